#!/usr/bin/env python
"""Per-operator time of the B224 artifact (torch profiler) next to ONNX Runtime's (its profiler).

Both sides run the same fused graph at batch 1 with the same thread count: the artifact via
torch.jit.load, executor optimization off as in the C++ runtime; ONNX Runtime on the ONNX export
of the fused model (bench.py's (g)). Prints the most expensive (operator, input shapes) rows of
each, in ms per image. bench.py leaves both files in benchmarks/.cache:

  .venv/bin/python benchmarks/profile_ops.py --artifact benchmarks/.cache/B224-<hash>.pt \\
      --onnx benchmarks/.cache/B224-fused-b1-<hash>.onnx --threads 2
"""

import argparse
import collections
import json
import os
import tempfile
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")


def profile_torch(path: str, runs: int, rows: int) -> None:
    module = torch.jit.load(path).eval()
    x = torch.randn(1, *module.input_shape())
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        for _ in range(2):
            module(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(runs):
                module(x)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / runs / 1e3
    print(f"torch {torch.__version__}: operator time {total:.1f} ms per image")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        shapes = [s for s in e.input_shapes if s][:4]
        print(f"  {e.self_cpu_time_total / runs / 1e3:7.2f}  {e.key:28s} x{e.count // runs:<3d} {shapes}")


def profile_ort(path: str, threads: int, runs: int, rows: int) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(session.get_inputs()[0].shape).astype(np.float32)
    for _ in range(2 + runs):  # the first two are dropped below
        session.run(None, {name: x})
    with open(session.end_profiling()) as fh:
        trace = json.load(fh)
    per_run = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    nodes_per_run = len(per_run) // (2 + runs)
    per_run = per_run[2 * nodes_per_run:]
    groups: dict = collections.defaultdict(lambda: [0.0, 0])
    for e in per_run:
        shapes = [list(d.values())[0] for d in e["args"].get("input_type_shape", [])][:2]
        key = (e["args"]["op_name"], json.dumps(shapes))
        groups[key][0] += e["dur"]
        groups[key][1] += 1
    total = sum(g[0] for g in groups.values()) / runs / 1e3
    print(f"onnxruntime {ort.__version__}: operator time {total:.1f} ms per image")
    for (op, shapes), (dur, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"  {dur / runs / 1e3:7.2f}  {op:28s} x{count // runs:<3d} {shapes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=16)
    args = parser.parse_args()
    for path in (args.artifact, args.onnx):
        if not os.path.isfile(path):
            parser.error(f"no such file: {path} (run benchmarks/bench.py once to create it)")
    torch.set_num_threads(args.threads)
    print(f"batch 1, {args.threads} thread(s), {args.runs} runs; ms per image, self time per (op, shapes)")
    profile_torch(args.artifact, args.runs, args.rows)
    profile_ort(args.onnx, args.threads, args.runs, args.rows)


if __name__ == "__main__":
    main()
