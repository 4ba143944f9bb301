"""Checkpoint -> one verified artifact file, as a pipeline of steps:

    resolve_options -> load_weights -> deploy -> the format's steps -> publish

The format's steps (``FORMATS``): script, freeze, save, reload for TorchScript (the default);
export, compile, save, reload for an AOTInductor package (.pt2, :mod:`.aoti`).

Every form the artifact takes is compared with the loaded model on the same seeded inputs,
through every entry point in ``CHECKS``; any error over the tolerance stops the build. The
file is written under a temporary name in the target folder and renamed into place only after
the bytes being renamed were reloaded and checked: on any failure nothing is left behind.
"""

import json
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .. import integrity
from ..checkpoints import Checkpoint, load_checkpoint, read_checkpoint
from ..model import RepMLPNet, fuse_model, resolve_config
from ..preprocess import ImageTransform
from ..quantize import int8_tolerance, int8_weight_count, quantize_int8
from ..utils import count_flops, output_error, quiet_jit, randomize_model_, script_module, sha256_file
from ..variants import DEFAULT_ARCH, ArchConfig, Preprocessing, canonical_name, get_variant
from .aoti import CompiledArtifact, Pt2Artifact, aoti_section, compile_programs, export_programs, write_pt2
from .errors import BuildError
from .manifest import MANIFEST_NAME, first_line, make_manifest, manifest_text, utc_now
from .module import DTYPES, EXPORTED_METHODS, OUTPUT_KINDS, ArtifactModule, OutputSpec, artifact_module, describe_outputs

__all__ = [
    "DEFAULT_TOLERANCE",
    "FORMATS",
    "BuildOptions",
    "BuildReport",
    "StageResult",
    "build_artifact",
    "check_out_path",
    "default_checkpoint",
    "default_out_path",
    "output_spec",
    "resolve_options",
]

# Default verification tolerance: max |error| / max |reference logit| (int8: int8_tolerance).
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}
VERIFY_BATCH = 2
VERIFY_SEED = 1234
PREPROCESSING_FIELDS = ("mean", "std", "resize_mode", "resize", "interpolation", "antialias")


