"""The AOTInductor format (--format aoti, a .pt2 package): built, verified, and served by the
same C++ runtime, binding and CLI as the TorchScript artifact, with the same answers.

Compiling is slow (tens of seconds per program on 2 cores), so each .pt2 here is built once
per module: digits (exact resize) and SMALL_ARCH at 64x96 (short-side resize, antialiased).
"""

import json
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import repmlp_rt
import runtime_helpers
import torch
from helpers import SMALL_ARCH, relative_close, repmlp_infer_binary

from repmlp.artifact import BuildError, build_artifact, default_out_path, read_manifest
from repmlp.artifact.aoti import MANIFEST_RECORD, export_programs, is_pt2_archive
from repmlp.artifact.build import deploy, load_weights, resolve_options
from repmlp.preprocess import ImageTransform
from repmlp.utils import quiet_jit
from repmlp.variants import get_variant

# The artifacts compared: name -> build_artifact arguments (the same for both formats).
CASES = {
    "digits": dict(arch="digits"),
    "small": dict(arch=SMALL_ARCH, img_size=(64, 96), num_classes=10, seed=3),
}
# Image sizes through forward_images: smaller, larger, portrait, landscape, odd and even
# crop offsets, and the input size itself (no resize in the eager and TorchScript forms).
IMAGE_SIZES = [(32, 32), (64, 96), (45, 61), (97, 40), (1, 1), (200, 133), (33, 34)]


_BUILT = {}  # (name, format) -> path: each artifact is built once for the whole module


