"""int8 weights with dynamically quantized activations for the fused RepMLPNet (``--dtype int8``).

Each large GEMM of the fused model (both FFN layers of every unit, and fc3 in stages with at most
``MAX_INT8_SHARESETS`` sharesets, one GEMM per shareset) runs in int8: the weight is stored as
int8 codes in [-64, 64] (``WEIGHT_LEVELS``: exact on CPUs without VNNI) with one symmetric scale
per output channel, and at every call each row of the activation matrix (one pixel's channels,
or one channel's map for fc3) is scaled by its own max |value| to int8, multiplied with
``torch._int_mm`` (int8 x int8 -> int32; oneDNN on x86, VNNI/AMX where the CPU has them), and
the int32 sums are rescaled to float32. Scales per row make the result of an image independent
of what else is in the batch. Everything else (the embedding convs, the global perceptron, fc3 of
stages with more sharesets, the head) stays float32.

Plain int8 tensors and an ATen op, rather than ``torch.ao.quantization`` or quantized tensors
(both deprecated in torch 2.13 and announced for removal): the scripted, frozen graph holds
ordinary int8 constants, and the C++ runtime runs it like any float32 artifact.
"""

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import register_flop_formula

from .model import ConvFFN, RepMLPBlock, RepMLPNet, RepMLPNetUnit
from .variants import ArchConfig

__all__ = [
    "ACTIVATION_SCHEME",
    "GELU_MIN",
    "INT8_LEVELS",
    "WEIGHT_LEVELS",
    "MAX_INT8_SHARESETS",
    "Int8ConvFFN",
    "Int8Linear",
    "Int8RepMLPBlock",
    "fc3_in_int8",
    "int8_gemm_count",
    "int8_weight_count",
    "int8_tolerance",
    "quantization_record",
    "quantize_int8",
]

# Activations: symmetric int8, codes in [-127, 127] (-128 is left out so that scales are symmetric).
INT8_LEVELS = 127
# Weights: symmetric, codes in [-64, 64]. On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI)
# oneDNN's int8 GEMM (behind torch._int_mm) shifts the activations by +128 to unsigned bytes and
# adds pairs of u8 x s8 products in signed 16 bits (vpmaddubsw), which saturates unless
# 2 * 255 * |w| <= 32767, i.e. |w| <= 64: with codes up to 127 such CPUs return wrong sums (the
# digits artifact's self-check measured a 0.62 relative error with oneDNN capped at AVX2). These
# codes are exact at every x86 ISA level (checked from SSE4.1 to AVX-512 VNNI), for twice the
# weight's rounding step.
WEIGHT_LEVELS = 64
# fc3 runs one int8 GEMM per shareset; past this many, each is too small for its quantization
# passes and call overhead to pay: B224's last stage (128 sets of 49x49) in int8 gave no
# consistent gain (benchmarks/RESULTS.md), its first three stages (1-32 sets) did.
MAX_INT8_SHARESETS = 32
# GELU(x) >= -0.16997 (its minimum, at x = -0.7518); rounded down so that the bound holds.
GELU_MIN = -0.17


def fc3_in_int8(num_sharesets: int) -> bool:
    """Whether fc3 of a stage with this many sharesets runs in int8 (``MAX_INT8_SHARESETS``)."""
    return num_sharesets <= MAX_INT8_SHARESETS


ACTIVATION_SCHEME = (
    "dynamic, symmetric int8 per row (each pixel or map row scaled by its own max |value| at call time; "
    "rows of GELU outputs by max(row max, 0.17), GELU being >= -0.17)"
)


