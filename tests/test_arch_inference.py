"""The architecture read from a checkpoint: every constructor argument, both layouts, both
forms, the published variants named, mismatches against --arch, --inspect, and the input size
and preprocessing of an mmcls config saved in the checkpoint's meta."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, make_model
from repmlp import create_model, export_state_dict, reparameterize_model
from repmlp.artifact import OptionError, build_artifact, read_manifest
from repmlp.checkpoint_arch import describe_checkpoint, infer_arch
from repmlp.checkpoints import read_checkpoint
from repmlp.cli import main
from repmlp.preprocess import ImageTransform
from repmlp.utils import quiet_jit
from repmlp.variants import VARIANTS, Preprocessing

TINY = {"channels": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "sharesets": (1, 2, 4, 8)}
# (name, create_model arguments, input size): the kernels cases on a tiny four-stage net, and
# two custom architectures (three and five stages; patch 2; gp ratio 2; one input channel).
CASES = {
    "kernels3": dict(arch=TINY, reparam_conv_kernels=(3,)),
    "kernels13": dict(arch=TINY, reparam_conv_kernels=(1, 3)),
    "kernels135": dict(arch=TINY, reparam_conv_kernels=(1, 3, 5)),
    "kernels_none": dict(arch=TINY, reparam_conv_kernels=None),
    "custom_patch2_gray": dict(arch={"channels": (12, 24, 48), "depths": (2, 1, 3), "sharesets": (3, 6, 12)},
                               patch_size=2, gp_ratio=2, in_channels=1, reparam_conv_kernels=(1, 3)),
    "custom_five_stages": dict(arch={"channels": (8, 8, 16, 16, 32), "depths": (1, 1, 1, 1, 2),
                                     "sharesets": (2, 2, 4, 4, 8), "patch_size": 2}, gp_ratio=2, reparam_conv_kernels=(3, 5)),
}
IMG = 32


def _model(case: str, seed: int = 0, num_classes: int = 5):
    kwargs = dict(CASES[case])
    return make_model(kwargs.pop("arch"), seed=seed, img_size=IMG, num_classes=num_classes, **kwargs)


def _save(model, layout: str, form: str, path) -> str:
    source = reparameterize_model(model) if form == "deploy" else model
    state = export_state_dict(source, layout)
    torch.save({"state_dict": state} if layout == "mmcls" else state, path)
    return str(path)


def _expected_arch(model) -> dict:
    cfg = model.config
    return {"channels": list(cfg.channels), "depths": list(cfg.depths), "sharesets": list(cfg.sharesets),
            "patch_size": cfg.patch_size, "gp_ratio": cfg.gp_ratio, "in_channels": cfg.in_channels}


@pytest.mark.parametrize("form", ["training", "deploy"])
@pytest.mark.parametrize("layout", ["official", "mmcls"])
@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_converts_without_arch(tmp_path, case, layout, form, capsys):
    model = _model(case, seed=len(case))
    path = _save(model, layout, form, tmp_path / "ckpt.pth")
    out = tmp_path / "a.pt"
    report = build_artifact(checkpoint=path, out=str(out))
    manifest = read_manifest(str(out))
    assert manifest["arch"]["source"] == "checkpoint" and manifest["arch"]["name"] == "custom"
    config = manifest["arch"]["config"]
    assert {k: config[k] for k in _expected_arch(model)} == _expected_arch(model)
    assert config["img_size"] == [IMG, IMG] and config["num_classes"] == 5
    kernels = model.config.reparam_conv_kernels
    if form == "training":  # a deploy file has its local branches folded in: no kernels to read
        assert config["reparam_conv_kernels"] == (list(kernels) if kernels else None)
    assert (manifest["weights"]["layout"], manifest["weights"]["form"]) == (layout, form)
    with quiet_jit():
        module = torch.jit.load(str(out))
    x = torch.randn(3, model.config.in_channels, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        scale = expected.abs().max().item()
        torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4 * scale)
        images = torch.randint(0, 256, (2, 41, 37, 3), dtype=torch.uint8)
        pre = ImageTransform(model.config.preprocessing, model.config.in_channels)
        torch.testing.assert_close(module.forward_images(images), model(pre(images)), rtol=1e-4, atol=1e-4 * scale)
    assert report.manifest == manifest
    # --inspect --json on the same file
    assert main(["--inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["layout"], info["form"], info["num_classes"], info["img_size"]) == (layout, form, 5, [IMG, IMG])
    assert {k: info["arch"][k] for k in _expected_arch(model)} == _expected_arch(model)
    assert info["arch"]["kernels"] == ((list(kernels) if kernels else None) if form == "training" else "folded")
    assert info["parameters"] == sum(v.numel() for k, v in export_state_dict(
        reparameterize_model(model) if form == "deploy" else model).items() if not k.endswith("num_batches_tracked"))
    assert info["variant"] is None


def _meta_state(name: str, layout: str, form: str, num_classes=1000) -> dict:
    """A published variant's state dict, shapes only (meta tensors: nothing is allocated)."""
    with torch.device("meta"):
        model = create_model(name, deploy=form == "deploy", num_classes=num_classes)
    state = export_state_dict(model, layout)
    return {"state_dict": state} if layout == "mmcls" else state


