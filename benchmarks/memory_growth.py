"""Resident-memory growth of one repmlp_rt.Runtime over many calls (Linux /proc/self/statm).

Alternates a float batch through ``forward`` and a uint8 image batch through ``forward_images``,
warms up, then prints the growth of the resident set over each block of calls. A leak of one
input per call shows up as (input size x calls); allocator caches settle during the warm-up.

    python -m benchmarks.memory_growth ARTIFACT [--calls 1000] [--blocks 2] [--batch 2]
"""

import argparse
import os
from typing import List, Optional

import numpy as np

import repmlp_rt
from benchmarks.harness import host_line


def resident_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--calls", type=int, default=1000, help="calls per block (half per entry point)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=200, help="calls before the first measurement")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if min(args.calls, args.blocks, args.batch, args.threads) < 1 or args.warmup < 0:
        parser.error("--calls, --blocks, --batch and --threads must be >= 1, --warmup >= 0")
    runtime = repmlp_rt.Runtime(args.artifact, threads=args.threads)
    c, h, w = runtime.input_shape
    rng = np.random.default_rng(1)
    batch = rng.standard_normal((args.batch, c, h, w)).astype(np.float32)
    images = rng.integers(0, 256, (args.batch, h + 8, w + 4, 3), dtype=np.uint8)
    for _ in range(args.warmup // 2):
        runtime.infer(batch)
        runtime.infer(images)
    before = resident_bytes()
    print(host_line())
    print(f"{args.artifact}: resident {before / 2**20:.1f} MiB after {args.warmup} warm-up calls")
    for block in range(args.blocks):
        for _ in range(args.calls // 2):
            runtime.infer(batch)
            runtime.infer(images)
        now = resident_bytes()
        print(f"  block {block + 1}: {args.calls} calls, growth {(now - before) / 2**10:.0f} KiB")
        before = now


if __name__ == "__main__":
    main()
