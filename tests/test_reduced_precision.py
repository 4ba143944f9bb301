"""bfloat16 and int8 artifacts: accuracy bounds on the digits set, the int8 layer
against a float64 model of its arithmetic, and the int8 artifact through the C++ runtime.

Bounds: held-out accuracy of the bf16 and int8 digits artifacts within 0.5 points of the fp32
artifact's; top-1 agreement with fp32 >= 99% on the whole digits set (1797 images). Added test
time: about 40 s (three digits builds, the dataset through each artifact).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import repmlp_rt
import torch
from helpers import make_model, relative_close, repmlp_infer_binary
from repmlp import fuse_model
from repmlp.artifact import build_artifact
from repmlp.preprocess import ImageTransform
from repmlp.model import RepMLPBlock
from repmlp.quantize import (
    ACTIVATION_SCHEME,
    GELU_MIN,
    INT8_LEVELS,
    WEIGHT_LEVELS,
    Int8Linear,
    Int8RepMLPBlock,
    quantize_int8,
)
from repmlp.utils import randomize_model_
from repmlp.variants import get_variant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "digits"))

from data import load_digits_rgb, split  # noqa: E402  (examples/digits is not a package)

MAX_ACCURACY_DROP = 0.005  # 0.5 points
MIN_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def digits_inputs():
    """(every digit as a normalized batch, labels, held-out indices)."""
    images, labels = load_digits_rgb()
    _, test_idx = split(labels)
    return images, torch.from_numpy(labels), torch.from_numpy(test_idx)


@pytest.fixture(scope="module")
def digits_builds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dtypes")
    paths = {}
    for dtype in ("float32", "bfloat16", "int8"):
        paths[dtype] = str(folder / f"digits-{dtype}.pt")
        build_artifact(out=paths[dtype], dtype=dtype)
    return paths


@pytest.fixture(scope="module")
def digits_predictions(digits_builds, digits_inputs):
    """dtype -> top-1 of every digit through the artifact's own preprocessing (forward_images)."""
    images, _, _ = digits_inputs
    batch = torch.from_numpy(images)
    preds = {}
    for dtype, path in digits_builds.items():
        module = torch.jit.load(path, map_location="cpu").eval()
        with torch.no_grad(), torch.jit.optimized_execution(False):
            preds[dtype] = module.forward_images(batch).argmax(1)
    return preds


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_held_out_accuracy_within_half_a_point_of_fp32(digits_predictions, digits_inputs, dtype):
    _, labels, test_idx = digits_inputs
    accuracy = {d: (p[test_idx] == labels[test_idx]).double().mean().item() for d, p in digits_predictions.items()}
    assert accuracy["float32"] >= 0.97
    assert accuracy[dtype] >= accuracy["float32"] - MAX_ACCURACY_DROP, accuracy


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_top1_agrees_with_fp32_on_the_whole_digits_set(digits_predictions, dtype):
    agreement = (digits_predictions[dtype] == digits_predictions["float32"]).double().mean().item()
    assert agreement >= MIN_AGREEMENT, f"{dtype}: {agreement:.4f} of 1797 digits agree with float32"


def test_int8_manifest_states_quantization_and_tolerance(digits_builds):
    import json

    extra = {"manifest.json": ""}
    torch.jit.load(digits_builds["int8"], map_location="cpu", _extra_files=extra)
    manifest = json.loads(extra["manifest.json"])
    assert manifest["input"]["dtype"] == "float32" and manifest["input"]["compute_dtype"] == "int8"
    quant = manifest["quantization"]
    assert quant["activations"] == ACTIVATION_SCHEME
    assert "float32" in quant["kept_float"]
    # digits: depths (1, 1, 2, 1), sharesets (1, 2, 4, 8), all at most MAX_INT8_SHARESETS: 2 FFN
    # GEMMs and fc3 per unit -> 3 + 3 + 6 + 3 GEMMs in sequence, each allowed half an activation
    # step (1/254) plus half a weight step (1/128) of the logit scale.
    assert quant["int8_gemms_per_image"] == 15
    assert quant["int8_layers"].endswith("stages 0, 1, 2, 3")
    assert "[-64, 64]" in quant["weights"]
    verification = manifest["verification"]
    assert verification["tolerance"] == pytest.approx(15 * (1 / 254 + 1 / 128))
    assert "float32" in verification["reference"]
    worst = max(s["max_rel_err"] for s in verification["stages"] if s["max_rel_err"] is not None)
    assert 0 < worst <= verification["tolerance"]