def _quantize_rows(x: torch.Tensor, levels: float, lower_bound: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, per-row step) of a float matrix, each row scaled by its own max |value|.

    ``lower_bound``: a bound below every value of ``x`` known in advance (a GELU output's), so
    that max |value| is at most max(row max, -lower_bound) and the row's minimum need not be
    read: the same step whenever the row's max reaches -lower_bound, one pass less.
    """
    # Each pass measured (TorchScript fuses nothing on CPU): amax and amin beat abs().amax()
    # and aminmax; scale, round and cast are the three passes left.
    if lower_bound is None:
        row_max = torch.maximum(x.amax(1, keepdim=True), x.amin(1, keepdim=True).neg())
    else:
        row_max = x.amax(1, keepdim=True).clamp_min_(-lower_bound)
    row_max = row_max.clamp_min_(1e-30)
    return (x * (levels / row_max)).round_().to(torch.int8), row_max / levels


def _int8_matmul(
    codes: torch.Tensor,
    row_step: torch.Tensor,
    weight_t: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor,
    out: Optional[torch.Tensor],
) -> torch.Tensor:
    """``codes @ weight_t`` rescaled to float32, plus bias; written into ``out`` when given."""
    # Dequantized in place: the int32 -> float32 cast, the row scale, then the column scale and
    # the bias in one addcmul (a pass and a temporary less than mul(acc, step).mul_().add_(),
    # whose int32 x float32 multiply also makes its own float copy of acc).
    y = torch._int_mm(codes, weight_t).float().mul_(row_step)
    return torch.addcmul(bias, y, weight_scale, out=y if out is None else out)


def _quantize_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of (..., out, in) weights: codes in [-WEIGHT_LEVELS, WEIGHT_LEVELS], one
    scale per output row."""
    weight = weight.detach().double()
    scale = weight.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / WEIGHT_LEVELS
    codes = torch.round(weight / scale.unsqueeze(-1)).clamp(-WEIGHT_LEVELS, WEIGHT_LEVELS).to(torch.int8)
    # (..., in, out) contiguous: the layout torch._int_mm measured fastest with (K-major B).
    return codes.transpose(-1, -2).contiguous(), scale.float()


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W int8 (per output channel scale), x quantized per row per call.

    ``input_lower_bound``: a value known to lie below every input (see :func:`_quantize_rows`).
    """

    levels: torch.jit.Final[float]
    input_lower_bound: Optional[float]

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, input_lower_bound: Optional[float] = None) -> None:
        super().__init__()
        self.levels = float(INT8_LEVELS)
        self.input_lower_bound = input_lower_bound
        codes, scale = _quantize_weight(weight)
        self.register_buffer("weight_t", codes)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias.detach().float())

    def forward(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        codes, row_step = _quantize_rows(x, self.levels, self.input_lower_bound)
        return _int8_matmul(codes, row_step, self.weight_t, self.weight_scale, self.bias, out)

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
        assert isinstance(ffn.act, nn.GELU) and ffn.act.approximate == "none"
        self.fc1 = Int8Linear(conv1.weight.flatten(1), conv1.bias)
        # fc2 reads GELU outputs: no pass for the row minimum over the widest matrix
        self.fc2 = Int8Linear(conv2.weight.flatten(1), conv2.bias, input_lower_bound=GELU_MIN)
        self.act = ffn.act
        self.chunk_rows = ffn.chunk_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        # Each chunk's result goes straight into its rows of the output (no cat pass).
        out = torch.empty(n * h * w, c, dtype=torch.float32, device=x.device)
        for start in range(0, max(n * h * w, 1), self.chunk_rows):
            stop = start + self.chunk_rows
            self.fc2(self.act(self.fc1(tokens[start:stop])), out[start:stop])
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2)


class Int8RepMLPBlock(nn.Module):
    """A reparameterized :class:`RepMLPBlock` with fc3 in int8: one GEMM per shareset, whose
    rows are the channel maps of that shareset (channels ``s, s + sets, ...``)."""

    levels: torch.jit.Final[float]
    num_sharesets: torch.jit.Final[int]

    def __init__(self, block: RepMLPBlock) -> None:
        super().__init__()
        assert block.is_reparameterized and block.fc3.bias is not None
        sets, area = block.num_sharesets, block.partition_h * block.partition_w
        self.levels = float(INT8_LEVELS)
        self.num_sharesets = sets
        self.gp = block.gp
        codes, scale = _quantize_weight(block.fc3.weight.reshape(sets, area, area))
        self.register_buffer("weight_t", codes)  # (sets, in, out)
        self.register_buffer("weight_scale", scale)  # (sets, out)
        self.register_buffer("bias", block.fc3.bias.detach().float().reshape(sets, area))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        gate = self.gp(x)
        sets = self.num_sharesets
        # Row-major maps: for a channels-last x, reshape gives a column-major view, and _int_mm
        # on column slices of its codes ran ~100x slower.
        codes, row_step = _quantize_rows(x.reshape(n * c, h * w).contiguous(), self.levels, None)
        codes, row_step = codes.reshape(-1, sets, h * w), row_step.reshape(-1, sets, 1)
        out = torch.empty(n, c, h, w, dtype=torch.float32, device=x.device)
        rows = out.view(-1, sets, h * w)
        for s in range(sets):
            _int8_matmul(codes[:, s], row_step[:, s], self.weight_t[s], self.weight_scale[s], self.bias[s], rows[:, s])
        return out.mul_(gate)

    def dequantized_weight(self) -> torch.Tensor:
        """The (sets, out, in) float fc3 matrices the int8 codes stand for."""
        return self.weight_t.transpose(1, 2).float() * self.weight_scale[:, :, None]


def quantize_int8(fused: RepMLPNet) -> RepMLPNet:
    """Replace the large GEMMs of a fused model by int8 ones, in place: both FFN GEMMs of every
    unit (:class:`Int8ConvFFN`) and fc3 of the stages with at most ``MAX_INT8_SHARESETS``
    sharesets (:class:`Int8RepMLPBlock`)."""
    if fused.form != "fused":
        raise ValueError(f"int8 quantization needs the fused model (repmlp.fuse_model), got the {fused.form} form")
    for unit in fused.modules():
        if not isinstance(unit, RepMLPNetUnit):
            continue
        if fc3_in_int8(unit.repmlp_block.num_sharesets):
            unit.repmlp_block = Int8RepMLPBlock(unit.repmlp_block)
        unit.ffn_block = Int8ConvFFN(unit.ffn_block)
    return fused


def int8_weight_count(model: nn.Module) -> int:
    """Weights held as int8 codes (buffers, so ``parameters()`` does not count them)."""
    layers = (Int8Linear, Int8RepMLPBlock)
    return sum(m.weight_t.numel() + m.bias.numel() for m in model.modules() if isinstance(m, layers))


def int8_gemm_count(config: ArchConfig) -> int:
    """How many int8 GEMMs an image passes through, one after the other (they are all in
    sequence): two per FFN, one per fc3 with at most ``MAX_INT8_SHARESETS`` sharesets (the
    GEMMs of its sharesets run side by side, on different channels)."""
    return sum(depth * (2 + fc3_in_int8(sets)) for depth, sets in zip(config.depths, config.sharesets))


def int8_tolerance(config: ArchConfig) -> float:
    """The builder's verification tolerance for an int8 artifact (max |err| / max |logit|).

    Derived, not fitted: rounding moves each operand of a GEMM by at most half a step, of its
    row's largest magnitude 1 / (2 * 127) for an activation and 1 / (2 * 64) for a weight, so
    one GEMM is off by about 1 / 254 + 1 / 128 of its output's scale; to first order these
    relative errors add up over the GEMMs in sequence (no gain or loss assumed through the
    layers in between). A kernel or scale mistake gives errors of order 1, above this; the
    accuracy cost itself is bounded by the digits tests (tests/test_reduced_precision.py).
    """
    return int8_gemm_count(config) * (1 / (2 * INT8_LEVELS) + 1 / (2 * WEIGHT_LEVELS))


def _stage_list(stages: List[int]) -> str:
    return ", ".join(str(i) for i in stages) if stages else "(none)"


def quantization_record(config: ArchConfig) -> Dict[str, Any]:
    """The manifest's ``quantization`` entry of an int8 artifact."""
    return {
        "weights": f"int8 codes in [-{WEIGHT_LEVELS}, {WEIGHT_LEVELS}] (exact in the 16-bit pair sums of CPUs "
        f"without VNNI), symmetric, one scale per output channel (max |w| / {WEIGHT_LEVELS})",
        "activations": ACTIVATION_SCHEME,
        "calibration": "none (scales are computed from each input at call time)",
        "int8_layers": "both FFN GEMMs of every unit; fc3 (one GEMM per shareset) of stages "
        + _stage_list([i for i, sets in enumerate(config.sharesets) if fc3_in_int8(sets)]),
        "int8_gemms_per_image": int8_gemm_count(config),
        "kept_float": "float32: patch embedding and downsampling convs, global perceptron, BNs, GELU, head; fc3 of "
        "stages " + _stage_list([i for i, sets in enumerate(config.sharesets) if not fc3_in_int8(sets)]),
        "kernel": "torch._int_mm (int8 x int8 -> int32, ATen); no torch.ao.quantization, no quantized tensors",
    }


@register_flop_formula(torch.ops.aten._int_mm)
def _int_mm_flop(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # So that count_flops (the manifest's gflop_per_image) counts the int8 GEMMs as the float ones.
    m, k = a_shape
    return 2 * m * k * b_shape[1]