def _build(tmp_path_factory, name: str, format: str) -> Path:
    if (name, format) not in _BUILT:
        case = dict(CASES[name])
        out = tmp_path_factory.mktemp(f"{name}-{format}") / f"{name}.{'pt2' if format == 'aoti' else 'pt'}"
        build_artifact(case.pop("arch"), out=str(out), format=format, **case)
        _BUILT[name, format] = out
    return _BUILT[name, format]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, .pt2, TorchScript .pt, eager fused wrapper) for one CASES entry."""
    name = request.param
    pt2 = _build(tmp_path_factory, name, "aoti")
    pt = _build(tmp_path_factory, name, "torchscript")
    args = dict(CASES[name])
    options = resolve_options(args.pop("arch"), out=str(pt2) + ".unused", **args)
    model, _, _ = load_weights(options)
    return name, pt2, pt, deploy(model, options)


def _batch(shape, n, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# equivalence: .pt2 vs eager fused vs TorchScript, both entry points


def test_pt2_matches_eager_and_torchscript_through_repmlp_rt(case):
    name, pt2, pt, eager = case
    aoti, script = repmlp_rt.Runtime(str(pt2)), repmlp_rt.Runtime(str(pt))
    assert aoti.input_shape == script.input_shape and aoti.labels == script.labels
    for n in (1, 3, 8):  # the batch is dynamic
        x = _batch(aoti.input_shape, n, seed=n)
        with torch.no_grad():
            expected = eager(x)
        relative_close(aoti.infer(x), expected)
        relative_close(aoti.infer(x), script.infer(x))
    for i, size in enumerate(IMAGE_SIZES):  # so are the image sizes
        images = torch.from_numpy(runtime_helpers.random_images(2, *size, seed=i))
        with torch.no_grad():
            expected = eager.forward_images(images)
        relative_close(aoti.infer_images(images), expected)
        relative_close(aoti.infer_images(images), script.infer_images(images))
    scores, indices = aoti.classify(images)
    torch.testing.assert_close(indices, script.classify(images)[1])


def test_pt2_matches_eager_and_torchscript_through_repmlp_infer(case, tmp_path):
    name, pt2, pt, eager = case
    shape = repmlp_rt.Runtime(str(pt)).input_shape
    x = _batch(shape, 5, seed=11)
    npy = runtime_helpers.write_npy(tmp_path / "batch.npy", x.numpy())
    pngs = [runtime_helpers.save_png(tmp_path / f"img{i}.png", runtime_helpers.random_images(1, *size, seed=i)[0])
            for i, size in enumerate([(45, 61), (97, 40)])]
    outputs = {}
    for label, artifact in (("aoti", pt2), ("torchscript", pt)):
        for kind, inputs in (("npy", [npy]), ("png", pngs)):
            out = tmp_path / f"{label}-{kind}.npy"
            result = _run_cli(artifact, *inputs, "--output", out)
            assert result.returncode == 0, result.stderr
            outputs[label, kind] = torch.from_numpy(np.load(out))
    with torch.no_grad():
        expected_npy = eager(x)
        expected_png = torch.cat([eager.forward_images(torch.from_numpy(np.asarray(_png(p))[None].copy())) for p in pngs])
    for label in ("aoti", "torchscript"):
        relative_close(outputs[label, "npy"], expected_npy)
        relative_close(outputs[label, "png"], expected_png)
    relative_close(outputs["aoti", "npy"], outputs["torchscript", "npy"])
    relative_close(outputs["aoti", "png"], outputs["torchscript", "png"])


def _png(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def _run_cli(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([repmlp_infer_binary(), *map(str, args)], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode >= 0, f"killed by signal {-result.returncode}: {result.stderr}"
    return result


def test_pt2_metadata_and_info(case):
    name, pt2, pt, _ = case
    manifest, script_manifest = read_manifest(str(pt2)), read_manifest(str(pt))
    assert manifest["file_format"] == "aoti" and script_manifest["file_format"] == "torchscript"
    assert manifest["aoti"]["torch_version"] == torch.__version__ and manifest["aoti"]["device"] == "cpu"
    for key in ("arch", "input", "preprocessing", "output", "weights", "model"):
        assert manifest[key] == script_manifest[key], key
    assert [s["stage"] for s in manifest["verification"]["stages"]] == [
        "load", "deploy", "export", "compile", "save", "reload"]
    runtime = repmlp_rt.Runtime(str(pt2))
    assert runtime.manifest == manifest
    result = _run_cli("--info", pt2)
    assert result.returncode == 0, result.stderr
    assert f"input shape:    {manifest['input']['shape']}" in result.stdout  # "[3, 32, 32]"


# ---------------------------------------------------------------------------------------------
# the preprocessing program: torch.export with symbolic image sizes, same arithmetic


@pytest.mark.parametrize("mode, interpolation, antialias", [
    ("short_side", "bilinear", True), ("short_side", "bicubic", True), ("short_side", "nearest", False),
    ("exact", "bilinear", False), ("exact", "bicubic", True),
])
def test_exported_preprocessing_matches_eager_and_torchscript(mode, interpolation, antialias):
    """Exported once with dynamic batch, height and width; every size then agrees exactly."""
    pre = replace(get_variant("T224").preprocessing, resize_mode=mode, interpolation=interpolation,
                  antialias=antialias, resize=(72, 72) if mode == "short_side" else (72, 80), crop=(64, 64))
    transform = ImageTransform(pre).eval()
    with quiet_jit():
        scripted = torch.jit.script(transform)

    class Wrapper(torch.nn.Module):  # export_programs' preprocess program takes .image_transform
        def __init__(self):
            super().__init__()
            self.image_transform = transform

        def forward(self, x):
            return x

    example = torch.zeros(2, 50, 70, 3, dtype=torch.uint8)
    exported = export_programs(Wrapper(), torch.zeros(2, 3, 64, 64), example).programs["preprocess"].module()
    for i, size in enumerate(IMAGE_SIZES + [(64, 64), (72, 72), (72, 80), (500, 375)]):
        images = torch.from_numpy(runtime_helpers.random_images(2, *size, seed=i))
        expected = transform(images)
        torch.testing.assert_close(exported(images), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(scripted(images), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# bad .pt2 files: one clear ArtifactError (binding) / exit 1 (CLI), never a crash


def _rewrite(source: Path, target: Path, change) -> Path:
    """A copy of the zip at ``source`` with ``change(name, data) -> data or None (drop)``."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = change(info.filename, src.read(info.filename))
            if data is not None:
                dst.writestr(info.filename, data)
    return target


