"""Concurrency and memory: one Runtime shared by 8 threads (the binding releases the GIL, so the
C++ Runtime runs concurrently) gives the single-threaded answers bit for bit, and 1,000 calls
leave resident memory where it was (growth measured in benchmarks/RESULTS.md, "Self-verification").
cpp/tests/test_core.cpp has the same thread check without Python (make ctest)."""

import os
import threading

import numpy as np
import repmlp_rt
import runtime_helpers as helpers

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
    results, errors = [], []
    start = threading.Barrier(THREADS)

    def worker(tid):
        try:
            start.wait()
            for rep in range(6):
                i = (tid + rep) % THREADS
                results.append((i, runtime.infer(inputs[i]), runtime.infer(images[i])))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
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


def test_self_check_runs_once_per_load_not_per_call(small_artifact):
    # The probe is the warm-up call: later calls cost what an unverified runtime's calls cost
    # (same outputs bit for bit, no per-call check).
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    verified = repmlp_rt.Runtime(small_artifact)
    unverified = repmlp_rt.Runtime(small_artifact, verify=False)
    np.testing.assert_array_equal(verified.infer(x), unverified.infer(x))
