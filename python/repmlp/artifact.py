"""Checkpoint -> one verified, frozen TorchScript artifact with an embedded manifest.

Pipeline (one progress line per stage): load -> deploy (locality injection + BN folding) ->
script -> freeze -> save -> reload, each compared with the loaded model on a seeded batch.
The file is written to a temporary name in the target folder and renamed only when every
check passed; on any failure nothing is left behind. See docs/ARTIFACT.md for the contract.
"""

import contextlib
import datetime
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from . import __version__, integrity
from .checkpoints import CheckpointInfo, load_checkpoint, read_state_dict, detect_form
from .model import RepMLPNet, create_model, fuse_model
from .preprocess import ImageTransform
from .utils import count_flops, randomize_model_, sha256_file
from .variants import DEFAULT_ARCH, ArchConfig, Preprocessing, canonical_name, get_variant

__all__ = [
    "ARTIFACT_FORMAT_VERSION",
    "MANIFEST_NAME",
    "EXPORTED_METHODS",
    "BuildError",
    "ArtifactModule",
    "build_artifact",
    "read_manifest",
    "default_checkpoint",
]

# Bump when the artifact's methods or the manifest's meaning change; the C++ runtime checks it
# (cpp/include/repmlp_rt/runtime.hpp, kFormatVersion).
ARTIFACT_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
EXPORTED_METHODS = ("forward_images", "format_version", "input_shape", "labels", "compute_dtype")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Default verification tolerance: max |error| / max |reference logit|.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}
VERIFY_BATCH = 2
# torch 2.13+ warns on every torch.jit.script/freeze/save/load call; only those are silenced.
JIT_DEPRECATION_MESSAGE = r"`torch\.jit\.\w+` is deprecated"
VERIFY_SEED = 1234


class BuildError(ValueError):
    """The build cannot go on (bad input, failed verification, unwritable output)."""


def default_checkpoint() -> str:
    """The trained digits checkpoint shipped inside the package (examples/digits)."""
    return os.path.join(os.path.dirname(__file__), "data", "digits.pth")


class ArtifactModule(nn.Module):
    """What gets scripted: the fused model plus its input contract and preprocessing."""

    format_version_: torch.jit.Final[int]
    in_chans: torch.jit.Final[int]
    img_h: torch.jit.Final[int]
    img_w: torch.jit.Final[int]
    dtype_name: torch.jit.Final[str]

    def __init__(self, model: RepMLPNet, dtype_name: str = "float32") -> None:
        super().__init__()
        cfg = model.config
        self.model = model
        self.format_version_ = ARTIFACT_FORMAT_VERSION
        self.in_chans = cfg.in_channels
        self.img_h, self.img_w = cfg.img_size
        self.dtype_name = dtype_name
        self.label_list: List[str] = list(cfg.labels) if cfg.labels is not None else [
            str(i) for i in range(cfg.num_classes)
        ]
        self.image_transform = ImageTransform(cfg.preprocessing)
        self.compute_dtype_ = DTYPES[dtype_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float (N, C, H, W) -> float32 logits (N, num_classes)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[2] != self.img_h or x.shape[3] != self.img_w:
            raise ValueError(
                "expected a (N, {}, {}, {}) batch, got {}".format(
                    self.in_chans, self.img_h, self.img_w, list(x.shape)
                )
            )
        if not x.is_floating_point():
            raise ValueError("expected a floating-point batch, got {}".format(x.dtype))
        if x.shape[0] < 1:
            raise ValueError("expected a batch of N >= 1, got N = 0")
        return self.model(x.to(self.compute_dtype_)).float()

    @torch.jit.export
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB -> normalized float32 (N, 3, img_h, img_w)."""
        return self.image_transform(images)

    @torch.jit.export
    def forward_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB images of any size -> float32 logits, preprocessing included."""
        return self.forward(self.preprocess(images))

    @torch.jit.export
    def format_version(self) -> int:
        return self.format_version_

    @torch.jit.export
    def input_shape(self) -> List[int]:
        return [self.in_chans, self.img_h, self.img_w]

    @torch.jit.export
    def labels(self) -> List[str]:
        return self.label_list

    @torch.jit.export
    def compute_dtype(self) -> str:
        return self.dtype_name


@dataclass
class StageResult:
    stage: str
    seconds: float
    max_abs_err: Optional[float] = None
    max_rel_err: Optional[float] = None
    note: str = ""


@dataclass
class BuildReport:
    path: str
    manifest: Dict[str, Any]
    stages: List[StageResult] = field(default_factory=list)
    sha256: str = ""
    size_bytes: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "stages": [vars(s) for s in self.stages],
            "manifest": self.manifest,
        }


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript is deprecated in torch 2.13: silence exactly that warning around our calls."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, message=JIT_DEPRECATION_MESSAGE)
        yield


