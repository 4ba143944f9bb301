#!/usr/bin/env python
"""Where the int8 artifact's time goes, per GEMM of B224 at batch 8, against the int8 kernels
torch offers on CPU.

For each int8 GEMM shape of the B224 int8 artifact at batch 8 (x: M x K rows, W: N x K):

  fp32     addmm(b, x, W.t()): what the float32 artifact runs
  ours     repmlp.quantize.Int8Linear: per-row int8 quantization of x, torch._int_mm, int32 ->
           float32 rescale and bias: what the int8 artifact runs
  gemm     torch._int_mm on codes quantized beforehand: the int8 GEMM alone, the floor any
           quantize-dequantize scheme around this kernel has
  fbgemm   torch.ops.quantized.linear_dynamic (what torch.ao's dynamic quantization runs): one
           fused kernel that quantizes x while packing it and rescales in the GEMM's epilogue;
           one scale for the whole x (so an image's result depends on the rest of its batch)
           and quantized tensors, which torch 2.13 deprecates: measured for reference only
  onednn   the prepacked int8 linear a load-time rewrite could use (onednn::qlinear_prepack once,
           onednn::qlinear_pointwise per call, float32 out with the bias fused): one activation
           scale for the whole x, computed per call here (amax), so it too would change what
           an artifact computes; its error is measured beside ours
  dnnlrows the same prepacked kernel keeping the artifact's per-row scheme: x quantized per row
           as ours does (shifted to unsigned bytes), the kernel run with scale 1 and the weight
           scales fused, then the row steps and the bias: what a load-time rewrite of the int8
           GEMMs onto prepacked weights could run without changing what the artifact computes

Prints ms per call and the speed-up over fp32 (interleaved rounds, medians), and each int8
path's error against a float64 product (max |err| / max |exact|).

``--stages`` instead times whole models (random weights, randomized BN statistics, frozen
TorchScript, executor optimization off as in the C++ runtime) that put different stages in
int8: float32; the shipped choice (``repmlp.quantize.quantize_int8``); FFNs of 96 channels or
fewer kept float32; fc3 in int8 only up to 4 sharesets; both. Each with its error against
float32 (max |err| / max |logit|) and ms per image.

A side study behind the int8 analysis in benchmarks/RESULTS.md; it changes nothing in the project.

  python -m benchmarks.int8_layers [--rounds 15] [--threads 1 2] [--shape M,K,N ...]
  python -m benchmarks.int8_layers --stages [--arch B224] [--batch 8] [--rounds 10]
"""

import argparse
import copy
import functools
import os
import statistics
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from benchmarks.harness import host_line, time_rounds
from repmlp.model import RepMLPNetUnit, create_model, fuse_model
from repmlp.quantize import (
    INT8_LEVELS,
    MAX_INT8_SHARESETS,
    Int8ConvFFN,
    Int8Linear,
    Int8RepMLPBlock,
    _quantize_rows,
)
from repmlp.utils import output_error, quiet_jit, randomize_model_

# (M, K, N) at batch 8: each stage's two FFN GEMMs on 512-row chunks (the last stage's 392 rows
# are one chunk), and stage 0's fc3 (one shareset: 8 x 96 maps of 56 x 56).
SHAPES = [
    (512, 96, 384),
    (512, 384, 96),
    (512, 192, 768),
    (512, 768, 192),
    (512, 384, 1536),
    (512, 1536, 384),
    (392, 768, 3072),
    (392, 3072, 768),
    (768, 3136, 3136),
]


