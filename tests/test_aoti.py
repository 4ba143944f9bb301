"""The AOTInductor format (--format aoti, a .pt2 package): built, verified, and served by the
same C++ runtime, binding and CLI as the TorchScript artifact, with the same answers; and
self-verifying as the TorchScript artifact is (the probe and the digest, docs/ARTIFACT.md).

Compiling is slow (tens of seconds per program on 2 cores), so each .pt2 here is built once
per module: digits (exact resize) and SMALL_ARCH at 64x96 (short-side resize, antialiased).
"""

import base64
import contextlib
import functools
import hashlib
import json
import re
import struct
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

from repmlp import integrity
from repmlp.artifact import FORMATS, BuildError, build_artifact, default_out_path, deploy, load_weights, read_manifest, resolve_options
from repmlp.artifact.aoti import MANIFEST_RECORD, CompiledArtifact, Pt2Artifact, export_programs, is_pt2_archive
from repmlp.artifact.publish import load_checked
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


def _rewrite(source: Path, target: Path, change, reseal: bool = False) -> Path:
    """A copy of the zip at ``source`` with ``change(name, data) -> data or None (drop)``.
    ``reseal``: the digest is computed again for the new records, as a package really built that
    way (by another torch, for another device) would carry it."""
    digest = "extra/" + integrity.DIGEST_RECORD
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if reseal and info.filename.endswith(digest):
                continue
            data = change(info.filename, src.read(info.filename))
            if data is not None:
                dst.writestr(info.filename, data)
    if reseal:
        integrity.seal(str(target))
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
        lambda m: m["aoti"].update(torch_version="2.99.0+cpu")), reseal=True),
        "compiled by torch 2.99.0+cpu, but this runtime runs torch"),
    "other_device": (lambda good, path: _rewrite(good, path, _set_device_key, reseal=True),
                     "compiled for device type 'cuda'"),
    "format_version": (lambda good, path: _rewrite(good, path, _edit_manifest(
        lambda m: m.update(format_version=2)), reseal=True), "format version 2"),
    "bad_manifest": (lambda good, path: _rewrite(good, path, _edit_manifest(lambda m: m.pop("input")), reseal=True),
                     "extra/manifest.json is not a valid manifest"),
    # The loader quotes the byte, which is not UTF-8: escaped (found by tests/fuzz.py).
    "non_utf8_version": (runtime_helpers.write_non_utf8_version, "Couldn't parse the version \\x"),
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
    import repmlp.artifact.aoti as aoti

    def broken(exported):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(aoti, "compile_programs", broken)
    with pytest.raises(BuildError, match="build failed: compiler exploded"):
        build_artifact(out=str(tmp_path / "d.pt2"), format="aoti")
    assert list(tmp_path.iterdir()) == []


def test_optimize_is_for_torchscript_only(digits_pt2):
    with pytest.raises(repmlp_rt.InputError, match="optimize applies to TorchScript artifacts"):
        repmlp_rt.Runtime(str(digits_pt2), optimize=True)


# ---------------------------------------------------------------------------------------------
# self-verification: the probe and the digest, checked by the builder's reload and at load


@pytest.fixture(scope="module")
def digits_eager():
    """The digits model's eager fused form (what the .pt2 was compiled from)."""
    options = resolve_options("digits", out="unused.pt2")
    model, _, _ = load_weights(options)
    return deploy(model, options)


def _members(path: Path) -> dict:
    """Record name (without the archive's top folder) -> ZipInfo."""
    with zipfile.ZipFile(path) as archive:
        return {info.filename.split("/", 1)[1]: info for info in archive.infolist()}


def _record_data_span(path: Path, name: str):
    """(offset of the record's bytes in the file, their size); the record is stored, not deflated."""
    info = _members(path)[name]
    assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _library(path: Path, program: str = "forward") -> str:
    """The record name of a program's compiled shared library."""
    [name] = [n for n in _members(path) if n.startswith(f"data/aotinductor/{program}/") and n.endswith(".so")]
    return name


