"""A build's options, each checked once, into one :class:`BuildOptions` value.

Errors name options by their keyword (``out``, ``force=True``, ``output='features'``); the
command line translates them into its flags. :class:`OptionError` marks the options that
contradict each other or the checkpoint (usage errors), before anything is built.
"""

import os
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from .. import integrity
from ..checkpoint_arch import CheckpointArch, arch_mismatches, infer_arch, matching_variant
from ..checkpoints import Checkpoint, read_checkpoint
from ..mm_config import config_from_meta, preprocessing_from_config
from ..model import check_out_indices, resolve_config
from ..quantize import int8_tolerance
from ..variants import DEFAULT_ARCH, ArchConfig, canonical_name, get_variant, official_preprocessing
from .contract import DTYPES, FORMAT_NAMES, OUTPUT_KINDS, OutputSpec
from .errors import BuildError, OptionError
from .formats import FORMATS

__all__ = [
    "ARCH_OPTIONS",
    "DEFAULT_TOLERANCE",
    "BuildOptions",
    "check_out_path",
    "default_checkpoint",
    "default_out_path",
    "output_spec",
    "resolve_options",
]

# Verification tolerance (max |error| / max |reference|): the self-check's CPU bound per
# dtype (int8: derived per architecture, repmlp.quantize.int8_tolerance).
DEFAULT_TOLERANCE = {dtype: bounds["cpu"] for dtype, bounds in integrity.PROBE_TOLERANCE.items()}
# build_artifact's architecture keywords -> ArchConfig fields.
ARCH_OPTIONS = {
    "channels": "channels",
    "depths": "depths",
    "sharesets": "sharesets",
    "kernels": "reparam_conv_kernels",
    "patch_size": "patch_size",
    "gp_ratio": "gp_ratio",
    "in_channels": "in_channels",
}


def default_checkpoint() -> str:
    """The trained digits checkpoint shipped inside the package (examples/digits)."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "digits.pth")


def _arch_name(arch: Any) -> str:
    # The variant's own spelling ("b", "t224" -> "B224", "T224") names the file and the manifest.
    name = canonical_name(arch) if isinstance(arch, str) else None
    return name or "custom"


def default_out_path(arch: Any, format: str = "torchscript") -> str:
    """Where an artifact goes without ``out``: ``repmlp-<arch>.pt`` (``.pt2`` for the
    ``aoti`` format) in the current folder."""
    return f"repmlp-{_arch_name(arch)}{FORMATS[format].suffix if format in FORMATS else '.pt'}"


def check_out_path(out: str, force: bool) -> None:
    """OptionError unless ``out`` can be written (folder exists and is writable; no existing
    file unless ``force``)."""
    folder = os.path.dirname(os.path.abspath(out)) or "."
    if os.path.isdir(out):
        raise OptionError(f"out {out} is a directory; give a file path", "out")
    if os.path.exists(out) and not force:
        raise OptionError(f"{out} exists; pass force=True to overwrite it", "out")
    if not os.path.isdir(folder):
        raise OptionError(f"output folder {folder} does not exist", "out")
    if not os.access(folder, os.W_OK):
        raise OptionError(f"output folder {folder} is not writable", "out")


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build needs, checked: the final architecture and where the weights come from."""

    arch_name: str
    config: ArchConfig  # input size, classes, labels and preprocessing already applied
    checkpoint: Optional[Checkpoint]  # None: seeded random weights
    out: str
    dtype: str
    device: torch.device
    tolerance: float
    seed: int = 0
    randomize_bn: bool = True
    output: OutputSpec = OutputSpec()
    format: str = "torchscript"  # one of FORMAT_NAMES
    arch_source: str = "variant"  # "variant", "options" or "checkpoint": where the numbers came from


def output_spec(
    kind: str,
    out_indices: Optional[Sequence[int]],
    final_norm: bool,
    pre_downsample: bool,
    num_classes: Optional[int],
    labels: Optional[Sequence[str]],
    labels_file: Optional[str],
) -> OutputSpec:
    """The output options, checked against each other (the stages against the arch later)."""
    if kind not in OUTPUT_KINDS:
        raise OptionError(f"output must be one of {', '.join(OUTPUT_KINDS)}, got {kind!r}", "output")
    if kind != "features":
        if out_indices is not None:
            raise OptionError(f"out_indices apply to output='features', not {kind}", "out_indices")
        if pre_downsample:
            raise OptionError(f"pre_downsample applies to output='features', not {kind}", "pre_downsample")
    if kind != "logits":
        if num_classes is not None:
            raise OptionError(f"num_classes applies to output='logits', not {kind} (no classifier)", "num_classes")
        if labels is not None or labels_file is not None:
            raise OptionError(f"labels apply to output='logits', not {kind} (no classes)", "labels")
    indices = tuple(OutputSpec().out_indices if out_indices is None else out_indices)
    return OutputSpec(kind, indices, bool(final_norm), bool(pre_downsample))