def read_manifest(path: str) -> Dict[str, Any]:
    """The manifest embedded in an artifact (raises BuildError if absent or unreadable)."""
    extra = {MANIFEST_NAME: ""}
    try:
        with _quiet_jit():
            torch.jit.load(path, map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise BuildError(f"cannot load artifact {path}: {_first_line(exc)}") from None
    if not extra[MANIFEST_NAME]:
        raise BuildError(f"{path} has no {MANIFEST_NAME}: not a RepMLP artifact")
    return json.loads(extra[MANIFEST_NAME])


def _errors(out: torch.Tensor, ref: torch.Tensor) -> Tuple[float, float]:
    diff = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return diff, diff / max(scale, 1e-12)


def _load_labels(path: str) -> Tuple[str, ...]:
    try:
        with open(path, encoding="utf-8") as fh:
            labels = tuple(line.rstrip("\r\n") for line in fh if line.strip())
    except OSError as exc:
        raise BuildError(f"cannot read labels file {path}: {exc.strerror}") from None
    return labels


def _override_preprocessing(cfg: ArchConfig, changes: Mapping[str, Any]) -> Preprocessing:
    allowed = {"mean", "std", "resize_mode", "resize", "interpolation", "antialias"}
    unknown = set(changes) - allowed
    if unknown:
        raise BuildError(f"unknown preprocessing option(s) {sorted(unknown)}; valid: {sorted(allowed)}")
    values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in changes.items() if v is not None}
    if isinstance(values.get("resize"), int):
        values["resize"] = (values["resize"], values["resize"])
    pre = replace(cfg.preprocessing, **values)
    try:
        pre.validate()
    except ValueError as exc:
        raise BuildError(f"preprocessing: {exc}") from None
    return pre


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _umask_file_mode() -> int:
    """0o666 less the process umask: the mode open() would give a new file (mkstemp gives 0o600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _arch_name(arch: Any) -> str:
    # The variant's own spelling ("b", "t224" -> "B224", "T224") names the file and the manifest.
    return (canonical_name(arch) or arch) if isinstance(arch, str) else "custom"


def default_out_path(arch: Any) -> str:
    """Where an artifact goes without ``out``: ``repmlp-<arch>.pt`` in the current folder."""
    return f"repmlp-{_arch_name(arch)}.pt"


def check_out_path(out: str, force: bool) -> None:
    """Raise BuildError unless ``out`` can be written (folder exists and is writable; no
    existing file unless ``force``)."""
    folder = os.path.dirname(os.path.abspath(out)) or "."
    if os.path.isdir(out):
        raise BuildError(f"--out {out} is a directory; give a file path")
    if os.path.exists(out) and not force:
        raise BuildError(f"{out} exists; pass --force to overwrite it")
    if not os.path.isdir(folder):
        raise BuildError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise BuildError(f"output folder {folder} is not writable")


def build_artifact(
    arch: Any = DEFAULT_ARCH,
    *,
    checkpoint: Optional[str] = None,
    out: Optional[str] = None,
    img_size: Any = None,
    num_classes: Optional[int] = None,
    labels: Optional[Sequence[str]] = None,
    labels_file: Optional[str] = None,
    preprocessing: Optional[Mapping[str, Any]] = None,
    dtype: str = "float32",
    device: str = "cpu",
    tolerance: Optional[float] = None,
    force: bool = False,
    seed: int = 0,
    randomize_bn: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    **overrides: Any,
) -> BuildReport:
    """Build, verify and atomically write an artifact; returns the report.

    Without ``checkpoint``, the default arch uses the shipped digits checkpoint and any other
    arch gets seeded random weights (with randomized BN statistics), recorded as such.
    ``preprocessing`` overrides fields of the variant's :class:`~repmlp.variants.Preprocessing`
    (``mean``, ``std``, ``resize_mode``, ``resize``, ``interpolation``, ``antialias``); the
    crop is always the input size.
    Raises :class:`BuildError` (a ``ValueError``) on bad input or failed verification.
    """
    say = progress or (lambda line: None)
    if dtype not in DTYPES:
        raise BuildError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tol = DEFAULT_TOLERANCE[dtype] if tolerance is None else float(tolerance)
    if not tol > 0:
        raise BuildError(f"tolerance must be > 0, got {tolerance}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BuildError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BuildError(f"device {device} asked for, but this torch has no usable CUDA")
    if dev.type not in ("cpu", "cuda"):
        raise BuildError(f"unsupported device {device!r}; expected cpu, cuda or cuda:N")
    cfg = get_variant(arch)
    arch_name = _arch_name(arch)
    if checkpoint is None and isinstance(arch, str) and get_variant(DEFAULT_ARCH) == cfg:
        checkpoint = default_checkpoint()
    if out is None:
        out = default_out_path(arch)
    check_out_path(out, force)

    stages: List[StageResult] = []

    def check(what: str, rel: float) -> None:
        if not rel <= tol:
            raise BuildError(f"{what}: relative error {rel:.3e} exceeds the tolerance {tol:.1e}")

    def stage(name: str, started: float, ref: Optional[torch.Tensor] = None, got: Optional[torch.Tensor] = None, note: str = "") -> None:
        result = StageResult(name, time.perf_counter() - started, note=note)
        line = f"[{len(stages) + 1}/6] {name:<8} {result.seconds:7.2f} s"
        if ref is not None and got is not None:
            result.max_abs_err, result.max_rel_err = _errors(got, ref)
            line += f"  max abs err {result.max_abs_err:.2e}, rel {result.max_rel_err:.2e}"
        if note:
            line += f"  {note}"
        stages.append(result)
        say(line)
        if result.max_rel_err is not None:
            check(f"stage {name}", result.max_rel_err)

    # 1. load
    t0 = time.perf_counter()
    ckpt_info: Optional[CheckpointInfo] = None
    form = "training"
    state = None
    if checkpoint is not None:
        state, _ = read_state_dict(checkpoint)
        form = detect_form(list(state))
    try:
        model = create_model(cfg, img_size=img_size, num_classes=num_classes, deploy=form == "deploy", **overrides)
    except RuntimeError as exc:  # allocation: fc3's weights grow with the square of the map's area
        raise BuildError(f"cannot create the model: {_first_line(exc)}") from None
    if model.config.num_classes < 1:
        raise BuildError(
            "an artifact serves class logits and needs num_classes >= 1 (docs/ARTIFACT.md); "
            "num_classes 0 (pooled features) is for the Python model only"
        )
    if labels_file is not None:
        labels = _load_labels(labels_file)
    if labels is not None:
        if len(labels) != model.config.num_classes:
            given = f"labels file {labels_file}" if labels_file is not None else "labels"
            raise BuildError(f"{given} has {len(labels)} labels, the model has {model.config.num_classes} classes")
        model.config = replace(model.config, labels=tuple(labels))
    if preprocessing:
        model.config = replace(model.config, preprocessing=_override_preprocessing(model.config, preprocessing))
    if state is not None:
        # The file was read once above; load_checkpoint saw a dict, so add its path and hash.
        ckpt_info = replace(
            load_checkpoint(model, state), path=os.path.abspath(checkpoint), sha256=sha256_file(checkpoint)
        )
        note = f"{os.path.basename(checkpoint)}: {ckpt_info.layout} layout, {ckpt_info.form} form"
    else:
        randomize_model_(model, seed=seed, randomize_bn=randomize_bn)
        note = f"random weights (seed {seed})"
    model = model.to(dev).eval()
    params_loaded = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(VERIFY_SEED)
    c, (h, w) = model.config.in_channels, model.config.img_size
    x = torch.randn(VERIFY_BATCH, c, h, w, generator=gen).to(dev)
    with torch.no_grad():
        reference = model(x).float()
    stage("load", t0, note=note)

    # 2. deploy form
    t0 = time.perf_counter()
    fused = fuse_model(model).to(DTYPES[dtype])
    wrapper = ArtifactModule(fused, dtype).to(dev).eval()
    with torch.no_grad():
        eager_out = wrapper(x)
    stage("deploy", t0, reference, eager_out, note=f"from {form} form")

    # The probe the runtime checks at load: the loaded (unfused, float32) model's outputs.
    probe = integrity.make_probe(
        model, lambda images: model(wrapper.preprocess(images)), (c, h, w), dev, seed=VERIFY_SEED + 1
    )
    probe_tolerance = integrity.probe_tolerances(dtype, str(dev), tol)

    tmp_path: Optional[str] = None
    try:
        with _quiet_jit():
            # 3. script
            t0 = time.perf_counter()
            scripted = torch.jit.script(wrapper)
            with torch.no_grad():
                scripted_out = scripted(x)
            stage("script", t0, reference, scripted_out)

            # 4. freeze
            t0 = time.perf_counter()
            frozen = torch.jit.freeze(scripted.eval(), preserved_attrs=list(EXPORTED_METHODS))
            with torch.no_grad():
                frozen_out = frozen(x)
            stage("freeze", t0, reference, frozen_out)

            # A JSON round trip turns tuples into lists, so later comparisons are like for like.
            manifest = _manifest(model, fused, arch_name, dtype, dev, tol, ckpt_info, seed, params_loaded, stages)
            manifest["probe"] = integrity.probe_section(
                probe, probe_tolerance, f"the loaded model in eval mode, float32, on {dev}"
            )
            manifest["digest"] = {
                "record": integrity.DIGEST_RECORD,
                "algorithm": integrity.DIGEST_ALGORITHM,
                "covers": "every other record of the archive, by name",
            }
            manifest = json.loads(json.dumps(manifest))

            # 5. save (temporary file in the target folder)
            t0 = time.perf_counter()
            folder = os.path.dirname(os.path.abspath(out))
            fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=folder)
            os.close(fd)
            torch.jit.save(frozen, tmp_path, _extra_files={
                MANIFEST_NAME: json.dumps(manifest, indent=2),
                integrity.PROBE_RECORD: integrity.probe_bytes(probe),
            })
            # The digest of every record goes in last, so the file is complete from here on:
            # what is verified below is what gets renamed into place, byte for byte.
            integrity.seal(tmp_path)
            stage("save", t0, note=f"{os.path.getsize(tmp_path) / 1e6:.1f} MB, sealed")

            # 6. reload and verify: the digest, the probe, both methods
            t0 = time.perf_counter()
            integrity.check_digest(tmp_path)
            extra = {MANIFEST_NAME: "", integrity.PROBE_RECORD: ""}
            reloaded = torch.jit.load(tmp_path, map_location=dev, _extra_files=extra)
            if json.loads(extra[MANIFEST_NAME]) != manifest:
                raise BuildError("the manifest read back differs from the one written")
            probe_err = integrity.probe_errors(reloaded, integrity.load_probe(extra[integrity.PROBE_RECORD]), dev)
            for method, rel in probe_err.items():
                if not rel <= probe_tolerance[dev.type]:
                    raise BuildError(
                        f"probe {method}: relative error {rel:.3e} exceeds the tolerance {probe_tolerance[dev.type]:.1e}"
                    )
            missing = [m for m in EXPORTED_METHODS if not hasattr(reloaded, m)]
            if missing:
                raise BuildError(f"the saved artifact lost its methods {missing}")
            images = torch.randint(0, 256, (VERIFY_BATCH, h + 7, w + 3, 3), generator=gen, dtype=torch.uint8).to(dev)
            with torch.no_grad():
                reloaded_out = reloaded(x)
                image_ref = model(wrapper.preprocess(images)).float()
                image_out = reloaded.forward_images(images)
            _, image_rel = _errors(image_out, image_ref)
            worst_probe = max(probe_err.values())
            stage("reload", t0, reference, reloaded_out,
                  note=f"forward_images rel err {image_rel:.2e}, probe {worst_probe:.2e}, digest ok")
            check("forward_images", image_rel)
            published_sha256 = sha256_file(tmp_path)
            os.chmod(tmp_path, _umask_file_mode())  # readable by a server running as another user
            os.replace(tmp_path, out)
            tmp_path = None
    except BuildError:
        raise
    except integrity.IntegrityError as exc:
        raise BuildError(f"the saved file fails its own digest: {exc}") from None
    except Exception as exc:
        raise BuildError(f"build failed: {_first_line(exc)}") from exc
    finally:
        if tmp_path is not None and os.path.exists(tmp_path):
            os.unlink(tmp_path)

    return BuildReport(
        path=os.path.abspath(out),
        manifest=manifest,
        stages=stages,
        sha256=published_sha256,
        size_bytes=os.path.getsize(out),
    )


def _manifest(
    model: RepMLPNet,
    fused: RepMLPNet,
    arch_name: str,
    dtype: str,
    device: torch.device,
    tolerance: float,
    ckpt: Optional[CheckpointInfo],
    seed: int,
    params_loaded: int,
    stages: List[StageResult],
) -> Dict[str, Any]:
    cfg = model.config
    labels = list(cfg.labels) if cfg.labels is not None else [str(i) for i in range(cfg.num_classes)]
    if ckpt is not None:
        weights: Dict[str, Any] = {
            "source": "checkpoint",
            "file": os.path.basename(ckpt.path or ""),
            "sha256": ckpt.sha256,
            "layout": ckpt.layout,
            "form": ckpt.form,
        }
    else:
        weights = {"source": "random", "seed": seed}
    return {
        "format": "repmlp-artifact",
        "format_version": ARTIFACT_FORMAT_VERSION,
        "arch": {"name": arch_name, "config": cfg.to_dict()},
        "input": {
            "method": "forward",
            "layout": "NCHW",
            "shape": [cfg.in_channels, cfg.img_size[0], cfg.img_size[1]],
            "batch": "dynamic (N >= 1)",
            "dtype": "float32",
            "compute_dtype": dtype,
            "normalized": True,
        },
        "preprocessing": {
            "method": "forward_images",
            "input": "uint8 (N, H, W, 3) RGB, any H and W",
            **cfg.preprocessing.to_dict(),
        },
        "output": {"kind": "logits", "dtype": "float32", "num_classes": cfg.num_classes, "labels": labels},
        "weights": weights,
        "deploy_form": "fused (locality injection + BN folding), fc3 as batched matmul",
        "model": {
            "params_loaded": params_loaded,
            "params_deploy": sum(p.numel() for p in fused.parameters()),
            "gflop_per_image": round(count_flops(fused) / 1e9, 4),
        },
        "build": {
            "repmlp_version": __version__,
            "torch_version": torch.__version__,
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "verify_device": str(device),
        },
        "verification": {
            "input": f"seeded N(0, 1) batch of {VERIFY_BATCH} (seed {VERIFY_SEED})",
            "reference": "the loaded model in eval mode, float32",
            "metric": "max |out - ref| / max |ref| over the logits",
            "tolerance": tolerance,
            "stages": [vars(s) for s in stages],
        },
    }
