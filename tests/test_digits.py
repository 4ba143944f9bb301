"""The shipped digits checkpoint (examples/digits): accuracy and equivalence of every form.

On the Python side: held-out accuracy >= 97% for the training form
(recomputed here from the shipped checkpoint on the recorded split); the deploy forms and the
scripted artifact give the same top-1 on every held-out image and logits within rtol 1e-5; the
artifact's raw-image method classifies the whole dataset (8x8 uint8 RGB) at >= 97%; the shipped
PNGs are exactly the dataset images they are named after. The C++ runtime (repmlp_rt.infer,
repmlp_infer) is compared with the artifact where it is built.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import repmlp
import torch
from data import load_digits_rgb, split  # examples/digits/data.py (pytest.ini pythonpath)
from helpers import ROOT, relative_close, repmlp_infer_binary
from repmlp.artifact import default_checkpoint
from repmlp.preprocess import ImageTransform

DIGITS_DIR = os.path.join(ROOT, "examples", "digits")
IMAGES_DIR = os.path.join(DIGITS_DIR, "images")

MIN_ACCURACY = 0.97
RTOL = 1e-5
PNG_RE = re.compile(r"^(\d)_(\d+)\.png$")


@pytest.fixture(scope="module")
def dataset():
    images, labels = load_digits_rgb()
    train_idx, test_idx = split(labels)
    return images, labels, train_idx, test_idx


@pytest.fixture(scope="module")
def trained():
    """The shipped checkpoint in its training form (eval mode)."""
    model = repmlp.create_model("digits")
    info = repmlp.load_checkpoint(model, default_checkpoint())
    assert info.layout == "official" and info.form == "training"
    return model.eval()


@pytest.fixture(scope="module")
def held_out(dataset, trained):
    """(normalized held-out inputs, labels, training-form logits)."""
    images, labels, _, test_idx = dataset
    transform = ImageTransform(trained.config.preprocessing)
    x = transform(torch.from_numpy(images[test_idx]))
    with torch.no_grad():
        logits = trained(x)
    return x, torch.from_numpy(labels[test_idx]), logits


def test_dataset_and_split_are_the_recorded_ones(dataset):
    images, labels, train_idx, test_idx = dataset
    assert images.shape == (1797, 8, 8, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
    assert set(np.unique(images)) <= {round(v * 255 / 16) for v in range(17)}
    assert len(train_idx) == 1347 and len(test_idx) == 450
    assert not set(train_idx) & set(test_idx)
    # stratified: every class is held out in proportion
    counts = np.bincount(labels[test_idx], minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47


def test_checkpoint_is_small_training_form_official_layout():
    path = default_checkpoint()
    assert os.path.getsize(path) < 5 * 1024 * 1024
    state = torch.load(path, map_location="cpu", weights_only=True)
    keys = list(state)
    assert any(k.endswith("fc3_bn.running_var") for k in keys)
    assert any(".repconv3.conv.weight" in k for k in keys)
    assert all(not k.startswith(("backbone.", "module.")) for k in keys)


def test_training_form_held_out_accuracy(held_out):
    _, y, logits = held_out
    acc = (logits.argmax(1) == y).float().mean().item()
    assert acc >= MIN_ACCURACY, f"held-out accuracy {acc:.4f} < {MIN_ACCURACY}"


@pytest.mark.parametrize("convert", [repmlp.reparameterize_model, repmlp.fuse_model], ids=["deploy", "fused"])
def test_deploy_forms_match_training_form(trained, held_out, convert):
    x, _, logits = held_out
    deployed = convert(trained)
    assert deployed.form in ("deploy", "fused")
    with torch.no_grad():
        out = deployed(x)
    assert torch.equal(out.argmax(1), logits.argmax(1))
    relative_close(out, logits, RTOL)


@pytest.fixture(scope="module")
def scripted(digits_artifact):
    return torch.jit.load(digits_artifact, map_location="cpu").eval()


def test_artifact_matches_training_form(scripted, dataset, held_out):
    images, _, _, test_idx = dataset
    x, _, logits = held_out
    assert scripted.labels() == [str(i) for i in range(10)]
    assert scripted.input_shape() == [3, 32, 32]
    with torch.no_grad():
        out = scripted(x)
        raw = scripted.forward_images(torch.from_numpy(images[test_idx]))
    assert torch.equal(out.argmax(1), logits.argmax(1))
    relative_close(out, logits, RTOL)
    # the baked-in preprocessing is the one training used
    assert torch.equal(raw.argmax(1), logits.argmax(1))
    relative_close(raw, logits, RTOL)


def test_artifact_raw_images_whole_dataset_accuracy(scripted, dataset):
    images, labels, _, _ = dataset
    with torch.no_grad():
        logits = scripted.forward_images(torch.from_numpy(images))
    acc = (logits.argmax(1).numpy() == labels).mean()
    assert acc >= MIN_ACCURACY, f"whole-dataset accuracy {acc:.4f} < {MIN_ACCURACY}"


def _pngs():
    return sorted(n for n in os.listdir(IMAGES_DIR) if n.endswith(".png"))


def test_shipped_pngs_are_the_named_held_out_digits(dataset):
    from PIL import Image

    images, labels, _, test_idx = dataset
    names = _pngs()
    assert len(names) >= 10
    assert {PNG_RE.match(n).group(1) for n in names} == {str(i) for i in range(10)}
    held = set(test_idx.tolist())
    for name in names:
        m = PNG_RE.match(name)
        assert m, name
        label, index = int(m.group(1)), int(m.group(2))
        assert index in held, f"{name} is not a held-out image"
        assert labels[index] == label, f"{name}: dataset label is {labels[index]}"
        with Image.open(os.path.join(IMAGES_DIR, name)) as img:
            assert img.mode == "RGB" and img.size == (8, 8)
            pixels = np.asarray(img)
        np.testing.assert_array_equal(pixels, images[index], err_msg=name)


# --- the C++ runtime, where it is built --------------------------------------------------------


def test_repmlp_rt_matches_artifact(digits_artifact, scripted, dataset, held_out):
    import repmlp_rt
    images, _, _, test_idx = dataset
    x, _, logits = held_out
    with torch.no_grad():
        ref = scripted(x)
    out = torch.from_numpy(np.asarray(repmlp_rt.infer(digits_artifact, x.numpy())))
    assert torch.equal(out.argmax(1), logits.argmax(1))
    relative_close(out, ref, RTOL)
    runtime = repmlp_rt.Runtime(digits_artifact)
    raw = torch.from_numpy(np.asarray(runtime.infer_images(np.ascontiguousarray(images[test_idx]))))
    assert torch.equal(raw.argmax(1), logits.argmax(1))
    relative_close(raw, ref, RTOL)


def test_repmlp_infer_on_shipped_pngs(digits_artifact, scripted, dataset, tmp_path):
    binary = repmlp_infer_binary()
    images, _, _, _ = dataset
    names = _pngs()
    paths = [os.path.join(IMAGES_DIR, n) for n in names]
    out_npy = str(tmp_path / "logits.npy")
    proc = subprocess.run(
        [binary, digits_artifact, *paths, "--json", "--topk", "1", "--output", out_npy],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    indices = [int(PNG_RE.match(n).group(2)) for n in names]
    with torch.no_grad():
        ref = scripted.forward_images(torch.from_numpy(images[indices]))
    got = torch.from_numpy(np.load(out_npy))
    relative_close(got, ref, RTOL)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            obj = json.loads(line)
            results[obj["input"]] = obj
    for path, expected in zip(paths, ref.argmax(1).tolist()):
        assert results[path]["topk"][0]["index"] == expected, path
        assert results[path]["topk"][0]["label"] == str(expected), path


def test_demo_script(digits_artifact, scripted, dataset):
    repmlp_infer_binary()  # demo.py finds it the same way: on PATH, else beside python
    proc = subprocess.run(
        [sys.executable, os.path.join(DIGITS_DIR, "demo.py"), digits_artifact, IMAGES_DIR],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # The score the demo must print: the artifact's own top-1 on the dataset images the PNGs
    # are (test_shipped_pngs_are_the_named_held_out_digits), against the labels in their names.
    images, _, _, _ = dataset
    names = _pngs()
    matches = [PNG_RE.match(n) for n in names]
    with torch.no_grad():
        logits = scripted.forward_images(torch.from_numpy(images[[int(m.group(2)) for m in matches]]))
    correct = int(sum(int(p) == int(m.group(1)) for p, m in zip(logits.argmax(1).tolist(), matches)))
    assert correct >= len(names) - 2, f"the artifact gets {correct}/{len(names)} shipped digits right"
    assert re.search(rf"^accuracy: {correct}/{len(names)} = ", proc.stdout, re.M), proc.stdout
