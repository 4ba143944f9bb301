"""What makes an artifact self-verifying: a stored probe and a digest of every record.

* The **probe** (record ``probe.pt``, described by the manifest's ``probe`` section) holds, for
  each entry point, a small seeded input and the output that the loaded eager model gave for
  it at build time. A runtime runs it as its warm-up call and refuses the artifact when the
  relative error exceeds the tolerance for its compute dtype and device: this catches a
  kernel that computes wrongly on the machine at hand, and corrupted weights that move
  the outputs.
* The **digest** (record ``digest.json``, added last) holds the SHA-256 of every other record
  of the archive (code, constants, weights, manifest, probe): bytes that the probe cannot see
  (labels, preprocessing constants, the manifest, a weight bit below the tolerance) cannot
  change silently either.

Both formats carry them under ``extra/``: a TorchScript file the probe as ``probe.pt``, a PT2
archive (``.pt2``) as ``probe.pt.b64``, the same bytes in base64, because torch's PT2 loader
reads every ``extra/`` record as UTF-8 text. docs/ARTIFACT.md describes the records; the C++
runtime checks them at load (cpp/src/integrity.cpp).
"""

import base64
import binascii
import hashlib
import io
import json
import zipfile
import zlib
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from .utils import output_error

__all__ = [
    "PROBE_RECORD",
    "PROBE_TEXT_RECORD",
    "DIGEST_RECORD",
    "IntegrityError",
    "probe_tolerances",
    "make_probe",
    "probe_bytes",
    "probe_text",
    "probe_record_contents",
    "load_probe",
    "read_probe_record",
    "probe_section",
    "digest_section",
    "probe_errors",
    "read_record",
    "record_digests",
    "seal",
    "check_digest",
]

# Extra-file names (both formats store them as extra/<name> inside the archive).
PROBE_RECORD = "probe.pt"  # TorchScript: the torch.save bytes
PROBE_TEXT_RECORD = "probe.pt.b64"  # PT2: the same bytes in base64 (its extra/ records are text)
DIGEST_RECORD = "digest.json"
PROBE_BATCH = 1  # the runtime's default warm-up batch: the probe replaces that call
DIGEST_ALGORITHM = "sha256"
METRIC = "max |out - ref| / max |ref| over the logits"

# Bound on the probe's relative error by compute dtype and device type (docs/ARTIFACT.md,
# "Self-check tolerances", derives them). float32 on CUDA is checked against float16's bound
# because cuDNN convolutions default to TF32, whose inputs keep float16's 10-bit mantissa.
PROBE_TOLERANCE: Dict[str, Dict[str, float]] = {
    "float32": {"cpu": 1e-4, "cuda": 2e-2},
    "float16": {"cpu": 2e-2, "cuda": 2e-2},
    "bfloat16": {"cpu": 6e-2, "cuda": 6e-2},
}


class IntegrityError(ValueError):
    """The artifact's records do not match its digest, or its probe is missing or unreadable."""


def probe_tolerances(dtype: str, build_device: str, build_tolerance: float) -> Dict[str, float]:
    """The per-device tolerances a build records: the table's, with the build's own tolerance
    for the device type it verified on."""
    if dtype in PROBE_TOLERANCE:
        tolerances = dict(PROBE_TOLERANCE[dtype])
    else:  # int8: the bound is derived per architecture (repmlp.quantize.int8_tolerance)
        tolerances = {"cpu": float(build_tolerance), "cuda": float(build_tolerance)}
    tolerances[torch.device(build_device).type] = float(build_tolerance)
    return tolerances


@torch.no_grad()
def make_probe(
    forward: Callable[[torch.Tensor], torch.Tensor],
    forward_images: Callable[[torch.Tensor], torch.Tensor],
    input_shape: Tuple[int, int, int],
    device: torch.device,
    seed: int,
) -> Dict[str, torch.Tensor]:
    """Seeded inputs for ``forward`` (float N(0, 1)) and ``forward_images`` (uint8 RGB of
    another size than the input, so resizing runs) with the outputs that the given reference
    callables (the eager model) return for them, as float32. Tensors are stored on the CPU."""
    c, h, w = input_shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(PROBE_BATCH, c, h, w, generator=gen)
    images = torch.randint(0, 256, (PROBE_BATCH, h + 7, w + 3, 3), generator=gen, dtype=torch.uint8)
    return {
        "forward/input": x,
        "forward/output": forward(x.to(device)).float().cpu(),
        "forward_images/input": images,
        "forward_images/output": forward_images(images.to(device)).float().cpu(),
    }