def _flipped(source: Path, target: Path, offset: int) -> Path:
    data = bytearray(source.read_bytes())
    data[offset] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def _probe(path: Path) -> dict:
    """The probe stored in a .pt2, decoded here without repmlp.integrity's record reader."""
    with zipfile.ZipFile(path) as archive:
        text = archive.read(next(n for n in archive.namelist() if n.endswith("extra/probe.pt.b64")))
    return integrity.load_probe(base64.b64decode(text, validate=True))


def _x(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def test_an_intact_pt2_carries_the_probe_and_the_digest_and_passes(digits_pt2, tmp_path_factory):
    members = _members(digits_pt2)
    with zipfile.ZipFile(digits_pt2) as archive:
        digest = json.loads(archive.read(members["extra/digest.json"]))
        for name, sha in digest["records"].items():
            assert hashlib.sha256(archive.read(members[name])).hexdigest() == sha, name
    assert digest["algorithm"] == "sha256"
    assert set(digest["records"]) == set(members) - {"extra/digest.json"}
    assert {"extra/manifest.json", "extra/probe.pt.b64", _library(digits_pt2), _library(digits_pt2, "preprocess")} \
        <= set(digest["records"])
    integrity.check_digest(str(digits_pt2))

    # The same seeded probe as the TorchScript artifact of the same model: both are the loaded
    # model's outputs, computed before either format's steps.
    pt = _build(tmp_path_factory, "digits", "torchscript")
    script_probe = integrity.load_probe(integrity.read_record(str(pt), "extra/probe.pt"))
    probe = _probe(digits_pt2)
    assert set(probe) == set(script_probe) == {
        "forward/input", "forward/output", "forward_images/input", "forward_images/output"}
    for key in probe:
        torch.testing.assert_close(probe[key], script_probe[key], rtol=0, atol=0)

    manifest, script_manifest = read_manifest(str(digits_pt2)), read_manifest(str(pt))
    assert manifest["digest"] == script_manifest["digest"]
    assert manifest["probe"]["record"] == "probe.pt.b64"
    assert manifest["probe"]["format"].startswith("base64 of torch.save")
    for key in ("entry_points", "reference", "metric", "tolerance"):
        assert manifest["probe"][key] == script_manifest["probe"][key], key

    runtime = repmlp_rt.Runtime(str(digits_pt2))
    check = runtime.self_check
    assert check["tolerance"] == manifest["probe"]["tolerance"]["cpu"] == 1e-4
    assert 0 <= check["error"] <= check["tolerance"]
    info = _run_cli("--info", digits_pt2)
    assert info.returncode == 0 and "self-check:     passed (digest of every record" in info.stdout, info.stderr

    # torch's own PT2 reader still reads the package: every extra/ record is UTF-8 text.
    from torch.export.pt2_archive._package import load_pt2

    assert set(load_pt2(str(digits_pt2)).extra_files) == {"manifest.json", "probe.pt.b64", "digest.json"}


@pytest.fixture()
def weight_flipped(digits_pt2, digits_eager, tmp_path):
    """The digits .pt2 with one byte flipped in a classifier weight inside the compiled forward
    library (AOTInductor embeds the weights there, as raw float32)."""
    name = _library(digits_pt2)
    offset, size = _record_data_span(digits_pt2, name)
    weights = digits_eager.model.head.weight.detach().contiguous().numpy()
    with open(digits_pt2, "rb") as fh:
        fh.seek(offset)
        library = fh.read(size)
    at = library.find(weights.tobytes())
    assert at >= 0 and library.find(weights.tobytes(), at + 1) < 0, "the head weights are not in the library once"
    element = weights.size // 2 * 4 + 3  # the sign and exponent byte of a float32 in the middle
    return _flipped(digits_pt2, tmp_path / "flipped.pt2", offset + at + element), name


def _assert_digest_refusal_everywhere(path, npy, x, record):
    """repmlp_infer (exit 1, one line), repmlp_rt.Runtime and repmlp_rt.infer all refuse the
    file because ``record`` no longer matches its digest."""
    message = f"self-check failed: record '{record}' does not match its SHA-256 digest"
    result = _run_cli(path, npy)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("repmlp_infer: error: ") and message in result.stderr, result.stderr
    with pytest.raises(repmlp_rt.ArtifactError, match=re.escape(message)):
        repmlp_rt.Runtime(str(path))
    with pytest.raises(repmlp_rt.ArtifactError, match=re.escape(message)):
        repmlp_rt.infer(str(path), x)


def test_a_flipped_weight_byte_in_a_pt2_fails_the_self_check_everywhere(weight_flipped, digits_pt2, tmp_path):
    path, record = weight_flipped
    x = _x()
    npy = runtime_helpers.write_npy(tmp_path / "x.npy", x)
    _assert_digest_refusal_everywhere(path, npy, x, record)

    # Without the digest, the probe sees this flip.
    probe_message = "self-check failed: worst relative error"
    with pytest.raises(repmlp_rt.ArtifactError, match=probe_message):
        repmlp_rt.Runtime(str(path), verify_digest=False)
    result = _run_cli(path, npy, "--no-verify-digest")
    assert result.returncode == 1 and probe_message in result.stderr and result.stderr.count("\n") == 1, result.stderr

    # Turning verification off is the user's choice: the file loads and answers without a word,
    # with the corrupted weights (torch's own loader agrees) instead of the built ones.
    result = _run_cli(path, npy, "--no-verify")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    runtime = repmlp_rt.Runtime(str(path), verify=False)
    assert runtime.self_check is None
    answer = torch.from_numpy(runtime.infer(x))
    relative_close(torch.from_numpy(repmlp_rt.infer(str(path), x, verify=False)), answer)
    with torch.no_grad():
        relative_close(answer, Pt2Artifact(str(path), torch.device("cpu")).forward(torch.from_numpy(x)))
    intact = torch.from_numpy(repmlp_rt.Runtime(str(digits_pt2)).infer(x))
    assert (answer - intact).abs().max() > 1e-2 * intact.abs().max()


def test_a_flipped_byte_in_the_compiled_library_is_refused_before_it_is_loaded(digits_pt2, tmp_path):
    """A changed ELF header: with the digest on, the library is never handed to the loader
    (whose error would be another); with verification off, the loader's own error."""
    name = _library(digits_pt2)
    offset, _ = _record_data_span(digits_pt2, name)
    path = _flipped(digits_pt2, tmp_path / "elf.pt2", offset + 1)  # the "E" of "\x7fELF"
    x = _x()
    npy = runtime_helpers.write_npy(tmp_path / "x.npy", x)
    _assert_digest_refusal_everywhere(path, npy, x, name)
    with pytest.raises(repmlp_rt.ArtifactError, match="cannot load its program 'forward'"):
        repmlp_rt.Runtime(str(path), verify=False)


def test_a_pt2_without_its_digest_or_probe_is_refused_with_verification_on(digits_pt2, tmp_path):
    x = _x()
    npy = runtime_helpers.write_npy(tmp_path / "x.npy", x)
    intact = repmlp_rt.Runtime(str(digits_pt2)).infer(x)
    refused = "has no digest.json record, so it cannot be verified"
    no_digest = _rewrite(digits_pt2, tmp_path / "no-digest.pt2",
                         lambda n, d: None if n.endswith("extra/digest.json") else d)
    # As a package built before self-verification: neither record.
    old = _rewrite(digits_pt2, tmp_path / "old.pt2",
                   lambda n, d: None if n.endswith(("extra/digest.json", "extra/probe.pt.b64")) else d)
    for path in (no_digest, old):
        with pytest.raises(repmlp_rt.ArtifactError, match=refused) as raised:
            repmlp_rt.Runtime(str(path))
        assert "--no-verify, verify=False" in str(raised.value)
        with pytest.raises(repmlp_rt.ArtifactError, match=refused):
            repmlp_rt.infer(str(path), x)
        result = _run_cli(path, npy)
        assert result.returncode == 1 and refused in result.stderr and result.stderr.count("\n") == 1, result.stderr
        unverified = repmlp_rt.Runtime(str(path), verify=False)
        relative_close(torch.from_numpy(unverified.infer(x)), torch.from_numpy(intact))
    # The probe alone still holds for the first; the second has none to run.
    check = repmlp_rt.Runtime(str(no_digest), verify_digest=False).self_check
    assert 0 <= check["error"] <= check["tolerance"] == 1e-4
    with pytest.raises(repmlp_rt.ArtifactError, match="has no probe.pt.b64 record"):
        repmlp_rt.Runtime(str(old), verify_digest=False)


def _skewed(source: Path, target: Path) -> Path:
    """The .pt2 with forward_images' stored output 1% off, sealed again: every record intact,
    as a machine that computes 1% off would see it."""
    def change(name, data):
        if not name.endswith("extra/probe.pt.b64"):
            return data
        probe = integrity.load_probe(base64.b64decode(data))
        out = probe["forward_images/output"].clone()
        out[0, 0] += 0.01 * out.abs().max()
        return integrity.probe_text({**probe, "forward_images/output": out}).encode()
    return _rewrite(source, target, change, reseal=True)


def test_a_pt2_probe_beyond_the_tolerance_is_refused(digits_pt2, tmp_path):
    path = _skewed(digits_pt2, tmp_path / "skewed.pt2")
    stored = _probe(path)
    with torch.no_grad():  # the expected error, from torch's own loader and the stored probe
        got = Pt2Artifact(str(path), torch.device("cpu")).forward_images(stored["forward_images/input"])
    ref = stored["forward_images/output"]
    expected = ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    with pytest.raises(repmlp_rt.ArtifactError, match="self-check failed") as raised:
        repmlp_rt.Runtime(str(path))
    found = re.search(r"worst relative error (\S+) in forward_images\(\), tolerance (\S+) \(float32 on cpu\)",
                      str(raised.value))
    assert found, str(raised.value)
    assert float(found.group(1)) == pytest.approx(expected, rel=1e-2)
    assert float(found.group(2)) == 1e-4
    assert repmlp_rt.Runtime(str(path), verify=False).self_check is None


def test_the_builders_reload_checks_the_pt2_digest_then_its_probe(digits_pt2, weight_flipped, tmp_path):
    """The reload step's check (publish.load_checked) on the built file, a skewed probe and a
    flipped weight."""
    check = functools.partial(load_checked, FORMATS["aoti"], torch.device("cpu"))
    written = CompiledArtifact({})
    manifest = read_manifest(str(digits_pt2))
    reloaded = check(str(digits_pt2), manifest, written)
    errors = integrity.probe_errors(reloaded, _probe(digits_pt2), torch.device("cpu"))
    assert set(errors) == {"forward", "forward_images"} and max(errors.values()) <= 1e-4
    with pytest.raises(BuildError, match=r"the stored probe's forward_images: relative error \S+ exceeds the tolerance"):
        check(str(_skewed(digits_pt2, tmp_path / "skewed.pt2")), manifest, written)
    path, record = weight_flipped
    # Python's zip reader checks each record's CRC-32 first: the flip is caught there.
    with pytest.raises(BuildError, match=re.escape(f"the written file fails its own digest: {path}: record {record} "
                                                   "cannot be read (corrupt file): Bad CRC-32")):
        check(str(path), manifest, written)


def test_the_published_pt2_is_the_verified_file(tmp_path, monkeypatch):
    """The builder checks the digest of the very bytes it then renames into place, and
    reports their sha256."""
    checked = []
    real_check = integrity.check_digest

    def hashing_check(path):
        checked.append(hashlib.sha256(open(path, "rb").read()).hexdigest())
        return real_check(path)

    monkeypatch.setattr(integrity, "check_digest", hashing_check)
    out = tmp_path / "digits.pt2"
    report = build_artifact(out=str(out), format="aoti")
    published = hashlib.sha256(out.read_bytes()).hexdigest()
    assert len(checked) == 2 and checked[-1] == published == report.sha256  # reload, then the final file
    real_check(str(out))
    assert [p.name for p in tmp_path.iterdir()] == ["digits.pt2"]


# ---------------------------------------------------------------------------------------------
# unpacking: each program goes into a private directory under $TMPDIR, removed once loaded on
# CPU and on every failure


@pytest.fixture
def unpack_dir(tmp_path, monkeypatch) -> Path:
    """An empty directory that TMPDIR points at, for the runtime (and the CLI it starts)."""
    where = tmp_path / "tmpdir"
    where.mkdir()
    monkeypatch.setenv("TMPDIR", str(where))
    return where


def test_a_loaded_pt2_leaves_no_files_behind_and_answers_as_before(digits_pt2, unpack_dir, monkeypatch):
    x = _x()
    images = np.random.default_rng(1).integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    runtime = repmlp_rt.Runtime(str(digits_pt2))
    assert list(unpack_dir.iterdir()) == []  # removed while the runtime lives
    # ... after the libraries were loaded from there (they stay mapped, their files deleted).
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(unpack_dir) in line]
    assert mapped and all(line.endswith("(deleted)") for line in mapped), mapped
    logits, (scores, indices) = runtime.infer(x), runtime.classify(images, topk=3)
    monkeypatch.delenv("TMPDIR")
    reference = repmlp_rt.Runtime(str(digits_pt2))
    np.testing.assert_array_equal(logits, reference.infer(x))
    ref_scores, ref_indices = reference.classify(images, topk=3)
    np.testing.assert_array_equal(scores, ref_scores)
    np.testing.assert_array_equal(indices, ref_indices)


