"""repmlp-eval on the digits held-out split, written out as PNG class folders.

The accuracies it prints must equal those computed here, independently, with repmlp_rt on the
same pixels (the dataset arrays, in one batch of the same order, as repmlp-eval runs them with
--batch-size covering the split); agreement with the first artifact, the --json schema, the
confusion-matrix PNG and every bad-input error are checked too.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import repmlp_rt
from data import load_digits_rgb, split  # examples/digits/data.py (pytest.ini pythonpath)
from helpers import SMALL_ARCH, without_plan_progress
from PIL import Image
from repmlp.artifact import build_artifact
from repmlp_rt import eval as repmlp_eval

DTYPES = ["float32", "bfloat16", "int8"]


@pytest.fixture(scope="module")
def held_out():
    images, labels = load_digits_rgb()
    _, test_idx = split(labels)
    return images[test_idx], labels[test_idx]


@pytest.fixture(scope="module")
def folders(held_out, tmp_path_factory):
    """DATA/<digit>/<NNNN>.png; names sort in the order of the held-out arrays within a class."""
    images, labels = held_out
    root = tmp_path_factory.mktemp("digits") / "held_out"
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-artifacts")
    paths = {}
    for dtype in DTYPES:
        paths[dtype] = str(folder / f"digits-{dtype}.pt")
        build_artifact(out=paths[dtype], dtype=dtype)
    return paths


def folder_order(held_out):
    """The order repmlp-eval reads the folders in: by class, then by file name."""
    _, labels = held_out
    return np.concatenate([np.flatnonzero(labels == c) for c in range(10)])


@pytest.fixture(scope="module")
def expected(held_out, artifacts):
    """Top-1/top-5 of each artifact on the held-out pixels, straight from repmlp_rt."""
    images, labels = held_out
    order = folder_order(held_out)
    batch, truth = np.ascontiguousarray(images[order]), labels[order]
    result = {}
    for dtype, path in artifacts.items():
        runtime = repmlp_rt.Runtime(path)
        logits = runtime.infer_images(batch)
        _, top5 = runtime.classify(batch, topk=5)
        result[dtype] = {"top1": logits.argmax(1), "top5_correct": int((top5 == truth[:, None]).any(1).sum())}
    result["truth"] = truth
    return result


def run_eval(*args, timeout=600):
    """repmlp-eval's result, with the runtime's GEMM-planning progress lines left out of stderr."""
    result = subprocess.run([sys.executable, "-m", "repmlp_rt.eval", *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    result.stderr = without_plan_progress(result.stderr)
    return result


@pytest.fixture(scope="module")
def evaluated(artifacts, folders, tmp_path_factory):
    plot = tmp_path_factory.mktemp("plot") / "confusion.png"
    result = run_eval(*[artifacts[d] for d in DTYPES], folders, "--json", "--batch-size", 450, "--plot", plot)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), plot, result.stderr


def test_accuracies_equal_those_computed_with_repmlp_rt(evaluated, expected, artifacts):
    summary, _, _ = evaluated
    truth = expected["truth"]
    n = len(truth)
    assert [r["artifact"] for r in summary["artifacts"]] == [artifacts[d] for d in DTYPES]
    first = expected[DTYPES[0]]["top1"]
    for dtype, result in zip(DTYPES, summary["artifacts"]):
        top1 = expected[dtype]["top1"]
        correct = int((top1 == truth).sum())
        assert result["compute_dtype"] == dtype
        assert result["top1_correct"] == correct and result["top1"] == correct / n
        assert result["top5_correct"] == expected[dtype]["top5_correct"]
        assert result["top5"] == expected[dtype]["top5_correct"] / n
        assert result["agreement"] == float((top1 == first).mean())
        # The shipped digits model is accurate in every dtype (tests/test_digits.py: >= 97%).
        assert correct / n >= 0.97 and result["top5"] >= result["top1"]
        confusion = np.array(result["confusion"])
        assert confusion.shape == (10, 10) and confusion.sum() == n
        assert np.trace(confusion) == correct
        np.testing.assert_array_equal(confusion.sum(1), np.bincount(truth, minlength=10))
    assert summary["artifacts"][0]["agreement"] == 1.0


def test_json_schema(evaluated, folders):
    summary, plot, _ = evaluated
    assert set(summary) == {"data", "topk", "artifacts", "plot"}
    assert summary["data"] == {"source": str(folders), "kind": "folders", "images": 450,
                               "classes": [str(i) for i in range(10)]}
    assert summary["topk"] == 5 and summary["plot"] == str(plot)
    keys = {"artifact", "compute_dtype", "top1", "top5", "top1_correct", "top5_correct", "agreement",
            "seconds", "images_per_second", "confusion"}
    for result in summary["artifacts"]:
        assert set(result) == keys
        assert result["seconds"] > 0 and result["images_per_second"] == pytest.approx(450 / result["seconds"])


def test_progress_bar_on_stderr(evaluated):
    _, _, stderr = evaluated
    lines = stderr.splitlines()  # text mode reads the bar's carriage returns as line ends
    assert lines[0] == "" and lines[1].endswith("] 0/450 images")
    assert lines[-1] == "repmlp-eval [" + "#" * 30 + "] 450/450 images"


def test_plot_is_a_confusion_matrix_image(evaluated):
    _, plot, _ = evaluated
    with Image.open(plot) as image:
        assert image.format == "PNG"
        # One 600x550 panel per artifact (eval.PANEL_INCHES at eval.PLOT_DPI).
        assert image.size == (600 * len(DTYPES), 550)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.std() > 20  # not blank
    # The matrix is drawn in blues: the diagonal's cells are strongly blue in every panel.
    bluish = (pixels[..., 2] - pixels[..., 0] > 80).reshape(550, len(DTYPES), 600).any(axis=(0, 2))
    assert bluish.all()
    assert not [name for name in os.listdir(plot.parent) if name != plot.name]  # no temporary left


def test_table_output_and_list_file(artifacts, folders, held_out, expected, tmp_path):
    """A 'path label' list (labels as names, a path with a space) gives the same numbers."""
    images, labels = held_out
    order = folder_order(held_out)
    spaced = tmp_path / "with space"
    spaced.mkdir()
    lines = []
    for rank, i in enumerate(order):
        target = spaced / f"{rank:04d}.png"
        Image.fromarray(images[i]).save(target)
        lines.append(f"with space/{target.name} {labels[i]}")
    listing = tmp_path / "list.txt"
    listing.write_text("# path label\n\n" + "\n".join(lines) + "\n")
    result = run_eval(artifacts["float32"], artifacts["int8"], listing, "--batch-size", 450, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    truth = expected["truth"]
    top1 = {d: 100 * (expected[d]["top1"] == truth).mean() for d in ("float32", "int8")}
    agree = 100 * (expected["int8"]["top1"] == expected["float32"]["top1"]).mean()
    rows = result.stdout.splitlines()
    assert rows[0] == f"{listing}: 450 images, 10 classes"
    assert rows[2].split()[:3] == ["digits-float32.pt", "float32", f"{top1['float32']:.2f}%"]
    assert rows[3].split()[:5] == ["digits-int8.pt", "int8", f"{top1['int8']:.2f}%",
                                   f"{100 * expected['int8']['top5_correct'] / 450:.2f}%", f"{agree:.2f}%"]


def test_list_file_with_class_indices(artifacts, folders, tmp_path):
    listing = tmp_path / "indices.txt"
    paths = sorted(folders.glob("*/*.png"))[:20]
    listing.write_text("".join(f"{p} {p.parent.name}\n" for p in paths))
    by_name = repmlp_eval.evaluate([artifacts["float32"]], str(listing))
    assert by_name["data"]["images"] == 20 and by_name["data"]["kind"] == "list"
    # Digits' labels are "0".."9", so these lines are names; an index beyond them is an error.
    listing.write_text(f"{paths[0]} 10\n")
    with pytest.raises(ValueError, match=r"class index 10 .* 10 classes \(0\.\.9\)"):
        repmlp_eval.evaluate([artifacts["float32"]], str(listing))


def _bad_data(tmp_path, folders):
    """(name, DATA, expected message) for every kind of bad DATA."""
    empty = tmp_path / "empty"
    empty.mkdir()
    unknown = tmp_path / "unknown"
    (unknown / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(unknown / "cat" / "a.png")
    hollow = tmp_path / "hollow"
    (hollow / "3").mkdir(parents=True)
    (hollow / "3" / "notes.txt").write_text("no images here")
    corrupt = tmp_path / "corrupt"
    (corrupt / "1").mkdir(parents=True)
    (corrupt / "1" / "broken.png").write_bytes(b"not a png")
    missing_image = tmp_path / "missing.txt"
    missing_image.write_text("nowhere.png 3\n")
    no_label = tmp_path / "nolabel.txt"
    no_label.write_text(f"{next(folders.glob('*/*.png'))}\n")
    blank = tmp_path / "blank.txt"
    blank.write_text("# nothing\n\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    return [
        ("missing", tmp_path / "nope", "does not exist"),
        ("no class folders", empty, "has no class folders"),
        ("unknown class", unknown, "class folder(s) 'cat'"),
        ("class without images", hollow, "holds no images"),
        ("undecodable image", corrupt, "cannot decode image"),
        ("missing image", missing_image, "no such image file: 'nowhere.png'"),
        ("no label", no_label, "expected 'path label'"),
        ("empty list", blank, "has no 'path label' lines"),
        ("not text", binary, "cannot read the list file"),
    ]


def test_bad_data_is_one_clear_error_and_exit_2(artifacts, folders, tmp_path):
    for name, data, message in _bad_data(tmp_path, folders):
        result = run_eval(artifacts["float32"], data, "--no-progress", "--plot", tmp_path / "p.png")
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("repmlp-eval: error: ") and message in lines[0], (name, lines)
        assert result.stdout == "" and not (tmp_path / "p.png").exists(), name


def test_bad_artifacts_and_options(artifacts, folders, tmp_path):
    not_an_artifact = tmp_path / "x.pt"
    not_an_artifact.write_bytes(b"nonsense")
    features = tmp_path / "features.pt"
    build_artifact(out=str(features), output="features", out_indices=(3,))
    three_classes = tmp_path / "three.pt"
    build_artifact(SMALL_ARCH, img_size=32, num_classes=3, out=str(three_classes), seed=1)
    cases = [
        ((tmp_path / "none.pt", folders), "does not exist"),
        ((not_an_artifact, folders), "repmlp-eval: error: "),
        ((features, folders), "outputs features, expected logits"),
        ((artifacts["float32"], three_classes, folders), "have different labels"),
        ((artifacts["float32"], folders, "--plot", tmp_path / "no" / "p.png"), "its folder does not exist"),
    ]
    for args, message in cases:
        result = run_eval(*args, "--no-progress")
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    usage = run_eval(folders)  # no artifact at all: argparse's usage error, also status 2
    assert usage.returncode == 2 and "usage: repmlp-eval" in usage.stderr
