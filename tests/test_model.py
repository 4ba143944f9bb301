"""The model: structure, exact re-parameterization, scripting, and bad arguments."""

import copy
import io

import pytest
import torch

import repmlp
from repmlp import create_model, fuse_model, reparameterize_model
from repmlp.model import RepMLPBlock

from helpers import SMALL_ARCH, make_model, relative_close

# Exact training-time parameter counts of the official models (1000-class head), from the
# official repository's models (REPMLPNET.md).
OFFICIAL_PARAMS = {
    "T224": 38_293_608,
    "T256": 58_687_848,
    "B224": 68_242_712,
    "B256": 96_447_512,
    "D256": 86_887_648,
    "L256": 117_641_560,
}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(OFFICIAL_PARAMS))
def test_training_parameter_counts_match_official(arch):
    with torch.device("meta"):
        model = create_model(arch)
    assert _count(model) == OFFICIAL_PARAMS[arch]


def test_b224_deploy_parameter_count_and_aliases():
    with torch.device("meta"):
        assert _count(create_model("B224", deploy=True)) == 68_332_664
        assert _count(create_model("b")) == 68_242_712
        assert _count(create_model("base")) == 68_242_712


def test_global_perceptron_width_is_unrounded():
    # mmcls rounds C // 4 up to a multiple of 8 (24 for 80 channels); the official model does not.
    with torch.device("meta"):
        model = create_model("D256")
    block = model.stages[0][0].repmlp_block
    assert block.gp.fc1.out_channels == 20


@pytest.mark.parametrize("kernels", [(1, 3), (3,), (1, 3, 5), None], ids=str)
def test_reparameterization_is_exact(kernels):
    model = make_model(img_size=(64, 96), num_classes=10, reparam_conv_kernels=kernels)
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
        deploy = reparameterize_model(model)
        fused = fuse_model(model)
        relative_close(deploy(x), expected)
        relative_close(fused(x), expected)
    assert model.form == "training" and deploy.form == "deploy" and fused.form == "fused"
    # the input model is untouched (inplace=False)
    assert any(isinstance(m, RepMLPBlock) and m.fc3_bn is not None for m in model.modules())


def test_non_square_input_224x160():
    arch = {"channels": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "sharesets_nums": [1, 4, 16, 32]}
    model = make_model(arch, img_size=(224, 160), num_classes=5)
    block = model.stages[0][0].repmlp_block
    assert (block.partition_h, block.partition_w) == (56, 40)
    x = torch.randn(2, 3, 224, 160)
    with torch.no_grad():
        relative_close(fuse_model(model)(x), model(x))


