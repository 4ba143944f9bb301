"""Feature and embedding artifacts, end to end: builder, artifact, repmlp_rt, repmlp_infer.

Every feature map is compared with ``seed_forward`` (tests/test_backbone.py: a transcription
of mmcls's RepMLPNet.forward) run on the training-form model the artifact was built from.
"""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import repmlp
from repmlp import export_state_dict
from repmlp.artifact import BuildError, build_artifact, default_checkpoint, read_manifest
from repmlp.preprocess import ImageTransform

from helpers import ROOT, SMALL_ARCH, make_model, relative_close, repmlp_infer_binary
from test_backbone import seed_forward

OUT_INDICES = [(0, 1, 2, 3), (1, 3), (3,)]
SIZES = [(32, 32), (64, 32)]
CASES = list(itertools.product(OUT_INDICES, [True, False], SIZES))
RTOL = 1e-5


def _case_id(case):
    out_indices, final_norm, size = case
    return f"{''.join(map(str, out_indices))}-{'norm' if final_norm else 'nonorm'}-{size[0]}x{size[1]}"


def _load(path):
    return torch.jit.load(str(path), map_location="cpu").eval()


@pytest.fixture(scope="module", params=CASES, ids=_case_id)
def features_case(request, tmp_path_factory):
    """(artifact path, training-form model, normalized batch, the seed's maps for it)."""
    out_indices, final_norm, size = request.param
    folder = tmp_path_factory.mktemp("features")
    model = make_model(img_size=size, num_classes=0, final_norm=final_norm, seed=6)
    checkpoint = folder / "backbone.pth"
    # A backbone-only checkpoint (no head.*), in mmcls's layout.
    torch.save(export_state_dict(model, "mmcls"), checkpoint)
    path = folder / "features.pt"
    build_artifact(
        SMALL_ARCH, img_size=size, checkpoint=str(checkpoint), out=str(path), output="features",
        out_indices=out_indices, final_norm=final_norm,
    )
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = seed_forward(model, x, out_indices)
    return path, model, x, expected


def _names(out_indices):
    return [f"stage{i}" for i in out_indices]


def test_features_artifact_equals_the_seed_forward(features_case):
    path, _, x, expected = features_case
    scripted = _load(path)
    manifest = read_manifest(str(path))
    with torch.no_grad():
        outs = scripted(x)
    assert scripted.output_kind() == "features" and scripted.labels() == []
    assert scripted.output_names() == [o["name"] for o in manifest["outputs"]]
    assert len(outs) == len(expected) == len(manifest["outputs"])
    for got, want, described in zip(outs, expected, manifest["outputs"]):
        assert got.dtype == torch.float32 and described["dtype"] == "float32"
        assert list(got.shape[1:]) == described["shape"]
        relative_close(got, want, RTOL)


def test_features_through_repmlp_rt_equal_the_seed_forward(features_case):
    import repmlp_rt

    path, _, x, expected = features_case
    runtime = repmlp_rt.Runtime(path)
    names = runtime.output_names
    assert runtime.output_kind == "features" and len(names) == len(expected)
    for caller_type, to_tensor in ((np.asarray, torch.from_numpy), (lambda t: t, lambda t: t)):
        outs = runtime.infer_outputs(caller_type(x.numpy()) if caller_type is np.asarray else x)
        assert list(outs) == names
        for name, want in zip(names, expected):
            got = outs[name]
            assert isinstance(got, np.ndarray if caller_type is np.asarray else torch.Tensor)
            relative_close(to_tensor(got), want, RTOL)