@pytest.mark.parametrize("form", ["training", "deploy"])
@pytest.mark.parametrize("layout", ["official", "mmcls"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_published_variants_are_named_from_their_weights(name, layout, form):
    info = describe_checkpoint(read_checkpoint(_meta_state(name, layout, form)))
    cfg = VARIANTS[name]
    assert info["variant"] == name
    assert (info["layout"], info["form"], info["num_classes"]) == (layout, form, 1000)
    assert info["img_size"] == list(cfg.img_size)
    assert info["arch"]["channels"] == list(cfg.channels) and info["arch"]["sharesets"] == list(cfg.sharesets)
    assert info["arch"]["depths"] == list(cfg.depths)
    assert info["arch"]["kernels"] == (list(cfg.reparam_conv_kernels) if form == "training" else "folded")


@pytest.mark.parametrize("kernels", [(3,), (1, 3), (1, 3, 5)])
def test_this_packages_own_state_dict_gives_its_kernels(kernels):
    """``RepMLPNet.state_dict()`` names its branches ``local_convs.{i}``, not ``repconv{k}``:
    their kernels come from the weights' shapes."""
    model = create_model("T224", reparam_conv_kernels=kernels)
    info = describe_checkpoint(read_checkpoint(model.state_dict()))
    assert info["variant"] == ("T224" if kernels == (1, 3) else None)
    assert info["arch"]["kernels"] == list(kernels)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n != "digits" else n for n in VARIANTS])
def test_published_variant_structures_convert_without_arch(tmp_path, name):
    """Every variant's structure at a small input (fc3 grows with the fourth power of the
    side), from an mmcls training checkpoint; the manifest names the numbers."""
    cfg = VARIANTS[name]
    model = make_model(name, seed=3, img_size=IMG if name != "digits" else cfg.img_size, num_classes=7)
    path = _save(model, "mmcls", "training", tmp_path / "v.pth")
    build_artifact(checkpoint=path, out=str(tmp_path / "v.pt"))
    manifest = read_manifest(str(tmp_path / "v.pt"))
    config = manifest["arch"]["config"]
    assert (config["channels"], config["depths"], config["sharesets"]) == (list(cfg.channels), list(cfg.depths), list(cfg.sharesets))
    assert manifest["arch"]["name"] == ("digits" if name == "digits" else "custom")  # the input size is not the variant's
    with quiet_jit():
        module = torch.jit.load(str(tmp_path / "v.pt"))
    x = torch.randn(2, 3, *model.config.img_size)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_arch_b_against_a_kernels3_checkpoint_is_one_line_exit_2(tmp_path):
    model = create_model("b", img_size=IMG, num_classes=3, reparam_conv_kernels=(3,))
    path = tmp_path / "seed_default.pth"
    torch.save({"state_dict": export_state_dict(model, "mmcls")}, path)
    out = tmp_path / "a.pt"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "build_artifact.py"), "--arch", "b", "--checkpoint",
                             str(path), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if "error" in line]
    assert error == ["repmlp-build: error: argument --arch: kernels: checkpoint (3,), --arch b (1, 3)"], result.stderr
    assert not out.exists()
    with pytest.raises(OptionError, match=re.escape("kernels: checkpoint (3,), arch='b' (1, 3)")):
        build_artifact("b", checkpoint=str(path), out=str(out))
    # the same checkpoint with the kernels given converts
    info = describe_checkpoint(read_checkpoint(str(path)))
    assert info["arch"]["kernels"] == [3] and info["variant"] is None


