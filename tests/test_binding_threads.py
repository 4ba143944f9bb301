"""repmlp_rt under threads: concurrent calls on one Runtime, the released GIL, the thread-local
executor switch and the lock-guarded path cache of repmlp_rt.infer."""

import os
import threading

import numpy as np
import repmlp_rt
import runtime_helpers as helpers
import torch


def test_calls_leave_the_callers_graph_executor_setting_alone(fake_runtime):
    # CPU calls run with TorchScript's executor optimization off; the switch is thread-local
    # and must be restored, or TorchScript code the caller runs afterwards would change.
    before = torch._C._get_graph_executor_optimize()
    try:
        torch._C._set_graph_executor_optimize(True)
        fake_runtime.infer(helpers.random_batch((3, 32, 32)))
        fake_runtime.infer_images(helpers.random_images(1, 32, 32))
        assert torch._C._get_graph_executor_optimize() is True
    finally:
        torch._C._set_graph_executor_optimize(before)


def test_concurrent_calls_match_serial(fake_runtime):
    inputs = [helpers.random_batch((3, 32, 32), n=1 + i % 3, seed=i) for i in range(8)]
    images = [helpers.random_images(2, 30 + i, 40, seed=i) for i in range(8)]
    serial = [fake_runtime.infer(x) for x in inputs]
    serial_images = [fake_runtime.classify(im, topk=3) for im in images]
    results, errors = {}, []

    def worker(tid):
        try:
            for rep in range(10):
                i = (tid + rep) % len(inputs)
                results[(tid, rep, "x")] = (i, fake_runtime.infer(inputs[i]))
                results[(tid, rep, "im")] = (i, fake_runtime.classify(images[i], topk=3))
        except Exception as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (_tid, _rep, kind), (i, value) in results.items():
        if kind == "x":
            np.testing.assert_array_equal(value, serial[i])
        else:
            np.testing.assert_array_equal(value[0], serial_images[i][0])
            np.testing.assert_array_equal(value[1], serial_images[i][1])


def test_path_cache_reuses_and_reloads(tmp_path):
    path = helpers.save_fake_artifact(tmp_path / "a.pt", seed=1)
    x = helpers.random_batch((3, 32, 32))
    repmlp_rt.clear_cache()
    first = repmlp_rt.infer(path, x)
    assert len(repmlp_rt._CACHE) == 1
    repmlp_rt.infer(str(path), x)
    assert len(repmlp_rt._CACHE) == 1
    # a rebuilt artifact at the same path is reloaded
    helpers.save_fake_artifact(tmp_path / "b.pt", seed=2)
    os.replace(tmp_path / "b.pt", path)
    second = repmlp_rt.infer(path, x)
    assert len(repmlp_rt._CACHE) == 1
    assert not np.allclose(first, second)
    repmlp_rt.clear_cache()


def test_gil_is_released_while_the_model_runs(small_artifact):
    """While one thread is inside Runtime.infer, Python code in another thread keeps running.

    Held for the whole call, the GIL would let the main thread run only until the worker
    enters C++ (one switch interval, 5 ms); released, the main thread runs throughout.
    """
    import time

    runtime = repmlp_rt.Runtime(small_artifact, threads=1)  # leave a core for this thread
    batch = 64
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    started = time.perf_counter()
    runtime.infer(x)
    per_call = time.perf_counter() - started
    # grow the batch until one call lasts long enough to tell the two cases apart
    batch = int(batch * max(1.0, 0.4 / max(per_call, 1e-4)))
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)

    def spin(seconds: float) -> int:
        count, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            count += 1
        return count

    solo_rate = spin(0.2) / 0.2
    done = threading.Event()
    worker = threading.Thread(target=lambda: (runtime.infer(x), done.set()))
    count = 0
    started = time.perf_counter()
    worker.start()
    while not done.is_set():
        count += 1
    elapsed = time.perf_counter() - started
    worker.join()
    assert elapsed > 0.1, f"the call was too short to judge ({elapsed:.3f} s)"
    share = count / (solo_rate * elapsed)
    assert share > 0.2, f"the main thread ran {share:.0%} of the time during infer: the GIL was held"
