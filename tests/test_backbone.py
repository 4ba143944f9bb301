"""The backbone as mmcls defines it: out_indices maps, final_norm, backbone-only checkpoints.

The reference is ``seed_forward`` below, a line-by-line transcription of mmcls's
``RepMLPNet.forward`` (patch_embed -> stages, each but the last followed by its downsampling
layer, a stage's map taken after that layer, the last one through final_norm), run on the
training-form model's own modules (mmcls's patch_embed, downsample_layers and final_norm are
this package's conv_embedding, embeds and head_norm).
"""

import pytest
import torch

from repmlp import CheckpointError, create_model, export_state_dict, fuse_model, load_checkpoint, reparameterize_model

from helpers import SMALL_ARCH, make_model, relative_close

OUT_INDICES = [(0, 1, 2, 3), (1, 3), (3,)]
SIZES = [(32, 32), (64, 32)]  # square and non-square


def seed_forward(model, x, out_indices):
    """mmcls RepMLPNet.forward, transcribed (module names mapped as in the module docstring)."""
    outs = []
    x = model.conv_embedding(x)
    for i, stage in enumerate(model.stages):
        x = stage(x)
        # downsample after each stage except last stage
        if i < len(model.stages) - 1:
            downsample = model.embeds[i]
            x = downsample(x)
        if i in out_indices:
            # final_norm is an nn.Identity when it is off, so this branch runs either way
            if model.head_norm is not None and i == len(model.stages) - 1:
                out = model.head_norm(x)
            else:
                out = x
            outs.append(out)
    return tuple(outs)


def _forms(model):
    return {"training": model, "deploy": reparameterize_model(model), "fused": fuse_model(model)}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("final_norm", [True, False], ids=["final_norm", "no_final_norm"])
@pytest.mark.parametrize("out_indices", OUT_INDICES, ids=str)
def test_backbone_equals_the_seed_forward_in_every_form(out_indices, final_norm, size):
    model = make_model(img_size=size, num_classes=0, out_indices=out_indices, final_norm=final_norm)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = seed_forward(model, x, out_indices)
        assert len(expected) == len(out_indices)
        for form, candidate in _forms(model).items():
            outs = candidate.forward_backbone(x)
            assert len(outs) == len(expected), form
            for got, want in zip(outs, expected):
                assert got.shape == want.shape, form
                relative_close(got, want)


def test_scripted_fused_backbone_equals_the_seed_forward():
    model = make_model(img_size=(64, 32), num_classes=0, out_indices=(1, 3))
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        expected = seed_forward(model, x, (1, 3))
        scripted = torch.jit.script(fuse_model(model))
        outs = scripted.forward_backbone(x)
        assert len(outs) == 2
        for got, want in zip(outs, expected):
            relative_close(got, want)


def test_backbone_specs_match_the_maps():
    model = make_model(img_size=(64, 32), num_classes=0, out_indices=(0, 1, 2, 3))
    with torch.no_grad():
        outs = model.forward_backbone(torch.randn(1, 3, 64, 32))
    specs = model.backbone_outputs()
    assert [name for name, _, _ in specs] == ["stage0", "stage1", "stage2", "stage3"]
    assert [tuple(o.shape[1:]) for o in outs] == [shape for _, shape, _ in specs]
    assert [stride for _, _, stride in specs] == [8, 16, 32, 32]


def test_b224_backbone_shapes_are_the_seeds():
    # mmcls B224, out_indices (0, 1, 2, 3): (N,192,28,28), (N,384,14,14), (N,768,7,7), (N,768,7,7)
    with torch.device("meta"):
        model = create_model("B224", num_classes=0, out_indices=(0, 1, 2, 3))
        outs = model.forward_backbone(torch.empty(2, 3, 224, 224))
    assert [tuple(o.shape) for o in outs] == [(2, 192, 28, 28), (2, 384, 14, 14), (2, 768, 7, 7), (2, 768, 7, 7)]
    assert [s for _, s, _ in model.backbone_outputs()] == [(192, 28, 28), (384, 14, 14), (768, 7, 7), (768, 7, 7)]


