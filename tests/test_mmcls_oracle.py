"""The project against mmcls 0.25.0 itself: an independent implementation as the oracle.

mmcls runs in its own venv (``make mmcls-oracle`` creates .venv-mmcls; REPMLP_MMCLS_PYTHON
overrides the interpreter) through tests/mmcls_oracle/run_mmcls.py, which builds mmcls's
RepMLPNet and ImageClassifier from configs, with seeded random weights and BN statistics, and
writes real mmcls checkpoints plus mmcls's outputs on a seeded input. Here the project loads
those checkpoints with its own loader and must reproduce every output: backbone maps for
several out_indices with the final norm on and off, logits and embeddings, in the training,
deploy and fused forms, in float64 (1e-12) and float32 (1e-5, relative to the output's
scale), and through built artifacts run by repmlp_rt. A missing mmcls venv fails these
tests; it does not skip them.

Channels are multiples of 32 (of 16 at GP ratio 2): mmcls rounds the GlobalPerceptron width
to a multiple of 8, the project keeps the official C // ratio, and the two agree there.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import repmlp
import repmlp_rt
import torch
from helpers import ROOT, relative_close
from repmlp.artifact import build_artifact

ORACLE_DIR = os.path.join(ROOT, "tests", "mmcls_oracle")
MMCLS_PYTHON = os.environ.get("REPMLP_MMCLS_PYTHON", os.path.join(ROOT, ".venv-mmcls", "bin", "python"))
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}

ARCH = {"channels": [32, 64, 128, 256], "depths": [2, 1, 2, 1], "sharesets_nums": [1, 4, 8, 16]}
# T224's structure at 64x64, so that repmlp-build --arch T224 --img-size 64 takes it.
ARCH_T = {"channels": [64, 128, 256, 512], "depths": [2, 2, 6, 2], "sharesets_nums": [1, 4, 16, 128]}
# Every other constructor argument of the seed away from its default.
ARCH_CUSTOM = {"channels": [32, 64, 96, 128], "depths": [1, 1, 1, 1], "sharesets_nums": [2, 2, 4, 8]}
INDEX_SETS = [[0, 1, 2, 3], [1, 3], [3], [0, 2]]


def _backbone(name, kernels, final_norm, seed, **extra):
    case = {"name": name, "kind": "backbone", "arch": ARCH, "img_size": 64, "kernels": kernels,
            "final_norm": final_norm, "out_indices": INDEX_SETS, "seed": seed, "batch": 2}
    case.update(extra)
    return case


CASES = [
    _backbone("k3_norm", [3], True, 1),
    _backbone("k3_no_norm", [3], False, 2),
    _backbone("k13_norm", [1, 3], True, 3),
    _backbone("k13_no_norm", [1, 3], False, 4),
    _backbone("no_kernels", None, True, 5, out_indices=[[0, 1, 2, 3]]),
    _backbone("custom", [1, 3, 5], True, 6, arch=ARCH_CUSTOM, img_size=32, patch_size=2, gp_ratio=2,
              in_channels=1, out_indices=[[0, 1, 2, 3], [2]]),
    {"name": "classifier", "kind": "classifier", "arch": ARCH, "img_size": 64, "kernels": [1, 3],
     "final_norm": True, "num_classes": 10, "seed": 7, "batch": 3},
    {"name": "classifier_t", "kind": "classifier", "arch": ARCH_T, "img_size": 64, "kernels": [1, 3],
     "final_norm": True, "num_classes": 10, "seed": 8, "batch": 2},
]
BY_NAME = {case["name"]: case for case in CASES}
BACKBONES = [c["name"] for c in CASES if c["kind"] == "backbone"]
CLASSIFIERS = [c["name"] for c in CASES if c["kind"] == "classifier"]
DTYPES = [torch.float64, torch.float32]
FORMS = ["training", "deploy", "fused", "deploy_checkpoint"]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """Runs mmcls once for every case; returns the folder with its checkpoints and outputs."""
    if not os.access(MMCLS_PYTHON, os.X_OK):
        pytest.fail(f"the mmcls 0.25.0 venv is missing ({MMCLS_PYTHON} is not an executable): "
                    "run `make mmcls-oracle` (or set REPMLP_MMCLS_PYTHON)")
    out = tmp_path_factory.mktemp("mmcls")
    spec = out / "spec.json"
    spec.write_text(json.dumps(CASES))
    # Only the stand-in torchvision on the path: nothing of the project reaches mmcls's side.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = os.path.join(ORACLE_DIR, "stub")
    result = subprocess.run([MMCLS_PYTHON, "-W", "ignore", os.path.join(ORACLE_DIR, "run_mmcls.py"), str(spec), str(out)],
                            capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, f"the mmcls oracle failed:\n{result.stderr[-3000:]}"
    versions = json.loads(result.stdout.strip().splitlines()[-1])
    assert versions["mmcls"] == "0.25.0" and versions["cases"] == [c["name"] for c in CASES]
    return out


def _load(oracle, name):
    def read(suffix):
        return torch.load(oracle / f"{name}{suffix}", map_location="cpu", weights_only=True)

    return read("-input.pt"), read("-outputs.pt")


def project_model(case, out_indices=(3,), deploy=False):
    """The project's model for a case, built from the same numbers as mmcls's config."""
    kernels = case["kernels"]
    return repmlp.create_model(
        case["arch"], img_size=case["img_size"], deploy=deploy, out_indices=tuple(out_indices),
        final_norm=case["final_norm"], num_classes=case.get("num_classes", 0),
        reparam_conv_kernels=None if kernels is None else tuple(kernels),
        patch_size=case.get("patch_size", 4), gp_ratio=case.get("gp_ratio", 4),
        in_channels=case.get("in_channels", 3),
    )


def loaded_model(oracle, case, form, dtype, out_indices=(3,), checkpoint=None):
    """The project's model in ``form``: loaded from mmcls's training checkpoint (then
    reparameterized or fused), or ``deploy_checkpoint``: from mmcls's own deploy-form file."""
    from_deploy = form == "deploy_checkpoint"
    model = project_model(case, out_indices, deploy=from_deploy)
    path = checkpoint or oracle / f"{case['name']}{'-deploy' if from_deploy else ''}.pth"
    info = repmlp.load_checkpoint(model, path)
    assert info.layout == "mmcls" and info.form == ("deploy" if from_deploy else "training")
    model = model.to(dtype).eval()
    if form == "deploy":
        model = repmlp.reparameterize_model(model)
    elif form == "fused":
        model = repmlp.fuse_model(model)
    assert model.form == {"deploy_checkpoint": "deploy"}.get(form, form)
    return model


