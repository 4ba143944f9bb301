#!/usr/bin/env python
"""Small measurements behind benchmarks/RESULTS.md, on bench.py's cached B224 files.

  ort-spin ARTIFACT ONNX [--spin 0|1]   does an ONNX Runtime run slow down the repmlp_rt call
                                        that follows it? (alone / right after ORT / after a pause)
  executor-mode ARTIFACT [--batch B]    the artifact with TorchScript's executor optimization
                                        on (the default) and off (the runtime's CPU mode),
                                        interleaved in one process
  binding-vs-cli ARTIFACT               repmlp_rt and repmlp_infer --bench, each in a fresh
                                        process, alternating: what the binding itself costs

  python -m benchmarks.side_checks ort-spin benchmarks/.cache/B224-<hash>.pt \\
      benchmarks/.cache/B224-fused-dynamic-<hash>.onnx
  python -m benchmarks.side_checks executor-mode benchmarks/.cache/B224-<hash>.pt
  python -m benchmarks.side_checks binding-vs-cli benchmarks/.cache/B224-<hash>.pt
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable, List, Optional

import numpy as np

from benchmarks.harness import find_repmlp_infer, host_line
from benchmarks.peers import ort_session
from repmlp.utils import quiet_jit


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def ort_spin(args: argparse.Namespace) -> None:
    import repmlp_rt

    runtime = repmlp_rt.Runtime(args.artifact, threads=args.threads)
    session = ort_session(args.onnx, args.threads, {"session.intra_op.allow_spinning": args.spin})
    x = np.random.default_rng(0).standard_normal((1, *runtime.input_shape), dtype=np.float32)
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    time.sleep(2)
    alone = [timed(lambda: runtime.infer(x)) for _ in range(8)]
    after: List[float] = []
    for _ in range(5):
        session.run(None, feed)
        after.append(timed(lambda: runtime.infer(x)))
    time.sleep(2)
    paused = [timed(lambda: runtime.infer(x)) for _ in range(8)]
    print(f"ORT allow_spinning={args.spin}, {args.threads} threads, batch 1, repmlp_rt ms (median):")
    print(f"  alone {statistics.median(alone):.1f}; right after an ORT run {statistics.median(after):.1f} "
          f"{[round(t) for t in after]}; after a 2 s pause {statistics.median(paused):.1f}")


def executor_mode(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with quiet_jit():
        default, plain = torch.jit.load(args.artifact).eval(), torch.jit.load(args.artifact).eval()
    x = torch.randn(args.batch, *default.input_shape())
    times: dict = {"optimization on": [], "optimization off": []}
    with torch.inference_mode():
        for _ in range(3):
            default(x)
        with torch.jit.optimized_execution(False):
            for _ in range(3):
                plain(x)
        for _ in range(args.rounds):
            times["optimization on"] += [timed(lambda: default(x)) / args.batch for _ in range(2)]
            with torch.jit.optimized_execution(False):
                times["optimization off"] += [timed(lambda: plain(x)) / args.batch for _ in range(2)]
    print(f"{args.threads} threads, batch {args.batch}, ms per image (median of {2 * args.rounds}): "
          + ", ".join(f"{name} {statistics.median(v):.1f}" for name, v in times.items()))


# Times repmlp_rt the way repmlp_infer --bench times itself: load (with the same warm-up
# batch), `warmup` untimed calls, then `iters` timed calls on one random batch; prints the p50.
_BINDING_BENCH = """
import json, statistics, sys, time
import numpy as np
import repmlp_rt
artifact, batch, threads, iters, warmup = sys.argv[1], *map(int, sys.argv[2:])
runtime = repmlp_rt.Runtime(artifact, threads=threads, warmup_batch=batch)
x = np.random.default_rng(0).standard_normal((batch, *runtime.input_shape), dtype=np.float32)
for _ in range(warmup):
    runtime.infer(x)
times = []
for _ in range(iters):
    start = time.perf_counter()
    runtime.infer(x)
    times.append((time.perf_counter() - start) * 1e3)
print(json.dumps({"p50_ms": statistics.median(times)}))
"""


def binding_vs_cli(args: argparse.Namespace) -> None:
    binary = find_repmlp_infer()
    if binary is None:
        raise SystemExit("repmlp_infer not found next to the interpreter or on PATH")
    common = [str(args.batch), str(args.threads), str(args.iters), str(args.warmup)]
    commands = {
        "repmlp_rt": [sys.executable, "-c", _BINDING_BENCH, args.artifact, *common],
        "repmlp_infer": [binary, args.artifact, "--bench", "--json", "--batch", common[0], "--threads",
                         common[1], "--iters", common[2], "--warmup", common[3]],
    }
    per_image: dict = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, command in commands.items():
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            per_image[name].append(result.get("bench", result)["p50_ms"] / args.batch)
    rt, cli = (statistics.median(per_image[n]) for n in ("repmlp_rt", "repmlp_infer"))
    print(f"{args.threads} threads, batch {args.batch}, {args.rounds} alternating fresh processes, "
          f"p50 ms per image (median): repmlp_rt {rt:.1f}, repmlp_infer {cli:.1f}, ratio {rt / cli:.3f}; "
          f"rounds: rt {[round(v, 1) for v in per_image['repmlp_rt']]}, cli {[round(v, 1) for v in per_image['repmlp_infer']]}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    spin = commands.add_parser("ort-spin")
    spin.add_argument("artifact")
    spin.add_argument("onnx")
    spin.add_argument("--spin", choices=["0", "1"], default="1", help="ORT's session.intra_op.allow_spinning")
    spin.add_argument("--threads", type=int, default=2)
    mode = commands.add_parser("executor-mode")
    mode.add_argument("artifact")
    mode.add_argument("--threads", type=int, default=2)
    mode.add_argument("--batch", type=int, default=1)
    mode.add_argument("--rounds", type=int, default=10)
    versus = commands.add_parser("binding-vs-cli")
    versus.add_argument("artifact")
    versus.add_argument("--threads", type=int, default=2)
    versus.add_argument("--batch", type=int, default=1)
    versus.add_argument("--iters", type=int, default=20)
    versus.add_argument("--warmup", type=int, default=3)
    versus.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(host_line())
    {"ort-spin": ort_spin, "executor-mode": executor_mode, "binding-vs-cli": binding_vs_cli}[args.command](args)


if __name__ == "__main__":
    main()