def test_each_arch_option_is_checked_against_the_checkpoint(tmp_path):
    model = _model("custom_patch2_gray")
    path = _save(model, "official", "training", tmp_path / "c.pth")
    cases = [(dict(channels=(12, 24, 36)), "channels: checkpoint (12, 24, 48), the options (12, 24, 36)"),
             (dict(depths=(2, 1, 2)), "depths: checkpoint (2, 1, 3)"),
             (dict(sharesets=(1, 6, 12)), "sharesets: checkpoint (3, 6, 12)"),
             (dict(kernels=()), "kernels: checkpoint (1, 3), the options none"),
             (dict(patch_size=4), "patch_size: checkpoint 2"),
             (dict(gp_ratio=4), "gp_ratio: checkpoint 2"),
             (dict(in_channels=3), "in_channels: checkpoint 1")]
    for options, message in cases:
        with pytest.raises(OptionError, match=re.escape(message)):
            build_artifact(checkpoint=path, out=str(tmp_path / "x.pt"), **options)
    with pytest.raises(OptionError, match="in_channels must be 1 or 3, got 2"):
        build_artifact("digits", in_channels=2, checkpoint=None, out=str(tmp_path / "x.pt"), seed=1)
    assert not (tmp_path / "x.pt").exists()
    # agreeing options are accepted and the architecture comes out as given
    build_artifact(checkpoint=path, out=str(tmp_path / "x.pt"), patch_size=2, gp_ratio=2, in_channels=1, kernels=(1, 3))
    assert read_manifest(str(tmp_path / "x.pt"))["arch"]["config"]["patch_size"] == 2


def test_arch_options_build_random_weights(tmp_path):
    out = tmp_path / "r.pt"
    build_artifact("digits", checkpoint=None, out=str(out), kernels=(3,), gp_ratio=2, seed=4)
    manifest = read_manifest(str(out))
    assert manifest["arch"]["config"]["reparam_conv_kernels"] == [3] and manifest["arch"]["config"]["gp_ratio"] == 2
    assert manifest["arch"]["source"] == "options" and manifest["weights"]["source"] == "random"


MMCLS_CONFIG = """
model = dict(type='ImageClassifier', backbone=dict(type='RepMLPNet', arch='b', img_size=224))
img_norm_cfg = dict(mean=[120.5, 110.25, 100.0], std=[50.0, 51.0, 52.0], to_rgb=True)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', size=(72, -1), backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=(32, 64)),
    dict(type='Normalize', **img_norm_cfg),
    dict(type='ImageToTensor', keys=['img']),
]
data = dict(samples_per_gpu=64, test=dict(type='ImageNet', pipeline=test_pipeline))
"""