def default_checkpoint() -> str:
    """The trained digits checkpoint shipped inside the package (examples/digits)."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "digits.pth")


def _arch_name(arch: Any) -> str:
    # The variant's own spelling ("b", "t224" -> "B224", "T224") names the file and the manifest.
    return (canonical_name(arch) or arch) if isinstance(arch, str) else "custom"


def default_out_path(arch: Any, format: str = "torchscript") -> str:
    """Where an artifact goes without ``out``: ``repmlp-<arch>.pt`` (``.pt2`` for the
    ``aoti`` format) in the current folder."""
    return f"repmlp-{_arch_name(arch)}{FORMATS[format].suffix if format in FORMATS else '.pt'}"


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


# --- 1. options ------------------------------------------------------------------------------


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
    format: str = "torchscript"  # a key of FORMATS


def resolve_options(
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
    output: str = "logits",
    out_indices: Optional[Sequence[int]] = None,
    final_norm: bool = True,
    pre_downsample: bool = False,
    format: str = "torchscript",
    **overrides: Any,
) -> BuildOptions:
    """Check every option and read the checkpoint (once); see :func:`build_artifact`."""
    if format not in FORMATS:
        raise BuildError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dtype not in DTYPES:
        raise BuildError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "int8" and format != "torchscript":
        raise BuildError(f"--dtype int8 is built for the torchscript format only, got --format {format} "
                         "(untested through AOTInductor; docs/PERFORMANCE.md)")
    if tolerance is not None and not float(tolerance) > 0:
        raise BuildError(f"tolerance must be > 0, got {tolerance}")
    dev = _resolve_device(device)
    if checkpoint is None and isinstance(arch, str) and get_variant(DEFAULT_ARCH) == get_variant(arch):
        checkpoint = default_checkpoint()
    out = default_out_path(arch, format) if out is None else out
    check_out_path(out, force)

    spec = output_spec(output, out_indices, final_norm, pre_downsample, num_classes, labels, labels_file)
    if format != "torchscript" and spec.kind != "logits":
        raise BuildError(f"--format {format} builds logits artifacts; --output {spec.kind} needs torchscript")
    if spec.kind != "logits":
        num_classes = 0  # no classifier: a full checkpoint's head.* is left out
    config = resolve_config(arch, img_size=img_size, num_classes=num_classes, **overrides)
    try:
        spec.validate(len(config.channels))
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    if spec.kind == "logits" and config.num_classes < 1:
        raise BuildError(
            "a logits artifact needs num_classes >= 1; for the pooled features build "
            "--output embedding (docs/BACKBONE.md)"
        )
    if labels_file is not None:
        labels = _read_labels(labels_file)
    if labels is not None:
        if len(labels) != config.num_classes:
            given = f"labels file {labels_file}" if labels_file is not None else "labels"
            raise BuildError(f"{given} has {len(labels)} labels, the model has {config.num_classes} classes")
        config = replace(config, labels=tuple(labels))
    if preprocessing:
        config = replace(config, preprocessing=_override_preprocessing(config.preprocessing, preprocessing))
    if tolerance is not None:
        tol = float(tolerance)
    else:  # int8: derived from the number of int8 GEMMs in sequence (repmlp.quantize.int8_tolerance)
        tol = int8_tolerance(config) if dtype == "int8" else DEFAULT_TOLERANCE[dtype]
    return BuildOptions(
        arch_name=_arch_name(arch),
        config=config,
        checkpoint=read_checkpoint(checkpoint) if checkpoint is not None else None,
        out=out,
        dtype=dtype,
        device=dev,
        tolerance=tol,
        seed=seed,
        randomize_bn=randomize_bn,
        output=spec,
        format=format,
    )


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
        raise BuildError(f"output must be one of {', '.join(OUTPUT_KINDS)}, got {kind!r}")
    if kind != "features":
        if out_indices is not None:
            raise BuildError(f"out_indices apply to --output features, not {kind}")
        if pre_downsample:
            raise BuildError(f"pre_downsample applies to --output features, not {kind}")
    if kind != "logits":
        if num_classes is not None:
            raise BuildError(f"num_classes applies to --output logits, not {kind} (no classifier)")
        if labels is not None or labels_file is not None:
            raise BuildError(f"labels apply to --output logits, not {kind} (no classes)")
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


def _override_preprocessing(base: Preprocessing, changes: Mapping[str, Any]) -> Preprocessing:
    unknown = set(changes) - set(PREPROCESSING_FIELDS)
    if unknown:
        raise BuildError(f"unknown preprocessing option(s) {sorted(unknown)}; valid: {sorted(PREPROCESSING_FIELDS)}")
    values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in changes.items() if v is not None}
    if isinstance(values.get("resize"), int):
        values["resize"] = (values["resize"], values["resize"])
    pre = replace(base, **values)
    try:
        pre.validate()
    except ValueError as exc:
        raise BuildError(f"preprocessing: {exc}") from None
    return pre


# --- 2. weights and the reference ------------------------------------------------------------


@dataclass(frozen=True)
class VerifyInputs:
    """Seeded inputs every form of the artifact is checked on, one per entry point."""

    batch: torch.Tensor  # normalized float (N, C, H, W)
    images: torch.Tensor  # uint8 (N, H', W', 3), deliberately not the input size

    @staticmethod
    def make(config: ArchConfig, device: torch.device) -> "VerifyInputs":
        gen = torch.Generator().manual_seed(VERIFY_SEED)
        c, (h, w) = config.in_channels, config.img_size
        batch = torch.randn(VERIFY_BATCH, c, h, w, generator=gen)
        images = torch.randint(0, 256, (VERIFY_BATCH, h + 7, w + 3, 3), generator=gen, dtype=torch.uint8)
        return VerifyInputs(batch.to(device), images.to(device))


def _outputs(result: Any) -> List[torch.Tensor]:
    """An entry point's outputs as a list: one tensor (logits, embedding) or the maps."""
    return [result] if isinstance(result, torch.Tensor) else list(result)


# The entry points every form is checked through, and how each is called.
CHECKS: Dict[str, Callable[[Any, VerifyInputs], List[torch.Tensor]]] = {
    "forward": lambda module, inputs: _outputs(module(inputs.batch)),
    "forward_images": lambda module, inputs: _outputs(module.forward_images(inputs.images)),
}


