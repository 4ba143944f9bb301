"""The host's GEMM rates: the ceilings bench.py measures its rows against, and a study of how
torch's CPU GEMM paths run the GEMM shapes of B224.

Ceilings (:class:`GemmCeiling`, GFLOP/s on a 4096-cube, 2 n^3 per call): MKL's ``torch.mm`` and
oneDNN's ``torch.ops.mkldnn._linear_pointwise`` on a weight pre-packed once
(``_reorder_linear_weight``) in float32 (the faster of the two is the float32 ceiling),
``torch.mm`` in bfloat16 and ``torch._int_mm`` in int8 (the ceilings of those artifacts).

The study (``--shapes``): for each (M, K, N) of the fused B224 graph at batch 1 (x: M x K rows,
W: N x K weights), each formulation, checked equal to the first before timing:

  view     addmm(b, x, W.t())           what the fused model runs (W.t() is a view)
  kmajor   addmm(b, x, Wt)              W stored pre-transposed, (K, N) contiguous
  wxt      addmm(b[:, None], W, x.t())  the transposed product, read back transposed
  panels   baddbmm over 2 column panels of Wt (plus the copy that joins them)
  wxtpan   wxt with W's rows in 2 panels, one baddbmm, no copy of the output
  mklpack  torch.ops.mkl._mkl_linear on a weight packed once by MKL
  dnnl     torch.ops.mkldnn._linear_pointwise on a weight packed once by oneDNN

The fc3 study (``--fc3``): fc3 of B224's stages with several sharesets (S sharesets of an
area x area weight, M = batch * channels / S rows each), at batch 1 and 8, in float32 and
bfloat16, each candidate returning the (M, S * area) rows the block reads next:

  view     baddbmm(b, x_s, W_s.t()) then the transposing copy  what the artifact runs ("aten")
  kn       the same on W_s.t() copied once to (S, K, N) rows    the plan's "aten-kn"
  conv     oneDNN's grouped 1x1 convolution on a weight reordered once
  perset   oneDNN's prepacked linear per shareset, stacked     (4 sharesets only: S calls)

  python -m benchmarks.gemm [--threads 1 2] [--rounds 5] [--shapes] [--fc3] [--write]
"""

import argparse
import statistics
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.harness import log, markdown_table, publish, time_rounds
from repmlp.quantize import WEIGHT_LEVELS