def fbgemm_linear(weight: torch.Tensor, bias: torch.Tensor) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """torch.ao's fused dynamic int8 linear on this weight, or None where this torch lacks it."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated")
            scale = weight.abs().amax(1).clamp_min(1e-12) / INT8_LEVELS
            zero = torch.zeros(weight.shape[0], dtype=torch.long)
            qweight = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(qweight, bias)
    except (RuntimeError, AttributeError) as exc:
        print(f"  fbgemm: not available ({str(exc).splitlines()[0]})")
        return None
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)


def onednn_linear(ours: Int8Linear, m: int, per_row: bool = False) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """oneDNN's prepacked int8 linear on ``ours``' weight codes and scales (one dynamic
    activation scale per call, or with ``per_row`` one per row applied after the kernel), or
    None where this torch or CPU lacks it."""
    codes, w_scale, bias = ours.weight_t.t().contiguous(), ours.weight_scale, ours.bias
    w_zero = torch.zeros(codes.shape[0], dtype=torch.long)
    try:
        packed = torch.ops.onednn.qlinear_prepack(codes, [m, codes.shape[1]])
    except (RuntimeError, AttributeError) as exc:
        print(f"  onednn: not available ({str(exc).splitlines()[0]})")
        return None

    def rows(x: torch.Tensor) -> torch.Tensor:
        codes, row_step = _quantize_rows(x, float(INT8_LEVELS), None)
        qx = codes.add(128).to(torch.uint8)  # the same codes as unsigned bytes, zero point 128
        y = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, packed, w_scale, w_zero, None, 1.0, 0,
                                               torch.float32, "none", [], "")
        return y.mul_(row_step).add_(bias)

    def call(x: torch.Tensor) -> torch.Tensor:
        # uint8 activations with zero point 128: the form oneDNN's x86 int8 kernels take.
        x_scale = float(x.abs().amax()) / 127.0 or 1.0
        qx = torch.round(x / x_scale).add_(128).clamp_(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(qx, x_scale, 128, packed, w_scale, w_zero, bias, 1.0, 0,
                                                  torch.float32, "none", [], "")
    return rows if per_row else call


def measure(m: int, k: int, n: int, rounds: int) -> Dict[str, Dict[str, float]]:
    gen = torch.Generator().manual_seed(m * k + n)
    # Rows of different scales, as pixel vectors are; weights at a conv's init scale.
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen).add_(0.1)
    weight, bias = torch.randn(n, k, generator=gen) / k**0.5, torch.randn(n, generator=gen) * 0.1
    ours = Int8Linear(weight, bias)
    codes, _ = _quantize_rows(x, float(INT8_LEVELS), None)
    calls: Dict[str, Callable[[], torch.Tensor]] = {
        "fp32": lambda: torch.addmm(bias, x, weight.t()),
        "ours": lambda: ours(x),
        "gemm": lambda: torch._int_mm(codes, ours.weight_t),
    }
    fused = fbgemm_linear(weight, bias)
    if fused is not None:
        calls["fbgemm"] = lambda: fused(x)
    prepacked = onednn_linear(ours, m)
    if prepacked is not None:
        calls["onednn"] = lambda: prepacked(x)
        by_rows = onednn_linear(ours, m, per_row=True)
        calls["dnnlrows"] = lambda: by_rows(x)
    exact = torch.addmm(bias.double(), x.double(), weight.double().t())
    with torch.inference_mode():
        errors = {name: output_error(calls[name](), exact)[1] for name in ("fp32", "ours", "fbgemm", "onednn", "dnnlrows") if name in calls}
        times = time_rounds(calls, rounds)
    return {name: {"s": statistics.median(t), "err": errors.get(name, float("nan"))} for name, t in times.items()}


# name: (FFNs in int8 from this many input channels, fc3 in int8 up to this many sharesets)
STAGE_CHOICES = {
    "float32": (None, 0),
    "shipped": (0, MAX_INT8_SHARESETS),
    "ffn>96": (97, MAX_INT8_SHARESETS),
    "fc3<=4": (0, 4),
    "ffn>96,fc3<=4": (97, 4),
}


def int8_variant(fused: nn.Module, min_ffn_channels: Optional[int], max_sets: int) -> torch.jit.ScriptModule:
    """A frozen copy of the fused model with the chosen units' GEMMs in int8."""
    model = copy.deepcopy(fused)
    for unit in model.modules():
        if not isinstance(unit, RepMLPNetUnit):
            continue
        if unit.repmlp_block.num_sharesets <= max_sets:
            unit.repmlp_block = Int8RepMLPBlock(unit.repmlp_block)
        if min_ffn_channels is not None and unit.ffn_block.ffn_fc1.conv.in_channels >= min_ffn_channels:
            unit.ffn_block = Int8ConvFFN(unit.ffn_block)
    with torch.no_grad(), quiet_jit():
        return torch.jit.freeze(torch.jit.script(model.eval()))


def compare_stage_choices(arch: str, batch: int, rounds: int, threads: list) -> None:
    fused = fuse_model(randomize_model_(create_model(arch), seed=0).eval())
    variants = {name: int8_variant(fused, *choice) for name, choice in STAGE_CHOICES.items()}
    x = torch.randn(batch, 3, *fused.config.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        reference = variants["float32"](x)
        errors = {n: output_error(m(x), reference)[1] for n, m in variants.items()}
        calls = {name: functools.partial(module, x) for name, module in variants.items()}
        for count in threads:
            torch.set_num_threads(count)
            per_image = {n: statistics.median(t) / batch for n, t in time_rounds(calls, rounds).items()}
            base = per_image["float32"]
            cells = [f"{n} {t * 1e3:.1f} ({base / t:.2f}x, err {errors[n]:.1e})" for n, t in per_image.items()]
            print(f"{arch} batch {batch}, {count} thr, ms per image:  " + "  ".join(cells), flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shape", action="append", metavar="M,K,N", help="GEMM shape(s) to measure instead of B224's")
    parser.add_argument("--stages", action="store_true", help="time whole models with different stages in int8")
    parser.add_argument("--arch", default="B224")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batch < 1 or any(t < 1 for t in args.threads):
        parser.error(f"--rounds, --batch and --threads must be >= 1, got {args.rounds}, {args.batch}, {args.threads}")
    if args.stages:
        print(f"{host_line()}; medians of {args.rounds} rounds")
        compare_stage_choices(args.arch, args.batch, args.rounds, args.threads)
        return
    shapes = SHAPES
    if args.shape:
        try:
            shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape]
        except ValueError:
            shapes = []
        if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
            parser.error(f"--shape takes M,K,N (three positive integers), got {args.shape}")
    capped = [v for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if v in os.environ]
    if capped:
        print(f"{', '.join(capped)} set: fbgemm dispatches on the CPU's own features and ignores these caps, "
              "so its column is not capped")
    print(f"{host_line()}; "
          f"ms per call (speed-up over fp32), median of {args.rounds} interleaved rounds; "
          "error: max |err| / max |exact| against float64")
    for threads in args.threads:
        torch.set_num_threads(threads)
        totals: Dict[str, float] = {}
        for m, k, n in shapes:
            result = measure(m, k, n, args.rounds)
            base = result["fp32"]["s"]
            cells = []
            for name, r in result.items():
                totals[name] = totals.get(name, 0.0) + r["s"]
                err = "" if r["err"] != r["err"] else f" err {r['err']:.1e}"
                cells.append(f"{name} {r['s'] * 1e3:6.2f} ({base / r['s']:.2f}x{err})")
            print(f"{threads} thr  M={m:4d} K={k:4d} N={n:4d}:  " + "  ".join(cells), flush=True)
        print(f"{threads} thr  sum over the shapes: "
              + "  ".join(f"{name} {s * 1e3:.1f} ms ({totals['fp32'] / s:.2f}x)" for name, s in totals.items()))


if __name__ == "__main__":
    main()