@pytest.mark.parametrize("final_norm", [True, False], ids=["final_norm", "no_final_norm"])
def test_pre_downsample_option_takes_each_stage_before_its_downsampling(final_norm):
    model = make_model(img_size=(64, 32), num_classes=0, out_indices=(0, 1, 2, 3), final_norm=final_norm)
    pre = create_model(
        SMALL_ARCH, img_size=(64, 32), num_classes=0, out_indices=(0, 1, 2, 3), final_norm=final_norm,
        pre_downsample=True,
    ).eval()
    pre.load_state_dict(model.state_dict())
    # What each downsampling layer receives is the stage's own map.
    seen = []
    hooks = [embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for embed in model.embeds]
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        last = seed_forward(model, x, (3,))[0]
        for hook in hooks:
            hook.remove()
        expected = seen + [last]
        for form, candidate in _forms(pre).items():
            outs = candidate.forward_backbone(x)
            assert len(outs) == 4, form
            for got, want in zip(outs, expected):
                assert got.shape == want.shape, form
                relative_close(got, want)
    assert [s for _, s, _ in pre.backbone_outputs()] == [(16, 16, 8), (32, 8, 4), (64, 4, 2), (128, 2, 1)]
    assert [stride for _, _, stride in pre.backbone_outputs()] == [4, 8, 16, 32]


def test_bad_out_indices_are_value_errors():
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        create_model(SMALL_ARCH, img_size=32, out_indices=(4,))
    with pytest.raises(ValueError, match="repeat"):
        create_model(SMALL_ARCH, img_size=32, out_indices=(1, 1))


@pytest.mark.parametrize("layout", ["official", "mmcls"])
def test_backbone_only_checkpoint_loads_without_a_classifier(layout):
    trained = make_model(img_size=32, num_classes=10, seed=4)
    state = export_state_dict(trained, layout)
    backbone_only = {k: v for k, v in state.items() if not k.startswith("head.")}
    assert len(backbone_only) == len(state) - 2
    x = torch.randn(2, 3, 32, 32)
    headless = create_model(SMALL_ARCH, img_size=32, num_classes=0, out_indices=(0, 1, 2, 3)).eval()
    info = load_checkpoint(headless, backbone_only)
    assert info.head == "absent"
    full = create_model(SMALL_ARCH, img_size=32, num_classes=0, out_indices=(0, 1, 2, 3)).eval()
    assert load_checkpoint(full, state).head == "ignored"  # a classifier checkpoint's backbone
    with torch.no_grad():
        expected = seed_forward(trained, x, (0, 1, 2, 3))
        for model in (headless, full):
            for got, want in zip(model.forward_backbone(x), expected):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            # num_classes 0: the model returns the embedding, the classifier's input
            torch.testing.assert_close(model(x), trained.forward_head(trained.forward_features(x), pre_logits=True), rtol=0, atol=0)

    classifier = create_model(SMALL_ARCH, img_size=32, num_classes=10)
    expected_keys = "head.fc" if layout == "mmcls" else r"head\.\*"
    with pytest.raises(CheckpointError, match=f"no classifier .*{expected_keys}.*num_classes=0"):
        load_checkpoint(classifier, backbone_only)


def test_checkpoint_without_final_norm_needs_final_norm_off():
    trained = make_model(img_size=32, num_classes=0, final_norm=False, seed=2)
    state = export_state_dict(trained, "mmcls")
    assert not any("final_norm" in k for k in state)
    with pytest.raises(CheckpointError, match="final_norm"):
        load_checkpoint(create_model(SMALL_ARCH, img_size=32, num_classes=0), state)
    model = create_model(SMALL_ARCH, img_size=32, num_classes=0, final_norm=False).eval()
    load_checkpoint(model, state)