def _resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BuildError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BuildError(f"device {device} asked for, but this torch has no usable CUDA")
    if dev.type not in ("cpu", "cuda"):
        raise BuildError(f"unsupported device {device!r}; expected cpu, cuda or cuda:N")
    return dev


def _read_labels(path: str) -> Tuple[str, ...]:
    try:
        with open(path, encoding="utf-8") as fh:
            return tuple(line.rstrip("\r\n") for line in fh if line.strip())
    except OSError as exc:
        raise BuildError(f"cannot read labels file {path}: {exc.strerror}") from None


def _arch_changes(arch_options: Mapping[str, Any]) -> Dict[str, Any]:
    """The given architecture keywords as ArchConfig fields (``kernels=()``: no local branches)."""
    changes = {ARCH_OPTIONS[k]: v for k, v in arch_options.items() if v is not None}
    kernels = changes.get("reparam_conv_kernels")
    if kernels is not None and len(tuple(kernels)) == 0:
        changes["reparam_conv_kernels"] = None
    return changes


def _from_checkpoint(found: CheckpointArch, img_size: Any, meta_pre: Mapping[str, Any]) -> Tuple[str, ArchConfig]:
    """The variant the checkpoint's numbers match, or a custom config with them."""
    size = img_size if img_size is not None else meta_pre.get("img_size") or found.square_img_size()
    if size is None:
        raise OptionError(f"fc3's first partition ({found.areas[0]} positions) is not a square: give img_size", "img_size")
    size = (size, size) if isinstance(size, int) else tuple(size)
    custom = found.config(size, found.num_classes or 0)
    name = matching_variant(custom, found.kernels_known)
    if name is not None:
        return name, get_variant(name)
    return "custom", replace(custom, preprocessing=official_preprocessing(size))


def _resolve_arch(
    arch: Any, found: Optional[CheckpointArch], img_size: Any, changes: Dict[str, Any], meta_pre: Mapping[str, Any]
) -> Tuple[str, str, ArchConfig]:
    """(name, source, config before sizes and classes): from the checkpoint (``arch`` None or
    'auto'), a variant name or a custom dict; architecture keywords applied on top."""
    if arch in (None, "auto"):
        if found is None:
            if arch == "auto":
                raise OptionError("arch='auto' reads the architecture from a checkpoint: give checkpoint", "arch")
            arch = DEFAULT_ARCH
        else:
            name, base = _from_checkpoint(found, img_size, meta_pre)
            return name, "checkpoint", base
    if not isinstance(arch, (str, Mapping, ArchConfig)):
        raise OptionError(f"arch must be a variant name, 'auto' or a dict, got {type(arch).__name__}", "arch")
    try:
        base = get_variant(arch)
    except ValueError as exc:
        raise OptionError(str(exc), "arch") from None
    return _arch_name(arch), "variant" if isinstance(arch, str) and not changes else "options", base


def _apply(
    base: ArchConfig, changes: Dict[str, Any], img_size: Any, num_classes: Optional[int], meta_pre: Mapping[str, Any]
) -> ArchConfig:
    """The base config with the architecture keywords, the input size and the class count."""
    try:
        config = base.with_changes(changes) if changes else base
        size = img_size if img_size is not None else meta_pre.get("img_size")
        config = resolve_config(config, img_size=size, num_classes=num_classes)
        config.validate()
        return config
    except ValueError as exc:
        raise OptionError(str(exc), "img_size" if "input size" in str(exc) else None) from None


def _architecture(
    arch: Any,
    checkpoint: Optional[Checkpoint],
    img_size: Any,
    num_classes: Optional[int],
    kind: str,
    arch_options: Mapping[str, Any],
) -> Tuple[str, str, ArchConfig]:
    """The final (name, source, config): the checkpoint's numbers unless given, checked against them."""
    found = infer_arch(checkpoint) if checkpoint is not None else None
    meta_pre = preprocessing_from_config(config_from_meta(checkpoint.meta)) if checkpoint is not None else {}
    changes = _arch_changes(arch_options)
    name, source, base = _resolve_arch(arch, found, img_size, changes, meta_pre)
    if kind != "logits":
        num_classes = 0  # no classifier: a full checkpoint's head.* is left out
    elif num_classes is None and found is not None and found.num_classes is not None:
        num_classes = found.num_classes
    config = _apply(base, changes, img_size, num_classes, meta_pre)
    if found is not None:
        requested = "the options" if source == "checkpoint" else (f"arch={arch!r}" if isinstance(arch, str) else "arch")
        mismatches = arch_mismatches(found, config, requested)
        if mismatches:
            raise OptionError("; ".join(mismatches), "arch")
    if config.in_channels not in (1, 3):
        raise OptionError(f"forward_images takes RGB images: in_channels must be 1 or 3, got {config.in_channels}",
                          "in_channels")
    pre = {k: v for k, v in meta_pre.items() if k != "img_size"}
    if pre:
        config = replace(config, preprocessing=config.preprocessing.with_changes(pre))
    if changes and name != "custom" and matching_variant(config) != name:
        name = "custom"
    return name, source, config


