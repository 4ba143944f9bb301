"""RepMLPNet GPU benchmark: the C++ runtime against eager PyTorch in reduced precision.

Rows, same random weights (seed 0, randomized BN statistics), interleaved rounds:

  eager-dev   the fused model in eager PyTorch, input already on the device in the compute
              dtype, logits left there (synchronized): the compute-only reference
  eager-host  the same from a float32 host batch to float32 host logits (copies included)
  rt          the artifact through the C++ runtime (repmlp_rt), float32 host batch in, float32
              host logits out: pinned staging, its own stream, the cast on the device
  rt-dev      the runtime on a tensor already on the device (read in place through DLPack)
  cli         `repmlp_infer --bench --device DEV` (one process per batch size; its p50)

The artifact is built for the device and dtype by the builder (which verifies it there);
every row's output is checked against eager-dev before timing.

  python -m benchmarks.bench_gpu                                    # cuda, float16, batch 1 and 64
  python -m benchmarks.bench_gpu --device cpu --dtype bfloat16 --arch T224 --batches 1 2 --iters 2  # smoke
``--write`` appends the table to benchmarks/RESULTS.md, ``--out PATH`` to another file.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from benchmarks import artifacts
from benchmarks.harness import (
    CACHE_DIR, append_results, check_close, command_line, find_repmlp_infer, log, markdown_table, time_rounds, why,
)
from repmlp.artifact import DTYPES, build_artifact
from repmlp.model import fuse_model
from repmlp.utils import quiet_jit

TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} logical cores)"


def run_cli(artifact: str, device: str, batch: int, iters: int, warmup: int) -> Dict[str, float]:
    binary = find_repmlp_infer()
    if binary is None:
        raise RuntimeError("repmlp_infer not found next to the interpreter or on PATH")
    command = [binary, artifact, "--bench", "--json", "--device", device, "--batch", str(batch),
               "--iters", str(iters), "--warmup", str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or f"exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])["bench"]


def make_rows(args: argparse.Namespace, device: torch.device, fused: torch.nn.Module, artifact: str,
              skipped: Dict[str, str]) -> Dict[str, Callable[[np.ndarray, torch.Tensor], Any]]:
    dtype = DTYPES[args.dtype]

    def eager_dev(host: np.ndarray, on_device: torch.Tensor) -> torch.Tensor:
        out = fused(on_device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    rows: Dict[str, Callable[[np.ndarray, torch.Tensor], Any]] = {
        "eager-dev": eager_dev,
        "eager-host": lambda host, on_device: fused(torch.from_numpy(host).to(device, non_blocking=True).to(dtype)).float().cpu(),
    }
    try:
        import repmlp_rt

        runtime = repmlp_rt.Runtime(artifact, device=str(device))
        rows["rt"] = lambda host, on_device: torch.from_numpy(runtime.infer(host))
        rows["rt-dev"] = lambda host, on_device: runtime.infer(on_device)
    except Exception as error:  # not built, or built without CUDA
        skipped["rt"] = why(error)
    return rows


def measure_batch(args: argparse.Namespace, device: torch.device, rows: Dict[str, Callable], batch: int,
                  shape: tuple, artifact: str, skipped: Dict[str, str]) -> List[List[object]]:
    host = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
    on_device = torch.from_numpy(host).to(device).to(DTYPES[args.dtype])
    reference = rows["eager-dev"](host, on_device).float().cpu()
    for name, call in rows.items():
        check_close(f"{name} b{batch}", call(host, on_device).float().cpu(), reference, TOLERANCE[args.dtype])
        for _ in range(args.warmup):
            call(host, on_device)
    calls = {name: (lambda c: lambda: c(host, on_device))(call) for name, call in rows.items()}
    seconds = time_rounds(calls, args.rounds, max(1, args.iters // args.rounds))
    ms = {name: 1e3 * statistics.median(s) for name, s in seconds.items()}
    try:
        ms["cli"] = run_cli(artifact, str(device), batch, args.iters, args.warmup)["p50_ms"]
    except Exception as error:
        skipped["cli"] = why(error)
    base = ms["eager-host"]
    return [[name, batch, f"{v:.3f}", f"{v / batch:.3f}", f"{batch * 1e3 / v:.1f}", f"{base / v:.2f}"] for name, v in ms.items()]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="B224")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--iters", type=int, default=20, help="timed calls per row and batch")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the calls are spread over")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--out", help="append the table to this file instead")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA device")
    if min(args.batches) < 1 or args.iters < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--batches, --iters and --rounds must be >= 1, --warmup >= 0")
    log(f"RepMLPNet GPU bench: {args.arch} {args.dtype} on {device_name(device)}, torch {torch.__version__}")
    model = artifacts.seeded_model(args.arch, 0)
    fused = fuse_model(model).to(device=device, dtype=DTYPES[args.dtype]).eval()
    shape = (model.config.in_channels, *model.config.img_size)
    os.makedirs(CACHE_DIR, exist_ok=True)
    artifact = os.path.join(CACHE_DIR, f"{args.arch}-{args.dtype}-{device.type}.pt")
    with quiet_jit():
        build_artifact(arch=args.arch, checkpoint=artifacts.checkpoint(args.arch, 0), out=artifact, dtype=args.dtype,
                       device=str(device), force=True,
                       progress=lambda line: log("  " + line))
    skipped: Dict[str, str] = {}
    rows = make_rows(args, device, fused, artifact, skipped)
    with torch.inference_mode():
        table = [row for batch in args.batches for row in measure_batch(args, device, rows, batch, shape, artifact, skipped)]
    body = (f"Device: {device_name(device)}. {args.arch}, {args.dtype}, random weights (seed 0, randomized BN "
            f"statistics); medians of {args.iters} calls per cell in {args.rounds} interleaved rounds after "
            f"{args.warmup} warm-up calls.\n\n"
            + markdown_table(["row", "batch", "ms / batch", "ms / image", "images/s", "x vs eager-host"], table)
            + "".join(f"\n\n- skipped {name}: {reason}" for name, reason in skipped.items()))
    print(body)
    if args.write or args.out:
        append_results(f"GPU benchmark, {args.arch} {args.dtype}", command_line("benchmarks.bench_gpu", argv), body,
                       **({"path": args.out} if args.out else {}))
    if skipped and device.type != "cpu":
        # On a GPU the point of the run is the C++ runtime: a skipped row is a failure.
        sys.exit(f"bench_gpu: skipped {', '.join(skipped)} (see above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