def load_weights(options: BuildOptions) -> Tuple[RepMLPNet, str, Optional[str]]:
    """The model in eval mode on the build device, with its weights; a line saying whence; and
    what became of the checkpoint's classifier (CheckpointInfo.head; None without one)."""
    ckpt = options.checkpoint
    try:
        model = RepMLPNet(
            options.config, deploy=ckpt is not None and ckpt.form == "deploy", **options.output.model_kwargs()
        )
    except RuntimeError as exc:  # allocation: fc3's weights grow with the square of the map's area
        raise BuildError(f"cannot create the model: {first_line(exc)}") from None
    head = None
    if ckpt is not None:
        head = load_checkpoint(model, ckpt).head
        note = f"{os.path.basename(ckpt.path or 'state dict')}: {ckpt.layout} layout, {ckpt.form} form"
        if head != "loaded":
            note += f", classifier {head}"
    else:
        randomize_model_(model, seed=options.seed, randomize_bn=options.randomize_bn)
        note = f"random weights (seed {options.seed})"
    return model.to(options.device).eval(), note, head


@torch.no_grad()
def reference_outputs(
    model: RepMLPNet, config: ArchConfig, inputs: VerifyInputs, kind: str = "logits"
) -> Dict[str, List[torch.Tensor]]:
    """What the loaded model gives through each entry point (eager preprocessing, float32):
    every output of the artifact's kind, in order."""
    transform = ImageTransform(config.preprocessing).to(inputs.images.device)

    def run(x: torch.Tensor) -> List[torch.Tensor]:
        outs = model.forward_backbone(x) if kind == "features" else [model(x)]
        return [out.float() for out in outs]

    return {"forward": run(inputs.batch), "forward_images": run(transform(inputs.images))}


def make_probe(model: RepMLPNet, options: "BuildOptions") -> Dict[str, torch.Tensor]:
    """The self-check probe stored in the artifact (repmlp.integrity): the loaded model's
    outputs for one seeded batch and one seeded image, the runtime's first warm-up call."""
    config = options.config
    transform = ImageTransform(config.preprocessing).to(options.device)
    shape = (config.in_channels, config.img_size[0], config.img_size[1])
    kind = options.output.kind

    def flat(x: torch.Tensor) -> torch.Tensor:
        return integrity.flatten_outputs(model.forward_backbone(x) if kind == "features" else model(x))

    return integrity.make_probe(flat, lambda images: flat(transform(images)), shape, options.device, seed=VERIFY_SEED + 1)


def deploy(model: RepMLPNet, options: BuildOptions) -> ArtifactModule:
    """The fused deploy form, cast to the compute dtype, wrapped with its contract."""
    fused = fuse_model(model).to(DTYPES[options.dtype])
    if options.dtype == "int8":
        fused = quantize_int8(fused)
    return artifact_module(fused, options.dtype, options.output.kind).to(options.device).eval()


# --- 3. the verified steps -------------------------------------------------------------------


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
    sha256: str = ""  # of the published file, which was reloaded and checked before the rename
    size_bytes: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "stages": [vars(s) for s in self.stages],
            "manifest": self.manifest,
        }


@dataclass
class _Build:
    """What the steps share: the options, the seeded inputs, the reference, the stage log."""

    options: BuildOptions
    inputs: VerifyInputs
    reference: Dict[str, List[torch.Tensor]]
    model_stats: Dict[str, Any]
    outputs: List[Dict[str, Any]]  # the manifest's description of every output, in order
    head: Optional[str] = None  # CheckpointInfo.head of the loaded checkpoint
    probe: Dict[str, torch.Tensor] = field(default_factory=dict)  # stored in the artifact; checked at load
    tmp_path: str = ""
    written: Dict[str, Any] = field(default_factory=dict)  # the manifest in tmp_path
    stages: List[StageResult] = field(default_factory=list)
    built_at: str = field(default_factory=utc_now)

    def manifest(self) -> Dict[str, Any]:
        """The manifest as of now: its verification lists the stages run so far."""
        return _manifest(self.options, self.model_stats, self.outputs, self.head, self.stages, self.built_at,
                         self.probe)

    @property
    def output_names(self) -> List[str]:
        return [output["name"] for output in self.outputs]


def _script(build: _Build, module: Any) -> Any:
    return script_module(module)


def _freeze(build: _Build, module: Any) -> Any:
    return torch.jit.freeze(module.eval(), preserved_attrs=list(EXPORTED_METHODS))


def _export(build: _Build, module: Any) -> Any:
    return export_programs(module, build.inputs.batch, build.inputs.images)


def _compile(build: _Build, exported: Any) -> Any:
    return compile_programs(exported)