def probe_bytes(probe: Mapping[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in probe.items()}, buffer)
    return buffer.getvalue()


def probe_text(probe: Mapping[str, torch.Tensor]) -> str:
    """The probe as the PT2 archive stores it: :func:`probe_bytes` in base64."""
    return base64.b64encode(probe_bytes(probe)).decode("ascii")


def probe_record_contents(probe: Mapping[str, torch.Tensor], record: str) -> Any:
    """What a format writes under ``record`` (PROBE_RECORD: bytes, PROBE_TEXT_RECORD: base64
    text); :func:`read_probe_record` reads either back."""
    return probe_text(probe) if record == PROBE_TEXT_RECORD else probe_bytes(probe)


def load_probe(data: bytes) -> Dict[str, torch.Tensor]:
    try:
        probe = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise IntegrityError(f"the probe record {PROBE_RECORD} cannot be read: {type(exc).__name__}") from None
    if not isinstance(probe, dict) or not all(isinstance(v, torch.Tensor) for v in probe.values()):
        raise IntegrityError(f"the probe record {PROBE_RECORD} is not a dict of tensors")
    return probe


def probe_section(
    probe: Mapping[str, torch.Tensor], tolerances: Mapping[str, float], reference: str, record: str = PROBE_RECORD
) -> Dict:
    """The manifest's ``probe`` section (``record``: PROBE_RECORD or PROBE_TEXT_RECORD)."""
    entry_points: Dict[str, Dict] = {}
    for key, tensor in probe.items():
        method, role = key.split("/")
        entry_points.setdefault(method, {})[role] = {
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).replace("torch.", ""),
        }
    return {
        "record": record,
        "format": ("base64 of " if record == PROBE_TEXT_RECORD else "")
        + "torch.save of a dict of tensors, '<entry point>/input' and '<entry point>/output'",
        "entry_points": entry_points,
        "reference": reference,
        "metric": METRIC,
        "tolerance": dict(tolerances),
    }


def flatten_outputs(outputs: Any) -> torch.Tensor:
    """One tensor or a list of them (features artifacts) as (N, total) float32 on the CPU:
    each output flattened per sample and joined, the form the probe stores and the runtime
    compares."""
    parts = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return torch.cat([out.float().flatten(1).cpu() for out in parts], dim=1)


def probe_errors(module, probe: Mapping[str, torch.Tensor], device: torch.device) -> Dict[str, float]:
    """Relative error of each entry point of ``module`` on the probe (the manifest's metric)."""
    errors = {}
    with torch.no_grad(), torch.jit.optimized_execution(False):  # as the C++ runtime runs TorchScript
        for key in probe:
            method, role = key.split("/")
            if role != "input":
                continue
            out = flatten_outputs(getattr(module, method)(probe[key].to(device)))
            ref = probe[f"{method}/output"]
            if out.shape != ref.shape:
                raise IntegrityError(f"probe: {method} gave shape {list(out.shape)}, expected {list(ref.shape)}")
            errors[method] = output_error(out, ref)[1]
    return errors


def digest_section() -> Dict[str, str]:
    """The manifest's ``digest`` section."""
    return {
        "record": DIGEST_RECORD,
        "algorithm": DIGEST_ALGORITHM,
        "covers": "every other record of the archive, by name",
    }


def _top_folder(names: Sequence[str]) -> str:
    """The folder every record is under, with its slash, as torch's zip reader finds it (the
    first name up to its first "/": "archive/" in a PT2 archive, the file's stem in a TorchScript
    one); "" when the records are not all under one folder (names are then taken as they are)."""
    if not names or "/" not in names[0]:
        return ""
    top = names[0].split("/", 1)[0] + "/"
    return top if all(name.startswith(top) for name in names) else ""


