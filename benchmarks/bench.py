"""RepMLPNet CPU benchmark: the deploy paths side by side, in one process, on one host.

Rows (``--configs``; the default is the first five):

  rt            repmlp_rt on artifacts of each ``--dtypes`` (float32, bfloat16, int8), same weights
                (left out where the gemm rows are timed: it is their gemm=auto, the default)
  gemm          repmlp_rt gemm=MODE for MODE in aten, onednn, mkl-packed, auto, each dtype
                (skipped, with one line saying so, where the runtime takes no gemm= keyword)
  ov-f32        OpenVINO's CPU plugin on the fused model's ONNX export (one dynamic-batch file)
  ov-bf16       the same with the bf16 inference precision hint
  ort           ONNX Runtime on the same file
  eager         the fused model in eager PyTorch
  upstream      the upstream deploy formulation (benchmarks/upstream_reference.py), eager
  ort-upstream  ONNX Runtime on the upstream formulation's export (one file per batch size)
  jit, jit-opt  the artifact via torch.jit.load in Python (+ optimize_for_inference)
  rt-opt        repmlp_rt with optimize=True
  rt-pt2        repmlp_rt on the AOTInductor package (.pt2)

Every row's output is checked against the fused eager model at each batch size before it is
timed (at the tolerance its precision is built with). Per (threads, batch) cell the rows run
in interleaved rounds, each round starting one row later, with a sample of the host's GEMM
rates (benchmarks/gemm.py) before each round; reported: medians. Each row's GFLOP/s is given
as a share of the float32 ceiling (the faster of MKL's and oneDNN's 4096-cube GEMM) and, for
bfloat16 and int8 rows, of that dtype's GEMM rate. FLOPs per image are counted on the model.

  python -m benchmarks.bench --build-only                      # the first time: build the B224 files (cached)
  python -m benchmarks.bench                                   # B224, 1 and 2 threads x batch 1 and 8
  python -m benchmarks.bench --quick --no-write --arch digits  # smoke run
  python -m benchmarks.bench --threads 2 --batches 8 --dtypes float32 --configs rt gemm ov-f32
"""

import argparse
import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from benchmarks import artifacts, peers
from benchmarks.gemm import GemmCeiling
from benchmarks.harness import (
    check_close,
    host_line,
    loadavg,
    log,
    markdown_table,
    publish,
    time_rounds,
    why,
)
from benchmarks.peers import GEMM_MODES, Peer
from repmlp.model import fuse_model
from repmlp.utils import count_flops, quiet_jit

DEFAULT_CONFIGS = ["rt", "gemm", "ov-f32", "ov-bf16", "ort"]
ALL_CONFIGS = DEFAULT_CONFIGS + ["eager", "upstream", "ort-upstream", "jit", "jit-opt", "rt-opt", "rt-pt2"]
DTYPES = ("float32", "bfloat16", "int8")


def ours(ms: Dict[str, Optional[float]], dtype: str) -> Optional[str]:
    """The label of the runtime's default row for ``dtype`` among the timed ones: the plain row,
    else gemm=auto (the default mode), else None."""
    return next((label for label in (f"repmlp_rt {dtype}", f"repmlp_rt {dtype} gemm=auto") if ms.get(label)), None)
Lat = Dict[Tuple[str, int, int], List[float]]


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="B224")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="artifact dtypes of the rt and gemm rows")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=ALL_CONFIGS)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per cell (default 3, --quick 1)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per row per round (default 2 at batch 1, else 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per row per cell (the first is checked)")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds to pause after ONNX Runtime / OpenVINO rows, whose threads spin after a run")
    p.add_argument("--gemm-size", type=int, default=4096, help="n of the n^3 ceiling GEMMs")
    p.add_argument("--quick", action="store_true", help="1 round, 1 call, 1 warm-up: a smoke run")
    p.add_argument("--build-only", action="store_true",
                   help="build (or find cached) the artifacts and ONNX exports the rows need, then stop")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.iters, args.warmup = args.rounds or 1, args.iters or 1, 1
    args.rounds = args.rounds or 3
    if min(args.threads + args.batches) < 1 or args.rounds < 1 or args.warmup < 1 or (args.iters or 1) < 1:
        p.error("--threads, --batches, --rounds, --iters and --warmup must be >= 1")
    return args