CEILING_KINDS = ("mkl_fp32", "onednn_fp32", "bf16", "int8")
# (M, K, N): stage-0 fc3, stage-3 FFN (49 rows), stage-2 FFN (196 rows), a stage-0 FFN chunk.
B224_SHAPES = [(96, 3136, 3136), (49, 768, 3072), (49, 3072, 768), (196, 384, 1536), (196, 1536, 384), (512, 96, 384)]


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> Callable[[], torch.Tensor]:
    """oneDNN's linear on ``weight`` (N x K) packed once for ``x``'s row count."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, x.shape[0])
    return lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class GemmCeiling:
    """Samples of the host's n^3 GEMM rates (GFLOP/s; int8: GOP/s), one call of each kind per
    sample, after one warm-up call per thread count."""

    def __init__(self, n: int = 4096) -> None:
        self.n = n
        a, b = torch.randn(n, n), torch.randn(n, n)
        # The int8 weight operand in the artifacts' range (WEIGHT_LEVELS), as the int8 rows run.
        a8 = torch.randint(-127, 128, (n, n), dtype=torch.int8)
        b8 = torch.randint(-WEIGHT_LEVELS, WEIGHT_LEVELS + 1, (n, n), dtype=torch.int8)
        a16, b16 = a.bfloat16(), b.bfloat16()
        self.calls: Dict[str, Callable[[], object]] = {
            "mkl_fp32": lambda: torch.mm(a, b),
            "onednn_fp32": onednn_linear(a, b, torch.zeros(n)),
            "bf16": lambda: torch.mm(a16, b16),
            "int8": lambda: torch._int_mm(a8, b8),
        }
        self.samples: Dict[int, Dict[str, List[float]]] = {}

    def sample(self, threads: int) -> None:
        torch.set_num_threads(threads)
        if threads not in self.samples:
            for call in self.calls.values():
                call()
            self.samples[threads] = {kind: [] for kind in self.calls}
        with torch.inference_mode():
            for kind, seconds in time_rounds(self.calls, 1).items():
                self.samples[threads][kind].append(2.0 * self.n**3 / seconds[0] / 1e9)

    def rate(self, threads: int, kind: str) -> float:
        """Median rate of ``kind``; ``"fp32"`` is the faster of MKL's and oneDNN's."""
        found = self.samples.get(threads, {})
        if kind == "fp32":
            return max(self.rate(threads, "mkl_fp32"), self.rate(threads, "onednn_fp32"))
        return statistics.median(found[kind]) if found.get(kind) else float("nan")

    def summary(self, threads: int) -> str:
        return ", ".join(f"{k} {self.rate(threads, k):.0f}" for k in CEILING_KINDS) + f" (fp32 ceiling {self.rate(threads, 'fp32'):.0f})"


def formulations(m: int, k: int, n: int) -> Dict[str, Callable[[], torch.Tensor]]:
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    wt = w.t().contiguous()
    panels = wt.reshape(k, 2, n // 2).permute(1, 0, 2).contiguous()  # (2, K, N/2)
    mkl_packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
    return {
        "view": lambda: torch.addmm(b, x, w.t()),
        "kmajor": lambda: torch.addmm(b, x, wt),
        "wxt": lambda: torch.addmm(b.unsqueeze(1), w, x.t()).t(),
        "panels": lambda: torch.baddbmm(b.reshape(2, 1, n // 2), x.expand(2, m, k), panels).permute(1, 0, 2).reshape(m, n),
        "wxtpan": lambda: torch.baddbmm(b.reshape(2, n // 2, 1), w.reshape(2, n // 2, k), x.t().expand(2, k, m)).reshape(n, m).t(),
        "mklpack": lambda: torch.ops.mkl._mkl_linear(x, mkl_packed, w, b, m),
        "dnnl": onednn_linear(x, w, b),
    }


# (channels, sharesets, area) of B224's stages 1-3.
B224_FC3 = [(192, 4, 784), (384, 32, 196), (768, 128, 49)]


def fc3_candidates(m: int, sets: int, area: int, dtype: torch.dtype) -> Dict[str, Callable[[], torch.Tensor]]:
    """The batched fc3 candidates on x (M, S, area) rows, as the block's reshape gives them."""
    x = torch.randn(m, sets, area).to(dtype)
    w = (torch.randn(sets, area, area) / area**0.5).to(dtype)  # shareset s: out = x_s @ w[s].t()
    b = torch.randn(sets, area).to(dtype)
    kn = w.transpose(1, 2).contiguous()
    conv_w = torch.ops.mkldnn._reorder_convolution_weight(w.reshape(sets * area, area, 1, 1), [0, 0], [1, 1], [1, 1], sets, [m, sets * area, 1, 1])
    calls = {
        "view": lambda: torch.baddbmm(b.unsqueeze(1), x.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1).reshape(m, -1),
        "kn": lambda: torch.baddbmm(b.unsqueeze(1), x.transpose(0, 1), kn).transpose(0, 1).reshape(m, -1),
        "conv": lambda: torch.ops.mkldnn._convolution_pointwise(
            x.reshape(m, -1, 1, 1), conv_w, b.reshape(-1), [0, 0], [1, 1], [1, 1], sets, "none", [], "").reshape(m, -1),
    }
    if sets <= 4:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w[s].contiguous(), m) for s in range(sets)]
        calls["perset"] = lambda: torch.stack(
            [torch.ops.mkldnn._linear_pointwise(x[:, s], packed[s], b[s], "none", [], "") for s in range(sets)], 1).reshape(m, -1)
    return calls