def test_int8_linear_matches_a_float64_model_of_its_rounding():
    """The int8 kernel path against the same quantize-dequantize arithmetic in float64."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 96, generator=gen), torch.randn(48, generator=gen)
    x = torch.randn(7, 96, generator=gen) * torch.rand(7, 1, generator=gen) * 10  # rows of different scales
    layer = Int8Linear(weight, bias)
    codes = layer.weight_t.t().double()
    assert codes.abs().max() == WEIGHT_LEVELS and torch.equal(codes, codes.round())
    w_deq = codes * layer.weight_scale.double()[:, None]
    # half a step per weight: the per-channel scale is max |w| / 64
    half_step = weight.double().abs().amax(1, keepdim=True) / (2 * WEIGHT_LEVELS)
    assert ((w_deq - weight.double()).abs() <= half_step + 1e-7).all()
    expected = fake_quantized_rows(x) @ w_deq.t() + bias.double()
    relative_close(layer(x).double(), expected, rtol=1e-5)


def fake_quantized_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row rounded to int8 steps of its own max |value| / 127, in float64."""
    step = x.double().abs().amax(1, keepdim=True) / INT8_LEVELS
    return torch.round(x.double() / step) * step


def test_int8_layer_on_gelu_outputs_needs_no_row_minimum():
    """fc2 takes GELU's minimum as its inputs' lower bound instead of reading each row's minimum:
    the same numbers whenever a row's max reaches |GELU_MIN|, and steps of |GELU_MIN| / 127
    (no clipping) for rows below it."""
    grid = torch.nn.functional.gelu(torch.linspace(-20, 20, 4_000_001))
    assert grid.min() >= GELU_MIN
    gen = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(32, 96, generator=gen), torch.randn(32, generator=gen)
    reads_min, bounded = Int8Linear(weight, bias), Int8Linear(weight, bias, input_lower_bound=GELU_MIN)
    x = torch.nn.functional.gelu(torch.randn(64, 96, generator=gen) * 3)
    assert (x.amax(1) >= -GELU_MIN).all()
    torch.testing.assert_close(bounded(x), reads_min(x), rtol=0, atol=0)
    small = torch.nn.functional.gelu(torch.randn(4, 96, generator=gen) * 0.05)  # every value < 0.17
    step = -GELU_MIN / INT8_LEVELS
    expected = torch.round(small.double() / step) * step @ bounded.dequantized_weight().double().t() + bias.double()
    relative_close(bounded(small).double(), expected, rtol=1e-5)


def test_int8_fc3_with_several_sharesets_matches_a_float64_model_of_its_rounding():
    """Channel c uses shareset c % sets: the per-shareset GEMMs must put every map back in place."""
    sets, channels, size = 4, 8, (3, 5)  # non-square maps, so a transposed matrix shows
    block = RepMLPBlock(channels, size, num_sharesets=sets, reparam_conv_kernels=(1, 3), gp_ratio=4)
    randomize_model_(block, seed=3)
    block.eval().reparameterize()
    layer = Int8RepMLPBlock(block)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, *size, generator=gen) * torch.rand(2, channels, 1, 1, generator=gen) * 10
    weights = layer.dequantized_weight().double()  # (sets, out, in)
    assert torch.equal(layer.weight_t.double(), layer.weight_t.double().round())
    w_true = block.fc3.weight.double().reshape(sets, 15, 15)
    assert weights.abs().amax() > 0 and layer.weight_t.abs().max() == WEIGHT_LEVELS
    assert ((weights - w_true).abs() <= w_true.abs().amax(2, keepdim=True) / (2 * WEIGHT_LEVELS) + 1e-7).all()
    rows = fake_quantized_rows(x.reshape(-1, 15)).reshape(2, channels, 15)
    bias = layer.bias.double()
    expected = torch.stack([rows[:, c] @ weights[c % sets].t() + bias[c % sets] for c in range(channels)], 1)
    with torch.no_grad():
        expected = expected.reshape(x.shape) * block.gp(x).double()
        relative_close(layer(x).double(), expected, rtol=1e-5)
        # forward_images hands the blocks channels-last maps: the same codes (the float32 gate
        # may differ in the last bit)
        channels_last = layer(x.contiguous(memory_format=torch.channels_last))
    relative_close(channels_last, layer(x), rtol=1e-6)


