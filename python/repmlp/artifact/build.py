"""Checkpoint -> one verified artifact file, as a pipeline of steps:

    resolve_options -> load_weights -> deploy -> the format's steps -> save -> reload -> publish

The format's steps (:mod:`.torchscript`: script, freeze; :mod:`.aoti`: export, compile) come
from its module. Every form the artifact takes is compared with the loaded model on the same
seeded inputs, through every entry point (:data:`.verify.CHECKS`); any error over the tolerance
stops the build. The file is written under a temporary name in the target folder and renamed
into place only after the bytes being renamed were reloaded and checked: on any failure nothing
is left behind.
"""

import os
import tempfile
import time
from typing import Any, Callable, Optional, Sequence, Tuple


from ..checkpoints import load_checkpoint
from ..model import RepMLPNet, fuse_model
from ..quantize import int8_weight_count, quantize_int8
from ..utils import count_flops, first_line, quiet_jit, randomize_model_
from .contract import DTYPES, Step
from .errors import BuildError
from .module import ArtifactModule, artifact_module, describe_outputs
from .options import BuildOptions, resolve_options
from .publish import load_checked, publish, write_form
from .state import BuildReport, BuildState, VerifyInputs
from .verify import ToleranceError, float64_error, make_probe, record_stage, reference_outputs

__all__ = ["build_artifact", "deploy", "load_weights"]


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


def deploy(model: RepMLPNet, options: BuildOptions) -> ArtifactModule:
    """The fused deploy form, cast to the compute dtype, wrapped with its contract."""
    fused = fuse_model(model).to(DTYPES[options.dtype])
    if options.dtype == "int8":
        fused = quantize_int8(fused)
    return artifact_module(fused, options.dtype, options.output.kind).to(options.device).eval()


def _save(state: BuildState, form: Any) -> Any:
    state.written = state.manifest()
    write_form(state, form, state.tmp_path, state.written)
    return form


def _reload(state: BuildState, form: Any) -> Any:
    return load_checked(state.format, state.options.device, state.tmp_path, state.written, form)


def _steps(state: BuildState) -> Sequence[Tuple[Step, Callable[[Any], Any]]]:
    """The format's steps, then save and reload, each as (step, form -> next form)."""
    inputs = state.inputs
    steps = [(step, lambda form, step=step: step.run(form, inputs.batch, inputs.images)) for step in state.format.steps]
    steps.append((Step("save", lambda *a: None, verify=False), lambda form: _save(state, form)))
    steps.append((Step("reload", lambda *a: None), lambda form: _reload(state, form)))
    return steps


def _advice(error: ToleranceError, model: RepMLPNet, state: BuildState) -> BuildError:
    """The error, with the weights' own float32 rounding error when that explains it."""
    own = float64_error(model, state.inputs, state.options.output.kind)
    if not own * 10 >= state.options.tolerance:
        return error
    suggested = float(f"{max(error.rel_err, own) * 2:.0e}")
    return BuildError(
        f"{error}; the loaded model's own float32 error against float64 is {own:.1e}: its weights are "
        f"ill-conditioned (activations of large scale), not the conversion; tolerance={suggested:g} would pass"
    )


def _run_steps(state: BuildState, module: Any, say: Callable[[str], None]) -> Any:
    with quiet_jit():
        for step, run in _steps(state):
            t0 = time.perf_counter()
            module = run(module)
            note = f"{os.path.getsize(state.tmp_path) / 1e6:.1f} MB" if step.name == "save" else ""
            record_stage(state, step.name, t0, module if step.verify else None, note=note, say=say)
    return module


def _start(opts: BuildOptions, say: Callable[[str], None]) -> Tuple[BuildState, RepMLPNet]:
    """Load the weights; the state with the reference outputs and the probe."""
    t0 = time.perf_counter()
    model, weights_note, head = load_weights(opts)
    inputs = VerifyInputs.make(opts.config, opts.device)
    state = BuildState(
        options=opts,
        inputs=inputs,
        reference=reference_outputs(model, opts.config, inputs, opts.output.kind),
        model_stats={"params_loaded": sum(p.numel() for p in model.parameters())},
        outputs=describe_outputs(model, opts.output.kind),
        head=head,
        probe=make_probe(model, opts),
    )
    record_stage(state, "load", t0, note=weights_note, say=say)
    return state, model