def _save(build: _Build, module: Any) -> Any:
    build.written = build.manifest()
    _write(build, module, build.tmp_path, build.written)
    return module


def _reload(build: _Build, module: Any) -> Any:
    return _load_checked(build, build.tmp_path, build.written, module)


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[_Build, Any], Any]  # (build, previous form) -> next form
    verify: bool = True  # compare the new form's outputs with the reference


def _write_torchscript(module: Any, path: str, extra_files: Dict[str, Any]) -> None:
    torch.jit.save(module, path, _extra_files=extra_files)


def _load_torchscript(path: str, device: torch.device, written: Any) -> Tuple[Any, str]:
    extra = {MANIFEST_NAME: ""}
    reloaded = torch.jit.load(path, map_location=device, _extra_files=extra)
    missing = [m for m in EXPORTED_METHODS if not hasattr(reloaded, m)]
    if missing:
        raise BuildError(f"the saved artifact lost its methods {missing}")
    return reloaded, extra[MANIFEST_NAME]


def _write_pt2(form: Any, path: str, extra_files: Dict[str, Any]) -> None:
    write_pt2(form.compiled if isinstance(form, Pt2Artifact) else form, path, extra_files)


def _load_pt2(path: str, device: torch.device, written: Any) -> Tuple[Any, str]:
    compiled = written.compiled if isinstance(written, Pt2Artifact) else written
    assert isinstance(compiled, CompiledArtifact)
    reloaded = Pt2Artifact(path, device, compiled)
    return reloaded, manifest_text(reloaded.manifest)


@dataclass(frozen=True)
class ArtifactFormat:
    """One file format: the steps from the deploy form to a reloaded file, and its I/O."""

    suffix: str  # of the default output path
    temp_suffix: str  # of the temporary file it is written to first
    steps: Tuple[Step, ...]  # after "deploy" (the eager fused wrapper), in order
    write: Callable[[Any, str, Dict[str, Any]], None]  # (form, path, extra files: name -> contents)
    load: Callable[[str, torch.device, Any], Tuple[Any, str]]  # (path, device, form written) -> (form, manifest text)
    probe_record: str  # the probe's extra-file name: integrity.PROBE_RECORD (bytes) or PROBE_TEXT_RECORD


FORMATS: Dict[str, ArtifactFormat] = {
    "torchscript": ArtifactFormat(
        ".pt",
        ".tmp",
        (Step("script", _script), Step("freeze", _freeze), Step("save", _save, verify=False), Step("reload", _reload)),
        _write_torchscript,
        _load_torchscript,
        integrity.PROBE_RECORD,
    ),
    # torch.export + AOTInductor: one .pt2 archive with two compiled programs (aoti.py).
    "aoti": ArtifactFormat(
        ".pt2",
        ".tmp.pt2",  # AOTInductor's package loader warns about names not ending in .pt2
        (Step("export", _export), Step("compile", _compile, verify=False), Step("save", _save, verify=False), Step("reload", _reload)),
        _write_pt2,
        _load_pt2,
        integrity.PROBE_TEXT_RECORD,  # torch's PT2 loader reads extra records as UTF-8 text
    ),
}


def _format(build: _Build) -> ArtifactFormat:
    return FORMATS[build.options.format]


def _worst_output(outs: List[torch.Tensor], refs: List[torch.Tensor]) -> Tuple[float, float, int]:
    """(abs err, rel err, index) of the output with the largest relative error, each output
    measured against its own scale; a missing output or a wrong shape is a BuildError."""
    if len(outs) != len(refs):
        raise BuildError(f"{len(outs)} outputs, expected {len(refs)}")
    worst = (0.0, 0.0, 0)
    for index, (out, ref) in enumerate(zip(outs, refs)):
        if out.shape != ref.shape:
            raise BuildError(f"output {index} has shape {list(out.shape)}, expected {list(ref.shape)}")
        abs_err, rel_err = output_error(out, ref)
        if not rel_err <= worst[1]:  # NaN counts as the worst
            worst = (abs_err, rel_err, index)
    return worst