def test_int8_ffn_gives_the_same_numbers_in_any_row_chunks():
    """Row chunks write straight into the output: chunked and whole must agree bit for bit."""
    model = quantize_int8(fuse_model(make_model(img_size=32, num_classes=10)))
    ffn = model.stages[0][0].ffn_block
    x = torch.randn(3, ffn.fc1.weight_t.shape[0], 8, 8)  # 192 token rows
    with torch.no_grad():
        whole = ffn(x)
        ffn.chunk_rows = 50  # 4 chunks, the last one short
        chunked = ffn(x)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_int8_result_does_not_depend_on_the_rest_of_the_batch():
    model = quantize_int8(fuse_model(make_model(img_size=32, num_classes=10)))
    x = torch.randn(4, 3, 32, 32)
    x[2:] *= 50  # other images with much larger values must not coarsen the first one's steps
    with torch.no_grad():
        together = model(x)
        alone = model(x[:1])
    relative_close(alone, together[:1], rtol=1e-5)


# oneDNN capped below VNNI: the int8 GEMM kernels of an AVX2 CPU (or AVX-512 without VNNI),
# which add pairs of u8 x s8 products in 16 bits. The cap is read once, at oneDNN's start: a
# child process. A no-op on a CPU without VNNI, which runs those kernels anyway.
NO_VNNI = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}

EXACT_WITHOUT_VNNI = """
import torch
from repmlp.quantize import INT8_LEVELS, _quantize_weight


def exact(acts, codes):
    return torch.equal(torch._int_mm(acts, codes).long(), acts.long() @ codes.long())


gen = torch.Generator().manual_seed(0)
# Weights at the largest code magnitude in both signs, activations at +-127: the pair sums that
# overflow 16 bits when weight codes reach 65 or more.
codes, _ = _quantize_weight(torch.randn(256, 384, generator=gen).sign())
acts = [torch.full((64, 384), INT8_LEVELS),
        torch.randint(-INT8_LEVELS, INT8_LEVELS + 1, (64, 384), generator=gen)]
acts = [a.to(torch.int8) for a in acts]
full_range = torch.full((384, 256), INT8_LEVELS, dtype=torch.int8)
print("full-range codes exact:", exact(acts[0], full_range))
print("weight codes exact:", all(exact(a, codes) for a in acts))
"""