def test_tmpdir_chooses_where_a_pt2_is_unpacked(digits_pt2, tmp_path, monkeypatch):
    missing = tmp_path / "no-such-dir"
    monkeypatch.setenv("TMPDIR", str(missing))
    message = f"cannot create a directory in '{missing}': No such file or directory; set TMPDIR"
    with pytest.raises(repmlp_rt.ArtifactError, match=re.escape(message)):
        repmlp_rt.Runtime(str(digits_pt2), verify=False)
    result = _run_cli(digits_pt2, runtime_helpers.write_npy(tmp_path / "x.npy", _x()))
    assert result.returncode == 1 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not missing.exists()


@pytest.mark.parametrize("verify", [True, False])
def test_a_pt2_that_fails_to_load_leaves_no_files_behind(digits_pt2, tmp_path, unpack_dir, verify):
    """The library replaced by bytes that are no shared library: refused by the digest before
    loading, or by the loader itself with verification off (the case where torch's own loader
    leaves its extraction directory behind)."""
    library = _library(digits_pt2)
    path = _rewrite(digits_pt2, tmp_path / "not-elf.pt2", lambda n, d: b"no shared library" if n.endswith(library) else d)
    expected = "does not match its SHA-256 digest" if verify else "cannot load its program 'forward'"
    with pytest.raises(repmlp_rt.ArtifactError, match=re.escape(expected)) as raised:
        repmlp_rt.Runtime(str(path), verify=verify)
    if not verify:
        assert "TMPDIR chooses where" in str(raised.value)
    assert list(unpack_dir.iterdir()) == []


@pytest.mark.parametrize("kind", ["climbing", "duplicate"])
def test_a_record_named_outside_the_archive_or_twice_is_refused(digits_pt2, tmp_path, unpack_dir, kind):
    """A record whose name climbs out of the unpack directory, or a second record of a
    program's name, is refused with or without verification; nothing is written outside."""
    library = _members(digits_pt2)[_library(digits_pt2)].filename
    extra = library.rsplit("/", 1)[0] + "/../../../../../escape.txt" if kind == "climbing" else library
    path = tmp_path / f"{kind}.pt2"
    with zipfile.ZipFile(digits_pt2) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
        with pytest.warns(UserWarning, match="Duplicate name") if kind == "duplicate" else contextlib.nullcontext():
            dst.writestr(extra, b"outside")
    expected = ("not a plain relative path inside the archive" if kind == "climbing"
                else "holds two records of the same name")
    for verify in (True, False):
        with pytest.raises(repmlp_rt.ArtifactError, match=expected):
            repmlp_rt.Runtime(str(path), verify=verify)
    assert list(unpack_dir.iterdir()) == []
    assert not list(tmp_path.rglob("escape.txt"))
