"""Shared fixtures: seeded models with randomized BN statistics and real built artifacts."""

import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:  # the package is normally installed (pip install -e .); fall back to the source tree
    import repmlp  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(ROOT, "python"))

from repmlp import create_model  # noqa: E402
from repmlp.artifact import build_artifact  # noqa: E402
from repmlp.utils import randomize_model_  # noqa: E402



def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where torch sees a GPU and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA is not available")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# A small custom arch with every structural feature of the real ones (4 stages, sharesets > 1).
SMALL_ARCH = {"channels": [16, 32, 64, 128], "depths": [1, 1, 2, 1], "sharesets_nums": [1, 4, 8, 16]}


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def small_artifact(artifact_dir) -> str:
    """A real artifact: SMALL_ARCH, 32x32 input, 10 classes, seeded random weights, random BN."""
    path = os.path.join(artifact_dir, "small.pt")
    build_artifact(SMALL_ARCH, img_size=32, num_classes=10, out=path, seed=3)
    return path


@pytest.fixture(scope="session")
def digits_artifact(artifact_dir) -> str:
    """The embedded default: the shipped trained digits checkpoint."""
    path = os.path.join(artifact_dir, "digits.pt")
    build_artifact(out=path)
    return path


@pytest.fixture(scope="session")
def b224_artifact(artifact_dir) -> str:
    """Full-size B224 with seeded random weights and randomized BN (about 270 MB)."""
    path = os.path.join(artifact_dir, "b224.pt")
    build_artifact("B224", out=path, seed=5)
    return path


# Every artifact the C++ runtime must agree with Python on: a minimal contract-following fake
# (tests/runtime_helpers.py) and the real ones above.
RUNTIME_ARTIFACTS = ["fake_artifact", "small_artifact", "digits_artifact"]


@pytest.fixture(scope="session")
def fake_artifact(tmp_path_factory):
    import runtime_helpers

    return runtime_helpers.save_fake_artifact(tmp_path_factory.mktemp("fake") / "fake.pt")


@pytest.fixture(params=RUNTIME_ARTIFACTS)
def artifact(request):
    from pathlib import Path

    return Path(request.getfixturevalue(request.param))
