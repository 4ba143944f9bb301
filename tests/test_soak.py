"""Concurrency and memory: one Runtime shared by 8 threads (the binding releases the GIL, so the
C++ Runtime runs concurrently) gives the single-threaded answers bit for bit, and 1,000 calls
leave resident memory where it was (growth measured in benchmarks/RESULTS.md, "Self-verification").
cpp/tests/test_core.cpp has the same thread check without Python (make ctest)."""

import os
import threading

import numpy as np
import repmlp_rt
import runtime_helpers as helpers
import torch

THREADS = 8
# Resident-memory growth allowed over 1,000 calls after a 100-call warm-up. Measured growth on
# the small artifact is at most 32 KiB (benchmarks/memory_growth.py); a leak of one batch's
# logits per call (10 floats) would stay under it too, a leak of one input per call (12 KiB)
# would not.
RSS_GROWTH_LIMIT = 8 << 20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_eight_threads_match_single_threaded_bitwise(small_artifact):
    runtime = repmlp_rt.Runtime(small_artifact)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1 + i % 4, 3, 32, 32)).astype(np.float32) for i in range(THREADS)]
    images = [helpers.random_images(1 + i % 2, 29 + i, 41, seed=i) for i in range(THREADS)]
    serial = [(runtime.infer(x), runtime.infer(im)) for x, im in zip(inputs, images)]
    results = []
    start = threading.Barrier(THREADS, timeout=300)

    def worker(tid):
        start.wait()
        for rep in range(6):
            i = (tid + rep) % THREADS
            results.append((i, runtime.infer(inputs[i]), runtime.infer(images[i])))

    helpers.run_in_threads(worker, THREADS)
    assert len(results) == THREADS * 6
    for i, logits, image_logits in results:
        np.testing.assert_array_equal(logits, serial[i][0])
        np.testing.assert_array_equal(image_logits, serial[i][1])


def test_resident_memory_is_flat_over_1000_calls(small_artifact):
    runtime = repmlp_rt.Runtime(small_artifact)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    images = helpers.random_images(2, 40, 36)
    for _ in range(100):
        runtime.infer(x)
        runtime.infer(images)
    before = _rss_bytes()
    for _ in range(1000):
        runtime.infer(x)
        runtime.infer(images)
    growth = _rss_bytes() - before
    assert growth < RSS_GROWTH_LIMIT, f"resident memory grew by {growth / 2**20:.1f} MiB over 1,000 calls"


class _CountingFake(helpers.FakeRepMLP):
    """The fake artifact's model, writing one marker line to stdout per forward pass (scripted
    models keep their print calls): every run of the model the runtime makes, the self-check's
    probe included, can be counted from what the process writes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("counting-fake forward")
        x = x.to(self.head.weight.dtype)
        x = self.features(x).mean(dim=(2, 3))
        return self.head(x).float()


def _forward_passes(capfd) -> int:
    return capfd.readouterr().out.count("counting-fake forward")


def test_self_check_runs_once_per_load_not_per_call(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(helpers, "FakeRepMLP", _CountingFake)
    path = str(helpers.save_fake_artifact(tmp_path / "counting.pt"))
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    images = helpers.random_images(2, 40, 36)
    _forward_passes(capfd)  # the build's own passes
    # gemm="aten": the automatic GEMM plan observes a planning load's forward passes too, which
    # would blur the count of the probe's own passes.
    verified = repmlp_rt.Runtime(path, warmup=0, gemm="aten")
    # The probe runs at load: one float batch and one image batch, one forward pass each.
    assert verified.self_check is not None
    assert _forward_passes(capfd) == 2
    unverified = repmlp_rt.Runtime(path, verify=False, warmup=0, gemm="aten")
    assert unverified.self_check is None
    assert _forward_passes(capfd) == 0
    for _ in range(5):
        verified.infer(x)
        verified.infer(images)
    assert _forward_passes(capfd) == 10, "the verified runtime ran the model more than once per call"
    np.testing.assert_array_equal(verified.infer(x), unverified.infer(x))
    np.testing.assert_array_equal(verified.infer(images), unverified.infer(images))