def test_features_through_repmlp_infer_equal_the_seed_forward(features_case, tmp_path):
    path, _, x, expected = features_case
    batch = tmp_path / "x.npy"
    np.save(batch, x.numpy())
    out = tmp_path / "maps.npz"
    result = subprocess.run(
        [repmlp_infer_binary(), str(path), str(batch), "--batch", "2", "--output", str(out), "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(str(path))
    names = [o["name"] for o in manifest["outputs"]]
    with np.load(out) as maps:
        assert list(maps.files) == names
        for name, want in zip(names, expected):
            assert maps[name].dtype == np.float32
            relative_close(torch.from_numpy(maps[name]), want, RTOL)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["input"] for r in records] == [f"{batch}[{i}]" for i in range(3)]
    for record in records:
        assert [o["name"] for o in record["outputs"]] == names
        assert [o["shape"] for o in record["outputs"]] == [o["shape"] for o in manifest["outputs"]]


def test_features_through_forward_images_equal_the_model_on_preprocessed_images(features_case):
    path, model, _, _ = features_case
    scripted = _load(path)
    h, w = model.config.img_size
    images = torch.randint(0, 256, (2, h + 5, w + 9, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = ImageTransform(model.config.preprocessing)(images)
        expected = seed_forward(model, x, read_manifest(str(path))["output"]["out_indices"])
        for got, want in zip(scripted.forward_images(images), expected):
            relative_close(got, want, RTOL)


@pytest.fixture(scope="module")
def digits_embedding(tmp_path_factory):
    path = tmp_path_factory.mktemp("embedding") / "digits-embedding.pt"
    report = build_artifact("digits", out=str(path), output="embedding")
    assert report.manifest["weights"]["head"] == "ignored"
    return path


def test_embedding_artifact_is_the_classifiers_input(digits_embedding):
    import repmlp_rt

    model = repmlp.create_model("digits")
    repmlp.load_checkpoint(model, default_checkpoint())
    model.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        # the classifier applied to the embedding gives the logits
        torch.testing.assert_close(model.head(expected), model(x))
    manifest = read_manifest(str(digits_embedding))
    assert manifest["outputs"] == [{"name": "embedding", "shape": [128], "dtype": "float32"}]
    assert manifest["output"]["kind"] == "embedding"
    relative_close(_load(digits_embedding)(x), expected, RTOL)
    runtime = repmlp_rt.Runtime(digits_embedding)
    relative_close(runtime.infer(x), expected, RTOL)  # one output: infer returns it
    relative_close(runtime.infer_outputs(x)["embedding"], expected, RTOL)


def test_digits_embedding_nearest_neighbour_top1(digits_embedding):
    """Embeddings of the held-out digits, matched by cosine similarity against the training
    split's, give the right digit for >= 95% of them (through repmlp_rt, raw uint8 images)."""
    import repmlp_rt

    sys.path.insert(0, os.path.join(ROOT, "examples", "digits"))
    from data import load_digits_rgb, split

    images, labels = load_digits_rgb()
    train, test = split(labels)
    runtime = repmlp_rt.Runtime(digits_embedding)
    gallery = runtime.infer_outputs(np.ascontiguousarray(images[train]))["embedding"]
    queries = runtime.infer_outputs(np.ascontiguousarray(images[test]))["embedding"]
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    nearest = (queries @ gallery.T).argmax(1)
    accuracy = (labels[train][nearest] == labels[test]).mean()
    assert accuracy >= 0.95, f"nearest-neighbour top-1 {accuracy:.4f} < 0.95"


def test_embedding_json_prints_the_vector(digits_embedding, tmp_path):
    import repmlp_rt

    png = os.path.join(ROOT, "examples", "digits", "images", "0_0078.png")
    result = subprocess.run(
        [repmlp_infer_binary(), str(digits_embedding), png, "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    (output,) = record["outputs"]
    assert output["name"] == "embedding" and output["shape"] == [128]
    image = repmlp_rt.decode_image(png)[None]
    expected = repmlp_rt.Runtime(digits_embedding).infer_outputs(image)["embedding"][0]
    np.testing.assert_allclose(np.asarray(output["values"], dtype=np.float32), expected, rtol=1e-5, atol=1e-6)


# --- what is not allowed -----------------------------------------------------------------------


def test_logits_artifact_from_a_backbone_only_checkpoint_is_a_clear_error(tmp_path):
    model = make_model(img_size=32, num_classes=10, seed=1)
    state = {k: v for k, v in export_state_dict(model, "official").items() if not k.startswith("head.")}
    checkpoint = tmp_path / "backbone.pth"
    torch.save(state, checkpoint)
    out = tmp_path / "a.pt"
    with pytest.raises(ValueError, match=r"no classifier .*output='features' or output='embedding'"):
        build_artifact(SMALL_ARCH, img_size=32, num_classes=10, checkpoint=str(checkpoint), out=str(out))
    assert not out.exists()
    # the same checkpoint makes a features artifact
    build_artifact(SMALL_ARCH, img_size=32, checkpoint=str(checkpoint), out=str(out), output="features")
    assert read_manifest(str(out))["weights"]["head"] == "absent"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"output": "pixels"}, "output must be one of logits, features, embedding"),
        ({"output": "features", "out_indices": (4,)}, r"must lie in \[0, 4\)"),
        ({"output": "features", "out_indices": ()}, "at least one stage"),
        ({"output": "logits", "out_indices": (1,)}, "out_indices apply to output='features'"),
        ({"output": "embedding", "num_classes": 10}, "num_classes applies to output='logits'"),
        ({"output": "embedding", "pre_downsample": True}, "pre_downsample applies to output='features'"),
    ],
)
def test_bad_output_options_are_build_errors(tmp_path, options, message):
    with pytest.raises(BuildError, match=message):
        build_artifact(SMALL_ARCH, img_size=32, out=str(tmp_path / "a.pt"), **options)


def test_repmlp_build_cli_output_options(tmp_path):
    out = tmp_path / "f.pt"
    cmd = [sys.executable, "-m", "repmlp", "--arch", "digits", "--output", "features", "--out-indices", "1,3",
           "--pre-downsample", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    outputs = read_manifest(str(out))["outputs"]
    assert [(o["name"], o["shape"], o["stride"]) for o in outputs] == [("stage1", [32, 4, 4], 8), ("stage3", [128, 1, 1], 32)]
    for bad, message in [(["--out-indices", "1,x"], "--out-indices"), (["--output", "logits", "--out-indices", "1"], "out-indices")]:
        result = subprocess.run([sys.executable, "-m", "repmlp", "--arch", "digits", *bad, "--out", str(tmp_path / "g.pt")],
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.fixture(scope="module")
def small_features(tmp_path_factory):
    path = tmp_path_factory.mktemp("small_features") / "f.pt"
    build_artifact(SMALL_ARCH, img_size=32, out=str(path), output="features", out_indices=(0, 3), seed=2)
    return path


def test_classify_and_single_output_calls_on_features_are_input_errors(small_features):
    import repmlp_rt

    runtime = repmlp_rt.Runtime(small_features)
    assert runtime.num_classes == 0 and runtime.labels == []
    images = np.zeros((1, 40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="classify needs an artifact with class logits.*features"):
        runtime.classify(images)
    with pytest.raises(ValueError, match="2 outputs.*stage0, stage3.*infer_outputs"):
        runtime.infer(images)
    assert sorted(runtime.infer_outputs(images)) == ["stage0", "stage3"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topk", "1"], "--topk needs an artifact with class logits"),
        (["--output", "{tmp}/x.npy"], "has 2 outputs (stage0, stage3): --output needs a .npz file"),
        (["--output", "{tmp}/x.txt"], "--output must name a .npy or .npz file"),
    ],
)
def test_repmlp_infer_usage_errors_on_features(small_features, tmp_path, args, message):
    png = os.path.join(ROOT, "examples", "digits", "images", "0_0078.png")
    args = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run([repmlp_infer_binary(), str(small_features), png, *args],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith("repmlp_infer: error: ") and message in result.stderr, result.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_repmlp_infer_text_lists_each_output(small_features):
    png = os.path.join(ROOT, "examples", "digits", "images", "0_0078.png")
    result = subprocess.run([repmlp_infer_binary(), str(small_features), png],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{png}: stage0 [32, 4, 4], stage3 [128, 1, 1]"


@pytest.mark.slow
def test_b224_features_artifact_through_repmlp_infer_writes_the_seeds_shapes(tmp_path):
    from PIL import Image

    path = tmp_path / "b224-features.pt"
    cmd = [sys.executable, "-m", "repmlp", "--arch", "B224", "--output", "features", "--out-indices", "0,1,2,3",
           "--out", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    image = np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    png = tmp_path / "x.png"
    Image.fromarray(image).save(png)
    out = tmp_path / "f.npz"
    result = subprocess.run([repmlp_infer_binary(), str(path), str(png), "--output", str(out)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    with np.load(out) as maps:
        # mmcls B224, out_indices (0, 1, 2, 3)
        assert [maps[name].shape for name in maps.files] == [(1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7), (1, 768, 7, 7)]
        expected = _load(path).forward_images(torch.from_numpy(image[None]))
        for name, want in zip(maps.files, expected):
            relative_close(torch.from_numpy(maps[name]), want, RTOL)


def test_triton_repository_is_for_logits_artifacts(small_features, tmp_path):
    from repmlp_rt.triton import write_triton_repository

    with pytest.raises(ValueError, match="outputs features; a Triton repository is written for logits"):
        write_triton_repository(small_features, tmp_path)
    assert list(tmp_path.iterdir()) == []
    result = subprocess.run([sys.executable, "-m", "repmlp", "--arch", "digits", "--output", "embedding",
                             "--triton-repo", str(tmp_path), "--out", str(tmp_path / "e.pt")],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2 and "--triton-backend libtorch serves logits artifacts" in result.stderr, result.stderr
