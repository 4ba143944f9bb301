"""The load-time GEMM plan (RuntimeOptions::gemm, docs/PERFORMANCE.md "GEMM plan"): every path
computes what ATen computes, within the artifact's self-check tolerance; auto's plan is cached
per host, artifact and thread count, and an unusable cache file is a warning and a new plan."""

import json
import os
import re

import numpy as np
import pytest
import torch

import repmlp_rt
from repmlp.artifact import build_artifact

from helpers import SMALL_ARCH

MODES = ["aten", "onednn", "mkl-packed", "auto"]
BATCHES = [1, 5, 8]


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    """Each test plans into its own cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def small_bf16_artifact(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gemm") / "small_bf16.pt")
    build_artifact(SMALL_ARCH, img_size=32, num_classes=10, out=path, seed=3, dtype="bfloat16")
    return path


@pytest.fixture(scope="module")
def small_int8_artifact(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gemm") / "small_int8.pt")
    build_artifact(SMALL_ARCH, img_size=32, num_classes=10, out=path, seed=3, dtype="int8")
    return path


def cache_files(tmp_path):
    folder = tmp_path / "cache" / "repmlp_rt"
    return sorted(folder.glob("*.json")) if folder.exists() else []


def batch(runtime, n: int, seed: int = 1) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *runtime.input_shape, generator=generator).numpy()


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def plan_of(runtime) -> str:
    """The plan itself: the summary (or a runtime's) up to where it says where it came from."""
    summary = runtime if isinstance(runtime, str) else runtime.gemm_plan
    return summary.split(";")[0]


def check_paths(path: str) -> None:
    reference = repmlp_rt.Runtime(path, threads=2, gemm="aten")
    inputs = {n: batch(reference, n) for n in BATCHES}
    expected = {n: reference.infer(x) for n, x in inputs.items()}
    tolerance = reference.self_check["tolerance"]
    for mode in MODES[1:]:
        runtime = repmlp_rt.Runtime(path, threads=2, gemm=mode)
        assert runtime.gemm_plan.startswith(mode + ":"), runtime.gemm_plan
        for n, x in inputs.items():
            error = relative_error(runtime.infer(x), expected[n])
            assert error <= tolerance, (mode, n, error, tolerance, runtime.gemm_plan)


@pytest.mark.parametrize("name", ["small_artifact", "digits_artifact", "small_bf16_artifact", "small_int8_artifact"])
def test_every_path_matches_aten(name, request):
    check_paths(request.getfixturevalue(name))


def test_int8_gemms_on_onednn_give_atens_sums(small_int8_artifact, tmp_path):
    """The int8 GEMMs on oneDNN's packed int8 linear, everything else as built (forced through a
    cache entry): the same int32 sums, so the same outputs to the last bit."""
    reference = repmlp_rt.Runtime(small_int8_artifact, threads=2, gemm="aten")
    cache, data = planned_cache(small_int8_artifact, tmp_path)
    int8_groups = [group for group in data["plan"] if group.startswith("int8 ")]
    assert int8_groups, data["plan"]
    for group, entry in data["plan"].items():
        entry["path"] = "onednn" if group in int8_groups else "aten"
    cache.write_text(json.dumps(data))
    runtime = repmlp_rt.Runtime(small_int8_artifact, threads=2, gemm="auto")
    assert "from cache" in runtime.gemm_plan and "onednn" in plan_of(runtime), runtime.gemm_plan
    for n in BATCHES:
        x = batch(runtime, n)
        np.testing.assert_array_equal(runtime.infer(x), reference.infer(x))


@pytest.mark.parametrize("mode", ["onednn", "mkl-packed"])
def test_pinned_path_rewrites_every_gemm(small_artifact, mode):
    """A pinned float32 plan moves every GEMM of the graph that the path can run onto it: all
    but fc3 of the blocks with several sharesets (4 in SMALL_ARCH), which stay on ATen."""
    summary = repmlp_rt.Runtime(small_artifact, threads=1, gemm=mode).gemm_plan
    assert re.fullmatch(rf"{mode}: aten 4, {mode} \d+ of \d+ GEMMs \(\d+ methods\)", plan_of(summary)), summary


def operator_calls(runtime, x: np.ndarray) -> dict:
    """How often each operator ran in one call of the runtime (its graph, as the plan left it)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runtime.infer(x)
    return {event.key: event.count for event in prof.key_averages()}


def test_fused_gelu_is_what_runs(small_artifact, tmp_path):
    """The FFN's first GEMM on oneDNN with its GELU fused stays fused when the second GEMM (which
    reads that GELU) is rewritten too, on either packed path (as every other matrix GEMM): no
    aten::gelu and no ATen GEMM is left in the graph that runs, and the answers are ATen's."""
    reference = repmlp_rt.Runtime(small_artifact, threads=1, gemm="aten")
    x = batch(reference, 1)
    gelus = operator_calls(reference, x).get("aten::gelu", 0)
    assert gelus > 0
    cache, data = planned_cache(small_artifact, tmp_path)
    for second in ["onednn", "mkl-packed"]:
        for group, entry in data["plan"].items():
            if group.startswith(("gemm ", "linear ")):
                entry["path"] = "onednn" if "+gelu" in group else second
        cache.write_text(json.dumps(data))
        runtime = repmlp_rt.Runtime(small_artifact, threads=2, gemm="auto")
        assert "from cache" in runtime.gemm_plan, runtime.gemm_plan
        calls = operator_calls(runtime, x)
        assert calls.get("aten::gelu", 0) == 0 and calls.get("aten::addmm", 0) == 0, (second, calls)
        fused = calls.get("mkldnn::_linear_pointwise", 0) - (gelus if second == "onednn" else 0)
        assert fused >= gelus, (second, calls)
        error = relative_error(runtime.infer(x), reference.infer(x))
        assert error <= reference.self_check["tolerance"], (second, error)


