"""Two ways of running one artifact, side by side on this host: what a runtime choice is worth.

``--plan``: two runtimes in one process, interleaved (harness.time_rounds): the GEMM plan as
``auto`` measures it, and the same plan with groups changed (``--set GROUP=PATH``, repeatable;
``--unfuse-gelu``: each FFN first GEMM that the plan puts on oneDNN with its GELU fused, and
whose second GEMM is rewritten too, on ATen with a separate GELU instead).

``--planning``: what the GEMM plan costs a load: one process, a fresh cache folder, the artifact
loaded with ``gemm="aten"``, then ``"auto"`` twice (it plans, then reads the cache); seconds
per ``repmlp_rt.Runtime(...)``, load and self-check included.

``--memory``: RuntimeOptions::keep_freed_memory on and off. malloc's settings are
process-wide, so each side is its own process, the two alternating; each reports its median
ms per image, minor page faults and kernel (system) time per call, resident and peak memory.

    python -m benchmarks.runtime_ab --plan ARTIFACT --threads 2 --batch 1 --unfuse-gelu
    python -m benchmarks.runtime_ab --memory ARTIFACT --threads 2 --batch 8 --pairs 2
    python -m benchmarks.runtime_ab --planning ARTIFACT --threads 1
"""

import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

import repmlp_rt
from benchmarks.harness import host_line, time_rounds


def second_gemm(group: str) -> str:
    """'gemm KxN+gelu DTYPE' -> 'gemm NxK DTYPE', the FFN's GEMM that reads that GELU."""
    kind, shape, dtype = group.split(" ")
    k, n = shape.replace("+gelu", "").split("x")
    return f"{kind} {n}x{k} {dtype}"


def edited_plan(plan: Dict[str, dict], sets: List[str], unfuse_gelu: bool) -> List[str]:
    """Applies the edits to ``plan`` in place; returns the groups changed."""
    changed = []
    if unfuse_gelu:
        for group, entry in plan.items():
            if "+gelu" in group and entry["path"] == "onednn" and \
                    plan.get(second_gemm(group), {}).get("path", "aten") != "aten":
                entry["path"] = "aten"
                changed.append(group)
    for item in sets:
        group, _, path = item.rpartition("=")
        if group not in plan:
            raise SystemExit(f"--set: no group {group!r} in the plan; it has: {', '.join(sorted(plan))}")
        plan[group]["path"] = path
        changed.append(group)
    return changed


def compare_plans(args: argparse.Namespace) -> None:
    measured, edited = tempfile.mkdtemp(), tempfile.mkdtemp()
    os.environ["XDG_CACHE_HOME"] = measured
    a = repmlp_rt.Runtime(args.artifact, threads=args.threads)
    (cache,) = glob.glob(os.path.join(measured, "repmlp_rt", "*.json"))
    with open(cache) as fh:
        data = json.load(fh)
    changed = edited_plan(data["plan"], args.set, args.unfuse_gelu)
    os.makedirs(os.path.join(edited, "repmlp_rt"))
    with open(os.path.join(edited, "repmlp_rt", os.path.basename(cache)), "w") as fh:
        json.dump(data, fh)
    os.environ["XDG_CACHE_HOME"] = edited
    b = repmlp_rt.Runtime(args.artifact, threads=args.threads)
    x = np.random.default_rng(0).random((args.batch, *a.input_shape), dtype=np.float32)
    for runtime in (a, b):
        runtime.infer(x)
    times = time_rounds({"measured": lambda: a.infer(x), "edited": lambda: b.infer(x)}, args.rounds, 2)
    ms = {name: statistics.median(t) * 1e3 / args.batch for name, t in times.items()}
    print(f"{host_line()}\n{os.path.basename(args.artifact)}, {args.threads} thr, batch {args.batch}, "
          f"{args.rounds} rounds; changed: {', '.join(changed) or 'nothing'}")
    print(f"  plan as measured ({a.gemm_plan.split(';')[0]}): {ms['measured']:.1f} ms/image")
    print(f"  edited ({b.gemm_plan.split(';')[0]}): {ms['edited']:.1f} ms/image "
          f"({ms['edited'] / ms['measured']:.3f}x)")


def planning_cost(args: argparse.Namespace) -> None:
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()
    seconds = []
    for mode in ("aten", "auto", "auto"):
        start = time.perf_counter()
        repmlp_rt.Runtime(args.artifact, threads=args.threads, gemm=mode)
        seconds.append(time.perf_counter() - start)
    print(f"{host_line()}\n{os.path.basename(args.artifact)}, {args.threads} thr: load with gemm=aten "
          f"{seconds[0]:.2f} s; auto first (plans) {seconds[1]:.2f} s; auto cached {seconds[2]:.2f} s")


def memory_side(artifact: str, threads: int, batch: int, keep: bool, calls: int) -> str:
    """One side of --memory, run in this process: its result line."""
    runtime = repmlp_rt.Runtime(artifact, threads=threads, keep_freed_memory=keep)
    x = np.random.default_rng(0).random((batch, *runtime.input_shape), dtype=np.float32)
    for _ in range(2):
        runtime.infer(x)
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = time_rounds({"call": lambda: runtime.infer(x)}, calls)["call"]
    after = resource.getrusage(resource.RUSAGE_SELF)
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    mib = {key: int(status[key].split()[0]) // 1024 for key in ("VmRSS", "VmHWM")}
    return (f"keep_freed_memory={keep}: {statistics.median(times) * 1e3 / batch:.1f} ms/image, "
            f"{(after.ru_minflt - before.ru_minflt) / calls:.0f} minor faults and "
            f"{(after.ru_stime - before.ru_stime) / calls * 1e3:.1f} ms system time per call, "
            f"resident {mib['VmRSS']} MiB, peak {mib['VmHWM']} MiB")


def compare_memory(args: argparse.Namespace) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    print(f"{host_line()}\n{os.path.basename(args.artifact)}, {args.threads} thr, batch {args.batch}, "
          f"{args.calls} calls per process after 2 warm-up calls")
    for _ in range(args.pairs):
        for keep in (False, True):
            done = subprocess.run([sys.executable, "-m", "benchmarks.runtime_ab", "--memory-side", args.artifact,
                                   "--threads", str(args.threads), "--batch", str(args.batch),
                                   "--calls", str(args.calls), "--keep", str(int(keep))],
                                  capture_output=True, text=True, env=env, check=True)
            print("  " + done.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--plan", metavar="ARTIFACT", help="the measured GEMM plan against an edited one")
    what.add_argument("--memory", metavar="ARTIFACT", help="keep_freed_memory on against off")
    what.add_argument("--planning", metavar="ARTIFACT", help="a load's time with and without planning")
    what.add_argument("--memory-side", metavar="ARTIFACT", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10, help="--plan: interleaved rounds of 2 calls each")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP=PATH", help="--plan: an edit")
    parser.add_argument("--unfuse-gelu", action="store_true", help="--plan: see the module's description")
    parser.add_argument("--pairs", type=int, default=2, help="--memory: alternating pairs of processes")
    parser.add_argument("--calls", type=int, default=6, help="--memory: timed calls per process")
    parser.add_argument("--keep", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plan:
        args.artifact = args.plan
        compare_plans(args)
    elif args.planning:
        args.artifact = args.planning
        planning_cost(args)
    elif args.memory:
        args.artifact = args.memory
        compare_memory(args)
    else:
        print(memory_side(args.memory_side, args.threads, args.batch, bool(args.keep), args.calls))


if __name__ == "__main__":
    main()
