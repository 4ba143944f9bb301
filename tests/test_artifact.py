"""build_artifact.py / repmlp.artifact: pipeline, manifest schema, both methods, atomicity, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from repmlp import create_model, export_state_dict
from repmlp.artifact import ARTIFACT_FORMAT_VERSION, EXPORTED_METHODS, MANIFEST_NAME, build_artifact, read_manifest
from repmlp.preprocess import ImageTransform
from repmlp.variants import Preprocessing

from helpers import ROOT, SMALL_ARCH, make_model, relative_close

BUILD = [sys.executable, os.path.join(ROOT, "build_artifact.py")]


def run_build(args, cwd=None):
    return subprocess.run(BUILD + list(args), cwd=cwd, capture_output=True, text=True, timeout=600)


def _load(path):
    extra = {MANIFEST_NAME: ""}
    module = torch.jit.load(path, _extra_files=extra)
    return module, json.loads(extra[MANIFEST_NAME])


def _leftovers(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp") or f.startswith("."))


# ---- the artifact itself ---------------------------------------------------------------------


def test_manifest_schema(small_artifact):
    _, manifest = _load(small_artifact)
    assert manifest["format"] == "repmlp-artifact"
    assert manifest["format_version"] == ARTIFACT_FORMAT_VERSION
    assert set(manifest) >= {"arch", "input", "preprocessing", "output", "weights", "model", "build", "verification"}
    assert manifest["arch"]["config"]["channels"] == SMALL_ARCH["channels"]
    assert manifest["input"]["shape"] == [3, 32, 32] and manifest["input"]["layout"] == "NCHW"
    assert manifest["input"]["compute_dtype"] == "float32"
    pre = manifest["preprocessing"]
    assert pre["method"] == "forward_images" and len(pre["mean"]) == 3 and len(pre["std"]) == 3
    assert {"resize_mode", "resize", "crop", "interpolation"} <= set(pre)
    assert manifest["output"]["num_classes"] == 10 and len(manifest["output"]["labels"]) == 10
    assert manifest["weights"] == {"source": "random", "seed": 3}
    assert manifest["build"]["torch_version"] == torch.__version__
    stages = [s["stage"] for s in manifest["verification"]["stages"]]
    assert stages == ["load", "deploy", "script", "freeze", "save", "reload"]
    assert manifest["probe"]["tolerance"]["cpu"] == manifest["verification"]["tolerance"]
    assert manifest["digest"]["record"] == "digest.json"
    tol = manifest["verification"]["tolerance"]
    assert all(s["max_rel_err"] is None or s["max_rel_err"] <= tol for s in manifest["verification"]["stages"])
    assert read_manifest(small_artifact) == manifest


def test_methods_match_the_training_form(small_artifact):
    module, _ = _load(small_artifact)
    for name in EXPORTED_METHODS:
        assert hasattr(module, name), name
    assert module.format_version() == ARTIFACT_FORMAT_VERSION
    assert module.input_shape() == [3, 32, 32]
    assert module.labels() == [str(i) for i in range(10)]
    assert module.compute_dtype() == "float32"
    # The same weights, rebuilt independently from the seed recorded in the manifest.
    reference = make_model(img_size=32, num_classes=10, seed=3)
    for batch in (1, 4):  # dynamic batch
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            relative_close(module(x), reference(x))
    images = torch.randint(0, 256, (3, 40, 57, 3), dtype=torch.uint8)
    transform = ImageTransform(reference.config.preprocessing)
    with torch.no_grad():
        relative_close(module.forward_images(images), reference(transform(images)))


def test_artifact_file_mode_follows_the_umask(small_artifact):
    # The file is written under a mkstemp name (mode 0600) and must not stay owner-only: a
    # server often runs as another user.
    mask = os.umask(0o022)
    os.umask(mask)
    assert os.stat(small_artifact).st_mode & 0o777 == 0o666 & ~mask


def test_forward_rejects_bad_shapes(small_artifact):
    module, _ = _load(small_artifact)
    with pytest.raises(Exception, match=r"expected a batch of N >= 1, got N = 0"):
        module(torch.randn(0, 3, 32, 32))
    with pytest.raises(Exception, match=r"expected a \(N, 3, 32, 32\) batch, got \[1, 3, 64, 64\]"):
        module(torch.randn(1, 3, 64, 64))
    with pytest.raises(Exception, match=r"expected uint8 images \(N, H, W, 3\)"):
        module.forward_images(torch.zeros(1, 3, 32, 32))


# ---- preprocessing against independent expectations --------------------------------------------


def test_preprocessing_normalizes_without_resizing_when_sizes_match():
    pre = Preprocessing(resize_mode="exact", resize=(32, 32), crop=(32, 32))
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    out = ImageTransform(pre)(images)
    mean = torch.tensor(pre.mean).reshape(1, 3, 1, 1)
    std = torch.tensor(pre.std).reshape(1, 3, 1, 1)
    torch.testing.assert_close(out, (images.permute(0, 3, 1, 2).float() - mean) / std)


def test_short_side_resize_then_center_crop_geometry():
    # short side already 32: no resize; the center crop of a 32x48 image starts at column 8
    pre = Preprocessing(resize_mode="short_side", resize=(32, 32), crop=(32, 32), mean=(0, 0, 0), std=(1, 1, 1))
    images = torch.arange(32 * 48, dtype=torch.int64).remainder(251).to(torch.uint8)
    images = images.reshape(1, 32, 48, 1).expand(1, 32, 48, 3).contiguous()
    out = ImageTransform(pre)(images)
    torch.testing.assert_close(out[0, 0], images[0, :, 8:40, 0].float())
    # a uniform image stays uniform through any resize; a 64x100 image is scaled to 32x50
    flat = torch.full((1, 64, 100, 3), 77, dtype=torch.uint8)
    torch.testing.assert_close(ImageTransform(pre)(flat), torch.full((1, 3, 32, 32), 77.0))


@pytest.mark.parametrize(
    "mode, resize, image_hw, resized_hw, top_left",
    [
        # torchvision's rule, worked out by hand: the short side becomes 32, the long side is
        # truncated (100 * 32 / 60 = 53.3 -> 53); the crop offset is round((53 - 32) / 2) = 10.
        ("short_side", (32, 32), (100, 60), (53, 32), (10, 0)),
        ("short_side", (32, 32), (45, 120), (32, 85), (0, 26)),  # round(26.5) = 26
        ("exact", (40, 48), (70, 50), (40, 48), (4, 8)),
    ],
)
def test_resize_and_crop_against_hand_computed_geometry(mode, resize, image_hw, resized_hw, top_left):
    pre = Preprocessing(resize_mode=mode, resize=resize, crop=(32, 32), mean=(10.0, 20.0, 30.0), std=(2.0, 3.0, 4.0),
                        antialias=False)  # the geometry only; antialiasing is checked against PIL below
    images = torch.randint(0, 256, (2, *image_hw, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    resized = torch.nn.functional.interpolate(
        images.permute(0, 3, 1, 2).float(), size=resized_hw, mode="bilinear", align_corners=False
    )
    top, left = top_left
    crop = resized[:, :, top : top + 32, left : left + 32]
    expected = (crop - torch.tensor([10.0, 20.0, 30.0]).reshape(1, 3, 1, 1)) / torch.tensor([2.0, 3.0, 4.0]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(ImageTransform(pre)(images), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "arch, resized_wh, crop_box",
    [
        # mmcls B224: Resize((256, 256), backend='pillow'), CenterCrop(224)
        ("B224", (256, 256), (16, 16, 240, 240)),
        # official T224: torchvision Resize(224) on a PIL image (short side 375 -> 224, long side
        # int(224 * 500 / 375) = 298), CenterCrop(224): top round(37.0) = 37
        ("T224", (224, 298), (0, 37, 224, 261)),
    ],
)
def test_variant_preprocessing_matches_the_pil_pipelines(arch, resized_wh, crop_box):
    from repmlp.variants import get_variant

    pre = get_variant(arch).preprocessing
    photo = np.random.default_rng(7).integers(0, 256, (500, 375, 3), dtype=np.uint8)  # H 500, W 375
    pil = PIL.Image.fromarray(photo).resize(resized_wh, PIL.Image.BILINEAR).crop(crop_box)
    expected = (torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)[None].float()
                - torch.tensor(pre.mean).reshape(1, 3, 1, 1)) / torch.tensor(pre.std).reshape(1, 3, 1, 1)
    out = ImageTransform(pre)(torch.from_numpy(photo)[None])
    # PIL rounds its result to uint8: at most one grey level apart, in normalized units
    torch.testing.assert_close(out, expected, rtol=0, atol=1.0 / min(pre.std))


def test_variant_preprocessing_defaults_follow_the_reference():
    # REPMLPNET.md: mmcls B224 resizes to 256x256 (aspect not kept) and crops 224; mmcls B256
    # resizes the short side to 292 and crops 256; the official repo resizes the short side to
    # the input size and crops it (T224, T256, D256, L256).
    from repmlp.variants import get_variant

    def geometry(name):
        pre = get_variant(name).preprocessing
        return pre.resize_mode, tuple(pre.resize), tuple(pre.crop), pre.interpolation, pre.antialias

    # Antialiased: both pipelines resize PIL images (see the PIL comparison below).
    assert geometry("B224") == ("exact", (256, 256), (224, 224), "bilinear", True)
    assert geometry("B256") == ("short_side", (292, 292), (256, 256), "bilinear", True)
    assert geometry("T224") == ("short_side", (224, 224), (224, 224), "bilinear", True)
    for name in ("T256", "D256", "L256"):
        assert geometry(name) == ("short_side", (256, 256), (256, 256), "bilinear", True)
    assert tuple(get_variant("B224").preprocessing.mean) == (123.675, 116.28, 103.53)
    assert tuple(get_variant("B224").preprocessing.std) == (58.395, 57.12, 57.375)


# ---- the CLI ---------------------------------------------------------------------------------


def test_arch_names_are_spelled_as_in_the_variant_table():
    from repmlp.artifact import default_out_path

    assert [default_out_path(a) for a in ("t224", "b", "BASE", "digits")] == [
        "repmlp-T224.pt", "repmlp-B224.pt", "repmlp-B224.pt", "repmlp-digits.pt"]


def test_python_dash_m_repmlp_is_the_build_command():
    result = subprocess.run([sys.executable, "-m", "repmlp", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: repmlp-build"), result.stderr


def test_no_arguments_in_an_empty_folder_builds_the_default(tmp_path):
    result = run_build([], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "repmlp-digits.pt"
    assert path.is_file()
    assert os.listdir(tmp_path) == ["repmlp-digits.pt"]
    extra = {"manifest.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    manifest = json.loads(extra["manifest.json"])
    assert manifest["arch"]["name"] == "digits"
    assert manifest["weights"]["source"] == "checkpoint" and manifest["weights"]["file"] == "digits.pth"
    assert manifest["output"]["labels"] == [str(i) for i in range(10)]
    for n in range(1, 7):  # one progress line per stage, then the summary
        assert f"[{n}/6]" in result.stderr
    assert "sha256" in result.stderr
    assert "input 3x32x32 float32 (computes in float32)" in result.stderr


def test_summary_names_input_and_compute_dtype_apart(tmp_path):
    result = run_build(["--dtype", "int8", "--out", str(tmp_path / "d8.pt")])
    assert result.returncode == 0, result.stderr
    assert "input 3x32x32 float32 (computes in int8)" in result.stderr


def test_checkpoint_json_report_and_mmcls_deploy_layout(tmp_path):
    from repmlp import reparameterize_model

    model = make_model(img_size=32, num_classes=10, seed=9)
    ckpt = tmp_path / "mm.pth"
    torch.save({"state_dict": export_state_dict(reparameterize_model(model), "mmcls")}, ckpt)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(10)))
    out = tmp_path / "custom.pt"
    result = run_build(
        ["--arch", "B224", "--checkpoint", str(ckpt), "--out", str(out), "--json"], cwd=tmp_path
    )
    # B224's structure is not this small checkpoint's: one usage line naming each field, nothing written
    assert result.returncode == 2 and not out.exists()
    assert "argument --arch: channels: checkpoint (16, 32, 64, 128), --arch B224 (96, 192, 384, 768); depths:" in result.stderr
    assert "Traceback" not in result.stderr
    report = build_artifact(SMALL_ARCH, img_size=32, num_classes=10, checkpoint=str(ckpt), out=str(out), labels_file=str(labels))
    module, manifest = _load(str(out))
    assert manifest["weights"]["layout"] == "mmcls" and manifest["weights"]["form"] == "deploy"
    assert module.labels()[3] == "class 3"
    assert report.sha256 and report.size_bytes == out.stat().st_size
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        relative_close(module(x), model(x))


def test_json_report_on_stdout(tmp_path):
    out = tmp_path / "a.pt"
    result = run_build(["--arch", "digits", "--out", str(out), "--json"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["path"] == str(out) and len(report["sha256"]) == 64
    assert [s["stage"] for s in report["stages"]][-1] == "reload"


def test_cli_preprocessing_and_class_flags_reach_the_build(tmp_path):
    out = tmp_path / "pp.pt"
    flags = ["--interpolation", "bicubic", "--antialias", "--std", "60,61,62", "--resize-mode", "exact"]
    result = run_build(["--arch", "digits", "--out", str(out), *flags])
    assert result.returncode == 0, result.stderr
    _, manifest = _load(str(out))
    pre = manifest["preprocessing"]
    assert (pre["interpolation"], pre["antialias"], pre["std"], pre["resize_mode"]) == ("bicubic", True, [60.0, 61.0, 62.0], "exact")
    # the shipped digits checkpoint has 10 classes: another width is a strict-load error
    result = run_build(["--arch", "digits", "--num-classes", "7", "--out", str(tmp_path / "x.pt")])
    assert result.returncode == 1 and "head" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--arch", "B999"], 2, "unknown arch 'B999'"),
        (["--img-size", "abc"], 2, "expected H or HxW"),
        (["--dtype", "int4"], 2, "invalid choice"),
        (["--bogus"], 2, "unrecognized arguments"),
        (["--arch", "T224", "--img-size", "100"], 2, "argument --img-size: input size must be divisible by 32"),
        (["--tolerance", "0"], 2, "argument --tolerance: expected a number > 0"),
        (["--device", "meta"], 2, "argument --device: expected cpu, cuda or cuda:N"),
        (["--std", "inf,1,1"], 2, "argument --std: expected three comma-separated finite numbers"),
        (["--num-classes", "0"], 2, "argument --num-classes: expected an integer >= 1"),
        (["--arch", "T224", "--img-size", "64", "--resize", "100x50"], 1, "short_side resizing takes one size"),
        (["--tolerance", "1e-30"], 1, "exceeds the tolerance"),
        (["--checkpoint", "/nonexistent/x.pth"], 1, "checkpoint file not found"),
        (["--out", "/nonexistent/dir/a.pt"], 2, "does not exist"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "npu"], 1, "device"),
    ],
)
def test_bad_input_one_line_and_exit_code(tmp_path, args, code, message):
    result = run_build(args + (["--out", str(tmp_path / "x.pt")] if "--out" not in args else []), cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "a.pt"
    out.write_bytes(b"keep me")
    result = run_build(["--out", str(out)])
    assert result.returncode == 2 and "--force" in result.stderr
    assert out.read_bytes() == b"keep me"
    result = run_build(["--out", str(out), "--force"])
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() != b"keep me" and _leftovers(tmp_path) == []


def test_bad_checkpoints_leave_nothing(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(export_state_dict(create_model("digits")), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    wrong = tmp_path / "wrong.pth"
    torch.save(export_state_dict(create_model(SMALL_ARCH, img_size=32, num_classes=10)), wrong)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cases = ((truncated, 1, "cannot read checkpoint"),
             (wrong, 2, "argument --arch: sharesets: checkpoint (1, 4, 8, 16), --arch digits (1, 2, 4, 8)"))
    for ckpt, code, message in cases:
        result = run_build(["--arch", "digits", "--checkpoint", str(ckpt), "--out", str(out_dir / "a.pt")])
        assert result.returncode == code and message in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "Traceback" not in result.stderr  # one line says what is wrong
        assert os.listdir(out_dir) == []


def test_labels_file_must_match(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    result = run_build(["--labels", str(labels), "--out", str(tmp_path / "a.pt")])
    assert result.returncode == 1 and "has 2 labels, the model has 10 classes" in result.stderr
    assert not (tmp_path / "a.pt").exists()


def test_num_classes_0_is_refused_before_building(tmp_path):
    with pytest.raises(ValueError, match="needs num_classes >= 1"):
        build_artifact(SMALL_ARCH, img_size=32, num_classes=0, out=str(tmp_path / "a.pt"))
    assert os.listdir(tmp_path) == []


def test_a_model_too_large_to_allocate_is_a_build_error(tmp_path, monkeypatch):
    # (Allocating for real is not safe to test: with memory overcommit it may succeed.)
    import repmlp.artifact as artifact
    import repmlp.artifact.build

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4398046511104 bytes")

    monkeypatch.setattr(repmlp.artifact.build, "RepMLPNet", no_memory)
    with pytest.raises(artifact.BuildError, match="cannot create the model: DefaultCPUAllocator"):
        build_artifact("T224", img_size=4096, out=str(tmp_path / "a.pt"))
    assert os.listdir(tmp_path) == []


def test_failure_after_save_removes_the_temporary_file(tmp_path, monkeypatch):
    import repmlp.artifact as artifact

    def broken_load(*args, **kwargs):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(torch.jit, "load", broken_load)
    with pytest.raises(artifact.BuildError, match="disk went away"):
        build_artifact(SMALL_ARCH, img_size=32, num_classes=10, out=str(tmp_path / "a.pt"))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_b224_artifact_equals_training_form(b224_artifact):
    module, manifest = _load(b224_artifact)
    assert manifest["model"]["params_loaded"] == 68_242_712
    reference = make_model("B224", seed=5)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        relative_close(module(x), reference(x))


@pytest.mark.parametrize("dtype, rtol", [("float16", 2e-2), ("bfloat16", 6e-2)])
def test_reduced_precision_artifact(tmp_path, dtype, rtol):
    out = tmp_path / f"{dtype}.pt"
    build_artifact(SMALL_ARCH, img_size=32, num_classes=10, out=str(out), seed=3, dtype=dtype)
    module, manifest = _load(str(out))
    assert module.compute_dtype() == dtype and manifest["input"]["compute_dtype"] == dtype
    reference = make_model(img_size=32, num_classes=10, seed=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = module(x)
        assert logits.dtype == torch.float32
        relative_close(logits, reference(x), rtol=rtol)


def test_preprocessing_overrides_are_baked_in(tmp_path):
    out = tmp_path / "pp.pt"
    changes = {"resize_mode": "short_side", "resize": 40, "mean": (1.0, 2.0, 3.0), "antialias": True}
    build_artifact(SMALL_ARCH, img_size=32, num_classes=10, out=str(out), seed=3, preprocessing=changes)
    module, manifest = _load(str(out))
    pre = manifest["preprocessing"]
    assert (pre["resize_mode"], pre["resize"], pre["mean"], pre["antialias"]) == ("short_side", [40, 40], [1.0, 2.0, 3.0], True)
    assert pre["crop"] == [32, 32]
    reference = make_model(img_size=32, num_classes=10, seed=3)
    expected_pre = Preprocessing(mean=(1.0, 2.0, 3.0), resize_mode="short_side", resize=(40, 40), crop=(32, 32), antialias=True)
    images = torch.randint(0, 256, (2, 50, 70, 3), dtype=torch.uint8)
    with torch.no_grad():
        relative_close(module.forward_images(images), reference(ImageTransform(expected_pre)(images)))


def test_bad_preprocessing_override(tmp_path):
    result = run_build(["--resize-mode", "short_side", "--resize", "20", "--out", str(tmp_path / "a.pt")])
    assert result.returncode == 1 and "short side 20 is smaller than the crop" in result.stderr
    assert os.listdir(tmp_path) == []
    result = run_build(["--mean", "1,2", "--out", str(tmp_path / "a.pt")])
    assert result.returncode == 2 and "three comma-separated finite numbers" in result.stderr


def test_scripting_survives_stale_ids_in_torchscripts_builtin_table():
    """torch.jit._builtins keys its builtin functions by id() without keeping every object alive:
    once a freed op's id was taken by a module's list, torch.jit.script failed with "builtin
    cannot be used as a value" (once in the suite, after the AOTInductor tests). The stale entry
    is planted here; the builder's script_module drops such entries before scripting."""
    from repmlp.utils import quiet_jit, script_module

    table = torch.jit._builtins._get_builtin_table()

    def model_with_a_stale_entry():
        model = make_model().eval()
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        key = id(conv._reversed_padding_repeated_twice)
        table[key] = "aten::add"  # as a freed op object at that address would have left it
        return model, key

    model, key = model_with_a_stale_entry()
    try:
        with quiet_jit(), pytest.raises(RuntimeError, match="builtin cannot be used as a value"):
            torch.jit.script(model)
    finally:
        table.pop(key, None)
    model, key = model_with_a_stale_entry()
    try:
        with quiet_jit():
            scripted = script_module(model)
        assert key not in table
    finally:
        table.pop(key, None)
    x = torch.randn(2, 3, *model.config.img_size)
    with torch.no_grad():
        relative_close(scripted(x), model(x))