def _edit_manifest(edit):
    def change(name, data):
        if not name.endswith(MANIFEST_RECORD):
            return data
        manifest = json.loads(data)
        edit(manifest)
        return json.dumps(manifest).encode()
    return change


def _set_device_key(name, data):
    if name.endswith("wrapper_metadata.json"):
        metadata = json.loads(data)
        metadata["AOTI_DEVICE_KEY"] = "cuda"
        return json.dumps(metadata).encode()
    return data


@pytest.fixture(scope="module")
def digits_pt2(tmp_path_factory):
    return _build(tmp_path_factory, "digits", "aoti")


BAD_PT2 = {
    "truncated": (lambda good, path: runtime_helpers.write_truncated(good, path), "cannot load artifact"),
    "foreign": (lambda good, path: _rewrite(good, path, lambda n, d: None if n.endswith(MANIFEST_RECORD) else d),
                "not a RepMLP artifact: an AOTInductor package without extra/manifest.json"),
    "other_torch": (lambda good, path: _rewrite(good, path, _edit_manifest(
        lambda m: m["aoti"].update(torch_version="2.99.0+cpu"))),
        "compiled by torch 2.99.0+cpu, but this runtime runs torch"),
    "other_device": (lambda good, path: _rewrite(good, path, _set_device_key),
                     "compiled for device type 'cuda'"),
    "format_version": (lambda good, path: _rewrite(good, path, _edit_manifest(
        lambda m: m.update(format_version=2))), "format version 2"),
    "bad_manifest": (lambda good, path: _rewrite(good, path, _edit_manifest(lambda m: m.pop("input"))),
                     "extra/manifest.json is not a valid manifest"),
}


@pytest.mark.parametrize("bad", list(BAD_PT2))
def test_bad_pt2_is_a_clear_error(digits_pt2, tmp_path, bad):
    make, fragment = BAD_PT2[bad]
    path = make(digits_pt2, tmp_path / "bad.pt2")
    with pytest.raises(repmlp_rt.ArtifactError, match=None) as raised:
        repmlp_rt.Runtime(str(path))
    assert fragment in str(raised.value), str(raised.value)
    result = _run_cli(path, runtime_helpers.write_npy(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32)))
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repmlp_infer: error: ") and fragment in lines[0], result.stderr


def test_pt2_content_not_name_decides_the_format(digits_pt2, tmp_path):
    renamed = tmp_path / "model.pt"
    renamed.write_bytes(digits_pt2.read_bytes())
    assert is_pt2_archive(str(renamed)) and not is_pt2_archive(str(tmp_path))
    runtime = repmlp_rt.Runtime(str(renamed))
    assert runtime.manifest["file_format"] == "aoti"
    assert read_manifest(str(renamed))["file_format"] == "aoti"


# ---------------------------------------------------------------------------------------------
# the builder: default name, atomic write


def test_default_out_path_follows_the_format():
    assert default_out_path("b", "aoti") == "repmlp-B224.pt2"
    assert default_out_path("b") == "repmlp-B224.pt"
    with pytest.raises(BuildError, match="format must be one of torchscript, aoti"):
        build_artifact(out="x.pt", format="onnx")


def test_a_failed_aoti_build_leaves_nothing(tmp_path, monkeypatch):
    import repmlp.artifact.build as build

    def broken(exported):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(build, "compile_programs", broken)
    with pytest.raises(BuildError, match="build failed: compiler exploded"):
        build_artifact(out=str(tmp_path / "d.pt2"), format="aoti")
    assert list(tmp_path.iterdir()) == []


def test_optimize_is_for_torchscript_only(digits_pt2):
    with pytest.raises(repmlp_rt.InputError, match="optimize applies to TorchScript artifacts"):
        repmlp_rt.Runtime(str(digits_pt2), optimize=True)
