"""int8 weights with dynamically quantized activations for the fused RepMLPNet (``--dtype int8``).

Each large GEMM of the fused model (both FFN layers of every unit, and fc3 where a stage has one
shareset) becomes an :class:`Int8Linear`: the weight is stored as int8 with one symmetric scale
per output channel, and at every call each row of the activation matrix (one pixel's channels,
or one channel's map for fc3) is scaled by its own max |value| to int8, multiplied with
``torch._int_mm`` (int8 x int8 -> int32; oneDNN on x86, VNNI/AMX where the CPU has them), and
the int32 sums are rescaled to float32. Scales per row make the result of an image independent of
what else is in the batch. Everything else (the embedding convs, the global perceptron, fc3 of
stages with several sharesets, the head) stays float32.

Plain int8 tensors and an ATen op, rather than ``torch.ao.quantization`` or quantized tensors
(both deprecated in torch 2.13 and announced for removal): the scripted, frozen graph holds
ordinary int8 constants, and the C++ runtime runs it like any float32 artifact.
"""

from typing import Any, Dict, List

import torch
import torch.nn as nn
from torch.utils.flop_counter import register_flop_formula

from .model import ConvFFN, RepMLPBlock, RepMLPNet, RepMLPNetUnit
from .variants import ArchConfig

__all__ = [
    "ACTIVATION_SCHEME",
    "INT8_LEVELS",
    "Int8Linear",
    "int8_gemm_count",
    "int8_weight_count",
    "int8_tolerance",
    "quantization_record",
    "quantize_int8",
]

# Symmetric int8: values in [-127, 127] (the -128 code is left out so that scales are symmetric).
INT8_LEVELS = 127
ACTIVATION_SCHEME = "dynamic, symmetric int8 per row (each pixel or map row scaled by its own max |value| at call time)"


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W int8 (per output channel scale), x quantized per row per call."""

    levels: torch.jit.Final[float]

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.levels = float(INT8_LEVELS)
        weight = weight.detach().double()
        scale = weight.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / INT8_LEVELS
        q = torch.round(weight / scale[:, None]).clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
        # (in, out) contiguous: the layout torch._int_mm measured fastest with (K-major B).
        self.register_buffer("weight_t", q.t().contiguous())
        self.register_buffer("weight_scale", scale.float())
        self.register_buffer("bias", bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Few passes over memory (TorchScript fuses nothing on CPU), each variant measured:
        # amax and amin (faster than abs().amax() or aminmax), scale-round-cast of x, then one
        # int32 x float32 multiply (the cast happens in the same pass) and two in-place passes.
        x = x.float()
        row_max = torch.maximum(x.amax(1, keepdim=True), x.amin(1, keepdim=True).neg()).clamp_min_(1e-30)
        xq = (x * (self.levels / row_max)).round_().to(torch.int8)
        acc = torch._int_mm(xq, self.weight_t)
        return torch.mul(acc, row_max / self.levels).mul_(self.weight_scale).add_(self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The (out, in) float weight the int8 codes stand for."""
        return self.weight_t.t().float() * self.weight_scale[:, None]


class Int8ConvFFN(nn.Module):
    """:class:`ConvFFN` in its fused form with both GEMMs in int8 (same row chunks)."""

    chunk_rows: torch.jit.Final[int]

    def __init__(self, ffn: ConvFFN) -> None:
        super().__init__()
        conv1, conv2 = ffn.ffn_fc1.conv, ffn.ffn_fc2.conv
        assert ffn.ffn_fc1.bn is None and ffn.ffn_fc2.bn is None and conv1.bias is not None and conv2.bias is not None
        self.fc1 = Int8Linear(conv1.weight.flatten(1), conv1.bias)
        self.fc2 = Int8Linear(conv2.weight.flatten(1), conv2.bias)
        self.act = ffn.act
        self.chunk_rows = ffn.chunk_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        rows = tokens.shape[0]
        chunks: List[torch.Tensor] = []
        for start in range(0, max(rows, 1), self.chunk_rows):
            chunks.append(self.fc2(self.act(self.fc1(tokens[start : start + self.chunk_rows]))))
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2)