def test_mmcls_meta_config_gives_input_size_and_preprocessing(tmp_path):
    model = make_model(TINY, seed=5, img_size=(32, 64), num_classes=4)
    path = tmp_path / "mm.pth"
    classes = ["cat", "dog", "fox", "owl"]
    torch.save({"meta": {"config": MMCLS_CONFIG, "CLASSES": classes}, "state_dict": export_state_dict(model, "mmcls")}, path)
    out = tmp_path / "mm.pt"
    build_artifact(checkpoint=str(path), out=str(out))  # fc3's area (8 x 16) alone is no square
    manifest = read_manifest(str(out))
    assert manifest["input"]["shape"] == [3, 32, 64]
    pre = manifest["preprocessing"]
    assert (pre["resize_mode"], pre["resize"], pre["crop"], pre["interpolation"]) == ("short_side", [72, 72], [32, 64], "bicubic")
    assert (pre["mean"], pre["std"]) == ([120.5, 110.25, 100.0], [50.0, 51.0, 52.0])
    assert manifest["output"]["labels"] == classes
    expected_pre = Preprocessing(mean=(120.5, 110.25, 100.0), std=(50.0, 51.0, 52.0), resize=(72, 72), crop=(32, 64),
                                 interpolation="bicubic")
    with quiet_jit():
        module = torch.jit.load(str(out))
    images = torch.randint(0, 256, (2, 90, 120, 3), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(ImageTransform(expected_pre)(images))
        torch.testing.assert_close(module.forward_images(images), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # flags win over the saved config
    build_artifact(checkpoint=str(path), out=str(out), force=True, preprocessing={"interpolation": "bilinear"})
    assert read_manifest(str(out))["preprocessing"]["interpolation"] == "bilinear"


def test_hand_written_backbone_state_dict_without_bn_counters(tmp_path):
    """A backbone-only file, no num_batches_tracked, ``module.`` prefixes: features from no --arch."""
    model = _model("kernels135", seed=7, num_classes=0)
    state = {f"module.{k}": v for k, v in export_state_dict(model, "official").items()
             if not k.endswith("num_batches_tracked") and not k.startswith("head.")}
    path = tmp_path / "bb.pth"
    torch.save(state, path)
    assert infer_arch(read_checkpoint(str(path))).num_classes is None
    build_artifact(checkpoint=str(path), out=str(tmp_path / "f.pt"), output="features")
    manifest = read_manifest(str(tmp_path / "f.pt"))
    assert [o["name"] for o in manifest["outputs"]] == ["stage0", "stage1", "stage2", "stage3"]
    assert manifest["weights"]["head"] == "absent" and manifest["arch"]["config"]["reparam_conv_kernels"] == [1, 3, 5]


def test_broken_state_dicts_are_named(tmp_path):
    state = export_state_dict(_model("kernels3"), "official")
    del state["stages.1.0.repmlp_block.fc3.weight"]
    with pytest.raises(ValueError, match=r"no stages\.1\.0\.repmlp_block\.fc3\.weight"):
        infer_arch(read_checkpoint(state))
    state = export_state_dict(_model("kernels3"), "official")
    state = {k.replace("stages.2.0.", "stages.2.1."): v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"stage 2's blocks must be numbered 0..N-1, found \[1\]"):
        infer_arch(read_checkpoint(state))


def test_tolerance_advice_names_the_weights_own_error(tmp_path):
    """A stage that fails on a tolerance below the weights' own float32 rounding error: the
    error says so and names a tolerance that passes."""
    with pytest.raises(ValueError, match=r"own float32 error against float64 is (\S+).*tolerance=(\S+) would pass") as raised:
        build_artifact("digits", out=str(tmp_path / "a.pt"), tolerance=1e-12)
    suggested = float(re.search(r"tolerance=(\S+) would pass", str(raised.value)).group(1))
    assert 1e-12 < suggested < 1e-4
    build_artifact("digits", out=str(tmp_path / "a.pt"), tolerance=suggested)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "build_artifact.py"), "--tolerance", "1e-12", "--out",
                             str(tmp_path / "b.pt")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "--tolerance " in result.stderr and "would pass" in result.stderr
