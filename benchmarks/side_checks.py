#!/usr/bin/env python
"""Two small measurements behind benchmarks/RESULTS.md, on bench.py's cached B224 files.

  ort-spin ARTIFACT ONNX [--spin 0|1]   does an ONNX Runtime run slow down the repmlp_rt call
                                        that follows it? (alone / right after ORT / after a pause)
  executor-mode ARTIFACT [--batch B]    the artifact with TorchScript's executor optimization
                                        on (the default) and off (the runtime's CPU mode),
                                        interleaved in one process

  .venv/bin/python benchmarks/side_checks.py ort-spin benchmarks/.cache/B224-<hash>.pt \\
      benchmarks/.cache/B224-fused-b1-<hash>.onnx
  .venv/bin/python benchmarks/side_checks.py executor-mode benchmarks/.cache/B224-<hash>.pt
"""

import argparse
import statistics
import time
import warnings
from typing import Callable, List

import numpy as np

warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def ort_spin(args: argparse.Namespace) -> None:
    import onnxruntime as ort
    import repmlp_rt

    runtime = repmlp_rt.Runtime(args.artifact, threads=args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.add_session_config_entry("session.intra_op.allow_spinning", args.spin)
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
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


def main() -> None:
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
    args = parser.parse_args()
    {"ort-spin": ort_spin, "executor-mode": executor_mode}[args.command](args)


if __name__ == "__main__":
    main()
