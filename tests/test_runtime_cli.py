"""The repmlp_infer binary: equivalence with torch.jit.load, output formats, bad input."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import runtime_helpers as helpers
from helpers import repmlp_infer_binary, without_plan_progress
import torch

RTOL, ATOL = 1e-5, 1e-5
ROOT = Path(__file__).resolve().parents[1]


def _binary() -> str:
    return repmlp_infer_binary()


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(check=False, args=[_binary(), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout)
    # never a death by signal (abort, segfault): those give a negative return code
    assert result.returncode >= 0, f"killed by signal {-result.returncode}: {result.stderr}"
    result.stderr = without_plan_progress(result.stderr)
    return result


def assert_error(result, code, fragment):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("repmlp_infer: error: "), lines[0]
    assert fragment in lines[0], lines[0]


def _expected_topk(logits: torch.Tensor, k: int):
    return torch.softmax(logits, dim=1).topk(k, dim=1)


# ---------------------------------------------------------------------------------------------
# equivalence


def test_npy_logits_and_topk_match_python(artifact, tmp_path):
    reference = helpers.load_reference(artifact)
    shape = reference.input_shape()
    x = np.random.default_rng(0).standard_normal((5, *shape)).astype(np.float32)
    npy = helpers.write_npy(tmp_path / "batch.npy", x)
    out = tmp_path / "logits.npy"
    k = min(3, len(reference.labels()))
    result = run_cli(artifact, npy, "--json", "--topk", k, "--batch", 2, "--output", out)
    assert result.returncode == 0, result.stderr
    expected = reference(torch.from_numpy(x))
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == tuple(expected.shape)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=RTOL, atol=ATOL)

    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["input"] for r in records] == [f"{npy}[{i}]" for i in range(5)]
    scores, indices = _expected_topk(expected, k)
    labels = reference.labels()
    for row, record in enumerate(records):
        assert [t["index"] for t in record["topk"]] == indices[row].tolist()
        assert [t["label"] for t in record["topk"]] == [labels[i] for i in indices[row].tolist()]
        np.testing.assert_allclose([t["score"] for t in record["topk"]], scores[row].numpy(),
                                   rtol=RTOL, atol=ATOL)


def test_optimize_flag_matches_python(small_artifact, tmp_path):
    reference = helpers.load_reference(small_artifact)
    x = np.random.default_rng(3).standard_normal((2, *reference.input_shape())).astype(np.float32)
    npy = helpers.write_npy(tmp_path / "batch.npy", x)
    out = tmp_path / "logits.npy"
    result = run_cli(small_artifact, npy, "--optimize", "--output", out)
    assert result.returncode == 0, result.stderr
    expected = reference(torch.from_numpy(x))
    # optimize_for_inference is not bit-exact: 1e-4 of the logit scale
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, rtol=1e-4,
                               atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("gemm", ["auto", "aten", "onednn", "mkl-packed"])
def test_gemm_modes_match_python(small_artifact, tmp_path, gemm):
    reference = helpers.load_reference(small_artifact)
    x = np.random.default_rng(5).standard_normal((3, *reference.input_shape())).astype(np.float32)
    npy = helpers.write_npy(tmp_path / "batch.npy", x)
    out = tmp_path / "logits.npy"
    result = run_cli(small_artifact, npy, "--gemm", gemm, "--output", out)
    assert result.returncode == 0, result.stderr
    expected = reference(torch.from_numpy(x))
    # a rewritten product may sum in another order: 1e-4 of the logit scale
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, rtol=1e-4,
                               atol=1e-4 * expected.abs().max().item())
    info = run_cli(small_artifact, "--gemm", gemm, "--info", "--json")
    assert info.returncode == 0, info.stderr
    assert isinstance(json.loads(info.stdout)["runtime"]["gemm_plan"], str)
    text = run_cli(small_artifact, "--gemm", gemm, "--info")
    assert "gemm plan:      " in text.stdout, text.stdout


def test_png_logits_and_topk_match_python(artifact, tmp_path):
    from PIL import Image

    reference = helpers.load_reference(artifact)
    sizes = [(40, 52), (40, 52), (32, 32), (57, 45)]  # grouped into batches of equal size
    paths = []
    for i, size in enumerate(sizes):
        paths.append(helpers.save_png(tmp_path / f"img{i}.png", helpers.random_images(1, *size, seed=i)[0]))
    out = tmp_path / "logits.npy"
    k = min(2, len(reference.labels()))
    result = run_cli(artifact, *paths, "--topk", k, "--output", out, "--batch", 4)
    assert result.returncode == 0, result.stderr

    # reference input: the PNG decoded by PIL, uint8 RGB
    expected = torch.cat([
        reference.forward_images(torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))[None].copy()))
        for p in paths
    ])
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, rtol=RTOL, atol=ATOL)

    # default output: one line per input, "<input>: <label> (<score>), ..."
    lines = result.stdout.splitlines()
    assert len(lines) == len(paths)
    scores, indices = _expected_topk(expected, k)
    labels = reference.labels()
    for line, path, row_scores, row_indices in zip(lines, paths, scores, indices):
        assert line.startswith(f"{path}: ")
        parts = line[len(f"{path}: "):].split(", ")
        assert [p.rsplit(" (", 1)[0] for p in parts] == [labels[i] for i in row_indices.tolist()]
        np.testing.assert_allclose([float(p.rsplit(" (", 1)[1].rstrip(")")) for p in parts],
                                   row_scores.numpy(), atol=1e-4)


def test_mixed_inputs_keep_input_order(fake_artifact, tmp_path):
    reference = helpers.load_reference(fake_artifact)
    image = helpers.random_images(1, 33, 35)[0]
    png = helpers.save_png(tmp_path / "a.png", image)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    npy = helpers.write_npy(tmp_path / "b.npy", x)
    out = tmp_path / "out.npy"
    result = run_cli(fake_artifact, png, npy, png, "--output", out, "--json")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == [
        str(png), f"{npy}[0]", f"{npy}[1]", str(png)]
    from_image = reference.forward_images(torch.from_numpy(image[None].copy()))
    expected = torch.cat([from_image, reference(torch.from_numpy(x)), from_image])
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, rtol=RTOL, atol=ATOL)


def test_output_is_written_atomically(fake_artifact, tmp_path):
    x = np.zeros((1, 3, 32, 32), np.float32)
    npy = helpers.write_npy(tmp_path / "x.npy", x)
    out = tmp_path / "out.npy"
    out.write_bytes(b"old")
    assert run_cli(fake_artifact, npy, "--output", out).returncode == 0
    assert np.load(out).shape == (1, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy", "x.npy"]  # no temp left
    # A write that fails after inference (the target is a folder): an error, nothing left.
    (tmp_path / "taken.npy").mkdir()
    result = run_cli(fake_artifact, npy, "--output", tmp_path / "taken.npy")
    assert_error(result, 1, "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy", "taken.npy", "x.npy"]
    # Writing over one of the inputs is refused before anything runs.
    assert_error(run_cli(fake_artifact, npy, "--output", tmp_path / "." / "x.npy"), 2, "is also an INPUT")
    assert np.load(npy).shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# --info, --bench


def test_info(fake_artifact):
    result = run_cli(fake_artifact, "--info")
    assert result.returncode == 0, result.stderr
    for fragment in ["format version: 1", "input shape:    [3, 32, 32]", "classes:        10",
                     "compute dtype:  float32", '"preprocessing"']:
        assert fragment in result.stdout
    result = run_cli(fake_artifact, "--info", "--json")
    info = json.loads(result.stdout)
    extra = {"manifest.json": ""}
    helpers.load_reference(fake_artifact)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(fake_artifact), _extra_files=extra)
    assert info["manifest"] == json.loads(extra["manifest.json"])
    assert info["runtime"]["input_shape"] == [3, 32, 32]
    assert info["runtime"]["format_version"] == 1


def test_info_text_shortens_a_long_label_list(tmp_path):
    from helpers import SMALL_ARCH
    from repmlp.artifact import build_artifact

    labels = [f"kind {i}" for i in range(40)]
    many = build_artifact(SMALL_ARCH, img_size=32, num_classes=40, labels=labels, out=str(tmp_path / "many.pt")).path
    text = run_cli(many, "--info").stdout
    assert f'"labels": "40 labels: {", ".join(labels[:5])}, ... (--info --json prints them all)"' in text
    assert "kind 39" not in text
    as_json = json.loads(run_cli(many, "--info", "--json").stdout)
    assert as_json["manifest"]["output"]["labels"] == labels


def test_bench(fake_artifact):
    result = run_cli(fake_artifact, "--bench", "--iters", 5, "--warmup", 1, "--batch", 2, "--threads", 1)
    assert result.returncode == 0, result.stderr
    for fragment in ["load (incl. warm-up)", "first call", "p50/p90/p99", "images/s", "batch=2", "threads=1"]:
        assert fragment in result.stdout
    result = run_cli(fake_artifact, "--bench", "--iters", 5, "--warmup", 0, "--json")
    bench = json.loads(result.stdout)["bench"]
    assert bench["iters"] == 5 and bench["batch"] == 8
    assert 0 < bench["p50_ms"] <= bench["p90_ms"] <= bench["p99_ms"]
    assert bench["images_per_s"] > 0 and bench["load_ms"] > 0 and bench["first_call_ms"] > 0


# ---------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit 2 for usage errors, 1 for everything else


@pytest.fixture(scope="module")
def bad_artifacts(tmp_path_factory, fake_artifact):
    return helpers.make_bad_artifacts(tmp_path_factory.mktemp("bad"), fake_artifact)


@pytest.mark.parametrize("name", sorted(helpers.BAD_ARTIFACT_MESSAGES))
def test_bad_artifacts(bad_artifacts, tmp_path, name):
    npy = helpers.write_npy(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    assert_error(run_cli(bad_artifacts[name], npy), 1, helpers.BAD_ARTIFACT_MESSAGES[name])


def _npy_cases(tmp_path):
    good = np.zeros((2, 3, 32, 32), np.float32)
    cases = {
        "wrong_shape": (helpers.write_npy(tmp_path / "shape.npy", np.zeros((2, 3, 16, 32), np.float32)),
                        "expected a float32 NCHW array of shape (N, 3, 32, 32)"),
        "wrong_rank": (helpers.write_npy(tmp_path / "rank.npy", np.zeros((3, 32, 32), np.float32)),
                       "got [3, 32, 32]"),
        "empty_batch": (helpers.write_npy(tmp_path / "empty.npy", np.zeros((0, 3, 32, 32), np.float32)),
                        "N >= 1"),
        "float64": (helpers.write_npy(tmp_path / "f64.npy", good.astype(np.float64)),
                    "expected dtype float32 ('<f4'), got '<f8'"),
        "uint8": (helpers.write_npy(tmp_path / "u8.npy", good.astype(np.uint8)), "got '|u1'"),
        "big_endian": (helpers.write_npy(tmp_path / "be.npy", good.astype(">f4")), "got '>f4'"),
        "fortran": (helpers.write_npy(tmp_path / "f.npy", np.asfortranarray(good)), "Fortran order"),
        "not_npy": (helpers.write_random_bytes(tmp_path / "random.npy", 64), "bad magic"),
    }
    full = helpers.write_npy(tmp_path / "full.npy", good).read_bytes()
    (tmp_path / "truncated.npy").write_bytes(full[:-10])
    cases["truncated"] = (tmp_path / "truncated.npy", "truncated")
    (tmp_path / "trailing.npy").write_bytes(full + b"xx")
    cases["trailing"] = (tmp_path / "trailing.npy", "bytes after the data")
    (tmp_path / "header.npy").write_bytes(full[:20])
    cases["truncated_header"] = (tmp_path / "header.npy", "truncated header")
    # A valid file whose header is padded past numpy's 10000-byte limit (this once overflowed
    # the stack of the header's regex match).
    header = ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 32, 32), }".ljust(50000) + "\n").encode()
    (tmp_path / "padded.npy").write_bytes(b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header
                                          + good.tobytes())
    cases["huge_header"] = (tmp_path / "padded.npy", "header of 50001 bytes exceeds the limit of 10000")
    (tmp_path / "folder.npy").mkdir()
    cases["directory"] = (tmp_path / "folder.npy", "is a directory")
    return cases


@pytest.mark.parametrize("case", ["wrong_shape", "wrong_rank", "empty_batch", "float64", "uint8",
                                  "big_endian", "fortran", "not_npy", "truncated", "trailing",
                                  "truncated_header", "huge_header", "directory"])
def test_bad_npy(fake_artifact, tmp_path, case):
    path, fragment = _npy_cases(tmp_path)[case]
    assert_error(run_cli(fake_artifact, path), 1, fragment)


def test_bad_images(fake_artifact, tmp_path):
    corrupt = helpers.write_random_bytes(tmp_path / "corrupt.png", 200)
    assert_error(run_cli(fake_artifact, corrupt), 1, "cannot decode image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert_error(run_cli(fake_artifact, empty), 1, "cannot decode image")
    assert_error(run_cli(fake_artifact, tmp_path / "missing.png"), 1, "cannot read image")
    good = helpers.save_png(tmp_path / "good.png", helpers.random_images(1, 8, 8)[0])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    assert_error(run_cli(fake_artifact, good, truncated), 1, "cannot decode image")
    (tmp_path / "folder.png").mkdir()
    assert_error(run_cli(fake_artifact, tmp_path / "folder.png"), 1, "is a directory")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--no-such-option"], "no-such-option"),
        (["--topk", "0"], "topk"),
        (["--topk", "11"], "topk must be in [1, 10], got 11"),
        (["--batch", "0"], "batch"),
        (["--threads", "-1"], "threads"),
        (["--threads", "5000"], "threads must be in [1, 4096]"),
        (["--output", "no-such-folder/x.npy"], "no-such-folder' does not exist"),
        (["--iters", "x"], "iters"),
        (["--device", "tpu"], "invalid device 'tpu'"),
        (["--output", "out.txt"], "--output must name a .npy or .npz file"),
        (["--gemm", "blas"], "gemm must be one of auto, aten, onednn, mkl-packed, got 'blas'"),
    ],
)
def test_usage_errors_exit_2(fake_artifact, tmp_path, args, fragment):
    npy = helpers.write_npy(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    assert_error(run_cli(fake_artifact, npy, *args), 2, fragment)


def test_fewer_classes_than_the_default_topk(tmp_path):
    # The default top-5 shrinks to the class count; only an explicit --topk above it is an error.
    three = helpers.save_fake_artifact(tmp_path / "three.pt", num_classes=3)
    npy = helpers.write_npy(tmp_path / "x.npy", np.zeros((2, 3, 32, 32), np.float32))
    result = run_cli(three, npy, "--json")
    assert result.returncode == 0, result.stderr
    assert [len(json.loads(line)["topk"]) for line in result.stdout.splitlines()] == [3, 3]
    assert run_cli(three, "--info").returncode == 0
    assert_error(run_cli(three, npy, "--topk", "4"), 2, "topk must be in [1, 3], got 4")


def test_json_with_a_non_utf8_file_name(fake_artifact, tmp_path):
    name = tmp_path / "caf\udce9.npy"  # the byte 0xE9 alone: not UTF-8
    helpers.write_npy(name, np.zeros((1, 3, 32, 32), np.float32))
    result = run_cli(fake_artifact, name, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["input"].endswith("caf\ufffd.npy[0]")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_failed_stdout_write_is_an_error(fake_artifact, tmp_path):
    npy = helpers.write_npy(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    with open("/dev/full", "w") as full:
        result = subprocess.run([_binary(), str(fake_artifact), str(npy)], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=300, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == "repmlp_infer: error: cannot write to standard output"


def test_missing_arguments_exit_2(fake_artifact):
    assert_error(run_cli(), 2, "ARTIFACT")
    assert_error(run_cli(fake_artifact), 2, "no INPUT given")


def test_cuda_device_without_cuda(fake_artifact, tmp_path):
    import repmlp_rt

    if repmlp_rt.built_with_cuda():
        pytest.skip("this build has CUDA support")
    npy = helpers.write_npy(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    assert_error(run_cli(fake_artifact, npy, "--device", "cuda"), 1, "no CUDA support")


@pytest.mark.cuda
def test_cuda_matches_cpu(fake_artifact, tmp_path):
    import repmlp_rt

    if not repmlp_rt.built_with_cuda():
        pytest.skip("repmlp_rt was built against a CPU-only torch")
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    npy = helpers.write_npy(tmp_path / "x.npy", x)
    cpu, gpu = tmp_path / "cpu.npy", tmp_path / "gpu.npy"
    assert run_cli(fake_artifact, npy, "--output", cpu).returncode == 0
    assert run_cli(fake_artifact, npy, "--output", gpu, "--device", "cuda").returncode == 0
    # TF32 convolutions on Ampere and later: compared at 2e-3 of the logit scale
    expected = np.load(cpu)
    np.testing.assert_allclose(np.load(gpu), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    result = run_cli(fake_artifact, "--bench", "--iters", 20, "--device", "cuda", "--json")
    assert json.loads(result.stdout)["bench"]["device"] == "cuda:0"
