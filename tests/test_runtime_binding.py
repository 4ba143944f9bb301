"""repmlp_rt (pybind11 binding of the C++ runtime) against torch.jit.load of the same artifact."""

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import repmlp_rt
import runtime_helpers as helpers
import torch

RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def fake_runtime(fake_artifact):
    return repmlp_rt.Runtime(fake_artifact)


def _batch(shape, n=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# equivalence with torch.jit.load


def test_infer_numpy_matches_torchscript(artifact):
    runtime = repmlp_rt.Runtime(artifact)
    reference = helpers.load_reference(artifact)
    x = _batch(runtime.input_shape)
    out = runtime.infer(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (4, runtime.num_classes)
    torch.testing.assert_close(torch.from_numpy(out), reference(torch.from_numpy(x)), rtol=RTOL, atol=ATOL)


def test_infer_torch_in_torch_out(artifact):
    runtime = repmlp_rt.Runtime(artifact)
    reference = helpers.load_reference(artifact)
    x = torch.from_numpy(_batch(runtime.input_shape, n=3, seed=1))
    out = runtime.infer(x)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(x), rtol=RTOL, atol=ATOL)
    # module-level infer, by path (cached) and by Runtime
    torch.testing.assert_close(repmlp_rt.infer(artifact, x), reference(x), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(repmlp_rt.infer(runtime, x), reference(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("size", [(40, 52), (32, 32), (17, 23)])
def test_uint8_images_match_forward_images(artifact, size):
    runtime = repmlp_rt.Runtime(artifact)
    reference = helpers.load_reference(artifact)
    images = helpers.random_images(3, *size, seed=sum(size))
    expected = reference.forward_images(torch.from_numpy(images))
    np_out = repmlp_rt.infer(artifact, images)
    assert isinstance(np_out, np.ndarray)
    torch.testing.assert_close(torch.from_numpy(np_out), expected, rtol=RTOL, atol=ATOL)
    torch_out = runtime.infer_images(torch.from_numpy(images))
    assert isinstance(torch_out, torch.Tensor)
    torch.testing.assert_close(torch_out, expected, rtol=RTOL, atol=ATOL)


def test_classify_matches_softmax_topk(artifact):
    runtime = repmlp_rt.Runtime(artifact)
    reference = helpers.load_reference(artifact)
    images = helpers.random_images(5, 36, 44, seed=3)
    k = min(3, runtime.num_classes)
    expected_scores, expected_indices = torch.softmax(
        reference.forward_images(torch.from_numpy(images)), dim=1).topk(k, dim=1)
    scores, indices = runtime.classify(images, topk=k)
    assert scores.shape == indices.shape == (5, k)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, expected_indices.numpy())
    torch.testing.assert_close(torch.from_numpy(scores), expected_scores, rtol=RTOL, atol=ATOL)
    # torch in, torch out; float NCHW batches go through forward
    x = torch.from_numpy(_batch(runtime.input_shape, n=2))
    t_scores, t_indices = runtime.classify(x, topk=k)
    e_scores, e_indices = torch.softmax(reference(x), dim=1).topk(k, dim=1)
    assert isinstance(t_scores, torch.Tensor) and isinstance(t_indices, torch.Tensor)
    torch.testing.assert_close(t_scores, e_scores, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(t_indices, e_indices)


def test_metadata_comes_from_the_artifact(artifact):
    runtime = repmlp_rt.Runtime(artifact)
    reference = helpers.load_reference(artifact)
    extra = {"manifest.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(artifact), map_location="cpu", _extra_files=extra)
    assert runtime.manifest == json.loads(extra["manifest.json"])
    assert runtime.format_version == repmlp_rt.FORMAT_VERSION == reference.format_version()
    assert list(runtime.input_shape) == reference.input_shape()
    assert runtime.labels == reference.labels()
    assert runtime.compute_dtype == reference.compute_dtype()
    assert runtime.device == "cpu"
    assert "Runtime(" in repr(runtime)


# ---------------------------------------------------------------------------------------------
# arrays of every layout


def test_layouts_without_segfault(fake_runtime):
    x = _batch((3, 32, 32), n=4)
    expected = fake_runtime.infer(x)
    # non-contiguous: strided, transposed back, negative strides, Fortran order
    wide = np.zeros((4, 3, 32, 64), np.float32)
    wide[..., ::2] = x
    np.testing.assert_array_equal(fake_runtime.infer(wide[..., ::2]), expected)
    np.testing.assert_array_equal(fake_runtime.infer(np.asfortranarray(x)), expected)
    np.testing.assert_array_equal(fake_runtime.infer(x[::-1].copy()[::-1]), expected)
    # read-only
    frozen = x.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(fake_runtime.infer(frozen), expected)
    # unaligned (offset by one byte into a buffer) and big-endian
    raw = bytearray(x.nbytes + 1)
    unaligned = np.frombuffer(raw, dtype=np.float32, offset=1, count=x.size).reshape(x.shape)
    assert not unaligned.flags.aligned
    np.copyto(unaligned, x)
    np.testing.assert_array_equal(fake_runtime.infer(unaligned), expected)
    np.testing.assert_array_equal(fake_runtime.infer(x.astype(">f4")), expected)
    # non-contiguous torch tensor
    np.testing.assert_array_equal(
        fake_runtime.infer(torch.from_numpy(wide)[..., ::2]).numpy(), expected)
    # uint8 images, non-contiguous
    images = helpers.random_images(2, 40, 40)
    padded = np.zeros((2, 40, 80, 3), np.uint8)
    padded[:, :, ::2] = images
    np.testing.assert_array_equal(fake_runtime.infer(padded[:, :, ::2]), fake_runtime.infer(images))


def test_does_not_copy_contiguous_input_or_keep_it(fake_runtime):
    # A contiguous float32 array is viewed, not copied: the result must not alias the input
    # and the input must be unchanged.
    x = _batch((3, 32, 32))
    before = x.copy()
    out = fake_runtime.infer(x)
    np.testing.assert_array_equal(x, before)
    assert not np.shares_memory(out, x)


def _python_side_allocation(call) -> int:
    """Peak bytes allocated while ``call`` runs, as tracemalloc sees them (numpy's buffers
    included; the C++ core's allocations are not)."""
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        call()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_contiguous_input_is_not_copied_on_the_python_side(fake_runtime):
    x = _batch((3, 32, 32), n=32)  # 393 KB
    fake_runtime.infer(x)
    assert _python_side_allocation(lambda: fake_runtime.infer(x)) < x.nbytes // 8
    # the measurement does see a copy: a reversed (non-contiguous) view must be copied
    assert _python_side_allocation(lambda: fake_runtime.infer(x[..., ::-1])) >= x.nbytes


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda: np.zeros((2, 1, 32, 32), np.float32), ["channels 1 != 3", "(N, 3, 32, 32)"]),
        (lambda: np.zeros((2, 3, 31, 32), np.float32), ["height 31 != 32"]),
        (lambda: np.zeros((2, 3, 32, 33), np.float32), ["width 33 != 32"]),
        (lambda: np.zeros((3, 32, 32), np.float32), ["4-D", "3-D", "[3, 32, 32]"]),
        (lambda: np.zeros((1, 2, 3, 32, 32), np.float32), ["4-D", "5-D"]),
        (lambda: np.zeros((0, 3, 32, 32), np.float32), ["N >= 1", "N = 0"]),
        (lambda: np.zeros((2, 3, 32, 32), np.float64), ["float32", "float64"]),
        (lambda: np.zeros((2, 3, 32, 32), np.int64), ["float32", "int64"]),
        (lambda: np.zeros((), np.float32), ["4-D", "0-D"]),
        (lambda: torch.zeros(2, 3, 32, 32, dtype=torch.float64), ["float32", "float64"]),
        (lambda: torch.zeros(2, 3, 16, 32), ["height 16 != 32"]),
    ],
)
def test_bad_input_raises_value_error(fake_runtime, make, fragments):
    with pytest.raises(ValueError) as info:
        fake_runtime.infer(make())
    assert isinstance(info.value, repmlp_rt.InputError)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "images, fragments",
    [
        (np.zeros((0, 32, 32, 3), np.uint8), ["N >= 1"]),
        (np.zeros((2, 0, 32, 3), np.uint8), ["height and width >= 1"]),
        (np.zeros((2, 32, 32, 4), np.uint8), ["(N, H, W, 3)", "[2, 32, 32, 4]"]),
        (np.zeros((32, 32, 3), np.uint8), ["4-D", "3-D"]),
    ],
)
def test_bad_images_raise_value_error(fake_runtime, images, fragments):
    for call in (fake_runtime.infer, fake_runtime.infer_images, fake_runtime.classify):
        with pytest.raises(ValueError) as info:
            call(images)
        for fragment in fragments:
            assert fragment in str(info.value)
    with pytest.raises(ValueError, match="expected dtype uint8"):
        fake_runtime.infer_images(np.zeros((1, 32, 32, 3), np.float32))


def test_bad_arguments(fake_runtime, fake_artifact):
    images = helpers.random_images(1, 32, 32)
    with pytest.raises(ValueError, match=r"topk must be in \[1, 10\], got 11"):
        fake_runtime.classify(images, topk=11)
    with pytest.raises(ValueError, match=r"topk must be in \[1, 10\], got 0"):
        fake_runtime.classify(_batch((3, 32, 32)), topk=0)
    with pytest.raises(ValueError, match=r"topk must be in \[1, 10\], got 1180591620717411303424"):
        fake_runtime.classify(images, topk=2**70)
    with pytest.raises(TypeError):
        fake_runtime.infer([[1.0, 2.0]])
    with pytest.raises(ValueError, match="threads"):
        repmlp_rt.Runtime(fake_artifact, threads=0)
    with pytest.raises(ValueError, match="invalid device 'tpu'"):
        repmlp_rt.Runtime(fake_artifact, device="tpu")


@pytest.mark.parametrize("warmup", [None, 0, 3])
def test_warmup_counts_give_the_same_results(small_artifact, warmup):
    runtime = repmlp_rt.Runtime(small_artifact, warmup=warmup, warmup_batch=2)
    x = _batch(runtime.input_shape, n=2, seed=5)
    expected = helpers.load_reference(small_artifact)(torch.from_numpy(x))
    torch.testing.assert_close(torch.from_numpy(runtime.infer(x)), expected, rtol=RTOL, atol=ATOL)


def test_optimize_for_inference_matches_the_plain_artifact(small_artifact):
    # optimize=True rewrites the graph in memory (oneDNN convolutions): not bit-exact, so
    # compared at 1e-4 of the logit scale, for both entry points.
    runtime = repmlp_rt.Runtime(small_artifact, optimize=True)
    reference = helpers.load_reference(small_artifact)
    x = _batch(runtime.input_shape, n=3, seed=9)
    expected = reference(torch.from_numpy(x))
    scale = expected.abs().max().item()
    torch.testing.assert_close(torch.from_numpy(runtime.infer(x)), expected, rtol=1e-4, atol=1e-4 * scale)
    images = helpers.random_images(2, 40, 52, seed=9)
    expected_images = reference.forward_images(torch.from_numpy(images))
    torch.testing.assert_close(torch.from_numpy(runtime.infer_images(images)), expected_images,
                               rtol=1e-4, atol=1e-4 * expected_images.abs().max().item())


def test_bad_warmup_is_a_value_error(fake_artifact):
    with pytest.raises(ValueError, match=r"warmup must be in \[0, 1048576\] .*, got -1"):
        repmlp_rt.Runtime(fake_artifact, warmup=-1)
    with pytest.raises(ValueError, match=r"warmup_batch must be in \[1, 1048576\], got 0"):
        repmlp_rt.Runtime(fake_artifact, warmup_batch=0)
    # Past the C++ int range too: a ValueError, not pybind11's TypeError.
    with pytest.raises(ValueError, match="warmup must be in"):
        repmlp_rt.Runtime(fake_artifact, warmup=2**40)
    with pytest.raises(ValueError, match="warmup_batch must be in"):
        repmlp_rt.Runtime(fake_artifact, warmup_batch=2**40)
    with pytest.raises(TypeError, match="warmup must be an int, got float"):
        repmlp_rt.Runtime(fake_artifact, warmup=1.5)


def test_default_topk_is_at_most_the_class_count(fake_runtime, tmp_path):
    images = helpers.random_images(2, 32, 32)
    scores, indices = fake_runtime.classify(images)
    assert scores.shape == indices.shape == (2, 5)
    three = repmlp_rt.Runtime(helpers.save_fake_artifact(tmp_path / "three.pt", num_classes=3))
    logits = torch.from_numpy(three.infer(images))
    scores, indices = three.classify(images)
    expected = torch.softmax(logits, dim=1).topk(3, dim=1)
    torch.testing.assert_close(torch.from_numpy(scores), expected.values, rtol=RTOL, atol=ATOL)
    assert indices.tolist() == expected.indices.tolist()


def test_calls_leave_the_callers_graph_executor_setting_alone(fake_runtime):
    # CPU calls run with TorchScript's executor optimization off; the switch is thread-local
    # and must be restored, or TorchScript code the caller runs afterwards would change.
    before = torch._C._get_graph_executor_optimize()
    try:
        torch._C._set_graph_executor_optimize(True)
        fake_runtime.infer(_batch((3, 32, 32)))
        fake_runtime.infer_images(helpers.random_images(1, 32, 32))
        assert torch._C._get_graph_executor_optimize() is True
    finally:
        torch._C._set_graph_executor_optimize(before)


@pytest.mark.skipif(repmlp_rt.built_with_cuda(), reason="this build has CUDA support")
def test_cuda_on_cpu_build_is_a_clear_error(fake_artifact):
    with pytest.raises(RuntimeError, match="no CUDA support") as info:
        repmlp_rt.Runtime(fake_artifact, device="cuda")
    assert isinstance(info.value, repmlp_rt.DeviceError)


@pytest.fixture(scope="module")
def bad_artifacts(tmp_path_factory, fake_artifact):
    return helpers.make_bad_artifacts(tmp_path_factory.mktemp("bad"), fake_artifact)


@pytest.mark.parametrize("name", sorted(helpers.BAD_ARTIFACT_MESSAGES))
def test_bad_artifacts_raise_artifact_error(bad_artifacts, name):
    with pytest.raises(RuntimeError) as info:
        repmlp_rt.Runtime(bad_artifacts[name])
    assert isinstance(info.value, repmlp_rt.ArtifactError)
    message = str(info.value)
    assert helpers.BAD_ARTIFACT_MESSAGES[name] in message
    assert "\n" not in message and "Exception raised from" not in message
    with pytest.raises(repmlp_rt.ArtifactError):
        repmlp_rt.infer(bad_artifacts[name], _batch((3, 32, 32)))


# ---------------------------------------------------------------------------------------------
# concurrency, caching, import


def test_concurrent_calls_match_serial(fake_runtime):
    inputs = [_batch((3, 32, 32), n=1 + i % 3, seed=i) for i in range(8)]
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
    x = _batch((3, 32, 32))
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


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(check=False, args=[sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_in_fresh_interpreter_without_torch(fake_artifact):
    code = (
        "import sys, numpy as np, repmlp_rt\n"
        "assert 'torch' not in sys.modules, 'repmlp_rt imported torch'\n"
        f"rt = repmlp_rt.Runtime({str(fake_artifact)!r})\n"
        "out = repmlp_rt.infer(rt, np.zeros((2, 3, 32, 32), np.float32))\n"
        "assert out.shape == (2, 10) and 'torch' not in sys.modules\n"
        "print('ok', repmlp_rt.__version__)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


@pytest.mark.parametrize("order", ["torch_first", "repmlp_rt_first"])
def test_import_alongside_torch(fake_artifact, order):
    imports = "import torch, repmlp_rt" if order == "torch_first" else "import repmlp_rt, torch"
    code = (
        "import warnings; warnings.simplefilter('ignore', DeprecationWarning)\n"
        f"{imports}\n"
        f"path = {str(fake_artifact)!r}\n"
        "x = torch.randn(2, 3, 32, 32)\n"
        "ref = torch.jit.load(path)(x)\n"
        "torch.testing.assert_close(repmlp_rt.Runtime(path).infer(x), ref, rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr


def test_public_api():
    for name in repmlp_rt.__all__:
        assert hasattr(repmlp_rt, name), name
    package = Path(repmlp_rt.__file__).parent
    assert (package / "py.typed").exists()
    assert (package / "_runtime.pyi").exists()
    assert issubclass(repmlp_rt.ArtifactError, RuntimeError)
    assert issubclass(repmlp_rt.InputError, ValueError)


def test_binary_is_on_path_after_install():
    found = shutil.which("repmlp_infer")
    assert found, "repmlp_infer is not on PATH: pip install --no-build-isolation -e ."
    result = subprocess.run(check=False, args=[found, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ARTIFACT" in result.stdout


@pytest.mark.skipif(not repmlp_rt.has_image_decoding(), reason="built without stb_image")
def test_decode_image_matches_pil(tmp_path):
    from PIL import Image

    image = helpers.random_images(1, 21, 34)[0]
    path = helpers.save_png(tmp_path / "x.png", image)
    decoded = repmlp_rt.decode_image(str(path))
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(path).convert("RGB")))
    with pytest.raises(ValueError, match="cannot decode image"):
        repmlp_rt.decode_image(str(helpers.write_random_bytes(tmp_path / "bad.png", 100)))


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)

# float32 on CUDA: cuDNN convolutions use TF32 by default on Ampere and later (10-bit mantissa),
# about 1e-4 of the logit scale on the fake artifact; 2e-3 leaves room without hiding a bug.
CUDA_RTOL = {"float32": 2e-3, "float16": 2e-2}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_cuda_matches_cpu(tmp_path, dtype_name):
    from helpers import relative_close

    if not repmlp_rt.built_with_cuda():
        pytest.skip("repmlp_rt was built against a CPU-only torch")
    rtol = CUDA_RTOL[dtype_name]
    path = helpers.save_fake_artifact(tmp_path / f"{dtype_name}.pt", dtype_name=dtype_name)
    runtime = repmlp_rt.Runtime(path, device="cuda")
    assert runtime.device == "cuda:0" and runtime.compute_dtype == dtype_name
    reference = helpers.load_reference(helpers.save_fake_artifact(tmp_path / "ref.pt"))
    x = _batch((3, 32, 32), n=8)
    relative_close(torch.from_numpy(runtime.infer(x)), reference(torch.from_numpy(x)), rtol)
    images = helpers.random_images(4, 40, 48)
    relative_close(torch.from_numpy(runtime.infer(images)), reference.forward_images(torch.from_numpy(images)), rtol)
    # CUDA tensors in (written just before the call), CPU tensors out, the right values
    on_gpu = torch.from_numpy(x).cuda() * 1.0
    out = runtime.infer(on_gpu)
    assert out.device.type == "cpu"
    relative_close(out, reference(torch.from_numpy(x)), rtol)
    # The caller's current stream and device are left as they were.
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


@pytest.mark.cuda
def test_cuda_threads_get_their_own_results(tmp_path):
    from helpers import relative_close

    if not repmlp_rt.built_with_cuda():
        pytest.skip("repmlp_rt was built against a CPU-only torch")
    path = helpers.save_fake_artifact(tmp_path / "a.pt")
    runtime = repmlp_rt.Runtime(path, device="cuda")
    reference = helpers.load_reference(path)
    inputs = [_batch((3, 32, 32), n=2 + i, seed=100 + i) for i in range(4)]
    expected = [reference(torch.from_numpy(x)) for x in inputs]
    failures: list = []

    def work(i: int) -> None:
        for _ in range(10):
            try:
                relative_close(torch.from_numpy(runtime.infer(inputs[i])), expected[i], CUDA_RTOL["float32"])
            except AssertionError as error:
                failures.append((i, str(error)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:2]


@pytest.mark.cuda
def test_cuda_memory_does_not_grow_with_calls(tmp_path):
    # Calls of one thread reuse one stream, hence the caching allocator's blocks: a new pool
    # stream per call made reserved memory grow with every stream of the pool (32).
    if not repmlp_rt.built_with_cuda():
        pytest.skip("repmlp_rt was built against a CPU-only torch")
    runtime = repmlp_rt.Runtime(helpers.save_fake_artifact(tmp_path / "a.pt"), device="cuda")
    x = _batch((3, 32, 32), n=64)
    for _ in range(5):  # the executor profiles and specializes on the new batch size first
        runtime.infer(x)
    reserved = torch.cuda.memory_reserved()
    for _ in range(40):
        runtime.infer(x)
    assert torch.cuda.memory_reserved() == reserved


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