def test_mkl_packed_leaves_bfloat16_as_built(small_bf16_artifact):
    summary = repmlp_rt.Runtime(small_bf16_artifact, threads=1, gemm="mkl-packed").gemm_plan
    assert "left as built" in summary, summary


def test_cache_is_reused(small_artifact, tmp_path):
    first = repmlp_rt.Runtime(small_artifact, threads=1, gemm="auto")
    files = cache_files(tmp_path)
    assert len(files) == 1, files
    stamp, text = files[0].stat().st_mtime_ns, files[0].read_text()
    second = repmlp_rt.Runtime(small_artifact, threads=1, gemm="auto")
    assert cache_files(tmp_path) == files
    assert files[0].stat().st_mtime_ns == stamp and files[0].read_text() == text
    assert "from cache" in second.gemm_plan and "measured" in first.gemm_plan
    assert plan_of(second) == plan_of(first)
    data = json.loads(text)
    assert data["key"]["threads"] == 1 and data["key"]["mode"] == "auto"
    assert {entry["path"] for entry in data["plan"].values()} <= {"aten", "onednn", "mkl-packed", "aten-kn"}
    # Batch 1 and batch 8 give most GEMMs different row counts: one packed copy for each.
    assert any(len(entry["rows"]) == 2 for entry in data["plan"].values()), data["plan"]


def test_cache_key_changes(small_artifact, digits_artifact, tmp_path):
    """Another thread count or another artifact is another key: planned again, cached apart."""
    repmlp_rt.Runtime(small_artifact, threads=1, gemm="auto")
    assert len(cache_files(tmp_path)) == 1
    other_threads = repmlp_rt.Runtime(small_artifact, threads=2, gemm="auto")
    assert "measured" in other_threads.gemm_plan
    assert len(cache_files(tmp_path)) == 2
    other_artifact = repmlp_rt.Runtime(digits_artifact, threads=1, gemm="auto")
    assert "measured" in other_artifact.gemm_plan
    assert len(cache_files(tmp_path)) == 3
    keys = [json.loads(f.read_text())["key"] for f in cache_files(tmp_path)]
    assert len({k["artifact_digest"] for k in keys}) == 2 and {k["threads"] for k in keys} == {1, 2}


@pytest.mark.parametrize("garbage", [b"", b"{not json", b'{"key": 1, "plan": {}}', b"\xff\xfe\x00"])
def test_corrupt_cache_warns_and_plans_again(small_artifact, tmp_path, capfd, garbage):
    reference = repmlp_rt.Runtime(small_artifact, threads=1, gemm="aten")
    repmlp_rt.Runtime(small_artifact, threads=1, gemm="auto")
    (cache,) = cache_files(tmp_path)
    cache.write_bytes(garbage)
    capfd.readouterr()
    runtime = repmlp_rt.Runtime(small_artifact, threads=1, gemm="auto")
    err = capfd.readouterr().err
    assert "warning: GEMM plan cache" in err and "planning again" in err, err
    assert "measured" in runtime.gemm_plan
    x = batch(runtime, 5)
    assert relative_error(runtime.infer(x), reference.infer(x)) <= runtime.self_check["tolerance"]
    assert json.loads(cache.read_text())["key"]["threads"] == 1  # rewritten whole
    assert not [f for f in os.listdir(cache.parent) if ".tmp" in f]