def runtime_peers(args: argparse.Namespace, found: Dict[str, Peer], skipped: Dict[str, str]) -> None:
    """The repmlp_rt rows: one per dtype, and per GEMM mode where the runtime offers them."""
    no_gemm = peers.gemm_keyword() if "gemm" in args.configs else None
    if no_gemm:
        skipped[f"repmlp_rt gemm=<mode> rows ({', '.join(GEMM_MODES)})"] = no_gemm
        log(f"  skipping the repmlp_rt gemm=<mode> rows ({', '.join(GEMM_MODES)}): {no_gemm}")
    for dtype in args.dtypes:
        try:
            path, _ = artifacts.artifact(args.arch, args.seed, dtype=dtype)
        except Exception as error:  # a failed build skips its rows, the run goes on
            skipped[f"repmlp_rt {dtype}"] = f"build failed: {why(error)}"
            continue
        gemm_rows = {f"repmlp_rt {dtype} gemm={mode}": {"gemm": mode} for mode in GEMM_MODES} if "gemm" in args.configs and not no_gemm else {}
        # The runtime's default is gemm=auto: where that row is timed, the plain row would repeat it.
        rows = {f"repmlp_rt {dtype}": {}} if "rt" in args.configs and not gemm_rows else {}
        rows.update(gemm_rows)
        if "rt-opt" in args.configs and dtype == "float32":
            rows["repmlp_rt float32 optimize=True"] = {"optimize": True}
        for label, options in rows.items():
            found[label] = peers.runtime(label, path, dtype, **options)
        if dtype == "float32" and {"jit", "jit-opt"} & set(args.configs):
            for name, opt in (("jit", False), ("jit-opt", True)):
                if name in args.configs:
                    found[f"torch.jit.load{' + optimize_for_inference' if opt else ''}"] = peers.jit(name, path, opt)
    if "rt-pt2" in args.configs:
        try:
            path, _ = artifacts.artifact(args.arch, args.seed, format="aoti")
            found["repmlp_rt .pt2 (AOTInductor)"] = peers.runtime("repmlp_rt .pt2", path)
        except Exception as error:
            skipped["repmlp_rt .pt2 (AOTInductor)"] = f"build failed: {why(error)}"


def onnx_peers(args: argparse.Namespace, fused: torch.nn.Module, shape: Tuple[int, ...],
               found: Dict[str, Peer], skipped: Dict[str, str]) -> None:
    """OpenVINO and ONNX Runtime on the fused model's export; ORT on the upstream one."""
    wanted = {"ov-f32": ("OpenVINO f32", "openvino"), "ov-bf16": ("OpenVINO bf16 hint", "openvino"),
              "ort": ("ONNX Runtime", "onnxruntime")}
    wanted = {k: v for k, v in wanted.items() if k in args.configs}
    try:
        path = artifacts.fused_onnx(fused, args.arch, args.seed) if wanted else ""
    except Exception as error:
        skipped.update({label: f"ONNX export failed: {why(error)}" for label, _ in wanted.values()})
        wanted = {}
    for key, (label, package) in wanted.items():
        try:
            __import__(package)
        except ImportError:
            skipped[label] = f"{package} is not installed (make bench installs it)"
            continue
        found[label] = peers.onnxruntime(label, {0: path}) if key == "ort" else peers.openvino(label, path, key[3:])
    if "ort-upstream" in args.configs:
        try:
            from benchmarks.upstream_reference import from_project_model

            upstream = from_project_model(artifacts.seeded_model(args.arch, args.seed))
            paths = {b: artifacts.upstream_onnx(upstream, args.arch, args.seed, torch.randn(b, *shape)) for b in args.batches}
            found["ONNX Runtime, upstream formulation"] = peers.onnxruntime("ort-upstream", paths)
        except Exception as error:
            skipped["ONNX Runtime, upstream formulation"] = why(error)


def make_peers(args: argparse.Namespace, fused: torch.nn.Module, shape: Tuple[int, ...]) -> Tuple[Dict[str, Peer], Dict[str, str]]:
    found: Dict[str, Peer] = {}
    skipped: Dict[str, str] = {}
    try:
        import repmlp_rt  # noqa: F401
    except ImportError as error:
        skipped["repmlp_rt"] = f"not importable ({error}); build it with make install"
    if "repmlp_rt" not in skipped:
        runtime_peers(args, found, skipped)
    onnx_peers(args, fused, shape, found, skipped)
    if "eager" in args.configs:
        found["fused model, eager"] = peers.eager("eager", fused)
    if "upstream" in args.configs:
        from benchmarks.upstream_reference import from_project_model

        found["upstream formulation, eager"] = peers.eager("upstream", from_project_model(artifacts.seeded_model(args.arch, args.seed)))
    return found, skipped


