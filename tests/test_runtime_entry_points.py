"""The runtime's entry points and their one set of rules, as seen from Python and the CLI:
infer (either kind of input), infer_normalized (float NCHW only), infer_images (uint8 NHWC
only), classify; torch tensors in through DLPack; option checks made once, in the C++ core."""

import subprocess

import numpy as np
import pytest
import repmlp_rt
import runtime_helpers as helpers
from helpers import repmlp_infer_binary
import torch

RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def runtime(fake_artifact):
    return repmlp_rt.Runtime(fake_artifact)


@pytest.fixture(scope="module")
def reference(fake_artifact):
    return helpers.load_reference(fake_artifact)


def _batch(n=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def test_infer_dispatches_on_dtype_and_the_named_entry_points_take_one_kind(runtime, reference):
    x = _batch()
    images = helpers.random_images(2, 40, 36, seed=3)
    expected = reference(torch.from_numpy(x))
    expected_images = reference.forward_images(torch.from_numpy(images))
    for out in (runtime.infer(x), runtime.infer_normalized(x)):
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=RTOL, atol=ATOL)
    for out in (runtime.infer(images), runtime.infer_images(images)):
        torch.testing.assert_close(torch.from_numpy(out), expected_images, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match=r"expected dtype float32, got uint8 \(uint8 NHWC images go through infer/infer_images\)"):
        runtime.infer_normalized(images)
    with pytest.raises(ValueError, match="expected dtype uint8 for NHWC images, got float32"):
        runtime.infer_images(x)


def test_torch_tensors_in_torch_tensors_out(runtime, reference):
    x = torch.from_numpy(_batch(seed=1))
    expected = reference(x)
    # contiguous, a strided view of the same values, and a tensor that requires grad
    strided = torch.from_numpy(_batch(seed=1)).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not strided.is_contiguous()
    for tensor in (x, strided, x.clone().requires_grad_(True)):
        for call in (runtime.infer, runtime.infer_normalized):
            out = call(tensor)
            assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type == "cpu"
            torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    images = torch.from_numpy(helpers.random_images(2, 33, 47, seed=4))
    for call in (runtime.infer, runtime.infer_images):
        torch.testing.assert_close(call(images), reference.forward_images(images), rtol=RTOL, atol=ATOL)
    scores, indices = runtime.classify(images, topk=3)
    expected_topk = torch.softmax(reference.forward_images(images), dim=1).topk(3, dim=1)
    assert isinstance(scores, torch.Tensor) and indices.dtype == torch.int64
    torch.testing.assert_close(scores, expected_topk.values, rtol=RTOL, atol=ATOL)
    assert indices.tolist() == expected_topk.indices.tolist()
    # the caller's tensor is left as it was (the runtime only reads it)
    torch.testing.assert_close(x, torch.from_numpy(_batch(seed=1)), rtol=0, atol=0)


def test_torch_bad_input_gives_the_cores_message(runtime):
    with pytest.raises(ValueError, match=r"got \[2, 3, 16, 32\]: height 16 != 32"):
        runtime.infer(torch.zeros(2, 3, 16, 32))
    with pytest.raises(ValueError, match="expected dtype float32, got float64"):
        runtime.infer_normalized(torch.zeros(2, 3, 32, 32, dtype=torch.float64))


def _cli_error(*args) -> str:
    result = subprocess.run([repmlp_infer_binary(), *map(str, args)], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 2, (result.returncode, result.stderr)
    return result.stderr.strip().removeprefix("repmlp_infer: error: ")


@pytest.mark.parametrize(
    "python_kwargs, cli_args",
    [
        ({"threads": 5000}, ["--threads", 5000]),
        ({"threads": -1}, ["--threads", -1]),
        ({"device": "tpu"}, ["--device", "tpu"]),
    ],
)
def test_option_errors_are_the_same_in_python_and_the_cli(fake_artifact, tmp_path, python_kwargs, cli_args):
    # One rule in one place: the core's message, word for word, from both front ends.
    with pytest.raises(ValueError) as info:
        repmlp_rt.Runtime(fake_artifact, **python_kwargs)
    npy = helpers.write_npy(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    assert _cli_error(fake_artifact, npy, *cli_args) == str(info.value)


def test_topk_errors_are_the_same_in_python_and_the_cli(runtime, fake_artifact, tmp_path):
    with pytest.raises(ValueError) as info:
        runtime.classify(_batch(), topk=11)
    assert str(info.value) == "topk must be in [1, 10], got 11"
    npy = helpers.write_npy(tmp_path / "x.npy", _batch())
    assert _cli_error(fake_artifact, npy, "--topk", 11) == str(info.value)


def test_option_ranges(fake_artifact):
    with pytest.raises(ValueError, match=r"^threads must be in \[1, 4096\] \(unset: torch's default\), got 4097$"):
        repmlp_rt.Runtime(fake_artifact, threads=4097)
    with pytest.raises(ValueError, match=r"^warmup_batch must be in \[1, 1048576\], got 1180591620717411303424$"):
        repmlp_rt.Runtime(fake_artifact, warmup_batch=2**70)
    with pytest.raises(TypeError, match="threads must be an int, got bool"):
        repmlp_rt.Runtime(fake_artifact, threads=True)
    runtime = repmlp_rt.Runtime(fake_artifact, warmup=np.int64(0), warmup_batch=4096)
    assert runtime.num_classes == 10