@torch.no_grad()
def _record(
    build: _Build, name: str, started: float, module: Any = None, note: str = "", say: Callable[[str], None] = print
) -> None:
    """Log one stage; with a module, check every entry point against the reference."""
    result = StageResult(name, 0.0, note=note)
    worst_check = ""
    if module is not None:
        per_check = {}
        # The graph executor's optimizing mode off, as the C++ runtime runs TorchScript: checks
        # the graph that will run, and spares the int8 graph 2-3 s of profiling per method.
        with torch.jit.optimized_execution(False):
            for check, call in CHECKS.items():
                per_check[check] = _worst_output(call(module, build.inputs), build.reference[check])
        worst_check = max(per_check, key=lambda c: per_check[c][1])
        result.max_abs_err, result.max_rel_err, index = per_check[worst_check]
        if len(build.output_names) > 1:
            worst_check += f" {build.output_names[index]}"
        images_rel = per_check["forward_images"][1]
        result.note = (note + "  " if note else "") + f"forward_images rel err {images_rel:.2e}"
    result.seconds = time.perf_counter() - started
    stage_count = 2 + len(_format(build).steps)  # load and deploy, then the format's steps
    line = f"[{len(build.stages) + 1}/{stage_count}] {name:<8} {result.seconds:7.2f} s"
    if result.max_rel_err is not None:
        line += f"  max abs err {result.max_abs_err:.2e}, rel {result.max_rel_err:.2e}"
    if result.note:
        line += f"  {result.note}"
    build.stages.append(result)
    say(line)
    if result.max_rel_err is not None and not result.max_rel_err <= build.options.tolerance:
        raise BuildError(
            f"stage {name}: {worst_check} relative error {result.max_rel_err:.3e} exceeds the "
            f"tolerance {build.options.tolerance:.1e}"
        )


# --- 4. writing -----------------------------------------------------------------------------


def _write(build: _Build, form: Any, path: str, manifest: Dict[str, Any]) -> None:
    """Write a form in the build's format with its manifest and self-check probe, then append
    the digest of every record (seal) before anything reads it back (docs/ARTIFACT.md)."""
    fmt = _format(build)
    probe = integrity.probe_record_contents(build.probe, fmt.probe_record)
    fmt.write(form, path, {MANIFEST_NAME: manifest_text(manifest), fmt.probe_record: probe})
    integrity.seal(path)


def _load_checked(build: _Build, path: str, manifest: Dict[str, Any], written: Any) -> Any:
    """Reload a written file as the runtime will: every record against its digest first (a
    .pt2's programs are shared libraries, loaded only once their bytes are known to be the
    ones written), then the file itself, whose manifest (and methods) must be the ones
    written, and the stored probe within its tolerance."""
    try:
        integrity.check_digest(path)
    except integrity.IntegrityError as exc:
        raise BuildError(f"the written file fails its own digest: {exc}") from None
    reloaded, text = _format(build).load(path, build.options.device, written)
    if json.loads(text) != manifest:
        raise BuildError("the manifest read back differs from the one written")
    device = build.options.device
    tolerance = manifest["probe"]["tolerance"][device.type]
    probe = integrity.load_probe(integrity.read_probe_record(path))
    for method, rel in integrity.probe_errors(reloaded, probe, device).items():
        if not rel <= tolerance:
            raise BuildError(f"the stored probe's {method}: relative error {rel:.3e} exceeds the tolerance {tolerance:.1e}")
    return reloaded