def load_all(found: Dict[str, Peer], threads: int, skipped: Dict[str, str]) -> Dict[str, Any]:
    loaded = {}
    for label, peer in found.items():
        if label in skipped:
            continue
        torch.set_num_threads(threads)
        try:
            loaded[label] = peer.load(threads)
        except Exception as error:
            skipped[label] = f"load at {threads} threads failed: {why(error)}"
            log(f"  SKIP {label}: {skipped[label]}")
    torch.set_num_threads(threads)
    return loaded


def run_cell(args: argparse.Namespace, found: Dict[str, Peer], loaded: Dict[str, Any], ceiling: GemmCeiling,
             threads: int, batch: int, shape: Tuple[int, ...], fused: torch.nn.Module,
             skipped: Dict[str, str], errors: Dict[str, float]) -> Dict[str, List[float]]:
    """One (threads, batch) cell: warm-up (the first call checked against the fused model), then
    interleaved rounds; returns per-call seconds by row."""
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        reference = fused(x)
    calls = {}
    for label, call in loaded.items():
        peer, arg = found[label], (x.numpy() if found[label].numpy else x)
        try:
            with torch.inference_mode():
                out = torch.from_numpy(np.asarray(call(arg))) if peer.numpy else call(arg)
                errors[f"{label} @ batch {batch}"] = check_close(f"{label} b{batch}", out, reference, peer.tolerance)
                for _ in range(args.warmup - 1):
                    call(arg)
        except Exception as error:
            skipped[label] = f"batch {batch}, {threads} threads: {why(error)}"
            log(f"  SKIP {label}: {skipped[label]}")
            continue
        calls[label] = (lambda c, a: lambda: c(a))(call, arg)
    for label in [label for label in loaded if label in skipped]:
        del loaded[label]
    if any(found[label].settle for label in calls):
        time.sleep(args.settle)  # the warm-ups' spinning threads, before the first round

    def settle(label: str) -> None:
        if found[label].settle:
            time.sleep(args.settle)

    per_round = args.iters or (2 if batch == 1 else 1)
    log(f"-- {threads} thread(s), batch {batch}: {args.rounds} round(s) x {per_round} call(s) of {len(calls)} rows; load avg {loadavg()}")
    with torch.inference_mode():
        return time_rounds(calls, args.rounds, per_round, after=settle, between=lambda r: ceiling.sample(threads))


def ms_per_image(lat: Lat, label: str, threads: int, batch: int) -> Optional[float]:
    seconds = lat.get((label, threads, batch))
    return 1000.0 * statistics.median(seconds) / batch if seconds else None


def results_table(args: argparse.Namespace, found: Dict[str, Peer], lat: Lat, ceiling: GemmCeiling, flops: float) -> str:
    headers = ["row", "threads", "batch", "ms / image", "images/s", "GFLOP/s", "% of fp32 ceiling",
               "% of own-dtype GEMM", "x vs repmlp_rt float32 (default gemm)", "calls"]
    rows = []
    for t in args.threads:
        for b in args.batches:
            cell = {label: ms_per_image(lat, label, t, b) for label in found}
            baseline = ours(cell, "float32")
            for label, peer in found.items():
                ms = cell[label]
                if ms is None:
                    continue
                rate, base = flops / (ms / 1000) / 1e9, cell[baseline] if baseline else None
                own = "" if peer.ceiling == "fp32" else f"{100 * rate / ceiling.rate(t, peer.ceiling):.0f}% ({peer.ceiling})"
                rows.append([label, t, b, f"{ms:.1f}", f"{1000 / ms:.2f}", f"{rate:.1f}",
                             f"{100 * rate / ceiling.rate(t, 'fp32'):.0f}%", own,
                             "" if base is None else f"{base / ms:.2f}", len(lat[(label, t, b)])])
    return markdown_table(headers, rows)


