"""Seeded, bounded fuzzing of every file the project reads: artifacts (TorchScript and .pt2),
checkpoints, .npy, PNG, JPEG.

Each case takes one intact file, mutates it (seeded: truncation, flipped bits, a zeroed 4 KiB
block, overwritten bytes, a flipped byte inside one zip record, a renamed zip record,
format-aware header edits) and
runs it through one entry point: ``repmlp_infer`` (a subprocess), ``repmlp_rt`` (in a worker
process) or the builder (``build_artifact``, in the worker). The outcome of every case is one of

  accepted:  error    a clean error: exit 1 or 2 with one ``repmlp_infer: error:`` line, or the
                      documented exception (ArtifactError, ValueError) with a one-line message
             same     exactly the intact file's output (bitwise logits, same labels/manifest)
             decoded  an input file (.npy, PNG, JPEG) whose mutation still decodes: the logits
                      equal those of the in-process runtime on what an independent decoder
                      (numpy for .npy, Pillow for PNG; for JPEG, which has no checksum, the
                      binding's own decoder) reads from the same file
             rebuilt  a checkpoint whose changed bytes still form valid weights: the artifact
                      built from it equals an eager model loaded from the same file
  failures:  crash (signal, or exit code other than 0/1/2), hang (over --timeout), unclean (a
             traceback, several lines, an undocumented exception; for a .pt2, files left in
             $TMPDIR, where the runtime unpacks it) and wrong (a result that matches neither
             the intact output nor the independent reference).

The .pt2 cases run with verification on (the default): with it off, a mutated compiled library
is loaded and run as it is, which may crash by design (docs/FORMATS.md).

``python tests/fuzz.py`` (``make fuzz``) runs 1,000 cases and prints the counts by outcome and
by target; it exits 1 if any case failed. ``tests/test_fuzz.py`` runs a smaller seeded subset.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ACCEPTED = ("error", "same", "decoded", "rebuilt")
FAILURES = ("crash", "hang", "unclean", "wrong")
# Share of the cases per target (the rest of the 1,000 go to the first entry).
MIX = {
    "artifact:repmlp_rt": 0.34,
    "artifact:repmlp_infer": 0.22,
    "pt2:repmlp_rt": 0.06,
    "pt2:repmlp_infer": 0.04,
    "npy:repmlp_infer": 0.14,
    "png:repmlp_infer": 0.08,
    "png:repmlp_rt": 0.06,
    "jpeg:repmlp_infer": 0.06,
    "checkpoint:build": 0.10,
}
ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-5  # "decoded"/"rebuilt" references: the same float32 math on another path


# ---------------------------------------------------------------------------------------------
# Mutations: bytes -> bytes, each seeded by the case's own numpy Generator.

def _zip_records(data: bytes) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each stored record, or [] when data is not a readable zip."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            records = []
            for info in archive.infolist():
                start = info.header_offset
                name_len, extra_len = struct.unpack("<HH", data[start + 26:start + 30])
                records.append((info.filename, start + 30 + name_len + extra_len, info.compress_size))
            return records
    except Exception:
        return []


def truncate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    cut = int(rng.integers(0, len(data)))
    return data[:cut], f"truncated to {cut} bytes"


def flip_bits(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    out = bytearray(data)
    count = int(rng.integers(1, 9))
    for _ in range(count):
        bit = int(rng.integers(0, len(out) * 8))
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out), f"{count} bit(s) flipped"


def zero_block(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    start = int(rng.integers(0, max(1, len(data) // 4096))) * 4096
    out = bytearray(data)
    out[start:start + 4096] = bytes(len(out[start:start + 4096]))
    return bytes(out), f"4 KiB zeroed at {start}"


def overwrite_bytes(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    count = int(rng.integers(1, 65))
    start = int(rng.integers(0, max(1, len(data) - count)))
    out = bytearray(data)
    out[start:start + count] = rng.integers(0, 256, len(out[start:start + count]), dtype=np.uint8).tobytes()
    return bytes(out), f"{count} random bytes at {start}"


def flip_in_record(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One flipped bit inside one (randomly chosen) record of a zip archive."""
    records = [r for r in _zip_records(data) if r[2] > 0]
    if not records:
        return flip_bits(data, rng)
    name, offset, size = records[int(rng.integers(0, len(records)))]
    out = bytearray(data)
    bit = int(rng.integers(0, size * 8))
    out[offset + bit // 8] ^= 1 << (bit % 8)
    return bytes(out), f"bit {bit} of record {name} flipped"


def rename_record(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One record under data/ renamed: climbing out of the archive, absolute, with a backslash,
    or taking another record's name (a duplicate)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            contents = [archive.read(info) for info in infos]
    except Exception:
        return flip_bits(data, rng)
    candidates = [i for i, info in enumerate(infos) if "/data/" in info.filename]
    if not candidates:
        return flip_bits(data, rng)
    chosen = candidates[int(rng.integers(0, len(candidates)))]
    old = infos[chosen].filename
    top, base = old.split("/", 1)[0], old.rsplit("/", 1)[1]
    style = int(rng.integers(0, 4))
    new = [old.rsplit("/", 1)[0] + "/" + "../" * int(rng.integers(1, 8)) + base,
           "/tmp/" + base,
           old.rsplit("/", 1)[0] + "/..\\" + base,
           infos[int(rng.integers(0, len(infos)))].filename][style]
    if style == 1:
        new = top + "/data/aotinductor/forward//" + base if rng.integers(0, 2) else new
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name": intended
        for i, (info, content) in enumerate(zip(infos, contents)):
            target.writestr(new if i == chosen else info.filename, content)
    return out.getvalue(), f"record {old} renamed {new!r}"


def edit_npy_header(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """A well-formed .npy header that lies: huge or wrong shape, Fortran order, another dtype."""
    header_len = struct.unpack("<H", data[8:10])[0]
    body = data[10 + header_len:]
    choice = int(rng.integers(0, 5))
    shape = (2, 1, 32, 32)
    descr, fortran = "<f4", False
    if choice == 0:
        shape = (int(rng.integers(1, 2**40)), 1, 32, 32)
    elif choice == 1:
        shape = tuple(int(v) for v in rng.integers(0, 64, int(rng.integers(0, 6))))
    elif choice == 2:
        fortran = True
    elif choice == 3:
        descr = str(rng.choice(["<f8", ">f4", "<f2", "|u1", "<i4", "|O", "<c8"]))
    else:
        shape = (10**30, 1, 32, 32)
    header = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    return data[:8] + struct.pack("<H", len(header)) + header.encode("latin1") + body, f"header {header.strip()}"


def edit_png_size(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """IHDR claims another (often huge) size, with a correct CRC: a decompression bomb."""
    width, height = (int(v) for v in rng.integers(1, 2**31 - 1, 2))
    if rng.random() < 0.5:
        width, height = int(rng.integers(10_000, 100_000)), int(rng.integers(10_000, 100_000))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return data[:12] + bytes(ihdr) + crc + data[33:], f"IHDR {width} x {height}"


def edit_jpeg_size(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """The SOF segment claims another (often huge) size."""
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        at = data.find(marker)
        if at >= 0:
            height, width = (int(v) for v in rng.integers(1, 65536, 2))
            out = bytearray(data)
            out[at + 5:at + 9] = struct.pack(">HH", height, width)
            return bytes(out), f"SOF {width} x {height}"
    return flip_bits(data, rng)


GENERIC = (truncate, flip_bits, zero_block, overwrite_bytes)
MUTATORS: dict[str, tuple[Callable, ...]] = {
    "artifact": GENERIC + (flip_in_record, flip_in_record, flip_in_record),
    "pt2": GENERIC + (flip_in_record, flip_in_record, rename_record),
    "checkpoint": GENERIC + (flip_in_record, flip_in_record),
    "npy": (truncate, flip_bits, overwrite_bytes, edit_npy_header, edit_npy_header),
    "png": (truncate, flip_bits, overwrite_bytes, edit_png_size),
    "jpeg": (truncate, flip_bits, overwrite_bytes, edit_jpeg_size),
}


# ---------------------------------------------------------------------------------------------
# Setup: the intact files and their outputs.

@dataclass
class Corpus:
    work: Path
    artifact: Path
    checkpoint: Path
    x_npy: Path
    png: Path
    jpeg: Path
    cli_stdout: str  # repmlp_infer on the intact artifact with x.npy and the PNG
    cli_logits: bytes  # its --output .npy
    infer: Path  # repmlp_infer binary
    pt2: Path  # the same model as an AOTInductor package
    pt2_cli_stdout: str
    pt2_cli_logits: bytes
    tmpdir: Path  # TMPDIR of every process the cases start: where a .pt2 is unpacked


def _quiet_torch():
    import torch

    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"`torch\.jit\.\w+` is deprecated")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.\w+` is deprecated")
    torch.set_num_threads(1)
    return torch


def _cli(corpus_infer: Path, args: list[str], timeout: float, tmpdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(corpus_infer), "--threads", "1", *args], capture_output=True,
                          timeout=timeout, check=False, env={**os.environ, "TMPDIR": str(tmpdir)})


def _intact_cli(infer: Path, artifact: Path, x_npy: Path, png: Path, tmpdir: Path) -> tuple[str, bytes]:
    out = artifact.with_suffix(".logits.npy")
    result = _cli(infer, [str(artifact), str(x_npy), str(png), "--output", str(out)], 120, tmpdir)
    if result.returncode != 0:
        raise SystemExit(f"repmlp_infer fails on the intact {artifact.name}: {result.stderr.decode(errors='replace')}")
    return result.stdout.decode(errors="replace"), out.read_bytes()


def make_corpus(work: Path, artifact_source: Path | None = None, pt2_source: Path | None = None) -> Corpus:
    """The intact files; ``artifact_source`` / ``pt2_source``: already built digits artifacts
    (TorchScript, .pt2) to reuse."""
    _quiet_torch()
    from PIL import Image

    from repmlp.artifact import build_artifact, default_checkpoint, read_manifest

    work.mkdir(parents=True, exist_ok=True)
    artifact = work / "digits.pt"
    if artifact_source is None:
        build_artifact(out=str(artifact), force=True)
    else:
        shutil.copyfile(artifact_source, artifact)
    c, h, w = read_manifest(str(artifact))["input"]["shape"]
    rng = np.random.default_rng(0)
    x_npy = work / "x.npy"
    np.save(x_npy, rng.standard_normal((2, c, h, w)).astype(np.float32))
    png = work / "image.png"
    Image.fromarray(rng.integers(0, 256, (h + 5, w + 3, 3), dtype=np.uint8)).save(png)
    jpeg = work / "image.jpg"
    smooth = np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), np.ones((6, 6, 1), dtype=np.uint8))
    Image.fromarray(smooth).save(jpeg, quality=90)
    checkpoint = work / "digits.pth"
    shutil.copyfile(default_checkpoint(), checkpoint)
    pt2 = work / "digits.pt2"
    if pt2_source is None:
        build_artifact(out=str(pt2), format="aoti", force=True)
    else:
        shutil.copyfile(pt2_source, pt2)
    tmpdir = work / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    infer = Path(shutil.which("repmlp_infer") or Path(sys.executable).with_name("repmlp_infer"))
    stdout, logits = _intact_cli(infer, artifact, x_npy, png, tmpdir)
    pt2_stdout, pt2_logits = _intact_cli(infer, pt2, x_npy, png, tmpdir)
    return Corpus(work, artifact, checkpoint, x_npy, png, jpeg, stdout, logits, infer, pt2, pt2_stdout,
                  pt2_logits, tmpdir)


def unpacked_leftovers(corpus: Corpus) -> list[str]:
    """What the runtime left in TMPDIR (nothing, once a .pt2 load has ended either way)."""
    return sorted(p.name for p in corpus.tmpdir.iterdir())


# ---------------------------------------------------------------------------------------------
# Running one case.

@dataclass
class Case:
    index: int
    target: str  # "<file kind>:<entry point>"
    path: Path
    mutation: str


def _clean_cli_error(result: subprocess.CompletedProcess) -> tuple[str, str]:
    stderr = result.stderr.decode(errors="replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    if result.returncode < 0:
        return "crash", f"signal {-result.returncode}: {stderr[-300:]}"
    if result.returncode not in (1, 2):
        return "crash", f"exit {result.returncode}: {stderr[-300:]}"
    if len(lines) != 1 or not lines[0].startswith("repmlp_infer: error: "):
        return "unclean", f"exit {result.returncode}, stderr {stderr[-500:]!r}"
    return "error", lines[0]


def run_cli_case(case: Case, corpus: Corpus, reference: "Reference", timeout: float) -> tuple[str, str]:
    kind = case.target.split(":")[0]
    out = case.path.with_suffix(".out.npy")
    if kind in ("artifact", "pt2"):
        args = [str(case.path), str(corpus.x_npy), str(corpus.png), "--output", str(out)]
    else:
        args = [str(corpus.artifact), str(case.path), "--output", str(out)]
    try:
        result = _cli(corpus.infer, args, timeout, corpus.tmpdir)
    except subprocess.TimeoutExpired:
        return "hang", f"over {timeout} s"
    if result.returncode != 0:
        return _clean_cli_error(result)
    if result.stderr.strip():
        return "unclean", f"exit 0 with stderr {result.stderr[-300:]!r}"
    logits = np.load(out) if out.exists() else None
    if kind in ("artifact", "pt2"):
        stdout, intact = (corpus.cli_stdout, corpus.cli_logits) if kind == "artifact" else (corpus.pt2_cli_stdout, corpus.pt2_cli_logits)
        same = result.stdout.decode(errors="replace") == stdout and out.read_bytes() == intact
        return ("same", "") if same else ("wrong", "the logits or the printed classes changed")
    expected = reference.for_input(kind, case.path)
    if expected is None:
        return "wrong", "accepted a file that the reference decoder refuses"
    if logits is None or logits.shape != expected.shape:
        return "wrong", f"logits {None if logits is None else logits.shape} vs reference {expected.shape}"
    if not same_numbers(logits, expected, RTOL):
        return "wrong", f"max |diff| {float(np.abs(logits - expected).max()):.3g}"
    return "decoded", ""


def same_numbers(got: np.ndarray, expected: np.ndarray, rtol: float) -> bool:
    """``got`` within ``rtol`` of ``expected``, relative to the largest finite |expected|.
    Extreme inputs or weights (1e37) may overflow inside the float32 model: a NaN or inf of the
    reference must then be the same NaN or inf in ``got``."""
    finite = np.abs(expected[np.isfinite(expected)])
    scale = float(finite.max()) if finite.size else 1.0
    return bool(np.allclose(got, expected, rtol=rtol, atol=rtol * (scale or 1.0), equal_nan=True))


class Reference:
    """Independent readers of mutated input files and the in-process runtime on the intact artifact."""

    def __init__(self, corpus: Corpus) -> None:
        import repmlp_rt

        self.runtime = repmlp_rt.Runtime(str(corpus.artifact), threads=1)
        self.repmlp_rt = repmlp_rt

    def for_input(self, kind: str, path: Path) -> np.ndarray | None:
        c, h, w = self.runtime.input_shape
        if kind == "npy":
            try:
                array = np.load(path, allow_pickle=False)
            except Exception:
                return None
            if (array.dtype != np.dtype("<f4") or np.isfortran(array) and array.ndim > 1
                    or array.shape[1:] != (c, h, w) or array.ndim != 4 or array.shape[0] < 1
                    or not np.isfinite(array).all()):
                return None
            return self.runtime.infer(np.ascontiguousarray(array))
        if kind == "png":
            from PIL import Image

            try:
                with Image.open(path) as image:
                    if image.format != "PNG":
                        return None
                    pixels = np.asarray(image.convert("RGB"))
            except Exception:
                return None
            return self.runtime.infer(pixels[None])
        # JPEG carries no checksum: a changed file that still decodes is another image. The
        # reference is the binding's decoder (stb_image, as the CLI) with the in-process runtime.
        try:
            pixels = self.repmlp_rt.decode_image(str(path))
        except ValueError:
            return None
        return self.runtime.infer(pixels[None])


# ---------------------------------------------------------------------------------------------
# The worker: repmlp_rt and builder cases in a separate process, so that a crash or a hang is
# recorded against its case instead of ending the run.

def worker_main(work: Path) -> None:
    torch = _quiet_torch()
    import repmlp_rt
    from PIL import Image
    from repmlp import create_model
    from repmlp.artifact import build_artifact
    from repmlp.checkpoints import load_checkpoint
    from repmlp.variants import DEFAULT_ARCH, get_variant

    state = json.loads((work / "corpus.json").read_text())
    x = np.load(state["x_npy"])
    with Image.open(state["png"]) as png:
        images = np.asarray(png.convert("RGB"))[None]
    def outputs(path: str) -> tuple:
        intact = repmlp_rt.Runtime(path, threads=1)
        return intact.infer(x), intact.infer(images), intact.labels, intact.manifest

    expected_by_kind = {"artifact": outputs(state["artifact"]), "pt2": outputs(state["pt2"])}

    def artifact_case(path: str, index: int, expected: tuple) -> tuple[str, str]:
        try:
            if index % 2:
                got = (repmlp_rt.infer(path, x), repmlp_rt.infer(path, images))
                runtime = repmlp_rt.Runtime(path, threads=1, warmup=0)
            else:
                runtime = repmlp_rt.Runtime(path, threads=1)
                got = (runtime.infer(x), runtime.infer(images))
            labels, manifest = runtime.labels, runtime.manifest
        except repmlp_rt.ArtifactError as exc:
            text = str(exc)
            return ("error", text) if "\n" not in text.strip() else ("unclean", text[:500])
        finally:
            repmlp_rt.clear_cache()
        same = (np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
                and labels == expected[2] and manifest == expected[3])
        return ("same", "") if same else ("wrong", "loaded, but the outputs, labels or manifest changed")

    def png_case(path: str) -> tuple[str, str]:
        try:
            pixels = repmlp_rt.decode_image(path)
        except ValueError as exc:
            text = str(exc)
            return ("error", text) if "\n" not in text.strip() else ("unclean", text[:500])
        try:
            with Image.open(path) as image:
                reference = np.asarray(image.convert("RGB"))
        except Exception as exc:
            return "wrong", f"decoded a file Pillow refuses ({type(exc).__name__}: {exc})"
        return ("decoded", "") if np.array_equal(pixels, reference) else ("wrong", "pixels differ from Pillow's")

    def checkpoint_case(path: str, index: int) -> tuple[str, str]:
        out = os.path.join(os.path.dirname(path), f"built-{index}.pt")
        try:
            build_artifact(checkpoint=path, out=out, force=True)
        except ValueError as exc:  # BuildError and CheckpointError are ValueErrors
            text = str(exc)
            return ("error", text) if "\n" not in text.strip() else ("unclean", text[:500])
        try:
            got = repmlp_rt.Runtime(out, threads=1).infer(x)
        finally:
            if os.path.exists(out):
                os.unlink(out)
        if np.array_equal(got, expected_by_kind["artifact"][0]):
            return "same", ""
        model = create_model(get_variant(DEFAULT_ARCH))
        load_checkpoint(model, path)
        with torch.no_grad():
            eager = model.eval()(torch.from_numpy(x)).numpy()
        if same_numbers(got, eager, 1e-4):
            return "rebuilt", ""
        return "wrong", "the artifact differs from the checkpoint it was built from"

    for line in sys.stdin:
        request = json.loads(line)
        kind = request["target"].split(":")[0]
        try:
            if kind in expected_by_kind:
                outcome = artifact_case(request["path"], request["index"], expected_by_kind[kind])
            elif kind == "png":
                outcome = png_case(request["path"])
            else:
                outcome = checkpoint_case(request["path"], request["index"])
        except Exception as exc:
            outcome = ("unclean", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-800:]}")
        print(json.dumps({"index": request["index"], "outcome": outcome[0], "detail": outcome[1][:600]}),
              flush=True)


class Worker:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.process: subprocess.Popen | None = None
        self.fresh = False

    def _start(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            self.fresh = True  # its first reply also waits for imports and the intact artifact
            self.process = subprocess.Popen(
                [sys.executable, __file__, "--worker", str(self.work)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(self.work / "tmpdir")},
            )
        return self.process

    def run(self, case: Case, timeout: float) -> tuple[str, str]:
        process = self._start()
        process.stdin.write(json.dumps({"index": case.index, "target": case.target, "path": str(case.path)}) + "\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], timeout + (120 if self.fresh else 0))
        self.fresh = False
        if not ready:
            self.stop()
            return "hang", f"over {timeout} s"
        line = process.stdout.readline()
        if not line:
            code = process.wait()
            err = process.stderr.read()[-400:]
            self.process = None
            return "crash", f"worker died ({'signal ' + str(-code) if code < 0 else 'exit ' + str(code)}): {err}"
        reply = json.loads(line)
        return reply["outcome"], reply["detail"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


# ---------------------------------------------------------------------------------------------

def plan(total: int, targets: Sequence[str] = tuple(MIX)) -> list[str]:
    """The target of each case, interleaved so that any prefix covers every target; ``targets``
    keeps their shares of MIX relative to each other."""
    mix = {target: MIX[target] for target in targets}
    weight = sum(mix.values())
    counts = {target: int(total * share / weight) for target, share in mix.items()}
    counts[next(iter(mix))] += total - sum(counts.values())
    order: list[str] = []
    left = dict(counts)
    while any(left.values()):
        for target in counts:
            if left[target]:
                order.append(target)
                left[target] -= 1
    return order


def fuzz(total: int, seed: int, timeout: float, work: Path, log: Callable[[str], None] = print,
         artifact: Path | None = None, targets: Sequence[str] = tuple(MIX), pt2: Path | None = None) -> dict:
    started = time.perf_counter()
    corpus = make_corpus(work, artifact, pt2)
    (work / "corpus.json").write_text(json.dumps({k: str(v) for k, v in vars(corpus).items() if isinstance(v, Path)}))
    reference = Reference(corpus)
    sources = {"artifact": corpus.artifact, "pt2": corpus.pt2, "checkpoint": corpus.checkpoint,
               "npy": corpus.x_npy, "png": corpus.png, "jpeg": corpus.jpeg}
    originals = {kind: path.read_bytes() for kind, path in sources.items()}
    cases_dir = work / "cases"
    cases_dir.mkdir(exist_ok=True)
    worker = Worker(work)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures: list[dict] = []
    try:
        for index, target in enumerate(plan(total, targets)):
            kind = target.split(":")[0]
            rng = np.random.default_rng([seed, index])
            mutators = MUTATORS[kind]
            mutate = mutators[int(rng.integers(0, len(mutators)))]
            data, mutation = mutate(originals[kind], rng)
            suffix = {"artifact": ".pt", "pt2": ".pt2", "checkpoint": ".pth", "npy": ".npy", "png": ".png",
                      "jpeg": ".jpg"}[kind]
            path = cases_dir / f"case{index:05d}{suffix}"
            path.write_bytes(data)
            case = Case(index, target, path, f"{mutate.__name__}: {mutation}")
            if target.endswith(":repmlp_infer"):
                outcome, detail = run_cli_case(case, corpus, reference, timeout)
            else:
                outcome, detail = worker.run(case, timeout)
            leftovers = unpacked_leftovers(corpus)
            if leftovers:
                if outcome not in FAILURES:
                    outcome, detail = "unclean", f"left {leftovers} in TMPDIR"
                for leftover in corpus.tmpdir.iterdir():
                    shutil.rmtree(leftover, ignore_errors=True)
            counts[target][outcome] += 1
            if outcome in FAILURES:
                failures.append({"case": index, "target": target, "mutation": case.mutation,
                                 "outcome": outcome, "detail": detail, "file": str(path)})
                log(f"case {index} ({target}, {case.mutation}): {outcome.upper()}: {detail[:300]}")
            else:
                path.unlink()
                for leftover in cases_dir.glob(f"case{index:05d}.*"):
                    leftover.unlink()
    finally:
        worker.stop()
    totals = collections.Counter()
    for per_target in counts.values():
        totals.update(per_target)
    return {"cases": total, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
            "by_target": {t: dict(c) for t, c in counts.items()}, "totals": dict(totals), "failures": failures}


def print_summary(summary: dict) -> None:
    outcomes = ACCEPTED + FAILURES
    width = max(len(t) for t in summary["by_target"]) + 2
    print(f"\nfuzz: {summary['cases']} cases, seed {summary['seed']}, {summary['seconds']} s")
    print(f"{'target':<{width}}" + "".join(f"{o:>9}" for o in outcomes))
    for target, per in summary["by_target"].items():
        print(f"{target:<{width}}" + "".join(f"{per.get(o, 0):>9}" for o in outcomes))
    print(f"{'total':<{width}}" + "".join(f"{summary['totals'].get(o, 0):>9}" for o in outcomes))
    bad = sum(summary["totals"].get(o, 0) for o in FAILURES)
    print(f"{bad} failure(s)" + ("" if not bad else f"; failing cases kept under {Path(summary['failures'][0]['file']).parent}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/fuzz.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="number of cases (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--work", type=Path, help="folder for the corpus and failing cases (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    parser.add_argument("--targets", nargs="+", choices=list(MIX), default=list(MIX),
                        help="fuzz only these targets (default: all, in the shares of MIX)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    if args.cases < 1:
        parser.error(f"--cases must be >= 1, got {args.cases}")
    work = args.work or Path(tempfile.mkdtemp(prefix="repmlp-fuzz-"))
    summary = fuzz(args.cases, args.seed, args.timeout, work, targets=args.targets)
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    failed = any(summary["totals"].get(o) for o in FAILURES)
    if not failed and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