def test_int8_weight_codes_are_exact_in_the_int8_gemm_of_cpus_without_vnni():
    result = subprocess.run([sys.executable, "-c", EXACT_WITHOUT_VNNI], env=NO_VNNI,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    if "full-range codes exact: True" in result.stdout:
        pytest.skip("this torch's int8 GEMM has no 16-bit pair sums under the cap (full-range codes are exact)")
    assert "full-range codes exact: False" in result.stdout, result.stdout
    assert "weight codes exact: True" in result.stdout, result.stdout


def test_int8_artifact_gives_the_same_answers_without_vnni(digits_builds, tmp_path):
    """The same int8 artifact through repmlp_infer with and without VNNI kernels: its load-time
    self-check passes and the outputs agree (the int8 sums are exact in both; the float32 layers
    may differ in the last bit, which can move an int8 rounding by a step, ~1e-4 of the logit
    scale; saturated sums were off by 0.6)."""
    x = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    outputs = {}
    for name, env in (("native", os.environ), ("no_vnni", NO_VNNI)):
        out = tmp_path / f"{name}.npy"
        command = [repmlp_infer_binary(), digits_builds["int8"], str(tmp_path / "x.npy"), "--output", str(out)]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{name}: {run.stderr}"
        outputs[name] = torch.from_numpy(np.load(out))
    relative_close(outputs["no_vnni"], outputs["native"], rtol=1e-3)


def test_int8_needs_the_fused_model():
    with pytest.raises(ValueError, match="fused"):
        quantize_int8(make_model(img_size=32, num_classes=10))


def test_int8_artifact_through_the_cpp_runtime_and_cli(digits_builds, digits_inputs):
    images, _, test_idx = digits_inputs
    path = digits_builds["int8"]
    module = torch.jit.load(path, map_location="cpu").eval()
    batch = images[test_idx[:16].numpy()]
    with torch.no_grad(), torch.jit.optimized_execution(False):
        expected = module.forward_images(torch.from_numpy(batch))
    runtime = repmlp_rt.Runtime(path, device="cpu")
    assert runtime.compute_dtype == "int8"
    relative_close(torch.from_numpy(np.asarray(runtime.infer_images(batch))), expected, rtol=1e-5)
    # The module's own forward on the very tensor the runtime gets (contiguous, as numpy hands
    # it over): a last-bit difference in the input (the Python transform against the graph's,
    # or another memory layout picking another conv kernel) can move an int8 rounding by one
    # step (8e-5 of the logit scale on digits).
    x = ImageTransform(get_variant("digits").preprocessing)(torch.from_numpy(batch)).contiguous()
    with torch.no_grad(), torch.jit.optimized_execution(False):
        expected = module(x)
    relative_close(torch.from_numpy(np.asarray(runtime.infer(x.numpy()))), expected, rtol=1e-5)
    info = subprocess.run([repmlp_infer_binary(), "--info", path], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "compute dtype:  int8" in info.stdout



# /proc/cpuinfo flag -> the name torch's cpuinfo gives the same feature
CPUINFO_NAMES = {"avx2": "avx2", "fma": "fma3", "avx512f": "avx512_f", "avx512_vnni": "avx512_vnni",
                 "avx_vnni": "avx_vnni", "avx512_bf16": "avx512_bf16", "avx512_fp16": "avx512_fp16",
                 "amx_tile": "amx_tile", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8"}


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the kernel's CPU flags (Linux)")
def test_info_prints_the_cpu_features_the_kernel_reports(digits_builds):
    with open("/proc/cpuinfo") as fh:
        flags = next(line for line in fh if line.startswith("flags")).split(":", 1)[1].split()
    expected = [CPUINFO_NAMES[f] for f in CPUINFO_NAMES if f in flags]
    cpu = repmlp_rt.cpu_features()
    assert sorted(cpu["isa"]) == sorted(expected) and cpu["kernel_level"]
    info = subprocess.run([repmlp_infer_binary(), "--info", "--json", digits_builds["float32"]],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    import json

    assert json.loads(info.stdout)["runtime"]["cpu"] == cpu
    text = subprocess.run([repmlp_infer_binary(), "--info", digits_builds["float32"]], capture_output=True, text=True, timeout=120)
    line = next(x for x in text.stdout.splitlines() if x.startswith("cpu:"))
    assert line.split("isa:")[1].split() == cpu["isa"] or not cpu["isa"]


def test_int8_is_refused_for_the_aoti_format(tmp_path):
    from repmlp.artifact import BuildError

    with pytest.raises(BuildError, match="torchscript format only"):
        build_artifact(out=str(tmp_path / "x.pt2"), dtype="int8", format="aoti")
    assert not (tmp_path / "x.pt2").exists()
