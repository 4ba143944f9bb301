#!/usr/bin/env python
"""How torch's CPU GEMM (MKL) runs the GEMM shapes of B224 at batch 1, per formulation.

For each (M, K, N) of the fused B224 graph at batch 1 (x: M x K tokens, W: N x K weights):

  view     addmm(b, x, W.t())          what the fused model runs now (B is a transposed view)
  kmajor   addmm(b, x, Wt)             W stored pre-transposed, (K, N) contiguous
  wxt      addmm(b[:, None], W, x.t()) the transposed product (N x M, read back transposed)
  panels   baddbmm over 2 column panels of Wt, x broadcast: the two halves of N as a batch
           (plus the copy that joins the halves)
  wxtpan   wxt with W's rows cut into 2 panels, one baddbmm; the panels are a view of W and
           the output needs no copy: what the fused model runs for fc3 with one shareset
  mklpack  torch.ops.mkl._mkl_linear on a weight pre-packed once by MKL (cblas_sgemm_pack)
  dnnl     torch.ops.mkldnn._linear_pointwise on a weight pre-packed once by oneDNN
           (both packed formats are machine-specific: a runtime would pack at load time)

Interleaved rounds, medians, 1 and 2 intra-op threads. A side study for benchmarks/RESULTS.md
(issue 8); it changes nothing in the project.

  .venv/bin/python benchmarks/gemm_variants.py [--rounds 15]
"""

import argparse
import statistics
import time

import torch

# (M, K, N): stage-0 fc3, stage-3 FFN (49 rows), stage-2 FFN (196 rows), stage-0 FFN chunk.
SHAPES = [(96, 3136, 3136), (49, 768, 3072), (49, 3072, 768), (196, 384, 1536), (196, 1536, 384), (512, 96, 384)]


def measure(m: int, k: int, n: int, rounds: int) -> dict:
    """Median seconds per call of each formulation of one (M, K, N) GEMM with bias."""
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    wt = w.t().contiguous()
    panels = wt.reshape(k, 2, n // 2).permute(1, 0, 2).contiguous()  # (2, K, N/2)
    panel_bias = b.reshape(2, 1, n // 2)
    mkl_packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
    dnnl_packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
    calls = {
        "view": lambda: torch.addmm(b, x, w.t()),
        "kmajor": lambda: torch.addmm(b, x, wt),
        "wxt": lambda: torch.addmm(b.unsqueeze(1), w, x.t()).t(),
        "panels": lambda: torch.baddbmm(panel_bias, x.expand(2, m, k), panels).permute(1, 0, 2).reshape(m, n),
        "wxtpan": lambda: torch.baddbmm(
            b.reshape(2, n // 2, 1), w.reshape(2, n // 2, k), x.t().expand(2, k, m)
        ).reshape(n, m).t(),
        "mklpack": lambda: torch.ops.mkl._mkl_linear(x, mkl_packed, w, b, m),
        "dnnl": lambda: torch.ops.mkldnn._linear_pointwise(x, dnnl_packed, b, "none", [], ""),
    }
    times: dict = {name: [] for name in calls}
    with torch.inference_mode():
        expected = calls["view"]()
        for call in calls.values():
            torch.testing.assert_close(call(), expected, rtol=1e-4, atol=1e-3)
            call()
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}; ms per call (GFLOP/s), median of {args.rounds} interleaved rounds")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for m, k, n in SHAPES:
            gflop = 2 * m * k * n / 1e9
            medians = measure(m, k, n, args.rounds)
            cells = [f"{name} {sec * 1e3:6.2f} ({gflop / sec:3.0f})" for name, sec in medians.items()]
            print(f"{threads} thr  M={m:4d} K={k:4d} N={n:4d}:  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