def mmcls_form(form):
    """mmcls's output that the project's ``form`` must equal: its fused form equals mmcls's
    deploy form; a model loaded from mmcls's deploy file equals that file run in mmcls."""
    return {"training": "training", "deploy_checkpoint": "deploy_file"}.get(form, "deploy")


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def reference_maps(expected, case, form, dtype, indices):
    """mmcls's maps for ``indices``: each selection from its own mmcls model in the training
    form; the deploy forms, run once on the case's first selection, are picked from that."""
    key = f"{mmcls_form(form)}/{dtype_name(dtype)}/out_indices="
    if form == "training":
        return expected[key + ",".join(map(str, indices))]
    first = case["out_indices"][0]
    return [expected[key + ",".join(map(str, first))][first.index(i)] for i in indices]


def every_form_and_dtype(test):
    """Runs ``test`` for each model form and each dtype."""
    return pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)(pytest.mark.parametrize("form", FORMS)(test))


@every_form_and_dtype
@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_maps_equal_mmcls(oracle, name, form, dtype):
    case, (x, expected) = BY_NAME[name], _load(oracle, name)
    for indices in case["out_indices"]:
        model = loaded_model(oracle, case, form, dtype, indices)
        with torch.no_grad():
            maps = model.forward_backbone(x.to(dtype))
        reference = reference_maps(expected, case, form, dtype, indices)
        assert len(maps) == len(reference) == len(indices)
        for got, want in zip(maps, reference):
            assert got.dtype == want.dtype == dtype and got.shape == want.shape
            relative_close(got, want, rtol=TOLERANCE[dtype])


@every_form_and_dtype
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_logits_and_embedding_equal_mmcls(oracle, name, form, dtype):
    case, (x, expected) = BY_NAME[name], _load(oracle, name)
    model = loaded_model(oracle, case, form, dtype)
    with torch.no_grad():
        logits = model(x.to(dtype))
        embedding = model.forward_head(model.forward_features(x.to(dtype)), pre_logits=True)
    prefix = f"{mmcls_form(form)}/{dtype_name(dtype)}"
    relative_close(logits, expected[f"{prefix}/logits"], rtol=TOLERANCE[dtype])
    relative_close(embedding, expected[f"{prefix}/embedding"], rtol=TOLERANCE[dtype])


def test_outputs_have_a_scale_where_float32_tolerance_means_something(oracle):
    """The weights' moderate init (run_mmcls.randomize) keeps outputs of order 1: a 1e-5
    relative error is then ~10 float32 ulps, not a scale where rounding dominates."""
    for case in CASES:
        _, expected = _load(oracle, case["name"])
        for key, value in expected.items():
            for tensor in value if isinstance(value, list) else [value]:
                assert 0.1 < tensor.abs().max().item() < 100, (case["name"], key)
                assert torch.isfinite(tensor).all()