def fc3_rows(threads: List[int], rounds: int) -> List[List[object]]:
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        for dtype in (torch.float32, torch.bfloat16):
            for channels, sets, area in B224_FC3:
                for batch in (1, 8):
                    m = batch * channels // sets
                    calls = fc3_candidates(m, sets, area, dtype)
                    with torch.inference_mode():
                        expected = calls["view"]().float()
                        for call in calls.values():
                            torch.testing.assert_close(call().float(), expected, rtol=0.05, atol=0.05 if dtype == torch.bfloat16 else 1e-4)
                        times = time_rounds(calls, rounds, per_round=3)
                    cells = {name: f"{statistics.median(t) * 1e3:.3f}" for name, t in times.items()}
                    rows.append([count, str(dtype).replace("torch.", ""), f"{sets} x {area} x {area}", batch, m,
                                 *(cells.get(name, "-") for name in ("view", "kn", "conv", "perset"))])
                    log(f"  {count} thr {dtype} S{sets} A{area} b{batch}: {cells}")
    return rows


def shape_rows(threads: List[int], rounds: int) -> List[List[object]]:
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        for m, k, n in B224_SHAPES:
            calls = formulations(m, k, n)
            with torch.inference_mode():
                expected = calls["view"]()
                for call in calls.values():
                    torch.testing.assert_close(call(), expected, rtol=1e-4, atol=1e-3)
                times = time_rounds(calls, rounds)
            gflop = 2 * m * k * n / 1e9
            cells = [f"{statistics.median(t) * 1e3:.2f} ({gflop / statistics.median(t):.0f})" for t in times.values()]
            rows.append([count, f"{m} x {k} x {n}", *cells])
            log(f"  {count} thr {m}x{k}x{n}: " + ", ".join(cells))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5, help="samples of each (interleaved)")
    parser.add_argument("--size", type=int, default=4096, help="n of the n^3 ceiling GEMMs")
    parser.add_argument("--shapes", action="store_true", help="also the B224 shapes study")
    parser.add_argument("--fc3", action="store_true", help="also the batched fc3 study")
    parser.add_argument("--write", action="store_true", help="append the tables to RESULTS.md")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.size < 1 or min(args.threads) < 1:
        parser.error("--rounds, --size and --threads must be >= 1")
    log("measuring ...")
    ceiling = GemmCeiling(args.size)
    for count in args.threads:
        for _ in range(args.rounds):
            ceiling.sample(count)
    rows = [[t, *(f"{ceiling.rate(t, k):.0f}" for k in CEILING_KINDS), f"{ceiling.rate(t, 'fp32'):.0f}"] for t in args.threads]
    body = f"GEMM rates on a {args.size}-cube, GFLOP/s (int8: GOP/s), median of {args.rounds}:\n\n"
    body += markdown_table(["threads", *CEILING_KINDS, "fp32 ceiling"], rows)
    if args.shapes:
        headers = ["threads", "M x K x N", *formulations(2, 2, 2)]
        body += f"\n\nB224's batch-1 GEMMs, ms per call (GFLOP/s), median of {args.rounds} interleaved rounds:\n\n"
        body += markdown_table(headers, shape_rows(args.threads, args.rounds))
    if args.fc3:
        body += f"\n\nfc3 with several sharesets, ms per call, median of {args.rounds} interleaved rounds x 3 calls:\n\n"
        body += markdown_table(["threads", "dtype", "S x K x N", "batch", "rows M", "view (aten)", "kn (aten-kn)", "conv (oneDNN grouped 1x1)", "perset (oneDNN linear per shareset)"],
                               fc3_rows(args.threads, args.rounds))
    publish("GEMM rates", "benchmarks.gemm", argv, body, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