def test_cache_entry_with_unknown_path_is_refused(small_artifact, tmp_path, capfd):
    repmlp_rt.Runtime(small_artifact, threads=1, gemm="auto")
    (cache,) = cache_files(tmp_path)
    data = json.loads(cache.read_text())
    for entry in data["plan"].values():
        entry["path"] = "fastest"
    cache.write_text(json.dumps(data))
    capfd.readouterr()
    runtime = repmlp_rt.Runtime(small_artifact, threads=1, gemm="auto")
    assert "unknown path" in capfd.readouterr().err
    assert "measured" in runtime.gemm_plan


def planned_cache(artifact: str, tmp_path) -> tuple:
    """auto's cache file for ``artifact`` at 2 threads, and its data."""
    repmlp_rt.Runtime(artifact, threads=2, gemm="auto")
    (cache,) = cache_files(tmp_path)
    return cache, json.loads(cache.read_text())


@pytest.mark.parametrize("name", ["digits_artifact", "small_bf16_artifact"])
def test_batched_fc3_on_its_own_layout_matches_aten(name, request, tmp_path):
    """fc3 with several sharesets on its second path ("aten-kn": the batched GEMM reading a
    (S, K, N) copy of the weight), forced through a cache entry since no mode pins it, gives
    ATen's outputs at batch 1, 5 and 8, in float32 and bfloat16."""
    path = request.getfixturevalue(name)
    reference = repmlp_rt.Runtime(path, threads=2, gemm="aten")
    cache, data = planned_cache(path, tmp_path)
    batched = [group for group in data["plan"] if group.startswith("fc3 ") and " x" in group]
    assert len(batched) >= 2, data["plan"]  # digits and SMALL_ARCH: stages with 2-16 sharesets
    for group in batched:
        data["plan"][group]["path"] = "aten-kn"
    cache.write_text(json.dumps(data))
    runtime = repmlp_rt.Runtime(path, threads=2, gemm="auto")
    on_kn = re.search(r"aten-kn (\d+) of", runtime.gemm_plan)
    assert "from cache" in runtime.gemm_plan and on_kn and int(on_kn[1]) >= len(batched), runtime.gemm_plan
    tolerance = reference.self_check["tolerance"]
    for n in BATCHES:
        x = batch(runtime, n)
        error = relative_error(runtime.infer(x), reference.infer(x))
        assert error <= tolerance, (n, error, tolerance)


def test_cache_entry_with_a_path_its_gemm_cannot_take_is_refused(small_artifact, tmp_path, capfd):
    """A cache that puts a batched fc3 on oneDNN's linear (it has no such form) is a warning and
    a new plan, never a failed load."""
    cache, data = planned_cache(small_artifact, tmp_path)
    for group in data["plan"]:
        if group.startswith("fc3 ") and " x" in group:
            data["plan"][group]["path"] = "onednn"
    cache.write_text(json.dumps(data))
    capfd.readouterr()
    runtime = repmlp_rt.Runtime(small_artifact, threads=2, gemm="auto")
    assert "a path that cannot run it" in capfd.readouterr().err
    assert "measured" in runtime.gemm_plan


def test_bad_mode_is_value_error(small_artifact):
    with pytest.raises(ValueError, match="auto, aten, onednn, mkl-packed.*'fast'"):
        repmlp_rt.Runtime(small_artifact, gemm="fast")


def test_python_mode_list_is_the_runtimes(small_artifact):
    """repmlp_rt.GEMM_MODES (the choices of the serving commands) is exactly what the C++
    runtime accepts: its refusal lists them, and each loads."""
    with pytest.raises(ValueError) as refused:
        repmlp_rt.Runtime(small_artifact, gemm="x")
    assert ", ".join(repmlp_rt.GEMM_MODES) in str(refused.value)
    for mode in repmlp_rt.GEMM_MODES:
        assert repmlp_rt.Runtime(small_artifact, threads=1, gemm=mode).gemm_plan.startswith(mode)


@pytest.mark.parametrize("module", ["repmlp_rt.serve", "repmlp_rt.batch"])
def test_serving_commands_take_gemm(module, capsys):
    import importlib

    parser = importlib.import_module(module)._parser()
    base = ["a.pt", "x", "--out", "o.jsonl"] if module.endswith("batch") else ["a.pt", "x"]
    assert parser.parse_args([*base, "--gemm", "onednn"]).gemm == "onednn"
    assert parser.parse_args(base).gemm == "auto"
    with pytest.raises(SystemExit) as usage:
        parser.parse_args([*base, "--gemm", "blas"])
    assert usage.value.code == 2 and "invalid choice: 'blas'" in capsys.readouterr().err


@pytest.mark.slow
def test_b224_paths_match_aten(b224_artifact):
    check_paths(b224_artifact)
