"""Verification: the loaded model's reference outputs, the stored probe, and each stage's check."""

import copy
import time
from typing import Any, Callable, Dict, List, Tuple

import torch

from .. import integrity
from ..model import RepMLPNet
from ..preprocess import ImageTransform
from ..utils import output_error
from .errors import BuildError
from .options import BuildOptions
from .state import ENTRY_POINTS, VERIFY_SEED, BuildState, StageResult, VerifyInputs

__all__ = ["CHECKS", "ToleranceError", "float64_error", "make_probe", "record_stage", "reference_outputs", "worst_output"]


class ToleranceError(BuildError):
    """A stage's outputs are further from the reference than the tolerance allows."""

    def __init__(self, message: str, rel_err: float) -> None:
        super().__init__(message)
        self.rel_err = rel_err


def _outputs(result: Any) -> List[torch.Tensor]:
    """An entry point's outputs as a list: one tensor (logits, embedding) or the maps."""
    return [result] if isinstance(result, torch.Tensor) else list(result)


# The entry points every form is checked through, and how each is called.
CHECKS: Dict[str, Callable[[Any, VerifyInputs], List[torch.Tensor]]] = {
    "forward": lambda module, inputs: _outputs(module(inputs.batch)),
    "forward_images": lambda module, inputs: _outputs(module.forward_images(inputs.images)),
}
assert tuple(CHECKS) == ENTRY_POINTS


def _model_outputs(model: RepMLPNet, kind: str, x: torch.Tensor) -> List[torch.Tensor]:
    return [out.float() for out in (model.forward_backbone(x) if kind == "features" else [model(x)])]


@torch.no_grad()
def reference_outputs(model: RepMLPNet, config: Any, inputs: VerifyInputs, kind: str = "logits") -> Dict[str, List[torch.Tensor]]:
    """What the loaded model gives through each entry point (eager preprocessing, float32):
    every output of the artifact's kind, in order."""
    transform = ImageTransform(config.preprocessing, config.in_channels).to(inputs.images.device)
    return {
        "forward": _model_outputs(model, kind, inputs.batch),
        "forward_images": _model_outputs(model, kind, transform(inputs.images)),
    }


def make_probe(model: RepMLPNet, options: BuildOptions) -> Dict[str, torch.Tensor]:
    """The self-check probe stored in the artifact (repmlp.integrity): the loaded model's
    outputs for one seeded batch and one seeded image, the runtime's first warm-up call."""
    config = options.config
    transform = ImageTransform(config.preprocessing, config.in_channels).to(options.device)
    shape = (config.in_channels, config.img_size[0], config.img_size[1])
    kind = options.output.kind

    def flat(x: torch.Tensor) -> torch.Tensor:
        return integrity.flatten_outputs(model.forward_backbone(x) if kind == "features" else model(x))

    return integrity.make_probe(flat, lambda images: flat(transform(images)), shape, options.device, seed=VERIFY_SEED + 1)


@torch.no_grad()
def float64_error(model: RepMLPNet, inputs: VerifyInputs, kind: str) -> float:
    """The loaded model's own float32 error against float64 on the verification batch: how
    far rounding alone moves these weights' outputs."""
    wide = copy.deepcopy(model).double()
    refs = _model_outputs(wide, kind, inputs.batch.double())
    return worst_output(_model_outputs(model, kind, inputs.batch), refs)[1]


def worst_output(outs: List[torch.Tensor], refs: List[torch.Tensor]) -> Tuple[float, float, int]:
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
def _check(state: BuildState, module: Any, result: StageResult, note: str) -> str:
    """Every entry point of ``module`` against the reference; fills ``result``, returns the
    worst entry point (and output)."""
    per_check = {}
    # The graph executor's optimizing mode off, as the C++ runtime runs TorchScript: checks
    # the graph that will run, and spares the int8 graph 2-3 s of profiling per method.
    with torch.jit.optimized_execution(False):
        for check, call in CHECKS.items():
            per_check[check] = worst_output(call(module, state.inputs), state.reference[check])
    worst = max(per_check, key=lambda c: per_check[c][1])
    result.max_abs_err, result.max_rel_err, index = per_check[worst]
    if len(state.output_names) > 1:
        worst += f" {state.output_names[index]}"
    result.note = (note + "  " if note else "") + f"forward_images rel err {per_check['forward_images'][1]:.2e}"
    return worst


def record_stage(
    state: BuildState, name: str, started: float, module: Any = None, note: str = "", say: Callable[[str], None] = print
) -> None:
    """Log one stage; with a module, check every entry point against the reference
    (ToleranceError past the tolerance)."""
    result = StageResult(name, 0.0, note=note)
    worst = _check(state, module, result, note) if module is not None else ""
    result.seconds = time.perf_counter() - started
    stage_count = 4 + len(state.format.steps)  # load and deploy, the format's steps, save and reload
    line = f"[{len(state.stages) + 1}/{stage_count}] {name:<8} {result.seconds:7.2f} s"
    if result.max_rel_err is not None:
        line += f"  max abs err {result.max_abs_err:.2e}, rel {result.max_rel_err:.2e}"
    if result.note:
        line += f"  {result.note}"
    state.stages.append(result)
    say(line)
    tolerance = state.options.tolerance
    if result.max_rel_err is not None and not result.max_rel_err <= tolerance:
        raise ToleranceError(
            f"stage {name}: {worst} relative error {result.max_rel_err:.3e} exceeds the tolerance {tolerance:.1e}",
            result.max_rel_err,
        )
