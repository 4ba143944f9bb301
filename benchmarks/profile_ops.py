#!/usr/bin/env python
"""Per-operator time of B224 artifacts (torch profiler) next to ONNX Runtime's and OpenVINO's.

Every side runs the same fused graph on the same input with the same thread count and batch:
each artifact via torch.jit.load, executor optimization off as in the C++ runtime (with
``--gemm MODE``: through repmlp_rt.Runtime with that GEMM plan, the graph the runtime runs); ONNX Runtime
on the ONNX export of the fused model (bench.py's (g)); OpenVINO's CPU plugin on the same ONNX
with each precision hint given (its per-node counters, grouped by node type and the kernel it
chose, which shows the precision each layer really ran in). Prints the most expensive rows of
each, in ms per image. bench.py leaves the files in benchmarks/.cache:

  python -m benchmarks.profile_ops --artifact benchmarks/.cache/B224-<hash>.pt \\
      --onnx benchmarks/.cache/B224-fused-dynamic-<hash>.onnx --threads 2
  python -m benchmarks.profile_ops --batch 8 --threads 1 --by-op \\
      --artifact benchmarks/.cache/B224-<hash>.pt --artifact benchmarks/.cache/B224-bfloat16-<hash>.pt \\
      --onnx benchmarks/.cache/B224-fused-dynamic-<hash>.onnx --openvino f32 bf16 --no-ort
"""

import argparse
import collections
import json
import os
import tempfile
from typing import List, Optional

import numpy as np
import torch

from benchmarks.harness import host_line
from benchmarks.peers import openvino_request, ort_session
from repmlp.utils import quiet_jit

# (time in ms summed over the profiled runs, calls summed over them) per row key.
Rows = dict


def print_rows(title: str, groups: Rows, runs: int, batch: int, rows: int) -> None:
    scale = runs * batch
    total = sum(ms for ms, _ in groups.values()) / scale
    print(f"{title}: operator time {total:.1f} ms per image")
    for key, (ms, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"  {ms / scale:7.2f}  {key[0]:28s} x{count // runs:<3d} {key[1]}")


def profile_torch(path: str, x: np.ndarray, runs: int, by_op: bool, gemm: Optional[str] = None) -> Rows:
    if gemm is None:
        with quiet_jit():
            module = torch.jit.load(path).eval()
        inputs = torch.from_numpy(x)
    else:  # the runtime's own graph, rewritten by its GEMM plan (same process, same profiler)
        import repmlp_rt

        runtime = repmlp_rt.Runtime(path, threads=torch.get_num_threads(), gemm=gemm)
        print(f"  {os.path.basename(path)}: {runtime.gemm_plan.split(';')[0]}")
        module, inputs = runtime.infer, x
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        for _ in range(2):
            module(inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=not by_op) as prof:
            for _ in range(runs):
                module(inputs)
    groups: Rows = {}
    for e in prof.key_averages(group_by_input_shape=not by_op):
        shapes = "" if by_op else str([s for s in e.input_shapes if s][:4])
        groups[(e.key, shapes)] = (e.self_cpu_time_total / 1e3, e.count)
    return groups


def profile_ort(path: str, x: np.ndarray, threads: int, runs: int, by_op: bool) -> Rows:
    session = ort_session(path, threads, enable_profiling=True, profile_file_prefix=os.path.join(tempfile.mkdtemp(), "ort"))
    name = session.get_inputs()[0].name
    for _ in range(2 + runs):  # the first two are dropped below
        session.run(None, {name: x})
    with open(session.end_profiling()) as fh:
        trace = json.load(fh)
    per_run = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    nodes_per_run = len(per_run) // (2 + runs)
    per_run = per_run[2 * nodes_per_run:]
    groups: dict = collections.defaultdict(lambda: [0.0, 0])
    for e in per_run:
        shapes = "" if by_op else json.dumps(
            [list(d.values())[0] for d in e["args"].get("input_type_shape", [])][:2])
        key = (e["args"]["op_name"], shapes)
        groups[key][0] += e["dur"] / 1e3
        groups[key][1] += 1
    return {k: (ms, count) for k, (ms, count) in groups.items()}


def profile_openvino(path: str, x: np.ndarray, threads: int, runs: int, precision: str) -> Rows:
    request = openvino_request(path, threads, precision, PERF_COUNT=True)
    for _ in range(2):
        request.infer({0: x})
    groups: dict = collections.defaultdict(lambda: [0.0, 0])
    for _ in range(runs):
        request.infer({0: x})
        for node in request.profiling_info:  # counters of the last inference only
            key = (node.node_type, node.exec_type)
            groups[key][0] += node.real_time.total_seconds() * 1e3
            groups[key][1] += 1
    return {k: (ms, count) for k, (ms, count) in groups.items()}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", action="append", default=[], help="a .pt artifact (repeatable)")
    parser.add_argument("--onnx", help="the fused model's ONNX export (for ONNX Runtime and OpenVINO)")
    parser.add_argument("--openvino", nargs="*", default=[], metavar="HINT",
                        help="OpenVINO precision hints to profile on --onnx (f32, bf16)")
    parser.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--by-op", action="store_true", help="one row per operator, shapes merged")
    parser.add_argument("--gemm", choices=("auto", "aten", "onednn", "mkl-packed"),
                        help="profile the artifacts through repmlp_rt with this GEMM plan")
    args = parser.parse_args(argv)
    if not args.artifact and not args.onnx:
        parser.error("give --artifact and/or --onnx")
    if args.openvino and not args.onnx:
        parser.error("--openvino profiles the --onnx file: give it")
    for hint in args.openvino:
        if hint not in ("f32", "bf16", "f16"):
            parser.error(f"--openvino takes f32, bf16 or f16, got {hint!r}")
    for path in args.artifact + ([args.onnx] if args.onnx else []):
        if not os.path.isfile(path):
            parser.error(f"no such file: {path} (python -m benchmarks.bench creates them)")
    if args.batch < 1 or args.threads < 1 or args.runs < 1:
        parser.error("--batch, --threads and --runs must be positive")
    torch.set_num_threads(args.threads)
    shape = (3, 224, 224)  # B224's; an artifact says its own
    if args.artifact:
        with quiet_jit():
            shape = tuple(torch.jit.load(args.artifact[0]).input_shape())
    x = np.random.default_rng(0).standard_normal((args.batch, *shape)).astype(np.float32)
    print(f"{host_line()}; batch {args.batch}, {args.threads} thread(s), {args.runs} runs; ms per image, self time per row")
    for path in args.artifact:
        groups = profile_torch(path, x, args.runs, args.by_op, args.gemm)
        plan = f", repmlp_rt gemm={args.gemm}" if args.gemm else ""
        print_rows(f"torch {torch.__version__}, {os.path.basename(path)}{plan}", groups, args.runs, args.batch, args.rows)
    if args.onnx and not args.no_ort:
        import onnxruntime as ort

        groups = profile_ort(args.onnx, x, args.threads, args.runs, args.by_op)
        print_rows(f"onnxruntime {ort.__version__}", groups, args.runs, args.batch, args.rows)
    for hint in args.openvino:
        import openvino as ov

        groups = profile_openvino(args.onnx, x, args.threads, args.runs, hint)
        print_rows(f"openvino {ov.__version__}, {hint} hint (node type, kernel)", groups,
                   args.runs, args.batch, args.rows)


if __name__ == "__main__":
    main()
