"""Load-time cost of the self-check (record digest + probe) and the memory a load takes.

For each artifact, each configuration loads it in a fresh process (so that page-cache state
and allocator history are alike; the file is read once beforehand so it is in the page cache)
and reports the load time (median of --repeats), the peak resident memory added by the load
(the high-water mark ru_maxrss minus the resident memory before the load) and the file size. The configurations are interleaved round by
round so that a shared host's load drifts over all of them alike.

    python -m benchmarks.load_cost [--b224] [--repeats 5] [--artifact NAME=PATH ...] [--write]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

from benchmarks.harness import markdown_table, publish
from repmlp.artifact import build_artifact
from repmlp.utils import quiet_jit

CONFIGS = {
    # name: Runtime keyword arguments
    "bare load (verify off, no warm-up)": {"verify": False, "warmup": 0},
    "default warm-up, verify off": {"verify": False},
    "default warm-up, verify on (default)": {"verify": True},
    "default warm-up, verify on, digest off": {"verify": True, "verify_digest": False},
    "one-shot (no warm-up), verify on": {"verify": True, "warmup": 0},
}

CHILD = r"""
import json, os, resource, sys, time
import repmlp_rt
kwargs = json.loads(sys.argv[2])
def resident_kib():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
before = resident_kib()
start = time.perf_counter()
runtime = repmlp_rt.Runtime(sys.argv[1], threads=int(sys.argv[3]), **kwargs)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the process's high-water mark
print(json.dumps({"seconds": seconds, "peak_rss_added_mib": (max(peak, before) - before) / 1024,
                  "rss_added_mib": (resident_kib() - before) / 1024}))
"""


def measure(path: str, kwargs: dict, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, json.dumps(kwargs), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def artifacts_to_measure(args: argparse.Namespace, work: str) -> Dict[str, str]:
    artifacts = dict(item.split("=", 1) for item in args.artifact)
    with quiet_jit():
        if not artifacts:
            artifacts["digits"] = os.path.join(work, "digits.pt")
            build_artifact(out=artifacts["digits"])
        if args.b224:
            artifacts["B224"] = os.path.join(work, "b224.pt")
            build_artifact("B224", out=artifacts["B224"], seed=5)
    return artifacts


def measure_artifact(name: str, path: str, repeats: int, threads: int) -> str:
    """Every configuration, interleaved round by round, in fresh processes; a table."""
    with open(path, "rb") as fh:  # into the page cache
        while fh.read(1 << 24):
            pass
    results: Dict[str, List[dict]] = {config: [] for config in CONFIGS}
    for _ in range(repeats):
        for config, kwargs in CONFIGS.items():
            results[config].append(measure(path, kwargs, threads))
    rows = [[config, *(f"{statistics.median(r[key] for r in runs) * scale:.1f}"
                       for key, scale in (("seconds", 1000), ("peak_rss_added_mib", 1), ("rss_added_mib", 1)))]
            for config, runs in results.items()]
    title = f"{name}: {os.path.getsize(path) / 2**20:.1f} MiB, {threads} thread(s), median of {repeats}"
    return title + "\n\n" + markdown_table(
        ["configuration", "load (ms)", "peak RSS added by the load (MiB)", "RSS added after it (MiB)"], rows)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--b224", action="store_true", help="also build and measure the 273 MB B224 artifact")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--artifact", action="append", default=[], metavar="NAME=PATH",
                        help="measure this already built artifact instead of building digits (and B224)")
    parser.add_argument("--write", action="store_true", help="append the tables to RESULTS.md")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    with tempfile.TemporaryDirectory(prefix="repmlp-load-cost-") as work:
        tables = [measure_artifact(name, path, args.repeats, args.threads)
                  for name, path in artifacts_to_measure(args, work).items()]
    publish("Load cost of the self-check", "benchmarks.load_cost", argv, "\n\n".join(tables), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