# Pairs of same-shape entries that a wrong key mapping could exchange: the two pre-norms of a
# unit, two local-perceptron BNs, two units of one stage, and the first downsampling's BN
# against the next stage's first pre-norm. (gp.conv1 and gp.conv2 differ in shape, C/4 x C
# against C x C/4: the loader's shape check already catches that exchange.)
SWAPS = [
    ("stages.0.0.norm1", "stages.0.0.norm2"),
    ("stages.2.1.norm1", "stages.2.1.norm2"),
    ("stages.1.0.repmlp_block.repconv1.bn", "stages.1.0.repmlp_block.repconv3.bn"),
    ("stages.2.0", "stages.2.1"),
    ("downsample_layers.0.bn", "stages.1.0.norm1"),
]


def _swapped(state, first, second):
    """The state dict with every tensor under ``first.`` exchanged with its twin under ``second.``."""
    a, b = f"backbone.{first}.", f"backbone.{second}."
    out = dict(state)
    pairs = [(k, b + k[len(a):]) for k in state if k.startswith(a)]
    assert pairs
    for ka, kb in pairs:
        assert state[ka].shape == state[kb].shape, (ka, kb)
        out[ka], out[kb] = state[kb], state[ka]
    return out


@pytest.mark.parametrize("first,second", SWAPS, ids=lambda s: s)
def test_the_oracle_sees_two_swapped_same_shape_keys(oracle, tmp_path, first, second):
    """The checkpoint still loads (same names and shapes), so only the comparison with mmcls
    can notice; it must fail, in float64 and float32, in the training and fused forms."""
    case = BY_NAME["classifier"]
    x, expected = _load(oracle, "classifier")
    original = torch.load(oracle / "classifier.pth", map_location="cpu", weights_only=True)
    path = tmp_path / "swapped.pth"
    torch.save({**original, "state_dict": _swapped(original["state_dict"], first, second)}, path)
    for dtype in DTYPES:
        for form in ("training", "fused"):
            reference = expected[f"{mmcls_form(form)}/{dtype_name(dtype)}/logits"]
            with torch.no_grad():
                right = loaded_model(oracle, case, form, dtype)(x.to(dtype))
                wrong = loaded_model(oracle, case, form, dtype, checkpoint=path)(x.to(dtype))
            relative_close(right, reference, rtol=TOLERANCE[dtype])
            with pytest.raises(AssertionError):
                relative_close(wrong, reference, rtol=TOLERANCE[dtype])


def _build_options(case):
    kernels = case["kernels"]
    return dict(img_size=case["img_size"], kernels=() if kernels is None else tuple(kernels),
                patch_size=case.get("patch_size", 4), gp_ratio=case.get("gp_ratio", 4),
                in_channels=case.get("in_channels", 3))


@pytest.mark.parametrize("checkpoint", ["classifier.pth", "classifier-deploy.pth"])
def test_mmcls_classifier_checkpoint_builds_into_an_artifact(oracle, tmp_path, checkpoint):
    """build_artifact on the mmcls file, then the C++ runtime: mmcls's float32 logits."""
    case = BY_NAME["classifier"]
    x, expected = _load(oracle, "classifier")
    out = tmp_path / "classifier.pt"
    build_artifact(case["arch"], checkpoint=str(oracle / checkpoint), out=str(out), num_classes=10,
                   **_build_options(case))
    runtime = repmlp_rt.Runtime(out)
    logits = runtime.infer_normalized(x.to(torch.float32).numpy())
    relative_close(torch.from_numpy(logits), expected["deploy/float32/logits"], rtol=1e-5)
    relative_close(torch.from_numpy(logits), expected["training/float32/logits"], rtol=1e-5)


@pytest.mark.parametrize("name", ["k3_norm", "k13_no_norm"])
def test_mmcls_backbone_checkpoint_builds_into_a_features_artifact(oracle, tmp_path, name):
    case = BY_NAME[name]
    indices = case["out_indices"][0]
    x, expected = _load(oracle, name)
    out = tmp_path / f"{name}.pt"
    build_artifact(case["arch"], checkpoint=str(oracle / f"{name}.pth"), out=str(out),
                   output="features", out_indices=indices, final_norm=case["final_norm"], **_build_options(case))
    outputs = repmlp_rt.Runtime(out).infer_outputs(x.to(torch.float32).numpy())
    reference = reference_maps(expected, case, "deploy", torch.float32, indices)
    assert list(outputs) == [f"stage{i}" for i in indices]
    for got, want in zip(outputs.values(), reference):
        relative_close(torch.from_numpy(got), want, rtol=1e-5)


def test_repmlp_build_cli_on_an_mmcls_checkpoint(oracle, tmp_path):
    """The command line a user types for an mmcls T-structure classifier trained at 64x64."""
    x, expected = _load(oracle, "classifier_t")
    out = tmp_path / "t.pt"
    cmd = [sys.executable, "-m", "repmlp", "--arch", "T224", "--img-size", "64", "--num-classes", "10",
           "--checkpoint", str(oracle / "classifier_t.pth"), "--out", str(out), "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    logits = repmlp_rt.Runtime(out).infer_normalized(np.ascontiguousarray(x.to(torch.float32).numpy()))
    relative_close(torch.from_numpy(logits), expected["training/float32/logits"], rtol=1e-5)
