"""Shared fixtures: seeded models with randomized BN statistics and real built artifacts.
Plain helper functions live in tests/helpers.py (pytest.ini puts tests/ on the path)."""

import os

import pytest
import torch

from repmlp.artifact import build_artifact

from helpers import SMALL_ARCH


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where torch sees a GPU and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA is not available")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


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


@pytest.fixture(scope="module")
def fake_runtime(fake_artifact):
    """repmlp_rt.Runtime of the fake artifact, one per test module."""
    import repmlp_rt

    return repmlp_rt.Runtime(fake_artifact)


@pytest.fixture(params=RUNTIME_ARTIFACTS)
def artifact(request):
    from pathlib import Path

    return Path(request.getfixturevalue(request.param))
