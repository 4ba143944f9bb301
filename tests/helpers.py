"""Helpers shared by the tests (a plain module: import it as ``helpers``)."""

import os
import shutil
import sys

import torch

from repmlp import create_model
from repmlp.utils import randomize_model_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small custom arch with every structural feature of the real ones (4 stages, sharesets > 1).
SMALL_ARCH = {"channels": [16, 32, 64, 128], "depths": [1, 1, 2, 1], "sharesets_nums": [1, 4, 8, 16]}


# The runtime's progress lines while it plans its GEMMs on a first load (printed only when the
# plan takes over a second: a busy host, a new torch, a new artifact), not a command's own output.
PLAN_PROGRESS = ("repmlp_rt: measuring GEMM paths on this CPU", "repmlp_rt: GEMM plan measured in")


def without_plan_progress(stderr: str) -> str:
    """``stderr`` without the runtime's GEMM-planning progress lines (everything else kept)."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith(PLAN_PROGRESS))


def repmlp_infer_binary() -> str:
    """The installed repmlp_infer: on PATH (an activated venv, `make test`), else next to this
    interpreter. Missing is a failure, not a skip: the binary is part of what is tested."""
    beside = os.path.join(os.path.dirname(sys.executable), "repmlp_infer")
    found = shutil.which("repmlp_infer") or (beside if os.access(beside, os.X_OK) else None)
    assert found, "repmlp_infer is not installed: pip install --no-build-isolation -e ."
    return found


def relative_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """assert_close with rtol and an atol of rtol x the logit scale (logits near 0 have no
    meaningful relative error)."""
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def make_model(arch=SMALL_ARCH, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A seeded model in eval mode with random weights and randomized BN statistics."""
    model = create_model(arch, **kwargs)
    randomize_model_(model, seed=seed, randomize_bn=True)
    return model.eval()