def _records(archive: zipfile.ZipFile) -> Dict[str, zipfile.ZipInfo]:
    """Records by name without the archive's top folder, as the C++ reader names them."""
    infos = archive.infolist()
    top = _top_folder([info.filename for info in infos])
    records = {}
    for info in infos:
        name = info.filename[len(top):]
        if name in records:
            raise IntegrityError(f"the archive has two records named {name}")
        records[name] = info
    return records


def read_record(path: str, name: str) -> bytes:
    """The bytes of one record (named without the archive's top folder)."""
    with zipfile.ZipFile(path) as archive:
        info = _records(archive).get(name)
        if info is None:
            raise IntegrityError(f"{path} has no record {name}")
        return archive.read(info)


def read_probe_record(path: str) -> bytes:
    """The probe's torch.save bytes from either format's record (``extra/probe.pt``, or
    ``extra/probe.pt.b64`` decoded)."""
    with zipfile.ZipFile(path) as archive:
        records = _records(archive)
        if "extra/" + PROBE_RECORD in records:
            return archive.read(records["extra/" + PROBE_RECORD])
        if "extra/" + PROBE_TEXT_RECORD in records:
            try:
                return base64.b64decode(archive.read(records["extra/" + PROBE_TEXT_RECORD]), validate=True)
            except binascii.Error as exc:
                raise IntegrityError(f"{path}: the probe record {PROBE_TEXT_RECORD} is not base64: {exc}") from None
    raise IntegrityError(f"{path} has no probe record ({PROBE_RECORD} or {PROBE_TEXT_RECORD})")


def record_digests(path: str, skip: Optional[str] = "extra/" + DIGEST_RECORD) -> Dict[str, str]:
    """SHA-256 of every record of the zip archive at ``path`` (except ``skip``), by name."""
    digests = {}
    with zipfile.ZipFile(path) as archive:
        for name, info in sorted(_records(archive).items()):
            if name == skip:
                continue
            sha = hashlib.sha256()
            try:
                with archive.open(info) as stream:
                    for chunk in iter(lambda: stream.read(1 << 20), b""):
                        sha.update(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:  # a CRC-32 that fails, say
                raise IntegrityError(f"{path}: record {name} cannot be read (corrupt file): {exc}") from None
            digests[name] = sha.hexdigest()
    return digests


def seal(path: str) -> Dict[str, str]:
    """Append ``extra/digest.json`` (the SHA-256 of every other record) to the archive at
    ``path``, in place and stored uncompressed; returns the record digests."""
    digests = record_digests(path)
    with zipfile.ZipFile(path) as archive:
        top = _top_folder(archive.namelist())  # the new record goes where the others are
    body = json.dumps({"algorithm": DIGEST_ALGORITHM, "records": digests}, indent=1, sort_keys=True)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_STORED) as archive:
        info = zipfile.ZipInfo(f"{top}extra/{DIGEST_RECORD}", date_time=(1980, 1, 1, 0, 0, 0))
        archive.writestr(info, body)
    return digests


def check_digest(path: str) -> None:
    """Raise IntegrityError unless every record of ``path`` matches its ``digest.json``."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = _records(archive)
            entry = records.get("extra/" + DIGEST_RECORD)
            if entry is None:
                raise IntegrityError(f"{path} has no {DIGEST_RECORD} record")
            stored = json.loads(archive.read(entry))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        if isinstance(exc, IntegrityError):
            raise
        raise IntegrityError(f"{path}: cannot read the digest: {exc}") from None
    if not isinstance(stored, dict) or stored.get("algorithm") != DIGEST_ALGORITHM:
        raise IntegrityError(f"{path}: {DIGEST_RECORD} is not a {DIGEST_ALGORITHM} digest")
    actual = record_digests(path)
    expected = stored.get("records", {})
    if actual != expected:
        changed = sorted(set(actual) ^ set(expected) | {k for k in actual if expected.get(k) != actual[k]})
        raise IntegrityError(f"{path}: records differ from {DIGEST_RECORD}: {changed[:5]}")
