"""The whole chain on one input: training-form eager -> deploy eager -> scripted -> saved and
reloaded -> C++ via repmlp_rt -> the repmlp_infer binary; on the digits model and on B224."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from repmlp import fuse_model, load_checkpoint, create_model, reparameterize_model
from repmlp.artifact import ArtifactModule, build_artifact, default_checkpoint

import repmlp_rt
from helpers import SMALL_ARCH, make_model, relative_close, repmlp_infer_binary


def _chain(training_model, artifact_path, x, tmp_path):
    """Every link's logits for the normalized batch x, in chain order."""
    outputs = {}
    with torch.no_grad():
        outputs["training"] = training_model(x)
        deploy = reparameterize_model(training_model)
        outputs["deploy"] = deploy(x)
        fused = fuse_model(training_model)
        outputs["fused"] = fused(x)
        scripted = torch.jit.script(ArtifactModule(fused))
        outputs["scripted"] = scripted(x)
        outputs["reloaded"] = torch.jit.load(artifact_path)(x)
    outputs["repmlp_rt"] = torch.from_numpy(repmlp_rt.Runtime(artifact_path).infer(x.numpy()))
    npy = tmp_path / "x.npy"
    np.save(npy, x.numpy())
    logits_file = tmp_path / "logits.npy"
    result = subprocess.run(
        [repmlp_infer_binary(), artifact_path, str(npy), "--output", str(logits_file), "--json", "--topk", "3"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    outputs["repmlp_infer"] = torch.from_numpy(np.load(logits_file))
    topk = [json.loads(line)["topk"] for line in result.stdout.splitlines()]
    return outputs, topk


def _assert_chain(outputs, topk, rtol=1e-5):
    reference = outputs["training"]
    for name, logits in outputs.items():
        assert logits.shape == reference.shape, name
        relative_close(logits, reference, rtol=rtol)
    # the C++ links agree with the reloaded artifact more tightly than with eager
    relative_close(outputs["repmlp_rt"], outputs["reloaded"], rtol=1e-5)
    relative_close(outputs["repmlp_infer"], outputs["reloaded"], rtol=1e-5)
    expected_top = outputs["reloaded"].topk(3, dim=1).indices
    assert [[entry["index"] for entry in row] for row in topk] == expected_top.tolist()
    assert torch.equal(outputs["training"].argmax(1), outputs["repmlp_infer"].argmax(1))


def test_chain_on_digits(digits_artifact, tmp_path):
    model = create_model("digits")
    load_checkpoint(model, default_checkpoint())
    model.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(21))
    outputs, topk = _chain(model, digits_artifact, x, tmp_path)
    _assert_chain(outputs, topk)


@pytest.mark.slow
def test_chain_on_b224_random_weights(b224_artifact, tmp_path):
    model = make_model("B224", seed=5)  # the same seeded weights and BN statistics as the artifact
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(22))
    outputs, topk = _chain(model, b224_artifact, x, tmp_path)
    _assert_chain(outputs, topk)
    assert os.path.getsize(b224_artifact) > 250e6  # the full model, not a stub


def test_chain_on_a_non_square_input(artifact_dir, tmp_path):
    """64x96 input: the upstream mmcls conversion crashes on non-square partitions."""
    path = str(artifact_dir / "small_64x96.pt")
    build_artifact(SMALL_ARCH, img_size=(64, 96), num_classes=10, out=path, seed=8)
    model = make_model(img_size=(64, 96), num_classes=10, seed=8)
    x = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(23))
    outputs, topk = _chain(model, path, x, tmp_path)
    _assert_chain(outputs, topk)
    assert repmlp_rt.Runtime(path).input_shape == (3, 64, 96)