class Int8RepMLPBlock(nn.Module):
    """A reparameterized :class:`RepMLPBlock` with one shareset, fc3 in int8 (rows: channel maps)."""

    def __init__(self, block: RepMLPBlock) -> None:
        super().__init__()
        assert block.is_reparameterized and block.num_sharesets == 1
        area = block.partition_h * block.partition_w
        assert block.fc3.bias is not None
        self.gp = block.gp
        self.fc3 = Int8Linear(block.fc3.weight.reshape(area, area), block.fc3.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        gate = self.gp(x)
        return self.fc3(x.reshape(n * c, h * w)).reshape(n, c, h, w) * gate


def quantize_int8(fused: RepMLPNet) -> RepMLPNet:
    """Replace the large GEMMs of a fused model by :class:`Int8Linear` layers, in place."""
    if fused.form != "fused":
        raise ValueError(f"int8 quantization needs the fused model (repmlp.fuse_model), got the {fused.form} form")
    for unit in fused.modules():
        if not isinstance(unit, RepMLPNetUnit):
            continue
        if unit.repmlp_block.num_sharesets == 1:
            unit.repmlp_block = Int8RepMLPBlock(unit.repmlp_block)
        unit.ffn_block = Int8ConvFFN(unit.ffn_block)
    return fused


def int8_weight_count(model: nn.Module) -> int:
    """Weights held as int8 codes (buffers, so ``parameters()`` does not count them)."""
    return sum(m.weight_t.numel() + m.bias.numel() for m in model.modules() if isinstance(m, Int8Linear))


def int8_gemm_count(config: ArchConfig) -> int:
    """How many int8 GEMMs an image passes through, one after the other (they are all in
    sequence): two per FFN, one per fc3 of a single-shareset stage."""
    return sum(depth * (2 + (sets == 1)) for depth, sets in zip(config.depths, config.sharesets))


def int8_tolerance(config: ArchConfig) -> float:
    """The builder's verification tolerance for an int8 artifact (max |err| / max |logit|).

    Derived, not fitted: rounding to int8 moves each operand of a GEMM by at most half a step,
    1 / (2 * 127) of its row's largest magnitude, so one GEMM with both operands rounded is off
    by about 2 / 254 = 1 / 127 of its output's scale; to first order these relative errors add
    up over the GEMMs in sequence (no gain or loss assumed through the layers in between). A
    kernel or scale mistake gives errors of order 1, far above this; the accuracy cost itself
    is bounded by the digits tests (tests/test_reduced_precision.py).
    """
    return int8_gemm_count(config) / INT8_LEVELS


def quantization_record(config: ArchConfig) -> Dict[str, Any]:
    """The manifest's ``quantization`` entry of an int8 artifact."""
    return {
        "weights": "int8, symmetric, one scale per output channel (max |w| / 127)",
        "activations": ACTIVATION_SCHEME,
        "calibration": "none (scales are computed from each input at call time)",
        "int8_layers": "both FFN GEMMs of every unit; fc3 of single-shareset stages",
        "int8_gemms_per_image": int8_gemm_count(config),
        "kept_float": "float32: patch embedding and downsampling convs, global perceptron, fc3 of "
        "multi-shareset stages, BNs, GELU, head",
        "kernel": "torch._int_mm (int8 x int8 -> int32, ATen); no torch.ao.quantization, no quantized tensors",
    }


@register_flop_formula(torch.ops.aten._int_mm)
def _int_mm_flop(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # So that count_flops (the manifest's gflop_per_image) counts the int8 GEMMs as the float ones.
    m, k = a_shape
    return 2 * m * k * b_shape[1]
