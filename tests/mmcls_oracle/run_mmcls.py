"""The oracle: mmcls 0.25.0's own RepMLPNet and ImageClassifier, run in their own venv.

    .venv-mmcls/bin/python tests/mmcls_oracle/run_mmcls.py SPEC.json OUT_DIR

Run by tests/test_mmcls_oracle.py with the stand-in torchvision (stub/) on PYTHONPATH. For each
case of SPEC (a JSON list, see the test) it builds the mmcls model from a config, gives it
seeded random weights and BN statistics, and writes to OUT_DIR:

- ``NAME.pth``: the training-form checkpoint as mmcls saves it (``state_dict`` + ``meta``;
  a backbone's keys prefixed ``backbone.``, as in a classifier's or a detector's file);
- ``NAME-deploy.pth``: the same model after mmcls's ``switch_to_deploy``;
- ``NAME-input.pt``: the seeded input batch (float64 holding float32 values);
- ``NAME-outputs.pt``: mmcls's outputs on that input, a dict keyed ``FORM/DTYPE/WHAT``
  (FORM ``training``, ``deploy`` (fused in DTYPE) or ``deploy_file`` (``NAME-deploy.pth``:
  fused in float32); DTYPE ``float64`` or ``float32``; WHAT ``out_indices=0,1``
  for a backbone's tuple of maps, ``logits`` or ``embedding`` for a classifier). The deploy
  forms are run for the first selection of stages only.

Nothing here imports the project: every number comes from mmcls itself.
"""

import copy
import json
import os
import sys

import mmcls
import torch
from mmcv import Config
from mmcls.models import build_backbone, build_classifier


def backbone_config(case, out_indices):
    kernels = case["kernels"]
    return dict(
        type="RepMLPNet",
        arch=case["arch"],
        img_size=case["img_size"],
        in_channels=case.get("in_channels", 3),
        patch_size=case.get("patch_size", 4),
        out_indices=tuple(out_indices),
        reparam_conv_kernels=None if kernels is None else tuple(kernels),
        globalperceptron_ratio=case.get("gp_ratio", 4),
        final_norm=case["final_norm"],
    )


def classifier_config(case):
    """The repmlp-base config's model, with the case's backbone and width."""
    return dict(
        type="ImageClassifier",
        backbone=backbone_config(case, (3,)),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(
            type="LinearClsHead",
            num_classes=case["num_classes"],
            in_channels=case["arch"]["channels"][-1],
            loss=dict(type="CrossEntropyLoss", loss_weight=1.0),
            topk=(1, 5),
        ),
    )


@torch.no_grad()
def randomize(model, seed):
    """Seeded weights and BN statistics of moderate size.

    mmcls's default initialisation with random BN statistics lets activations grow to ~1e5
    through the residual blocks; float32 then carries only ~1e-2 absolute precision there, and
    a 1e-5 relative comparison would measure rounding, not the model. Weights ~ N(0, 1/fan_in)
    and BN scales near 1 keep every stage's output of order 1, so 1e-5 in float32 is a real
    check; float64 (1e-12) does not depend on this.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
            module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            module.num_batches_tracked.fill_(seed + 1)
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            weight = module.weight
            fan_in = weight[0].numel()
            weight.copy_(torch.randn(weight.shape, generator=gen) / fan_in**0.5)
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)


def checkpoint(model, cfg, case):
    """What mmcls's runner saves: weights on the CPU plus meta with the config text. A lone
    backbone's keys get the ``backbone.`` prefix they have in every mmcls/mmdet/mmseg model
    file (what a ``Pretrained`` init_cfg with ``prefix='backbone.'`` reads)."""
    meta = {"mmcls_version": mmcls.__version__, "config": Config(dict(model=cfg)).pretty_text}
    prefix = "backbone." if case["kind"] == "backbone" else ""
    if case["kind"] == "classifier":
        meta["CLASSES"] = [f"class{i}" for i in range(case["num_classes"])]
    weights = {prefix + k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"state_dict": weights, "meta": meta}


@torch.no_grad()
def outputs_of(model, case, x, form, dtype, out_indices):
    """mmcls's outputs for one form and dtype (a deep copy runs, the model is untouched)."""
    model = copy.deepcopy(model).to(dtype).eval()
    x = x.to(dtype)
    if case["kind"] == "classifier":
        return {
            f"{form}/{dtype_name(dtype)}/logits": model.simple_test(x, softmax=False, post_process=False),
            f"{form}/{dtype_name(dtype)}/embedding": model.extract_feat(x, stage="neck")[-1],
        }
    maps = model(x)
    key = "out_indices=" + ",".join(map(str, out_indices))
    return {f"{form}/{dtype_name(dtype)}/{key}": list(maps)}


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def build(case, out_indices=None):
    if case["kind"] == "classifier":
        cfg = classifier_config(case)
        return build_classifier(cfg), cfg
    cfg = backbone_config(case, out_indices)
    return build_backbone(cfg), cfg


def switch_to_deploy(model, case, dtype=torch.float32):
    """mmcls's locality injection on a copy, computed in ``dtype``. mmcls builds its identity
    matrix in the default dtype, so that is switched too (in float64 it fails otherwise)."""
    model = copy.deepcopy(model).to(dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        (model if case["kind"] == "backbone" else model.backbone).switch_to_deploy()
    finally:
        torch.set_default_dtype(default)
    return model


def run_case(case, out_dir):
    name = case["name"]
    index_sets = case.get("out_indices", [[3]])
    model, cfg = build(case, index_sets[0])
    randomize(model, case["seed"])
    model.eval()
    torch.save(checkpoint(model, cfg, case), os.path.join(out_dir, f"{name}.pth"))
    torch.save(checkpoint(switch_to_deploy(model, case), cfg, case), os.path.join(out_dir, f"{name}-deploy.pth"))

    gen = torch.Generator().manual_seed(case["seed"] + 1000)
    size = case["img_size"]
    x = torch.randn(case["batch"], case.get("in_channels", 3), size, size, generator=gen).to(torch.float64)
    torch.save(x, os.path.join(out_dir, f"{name}-input.pt"))

    results = {}
    for position, indices in enumerate(index_sets):
        # Each selection of stages is its own mmcls model, loaded from the saved weights.
        variant, _ = build(case, indices)
        variant.load_state_dict(model.state_dict(), strict=True)
        variant.eval()
        for dtype in (torch.float64, torch.float32):
            results.update(outputs_of(variant, case, x, "training", dtype, indices))
        if position:
            continue  # the deploy forms once, on the first selection (the test slices it)
        # Locality injection in the comparison's own dtype (float64 for the float64 reference),
        # and the deploy file's model (fused in float32) run in both dtypes.
        in_float32 = switch_to_deploy(variant, case)
        for dtype in (torch.float64, torch.float32):
            fused = in_float32 if dtype == torch.float32 else switch_to_deploy(variant, case, dtype)
            results.update(outputs_of(fused, case, x, "deploy", dtype, indices))
            results.update(outputs_of(in_float32, case, x, "deploy_file", dtype, indices))
    torch.save(results, os.path.join(out_dir, f"{name}-outputs.pt"))


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: run_mmcls.py SPEC.json OUT_DIR")
    with open(sys.argv[1], encoding="utf-8") as handle:
        cases = json.load(handle)
    for case in cases:
        run_case(case, sys.argv[2])
    print(json.dumps({"mmcls": mmcls.__version__, "torch": torch.__version__, "cases": [c["name"] for c in cases]}))


if __name__ == "__main__":
    main()