def _build(opts: BuildOptions, say: Callable[[str], None]) -> BuildReport:
    state, model = _start(opts, say)
    try:
        t0 = time.perf_counter()
        module: Any = deploy(model, opts)
        state.model_stats["params_deploy"] = sum(p.numel() for p in module.model.parameters()) + int8_weight_count(module.model)
        state.model_stats["gflop_per_image"] = round(count_flops(module.model) / 1e9, 4)
        record_stage(state, "deploy", t0, module, note=f"from {model.form} form", say=say)
        folder = os.path.dirname(os.path.abspath(opts.out))
        fd, state.tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(opts.out)}.", suffix=state.format.temp_suffix, dir=folder)
        os.close(fd)
        digest = publish(state, _run_steps(state, module, say), opts.out)
    except ToleranceError as exc:
        raise _advice(exc, model, state) from None
    except BuildError:
        raise
    except Exception as exc:
        raise BuildError(f"build failed: {first_line(exc)}") from exc
    finally:
        if state.tmp_path and os.path.exists(state.tmp_path):
            os.unlink(state.tmp_path)
    return BuildReport(
        path=os.path.abspath(opts.out),
        manifest=state.manifest(),
        stages=state.stages,
        sha256=digest,
        size_bytes=os.path.getsize(opts.out),
    )


def build_artifact(
    arch: Any = None,
    *,
    checkpoint: Optional[str] = None,
    out: Optional[str] = None,
    img_size: Any = None,
    num_classes: Optional[int] = None,
    labels: Optional[Sequence[str]] = None,
    labels_file: Optional[str] = None,
    preprocessing: Optional[dict] = None,
    dtype: str = "float32",
    format: str = "torchscript",
    output: str = "logits",
    out_indices: Optional[Sequence[int]] = None,
    final_norm: Optional[bool] = None,
    pre_downsample: bool = False,
    channels: Optional[Sequence[int]] = None,
    depths: Optional[Sequence[int]] = None,
    sharesets: Optional[Sequence[int]] = None,
    kernels: Optional[Sequence[int]] = None,
    patch_size: Optional[int] = None,
    gp_ratio: Optional[int] = None,
    in_channels: Optional[int] = None,
    device: str = "cpu",
    tolerance: Optional[float] = None,
    force: bool = False,
    seed: int = 0,
    randomize_bn: bool = True,
    progress: Optional[Callable[[str], None]] = None,
) -> BuildReport:
    """Build, verify and atomically write an artifact; returns the report.

    Args:
        arch: a variant name (:data:`~repmlp.variants.VARIANTS`, mmcls's ``b``), a custom dict
            (``channels``, ``depths``, ``sharesets_nums``, ...), or ``None``/``"auto"``: read
            from ``checkpoint`` (without one, ``None`` means the shipped digits model).
        checkpoint: official or mmcls/mmpretrain ``.pth``, training or deploy form. Without it
            the digits arch uses the shipped checkpoint and any other seeded random weights
            (with randomized BN statistics), recorded as such.
        out: the file to write (default ``repmlp-<arch>.pt``, ``.pt2`` for ``aoti``).
        img_size: input size, int or (H, W); default the variant's, the checkpoint config's
            center crop, or the square that fc3's size implies.
        num_classes: classifier width (default the variant's or the checkpoint's).
        labels, labels_file: class names (a list, or a text file of one per line).
        preprocessing: fields of :class:`~repmlp.variants.Preprocessing` to change (``mean``,
            ``std``, ``resize_mode``, ``resize``, ``interpolation``, ``antialias``); the crop
            is the input size. Default the variant's, else the checkpoint config's test pipeline.
        dtype: ``float32``, ``float16``, ``bfloat16`` or ``int8`` (torchscript only).
        format: ``torchscript`` (default) or ``aoti`` (torch.export + AOTInductor, logits only).
        output: ``logits``, ``features`` (the backbone's maps at ``out_indices``) or
            ``embedding`` (the pooled classifier input); ``pre_downsample`` and ``final_norm``
            as in :func:`~repmlp.model.create_model` (``final_norm`` default: as the checkpoint).
        channels, depths, sharesets, kernels, patch_size, gp_ratio, in_channels: the
            architecture (``kernels=()``: no local conv branches); each must agree with the
            checkpoint, whose values they default to.
        device: where verification runs (for ``aoti`` also the device compiled for).
        tolerance: max |error| / max |reference| at every stage (default per dtype).
        force: overwrite an existing ``out``.
        seed, randomize_bn: the random weights without a checkpoint.
        progress: called with one line per stage.

    Raises :class:`BuildError` (a ``ValueError``; :class:`OptionError` for options that
    contradict each other or the checkpoint) on bad input or failed verification, and
    :class:`~repmlp.checkpoints.CheckpointError` for an unreadable checkpoint.
    """
    arch_options = dict(channels=channels, depths=depths, sharesets=sharesets, kernels=kernels,
                        patch_size=patch_size, gp_ratio=gp_ratio, in_channels=in_channels)
    opts = resolve_options(
        arch, checkpoint=checkpoint, out=out, img_size=img_size, num_classes=num_classes, labels=labels,
        labels_file=labels_file, preprocessing=preprocessing, dtype=dtype, device=device, tolerance=tolerance,
        force=force, seed=seed, randomize_bn=randomize_bn, output=output, out_indices=out_indices,
        final_norm=final_norm, pre_downsample=pre_downsample, format=format, **arch_options,
    )
    return _build(opts, progress or (lambda line: None))