def targets(args: argparse.Namespace, lat: Lat, ceiling: GemmCeiling, flops: float) -> List[str]:
    """The comparisons the runtime is held to, each with its measured value."""
    lines = []
    for t in args.threads:
        for b in args.batches:
            ms = {label: ms_per_image(lat, label, t, b) for (label, tt, bb) in lat if (tt, bb) == (t, b)}
            for dtype, peer in (("float32", "OpenVINO f32"), ("bfloat16", "OpenVINO bf16 hint")):
                label = ours(ms, dtype)
                if label and ms.get(peer):
                    lines.append(f"- {t} thr, batch {b}: {label} vs {peer}: time ratio {peer} / ours {ms[peer] / ms[label]:.2f} (target >= 1)")
            label = ours(ms, "float32")
            if label:
                share = 100 * flops / (ms[label] / 1000) / 1e9 / ceiling.rate(t, "fp32")
                lines.append(f"- {t} thr, batch {b}: {label} at {share:.0f}% of the fp32 ceiling (target {80 if b > 1 else 70}%)")
            for dtype in args.dtypes:
                single = {m: ms.get(f"repmlp_rt {dtype} gemm={m}") for m in GEMM_MODES if m != "auto"}
                auto, single = ms.get(f"repmlp_rt {dtype} gemm=auto"), {m: v for m, v in single.items() if v}
                if auto and single:
                    best = min(single, key=single.get)
                    lines.append(f"- {t} thr, batch {b}, {dtype}: gemm=auto {auto:.1f} ms vs best single path {best} "
                                 f"{single[best]:.1f} ms: {100 * (auto / single[best] - 1):+.1f}% (target <= +3%)")
    return lines


def report(args: argparse.Namespace, found: Dict[str, Peer], lat: Lat, ceiling: GemmCeiling, flops: float,
           skipped: Dict[str, str], errors: Dict[str, float], minutes: float) -> str:
    per_round = ", ".join(f"{args.iters or (2 if b == 1 else 1)} at batch {b}" for b in args.batches)
    lines = [f"{args.arch}, random weights (seed {args.seed}, randomized BN statistics), {flops / 1e9:.2f} GFLOP per image "
             f"(counted on the fused model); {args.rounds} interleaved round(s) per cell, calls per row per round: {per_round}, "
             f"after {args.warmup} warm-up call(s); medians. Wall time {minutes:.1f} min, load average at the end {loadavg()}.",
             "", f"Host: {host_line()}.",
             "GEMM ceilings, GFLOP/s (int8: GOP/s), 4096-cube: " + "; ".join(f"{t} thr: {ceiling.summary(t)}" for t in args.threads),
             "", "Output checks (max |diff| / max |logit| against the fused eager model): "
             + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()),
             "", results_table(args, found, lat, ceiling, flops), "", "Comparisons:", ""]
    lines += targets(args, lat, ceiling, flops) or ["- none (rows missing)"]
    lines += ["", "Skipped:", ""] + ([f"- {k}: {v}" for k, v in skipped.items()] or ["- none"])
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    log(f"RepMLPNet CPU bench: {args.arch}; {host_line()}; load avg {loadavg()}")
    torch.manual_seed(args.seed)
    with quiet_jit():
        model = artifacts.seeded_model(args.arch, args.seed)
        shape = (model.config.in_channels, *model.config.img_size)
        fused = fuse_model(model)
        flops = float(count_flops(fused))
        log(f"  {flops / 1e9:.2f} GFLOP per image")
        found, skipped = make_peers(args, fused, shape)
        if args.build_only:
            log(f"  ready: {len(found)} rows" + "".join(f"\n  skipped {k}: {v}" for k, v in skipped.items()))
            return 0
        ceiling = GemmCeiling(args.gemm_size)
        lat: Lat = {}
        errors: Dict[str, float] = {}
        for t in args.threads:
            loaded = load_all(found, t, skipped)
            for b in args.batches:
                times = run_cell(args, found, loaded, ceiling, t, b, shape, fused, skipped, errors)
                lat.update({(label, t, b): seconds for label, seconds in times.items()})
                log("   " + ", ".join(f"{label} {ms_per_image(lat, label, t, b):.1f}" for label in times) + " ms/image")
            del loaded
    body = report(args, found, lat, ceiling, flops, skipped, errors, (time.perf_counter() - started) / 60)
    publish(f"CPU benchmark, {args.arch}", "benchmarks.bench", argv, body, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
