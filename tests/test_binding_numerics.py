"""repmlp_rt (the pybind11 binding of the C++ runtime) against torch.jit.load of the same
artifact: logits, images, top-k, metadata, warm-up and optimize options."""

import json
import warnings

import numpy as np
import pytest
import repmlp_rt
import runtime_helpers as helpers
import torch
from runtime_helpers import ATOL, RTOL


def test_infer_numpy_matches_torchscript(artifact):
    runtime = repmlp_rt.Runtime(artifact)
    reference = helpers.load_reference(artifact)
    x = helpers.random_batch(runtime.input_shape)
    out = runtime.infer(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (4, runtime.num_classes)
    torch.testing.assert_close(torch.from_numpy(out), reference(torch.from_numpy(x)), rtol=RTOL, atol=ATOL)


def test_infer_torch_in_torch_out(artifact):
    runtime = repmlp_rt.Runtime(artifact)
    reference = helpers.load_reference(artifact)
    x = torch.from_numpy(helpers.random_batch(runtime.input_shape, n=3, seed=1))
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
    x = torch.from_numpy(helpers.random_batch(runtime.input_shape, n=2))
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


@pytest.mark.parametrize("warmup", [None, 0, 3])
def test_warmup_counts_give_the_same_results(small_artifact, warmup):
    runtime = repmlp_rt.Runtime(small_artifact, warmup=warmup, warmup_batch=2)
    x = helpers.random_batch(runtime.input_shape, n=2, seed=5)
    expected = helpers.load_reference(small_artifact)(torch.from_numpy(x))
    torch.testing.assert_close(torch.from_numpy(runtime.infer(x)), expected, rtol=RTOL, atol=ATOL)


def test_optimize_for_inference_matches_the_plain_artifact(small_artifact):
    # optimize=True rewrites the graph in memory (oneDNN convolutions): not bit-exact, so
    # compared at 1e-4 of the logit scale, for both entry points.
    runtime = repmlp_rt.Runtime(small_artifact, optimize=True)
    reference = helpers.load_reference(small_artifact)
    x = helpers.random_batch(runtime.input_shape, n=3, seed=9)
    expected = reference(torch.from_numpy(x))
    scale = expected.abs().max().item()
    torch.testing.assert_close(torch.from_numpy(runtime.infer(x)), expected, rtol=1e-4, atol=1e-4 * scale)
    images = helpers.random_images(2, 40, 52, seed=9)
    expected_images = reference.forward_images(torch.from_numpy(images))
    torch.testing.assert_close(torch.from_numpy(runtime.infer_images(images)), expected_images,
                               rtol=1e-4, atol=1e-4 * expected_images.abs().max().item())


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
