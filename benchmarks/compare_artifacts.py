"""A/B timing of several TorchScript artifacts in one process, in interleaved rounds.

For before/after questions bench.py's matrix is too coarse: two builds of the same model (or
two dtypes) run on one input, one call each per round, each round starting with the next
artifact, so that a host whose speed drifts slows every candidate alike. Prints the median and
the fastest call of each and their ratio to the first artifact named. Executor optimization
off, as in the C++ runtime.

  python -m benchmarks.compare_artifacts --threads 1 --batch 8 --rounds 12 \\
      fp32=benchmarks/.cache/B224-<hash>.pt int8=benchmarks/.cache/B224-int8-<hash>.pt
"""

import argparse
import statistics
from typing import List, Optional

import torch

from benchmarks.harness import host_line, log, markdown_table, time_rounds
from repmlp.utils import quiet_jit


def parse_named(parser: argparse.ArgumentParser, items: List[str]) -> List[tuple]:
    named = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"expected NAME=PATH, got {item!r}")
        named.append((name, path))
    return named


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", metavar="NAME=PATH", help="the first is the baseline of the ratios")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--images", action="store_true", help="time forward_images on uint8 231x227 images instead of forward")
    args = parser.parse_args(argv)
    if min(args.threads, args.batch, args.rounds) < 1:
        parser.error("--threads, --batch and --rounds must be >= 1")
    named = parse_named(parser, args.artifacts)
    torch.set_num_threads(args.threads)
    with quiet_jit():
        modules = {name: torch.jit.load(path, map_location="cpu").eval() for name, path in named}
    shapes = {tuple(m.input_shape()) for m in modules.values()}
    if len(shapes) != 1:
        parser.error(f"the artifacts take different inputs: {sorted(shapes)}")
    torch.manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 231, 227, 3), dtype=torch.uint8) if args.images else torch.randn(args.batch, *shapes.pop())
    calls = {name: (lambda m: lambda: (m.forward_images if args.images else m)(x))(module) for name, module in modules.items()}
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        for call in calls.values():  # warm-up
            call()
        seconds = time_rounds(calls, args.rounds)
    base = named[0][0]
    base_median, base_min = statistics.median(seconds[base]), min(seconds[base])
    rows = [[name, f"{statistics.median(t) * 1e3 / args.batch:.1f}", f"{base_median / statistics.median(t):.2f}",
             f"{min(t) * 1e3 / args.batch:.1f}", f"{base_min / min(t):.2f}"] for name, t in seconds.items()]
    log(f"{host_line()}; {args.threads} thread(s), batch {args.batch}, {args.rounds} rounds, "
        f"{'forward_images' if args.images else 'forward'}; ms per image, ratio: {base}'s time / this one's")
    print(markdown_table(["artifact", "median ms", f"x vs {base}", "fastest ms", f"x vs {base} (fastest)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
