"""repmlp_rt on CUDA (marked ``cuda``: skipped where torch sees no GPU, or where the binding was
built against a CPU-only torch): values against the CPU reference, threads, memory."""


import pytest
import repmlp_rt
import runtime_helpers as helpers
import torch
from helpers import relative_close


# float32 on CUDA: cuDNN convolutions use TF32 by default on Ampere and later (10-bit mantissa),
# about 1e-4 of the logit scale on the fake artifact; 2e-3 leaves room without hiding a bug.
CUDA_RTOL = {"float32": 2e-3, "float16": 2e-2}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_cuda_matches_cpu(tmp_path, dtype_name):
    if not repmlp_rt.built_with_cuda():
        pytest.skip("repmlp_rt was built against a CPU-only torch")
    rtol = CUDA_RTOL[dtype_name]
    path = helpers.save_fake_artifact(tmp_path / f"{dtype_name}.pt", dtype_name=dtype_name)
    runtime = repmlp_rt.Runtime(path, device="cuda")
    assert runtime.device == "cuda:0" and runtime.compute_dtype == dtype_name
    reference = helpers.load_reference(helpers.save_fake_artifact(tmp_path / "ref.pt"))
    x = helpers.random_batch((3, 32, 32), n=8)
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
    if not repmlp_rt.built_with_cuda():
        pytest.skip("repmlp_rt was built against a CPU-only torch")
    path = helpers.save_fake_artifact(tmp_path / "a.pt")
    runtime = repmlp_rt.Runtime(path, device="cuda")
    reference = helpers.load_reference(path)
    inputs = [helpers.random_batch((3, 32, 32), n=2 + i, seed=100 + i) for i in range(4)]
    expected = [reference(torch.from_numpy(x)) for x in inputs]
    finished: list = []

    def work(i: int) -> None:
        for _ in range(10):
            relative_close(torch.from_numpy(runtime.infer(inputs[i])), expected[i], CUDA_RTOL["float32"])
        finished.append(i)

    helpers.run_in_threads(work, 4)
    assert sorted(finished) == [0, 1, 2, 3]


@pytest.mark.cuda
def test_cuda_memory_does_not_grow_with_calls(tmp_path):
    # Calls of one thread reuse one stream, hence the caching allocator's blocks: a new pool
    # stream per call would make reserved memory grow with every stream of the pool (32).
    if not repmlp_rt.built_with_cuda():
        pytest.skip("repmlp_rt was built against a CPU-only torch")
    runtime = repmlp_rt.Runtime(helpers.save_fake_artifact(tmp_path / "a.pt"), device="cuda")
    x = helpers.random_batch((3, 32, 32), n=64)
    for _ in range(5):  # the executor profiles and specializes on the new batch size first
        runtime.infer(x)
    reserved = torch.cuda.memory_reserved()
    for _ in range(40):
        runtime.infer(x)
    assert torch.cuda.memory_reserved() == reserved
