"""Checkpoint layouts (official, mmcls/mmpretrain), forms, strictness and bad files."""

import pytest
import torch

from repmlp import CheckpointError, create_model, export_state_dict, load_checkpoint, reparameterize_model

from helpers import SMALL_ARCH, make_model

class Payload:
    """A picklable class that weights_only loading must refuse."""


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _fresh(**kwargs):
    return create_model(SMALL_ARCH, img_size=32, num_classes=10, **kwargs).eval()


@pytest.fixture
def trained():
    return make_model(img_size=32, num_classes=10, seed=11)


def test_official_and_mmcls_layouts_give_identical_logits(trained):
    official = export_state_dict(trained, "official")
    mmcls = export_state_dict(trained, "mmcls")
    a, b = _fresh(), _fresh()
    info_a = load_checkpoint(a, official)
    info_b = load_checkpoint(b, mmcls)
    assert (info_a.layout, info_a.form) == ("official", "training")
    assert (info_b.layout, info_b.form) == ("mmcls", "training")
    with torch.no_grad():
        expected = trained(X)
        torch.testing.assert_close(a(X), expected, rtol=0, atol=0)
        torch.testing.assert_close(b(X), expected, rtol=0, atol=0)


def test_key_names_follow_the_upstream_layouts(trained):
    official = export_state_dict(trained, "official")
    mmcls = export_state_dict(trained, "mmcls")
    # names as the official repo and mmcls spell them (REPMLPNET.md, "Checkpoint layouts")
    for key in [
        "conv_embedding.conv.weight",
        "conv_embedding.bn.running_var",
        "embeds.0.conv.weight",
        "stages.0.0.prebn1.weight",
        "stages.0.0.prebn2.bias",
        "stages.2.1.repmlp_block.gp.fc1.weight",
        "stages.2.1.repmlp_block.gp.fc2.bias",
        "stages.2.1.repmlp_block.fc3.weight",
        "stages.2.1.repmlp_block.fc3_bn.running_mean",
        "stages.2.1.repmlp_block.repconv1.conv.weight",
        "stages.2.1.repmlp_block.repconv3.bn.weight",
        "stages.3.0.ffn_block.ffn_fc2.bn.weight",
        "head_norm.weight",
        "head.weight",
    ]:
        assert key in official, key
    for key in [
        "backbone.patch_embed.projection.weight",
        "backbone.patch_embed.norm.running_var",
        "backbone.downsample_layers.0.conv.weight",
        "backbone.stages.0.0.norm1.weight",
        "backbone.stages.0.0.norm2.bias",
        "backbone.stages.2.1.repmlp_block.gp.conv1.conv.weight",
        "backbone.stages.2.1.repmlp_block.gp.conv2.conv.bias",
        "backbone.stages.2.1.repmlp_block.fc3_bn.running_mean",
        "backbone.stages.2.1.repmlp_block.repconv3.bn.weight",
        "backbone.stages.3.0.ffn_block.ffn_fc1.conv.weight",
        "backbone.final_norm.weight",
        "head.fc.weight",
    ]:
        assert key in mmcls, key
    assert len(official) == len(mmcls)


def test_b224_has_823_keys_in_both_layouts():
    with torch.device("meta"):
        model = create_model("B224")
    assert len(export_state_dict(model, "official")) == 823
    assert len(export_state_dict(model, "mmcls")) == 823


def test_export_round_trips_both_layouts(trained):
    for layout in ("official", "mmcls"):
        state = export_state_dict(trained, layout)
        model = _fresh()
        load_checkpoint(model, state)
        again = export_state_dict(model, layout)
        assert list(again) == list(state)
        for key in state:
            torch.testing.assert_close(again[key], state[key], rtol=0, atol=0)


