"""repmlp_rt's inputs and errors: arrays of every layout (without copies where none is needed),
bad arrays, arguments and artifacts (one clear exception each), image decoding."""

import numpy as np
import pytest
import repmlp_rt
import runtime_helpers as helpers
import torch


def test_layouts_without_segfault(fake_runtime):
    x = helpers.random_batch((3, 32, 32), n=4)
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
    x = helpers.random_batch((3, 32, 32))
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
    x = helpers.random_batch((3, 32, 32), n=32)  # 393 KB
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
        fake_runtime.classify(helpers.random_batch((3, 32, 32)), topk=0)
    with pytest.raises(ValueError, match=r"topk must be in \[1, 10\], got 1180591620717411303424"):
        fake_runtime.classify(images, topk=2**70)
    with pytest.raises(TypeError):
        fake_runtime.infer([[1.0, 2.0]])
    with pytest.raises(ValueError, match="threads"):
        repmlp_rt.Runtime(fake_artifact, threads=0)
    with pytest.raises(ValueError, match="invalid device 'tpu'"):
        repmlp_rt.Runtime(fake_artifact, device="tpu")


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


def test_bad_gemm_is_a_value_error_naming_the_modes(fake_artifact):
    with pytest.raises(ValueError, match="gemm must be one of auto, aten, onednn, mkl-packed, got 'blas'"):
        repmlp_rt.Runtime(fake_artifact, gemm="blas")
    with pytest.raises(ValueError, match="got ''"):
        repmlp_rt.Runtime(fake_artifact, gemm="")
    with pytest.raises(TypeError, match="gemm must be a str"):
        repmlp_rt.Runtime(fake_artifact, gemm=None)


@pytest.mark.parametrize("gemm", ["auto", "aten", "onednn", "mkl-packed"])
def test_every_gemm_mode_gives_the_reference_logits(small_artifact, gemm):
    reference = helpers.load_reference(small_artifact)
    x = helpers.random_batch((3, 32, 32), n=3)
    runtime = repmlp_rt.Runtime(small_artifact, gemm=gemm)
    assert runtime.self_check is not None and isinstance(runtime.gemm_plan, str)
    expected = reference(torch.from_numpy(x))
    # a rewritten product may sum in another order: 1e-4 of the logit scale
    torch.testing.assert_close(torch.from_numpy(runtime.infer(x)), expected, rtol=1e-4,
                               atol=1e-4 * expected.abs().max().item())


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
        repmlp_rt.infer(bad_artifacts[name], helpers.random_batch((3, 32, 32)))


@pytest.mark.skipif(not repmlp_rt.has_image_decoding(), reason="built without stb_image")
def test_decode_image_matches_pil(tmp_path):
    from PIL import Image

    image = helpers.random_images(1, 21, 34)[0]
    path = helpers.save_png(tmp_path / "x.png", image)
    decoded = repmlp_rt.decode_image(str(path))
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(path).convert("RGB")))
    with pytest.raises(ValueError, match="cannot decode image"):
        repmlp_rt.decode_image(str(helpers.write_random_bytes(tmp_path / "bad.png", 100)))