def _umask_file_mode() -> int:
    """0o666 less the process umask: the mode open() would give a new file (mkstemp gives 0o600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@torch.no_grad()
def _publish(build: _Build, verified: Any, out: str) -> str:
    """Write the final file (its manifest now lists every stage), reload that file and check
    it like the reload stage, then rename those same bytes into place. Returns their sha256."""
    final = build.manifest()
    _write(build, verified, build.tmp_path, final)
    digest = sha256_file(build.tmp_path)
    reloaded = _load_checked(build, build.tmp_path, final, verified)
    for check, call in CHECKS.items():
        _, rel, _ = _worst_output(call(reloaded, build.inputs), build.reference[check])
        if not rel <= build.options.tolerance:
            raise BuildError(f"the final file's {check}: relative error {rel:.3e} exceeds the tolerance")
    if sha256_file(build.tmp_path) != digest:
        raise BuildError("the artifact changed on disk while it was being verified")
    os.chmod(build.tmp_path, _umask_file_mode())  # readable by a server running as another user
    os.replace(build.tmp_path, out)
    return digest


# --- the pipeline ---------------------------------------------------------------------------


def build_artifact(
    arch: Any = DEFAULT_ARCH,
    *,
    progress: Optional[Callable[[str], None]] = None,
    **options: Any,
) -> BuildReport:
    """Build, verify and atomically write an artifact; returns the report.

    Options (keyword-only, see :func:`resolve_options`): ``checkpoint``, ``out``,
    ``img_size``, ``num_classes``, ``labels`` or ``labels_file``, ``preprocessing`` (fields of
    :class:`~repmlp.variants.Preprocessing`: ``mean``, ``std``, ``resize_mode``, ``resize``,
    ``interpolation``, ``antialias``; the crop is always the input size), ``dtype``,
    ``device`` (verification; for ``aoti`` also the device compiled for), ``tolerance``,
    ``force``, ``seed``, ``randomize_bn``, ``format`` (``torchscript``, the default, or
    ``aoti``: see :data:`FORMATS`) and any other :class:`~repmlp.variants.ArchConfig` field.
    Without ``checkpoint``, the default arch uses the shipped digits checkpoint and any other
    arch gets seeded random weights (with randomized BN statistics), recorded as such.
    Raises :class:`BuildError` (a ``ValueError``) on bad input or failed verification.
    """
    say = progress or (lambda line: None)
    opts = resolve_options(arch, **options)

    t0 = time.perf_counter()
    model, weights_note, head = load_weights(opts)
    inputs = VerifyInputs.make(opts.config, opts.device)
    build = _Build(
        options=opts,
        inputs=inputs,
        reference=reference_outputs(model, opts.config, inputs, opts.output.kind),
        model_stats={"params_loaded": sum(p.numel() for p in model.parameters())},
        outputs=describe_outputs(model, opts.output.kind),
        head=head,
        probe=make_probe(model, opts),
    )
    _record(build, "load", t0, note=weights_note, say=say)

    t0 = time.perf_counter()
    module: Any = deploy(model, opts)
    build.model_stats["params_deploy"] = sum(p.numel() for p in module.model.parameters()) + int8_weight_count(module.model)
    build.model_stats["gflop_per_image"] = round(count_flops(module.model) / 1e9, 4)
    _record(build, "deploy", t0, module, note=f"from {model.form} form", say=say)

    folder = os.path.dirname(os.path.abspath(opts.out))
    try:
        fd, build.tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(opts.out)}.", suffix=_format(build).temp_suffix, dir=folder)
        os.close(fd)
        with quiet_jit():
            for step in _format(build).steps:
                t0 = time.perf_counter()
                module = step.run(build, module)
                note = f"{os.path.getsize(build.tmp_path) / 1e6:.1f} MB" if step.name == "save" else ""
                _record(build, step.name, t0, module if step.verify else None, note=note, say=say)
            digest = _publish(build, module, opts.out)
    except BuildError:
        raise
    except Exception as exc:
        raise BuildError(f"build failed: {first_line(exc)}") from exc
    finally:
        if os.path.exists(build.tmp_path):
            os.unlink(build.tmp_path)

    return BuildReport(
        path=os.path.abspath(opts.out),
        manifest=build.manifest(),
        stages=build.stages,
        sha256=digest,
        size_bytes=os.path.getsize(opts.out),
    )


def _manifest(
    opts: BuildOptions,
    model_stats: Dict[str, Any],
    outputs: List[Dict[str, Any]],
    head: Optional[str],
    stages: List[StageResult],
    built_at: str,
    probe: Dict[str, torch.Tensor],
) -> Dict[str, Any]:
    manifest = make_manifest(
        opts,
        outputs=outputs,
        head=head,
        model_stats=model_stats,
        built_at=built_at,
        verification={
            "input": f"seeded N(0, 1) batch of {VERIFY_BATCH} and uint8 images of another size (seed {VERIFY_SEED})",
            "reference": "the loaded model in eval mode, float32 (eager preprocessing for images)",
            "entry_points": list(CHECKS),
            "metric": "max |out - ref| / max |ref| per output, the worst output and entry point",
            "tolerance": opts.tolerance,
            "stages": [vars(s) for s in stages],
        },
    )
    manifest["file_format"] = opts.format
    if opts.format == "aoti":
        manifest["aoti"] = aoti_section(opts.device)
    tolerances = integrity.probe_tolerances(opts.dtype, str(opts.device), opts.tolerance)
    manifest["probe"] = integrity.probe_section(
        probe, tolerances, f"the loaded model in eval mode, float32, on {opts.device}", FORMATS[opts.format].probe_record
    )
    manifest["digest"] = integrity.digest_section()
    return manifest