def test_deploy_form_checkpoint(trained, tmp_path):
    deploy = reparameterize_model(trained)
    for layout in ("official", "mmcls"):
        path = tmp_path / f"deploy_{layout}.pth"
        torch.save(export_state_dict(deploy, layout), path)
        model = _fresh(deploy=True)
        info = load_checkpoint(model, str(path))
        assert (info.layout, info.form) == (layout, "deploy")
        assert info.sha256 and len(info.sha256) == 64
        with torch.no_grad():
            torch.testing.assert_close(model(X), deploy(X), rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module", "none"])
def test_wrapped_files_load_with_weights_only(trained, tmp_path, wrap):
    state = export_state_dict(trained, "mmcls")
    if wrap == "module":
        obj = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "none":
        obj = state
    else:
        obj = {wrap: state, "meta": {"epoch": 3}}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = _fresh()
    load_checkpoint(model, str(path))
    with torch.no_grad():
        torch.testing.assert_close(model(X), trained(X), rtol=0, atol=0)


# ---- nothing loads silently ------------------------------------------------------------------


def test_form_mismatch_names_the_fix(trained):
    training_state = export_state_dict(trained)
    with pytest.raises(CheckpointError, match=r"training form.*create it with deploy=False"):
        load_checkpoint(_fresh(deploy=True), training_state)
    deploy_state = export_state_dict(reparameterize_model(trained))
    with pytest.raises(CheckpointError, match=r"deploy form.*create it with deploy=True"):
        load_checkpoint(_fresh(), deploy_state)


def test_missing_key_is_named_with_layout(trained):
    state = export_state_dict(trained, "mmcls")
    del state["backbone.stages.1.0.norm2.weight"]
    with pytest.raises(CheckpointError, match=r"mmcls layout.*1 missing.*backbone\.stages\.1\.0\.norm2\.weight"):
        load_checkpoint(_fresh(), state)


def test_unexpected_key_is_named(trained):
    state = export_state_dict(trained)
    state["stages.0.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"official layout.*1 unexpected.*stages\.0\.0\.extra\.weight"):
        load_checkpoint(_fresh(), state)


def test_wrong_shape_names_both_shapes(trained):
    model = create_model(SMALL_ARCH, img_size=32, num_classes=5)
    with pytest.raises(CheckpointError, match=r"head\.weight: checkpoint \(10, 128\) vs model \(5, 128\)"):
        load_checkpoint(model, export_state_dict(trained))


def test_other_input_size_is_a_shape_error(trained):
    model = create_model(SMALL_ARCH, img_size=64, num_classes=10)
    with pytest.raises(CheckpointError, match=r"fc3\.weight: checkpoint \(64, 64, 1, 1\) vs model \(256, 256, 1, 1\)"):
        load_checkpoint(model, export_state_dict(trained))
    # ... and the message names the two usual causes and what to pass
    other = create_model(SMALL_ARCH, img_size=64, num_classes=7)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(other, export_state_dict(trained))
    assert "fc3 sizes follow the input size" in str(info.value) and "img_size=<H>x<W>" in str(info.value)
    assert "the checkpoint's classifier has 10 classes: pass num_classes=<N>" in str(info.value)


def test_kernel_mismatch_names_the_branches(trained):
    model = create_model(SMALL_ARCH, img_size=32, num_classes=10, reparam_conv_kernels=(3,))
    with pytest.raises(CheckpointError, match=r"unexpected.*repconv1"):
        load_checkpoint(model, export_state_dict(trained))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(_fresh(), str(tmp_path / "nope.pth"))


def test_truncated_file(trained, tmp_path):
    path = tmp_path / "full.pth"
    torch.save(export_state_dict(trained), path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*cut\.pth"):
        load_checkpoint(_fresh(), str(cut))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(_fresh(), str(path))


def test_arbitrary_pickle_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    # any class outside weights_only's allow-list is refused before it is constructed
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(_fresh(), str(path))


def test_unreadable_files_say_why(tmp_path):
    import numpy as np

    cases = {
        "numpy.pth": ({"state_dict": {"w": torch.zeros(1)}, "meta": np.zeros(3)},
                      r"weights_only=True refuses \(Unsupported global: GLOBAL numpy.*state dict$"),
        "empty.pth": (None, "the file is empty or truncated"),
        "text.pth": ("hello\n", r"not a PyTorch checkpoint \("),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is None:
            path.write_bytes(b"")
        elif isinstance(content, str):
            path.write_text(content)
        else:
            torch.save(content, path)
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(_fresh(), str(path))
        assert "\x1b" not in str(info.value) and "\n" not in str(info.value)


def test_foreign_state_dict():
    foreign = torch.nn.Linear(2, 2).state_dict()
    with pytest.raises(CheckpointError, match="not a RepMLPNet checkpoint"):
        load_checkpoint(_fresh(), foreign)
    with pytest.raises(CheckpointError, match="expected a non-empty state dict"):
        load_checkpoint(_fresh(), {})
    with pytest.raises(CheckpointError, match="expected a tensor"):
        load_checkpoint(_fresh(), {"conv_embedding.conv.weight": [1, 2]})
    with pytest.raises(CheckpointError, match=r"key 1 \(int\) is not a parameter name"):
        load_checkpoint(_fresh(), {1: torch.zeros(1)})


def test_export_refuses_fused_models(trained):
    from repmlp import fuse_model

    with pytest.raises(ValueError, match="fused"):
        export_state_dict(fuse_model(trained))
    with pytest.raises(ValueError, match="layout must be one of"):
        export_state_dict(trained, "timm")
