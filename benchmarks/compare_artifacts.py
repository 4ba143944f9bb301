#!/usr/bin/env python
"""Time several TorchScript artifacts side by side in one process, in interleaved rounds.

For A/B questions bench.py's full matrix is too coarse: two builds of the same model (before
and after a change, or two dtypes) run on the same input, one call each per round, so that a
host whose speed drifts (shared cores) slows every candidate alike. Prints the median and the
fastest call of each, and their ratio to the first artifact named. Executor optimization off,
as in the C++ runtime.

  .venv/bin/python benchmarks/compare_artifacts.py --threads 1 --batch 8 --rounds 12 \\
      fp32=benchmarks/.cache/B224-<hash>.pt int8=benchmarks/.cache/B224-int8-<hash>.pt
"""

import argparse
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", metavar="NAME=PATH", help="the first is the baseline of the ratios")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--images", action="store_true", help="time forward_images on uint8 231x227 images instead of forward")
    args = parser.parse_args()
    named = []
    for item in args.artifacts:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"expected NAME=PATH, got {item!r}")
        named.append((name, path))
    torch.set_num_threads(args.threads)
    modules = {name: torch.jit.load(path, map_location="cpu").eval() for name, path in named}
    shapes = {tuple(m.input_shape()) for m in modules.values()}
    if len(shapes) != 1:
        parser.error(f"the artifacts take different inputs: {sorted(shapes)}")
    torch.manual_seed(0)
    if args.images:
        x = torch.randint(0, 256, (args.batch, 231, 227, 3), dtype=torch.uint8)
    else:
        x = torch.randn(args.batch, *shapes.pop())
    calls = {name: module.forward_images if args.images else module for name, module in modules.items()}
    seconds = {name: [] for name in calls}
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        for call in calls.values():  # warm-up
            call(x)
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call(x)
                seconds[name].append(time.perf_counter() - start)
    base_median, base_min = statistics.median(seconds[named[0][0]]), min(seconds[named[0][0]])
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, {args.rounds} rounds, "
          f"{'forward_images' if args.images else 'forward'}; ms per image (ratio: {named[0][0]} time / this time)")
    for name, times in seconds.items():
        median, fastest = statistics.median(times), min(times)
        print(f"  {name:<12} median {median * 1e3 / args.batch:7.1f} ({base_median / median:4.2f}x)   "
              f"fastest {fastest * 1e3 / args.batch:7.1f} ({base_min / fastest:4.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