def _checked_output(spec: OutputSpec, out_indices: Optional[Sequence[int]], config: ArchConfig) -> OutputSpec:
    if spec.kind == "features" and out_indices is None:  # every stage by default
        spec = replace(spec, out_indices=tuple(range(len(config.channels))))
    try:
        check_out_indices(spec.out_indices if spec.kind == "features" else (0,), len(config.channels))
    except ValueError as exc:
        raise OptionError(str(exc), "out_indices") from None
    if spec.kind != "features":
        spec = replace(spec, out_indices=tuple(range(len(config.channels))))
    if spec.kind == "logits" and config.num_classes < 1:
        raise OptionError(
            "a logits artifact needs num_classes >= 1; for the pooled features build "
            "output='embedding' (docs/BACKBONE.md)", "num_classes"
        )
    return spec


def _labelled(config: ArchConfig, labels: Optional[Sequence[str]], labels_file: Optional[str],
              checkpoint: Optional[Checkpoint]) -> ArchConfig:
    """The config with the given labels, else the class names the checkpoint's meta lists."""
    if labels_file is not None:
        labels = _read_labels(labels_file)
    if labels is not None:
        if len(labels) != config.num_classes:
            given = f"labels file {labels_file}" if labels_file is not None else "labels"
            raise BuildError(f"{given} has {len(labels)} labels, the model has {config.num_classes} classes")
        return replace(config, labels=tuple(labels))
    meta = checkpoint.meta if checkpoint is not None else None
    names = (meta or {}).get("CLASSES") or ((meta or {}).get("dataset_meta") or {}).get("classes")
    if config.labels is None and isinstance(names, (list, tuple)) and len(names) == config.num_classes > 0:
        return replace(config, labels=tuple(str(n) for n in names))
    return config


def _check_choices(format: str, dtype: str, tolerance: Optional[float]) -> None:
    if format not in FORMAT_NAMES:
        raise OptionError(f"format must be one of {', '.join(FORMAT_NAMES)}, got {format!r}", "format")
    if dtype not in DTYPES:
        raise OptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", "dtype")
    if dtype == "int8" and format != "torchscript":
        raise OptionError(f"dtype='int8' is built for the torchscript format only, got format={format} "
                          "(untested through AOTInductor; docs/PERFORMANCE.md)", "dtype")
    if tolerance is not None and not float(tolerance) > 0:
        raise OptionError(f"tolerance must be > 0, got {tolerance}", "tolerance")


def resolve_options(
    arch: Any = None,
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
    output: str = "logits",
    out_indices: Optional[Sequence[int]] = None,
    final_norm: Optional[bool] = None,
    pre_downsample: bool = False,
    format: str = "torchscript",
    **arch_options: Any,
) -> BuildOptions:
    """Check every option and read the checkpoint (once); see :func:`~.build.build_artifact`."""
    _check_choices(format, dtype, tolerance)
    unknown = sorted(set(arch_options) - set(ARCH_OPTIONS))
    if unknown:
        raise OptionError(f"unknown option(s) {unknown}", None)
    dev = _resolve_device(device)
    default_arch = arch is None or (isinstance(arch, str) and canonical_name(arch) == DEFAULT_ARCH)
    if checkpoint is None and default_arch and all(v is None for v in arch_options.values()):
        checkpoint = default_checkpoint()
    if out is not None:
        check_out_path(out, force)
    ckpt = read_checkpoint(checkpoint) if checkpoint is not None else None
    if final_norm is None:
        final_norm = infer_arch(ckpt).final_norm if ckpt is not None else True
    spec = output_spec(output, out_indices, final_norm, pre_downsample, num_classes, labels, labels_file)
    if format != "torchscript" and spec.kind != "logits":
        raise OptionError(f"format={format} builds logits artifacts; output={spec.kind} needs torchscript", "format")
    name, source, config = _architecture(arch, ckpt, img_size, num_classes, spec.kind, arch_options)
    spec = _checked_output(spec, out_indices, config)
    if out is None:
        out = default_out_path(name, format)
        check_out_path(out, force)
    config = _labelled(config, labels, labels_file, ckpt)
    if preprocessing:
        try:
            config = replace(config, preprocessing=config.preprocessing.with_changes(preprocessing))
        except ValueError as exc:
            raise BuildError(f"preprocessing: {exc}") from None
    if tolerance is None:
        tolerance = int8_tolerance(config) if dtype == "int8" else DEFAULT_TOLERANCE[dtype]
    return BuildOptions(
        arch_name=name, config=config, checkpoint=ckpt, out=out, dtype=dtype, device=dev,
        tolerance=float(tolerance), seed=seed, randomize_bn=randomize_bn, output=spec, format=format,
        arch_source=source,
    )