def test_reparameterize_twice_and_on_deploy_model_is_a_noop():
    model = make_model(img_size=32, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    deploy = reparameterize_model(model)
    state = {k: v.clone() for k, v in deploy.state_dict().items()}
    again = reparameterize_model(deploy, inplace=True)
    assert again is deploy
    for block in deploy.modules():
        if isinstance(block, RepMLPBlock):
            block.reparameterize()
    after = deploy.state_dict()
    assert state.keys() == after.keys()
    for key in state:
        torch.testing.assert_close(after[key], state[key], rtol=0, atol=0)
    fused = fuse_model(deploy)
    fused_twice = fuse_model(fused)
    with torch.no_grad():
        relative_close(fused_twice(x), model(x))
    built_deploy = create_model(SMALL_ARCH, img_size=32, num_classes=10, deploy=True)
    reparameterize_model(built_deploy, inplace=True)  # no AttributeError, unlike upstream
    assert built_deploy.form == "deploy"


def test_reparameterize_keeps_dtype_and_device():
    model = make_model(img_size=32, num_classes=10).double()
    deploy = fuse_model(model)
    assert all(p.dtype == torch.float64 for p in deploy.parameters())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        relative_close(deploy(x), model(x), rtol=1e-10)


@pytest.mark.parametrize("form", ["training", "deploy", "fused"])
def test_scripted_frozen_saved_reloaded_equals_eager(form):
    model = make_model(img_size=(32, 64), num_classes=10)
    if form == "deploy":
        model = reparameterize_model(model)
    elif form == "fused":
        model = fuse_model(model)
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        expected = model(x)
        frozen = torch.jit.freeze(torch.jit.script(model))
        buffer = io.BytesIO()
        torch.jit.save(frozen, buffer)
        buffer.seek(0)
        reloaded = torch.jit.load(buffer)
        relative_close(frozen(x), expected)
        relative_close(reloaded(x), expected)


def test_backbone_outputs_and_features():
    model = make_model(img_size=64, num_classes=0, out_indices=(0, 1, 2, 3))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = model.forward_backbone(x)
        feats = model(x)
    # mmcls's maps: a stage before the last after its downsampling (tests/test_backbone.py)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2), (2, 128, 2, 2)]
    assert feats.shape == (2, 128)
    # the last backbone output goes through the final norm; pooling it gives the features
    torch.testing.assert_close(outs[-1].mean((2, 3)), feats, rtol=1e-6, atol=1e-6)
    torch.jit.script(model)


def test_training_mode_still_trains():
    model = create_model(SMALL_ARCH, img_size=32, num_classes=10).train()
    x = torch.randn(4, 3, 32, 32)
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    block = model.stages[0][0].repmlp_block
    assert block.fc3.weight.grad is not None and block.local_convs[0].conv.weight.grad is not None


@pytest.mark.slow
def test_b224_full_size_reparameterization_is_exact():
    model = make_model("B224", seed=1)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        deploy = reparameterize_model(model)
        assert _count(deploy) == 68_332_664
        relative_close(deploy(x), expected)
        relative_close(fuse_model(deploy)(x), expected)


# ---- bad arguments -------------------------------------------------------------------------


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown arch 'B999'.*B224.*L256"):
        create_model("B999")


@pytest.mark.parametrize("size", [100, (224, 100), 16, (0, 224)])
def test_size_not_divisible_by_32(size):
    with pytest.raises(ValueError, match="divisible by 32"):
        create_model("T224", img_size=size)


@pytest.mark.parametrize(
    "arch, message",
    [
        ({"channels": [16, 32], "depths": [1, 1, 1], "sharesets_nums": [1, 1]}, "same non-zero length"),
        ({"channels": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "sharesets_nums": [1, 3, 4, 8]}, "not divisible by 3 sharesets"),
        ({"channels": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}, "missing"),
        ({"channels": [16, 32, 64, 128], "depths": [1, 1, 0, 1], "sharesets_nums": [1, 2, 4, 8]}, "positive"),
        ({"channels": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "sharesets_nums": [1, 2, 4, 8], "widths": 3}, "unknown keys"),
    ],
)
def test_inconsistent_custom_arch(arch, message):
    with pytest.raises(ValueError, match=message):
        create_model(arch, img_size=32)


@pytest.mark.parametrize("kernels", [(2,), (3, 3), (0,)])
def test_bad_kernels(kernels):
    with pytest.raises(ValueError, match="reparam_conv_kernels"):
        create_model(SMALL_ARCH, img_size=32, reparam_conv_kernels=kernels)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"gp_ratio": 0}, "gp_ratio must be a positive int, got 0"),
        ({"patch_size": 0}, "patch_size must be a positive int"),
        ({"ffn_expand": 0}, "ffn_expand must be a positive int"),
        ({"in_channels": 0}, "in_channels must be a positive int"),
        ({"num_classes": 10.0}, "num_classes must be an int >= 0, got 10.0"),
        ({"num_classes": -1}, "num_classes must be an int >= 0"),
        ({"reparam_conv_kernels": 3}, "reparam_conv_kernels must be a list of ints, got 3"),
    ],
)
def test_bad_config_values_are_value_errors(override, message):
    with pytest.raises(ValueError, match=message):
        create_model(SMALL_ARCH, img_size=32, **override)


@pytest.mark.parametrize("field, value", [("mean", (float("nan"), 0.0, 0.0)), ("std", (1.0, float("inf"), 1.0)),
                                          ("std", (1.0, 0.0, 1.0))])
def test_preprocessing_needs_finite_mean_and_positive_std(field, value):
    from repmlp.variants import Preprocessing

    with pytest.raises(ValueError, match="mean and std need 3 finite values, std > 0"):
        Preprocessing(**{field: value}).validate()


def test_empty_batch_in_every_form():
    model = make_model(img_size=32, num_classes=10).eval()
    x = torch.zeros(0, 3, 32, 32)
    with torch.no_grad():
        for form in (model, reparameterize_model(model), fuse_model(model)):
            assert form(x).shape == (0, 10)


def test_unknown_override():
    with pytest.raises(ValueError, match="unknown option"):
        create_model(SMALL_ARCH, img_size=32, colour="blue")


def test_wrong_input_shape_is_a_clear_error():
    model = make_model(img_size=32, num_classes=10)
    with pytest.raises(ValueError, match=r"expects \(N, 3, 32, 32\) input, got \[1, 3, 64, 64\]"):
        model(torch.randn(1, 3, 64, 64))
    scripted = torch.jit.script(model)
    with pytest.raises(Exception, match=r"expects \(N, 3, 32, 32\) input"):
        scripted(torch.randn(1, 3, 32, 48))


def test_variant_table_is_data():
    assert set(repmlp.list_variants()) >= {"T224", "T256", "B224", "B256", "D256", "L256", "b", "base"}
    cfg = repmlp.VARIANTS["L256"]
    assert cfg.channels == (96, 192, 384, 768) and cfg.depths == (2, 2, 18, 2)
    assert cfg.sharesets == (1, 4, 32, 256) and cfg.reparam_conv_kernels == (1, 3)
    # deepcopy-able config, no shared mutable state between models
    copy.deepcopy(create_model(SMALL_ARCH, img_size=32).config)


def test_custom_arch_as_keyword_arguments():
    by_dict = create_model(SMALL_ARCH, img_size=32, num_classes=10)
    by_kwargs = create_model(None, channels=[16, 32, 64, 128], depths=[1, 1, 2, 1], sharesets_nums=[1, 4, 8, 16], img_size=32, num_classes=10)
    assert by_kwargs.config == by_dict.config
    assert set(by_kwargs.state_dict()) == set(by_dict.state_dict())
