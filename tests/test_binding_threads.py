"""repmlp_rt under threads: concurrent calls on one Runtime, the released GIL, the thread-local
executor switch and the lock-guarded path cache of repmlp_rt.infer."""

import os
import sys
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
    results = {}

    def worker(tid):
        for rep in range(10):
            i = (tid + rep) % len(inputs)
            results[(tid, rep, "x")] = (i, fake_runtime.infer(inputs[i]))
            results[(tid, rep, "im")] = (i, fake_runtime.classify(images[i], topk=3))

    helpers.run_in_threads(worker, 6)
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


def _other_thread_runs_during(call) -> bool:
    """Whether this thread runs Python code while ``call`` runs in another thread.

    With the switch interval far above the test's length, the interpreter never takes the GIL
    from a thread: a thread gives it up only when it blocks or releases it itself. This thread
    blocks in ``start()`` until the worker has begun, so it can run again before ``call``
    returns only if ``call`` releases the GIL; it then finds the call still in progress. An
    exception in the worker is raised here; joins have timeouts, so a hung call fails the test.
    """
    calling, returned = threading.Event(), threading.Event()
    errors: list = []

    def worker() -> None:
        try:
            calling.set()
            call()
        except BaseException as error:  # noqa: BLE001 - raised in the calling thread below
            errors.append(error)
        finally:
            returned.set()

    thread = threading.Thread(target=worker)
    saved = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        thread.start()
        assert calling.wait(timeout=120), "the worker thread did not start"
        during = not returned.is_set()
    finally:
        sys.setswitchinterval(saved)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the call did not return within 300 s"
    if errors:
        raise errors[0]
    return during


def test_gil_is_released_while_the_model_runs(small_artifact):
    runtime = repmlp_rt.Runtime(small_artifact, threads=1)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32), dtype=np.float32)
    expected = runtime.infer(x)  # the first call's one-time work is done before the check
    # The check itself tells the two cases apart: pure Python code holds the GIL throughout.
    assert not _other_thread_runs_during(lambda: sum(i * i for i in range(200_000)))
    results: list = []
    assert _other_thread_runs_during(lambda: results.append(runtime.infer(x))), \
        "no other Python thread ran while infer ran: the GIL was held for the whole call"
    np.testing.assert_array_equal(results[0], expected)
