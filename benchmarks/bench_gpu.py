#!/usr/bin/env python
"""RepMLPNet GPU benchmark (issue 8): the C++ runtime against eager PyTorch in reduced precision.

Configurations, same random weights (seed 0, randomized BN statistics), one run, interleaved:

  eager-dev   the fused model in eager PyTorch, input already on the device in the compute
              dtype, logits left there (synchronized): the compute-only reference
  eager-host  the same from a float32 host batch to float32 host logits (copies included)
  rt          the artifact through the C++ runtime (repmlp_rt), float32 host batch in, float32
              host logits out: pinned staging, its own stream, the cast on the device
  cli         `repmlp_infer --bench --device DEV` (one process per batch size; its p50)

The artifact is built for the device and dtype by repmlp.build_artifact (which verifies it
there); every configuration's logits are checked against eager-dev before timing.

  .venv/bin/python benchmarks/bench_gpu.py                                  # cuda, float16, batch 1 and 64
  .venv/bin/python benchmarks/bench_gpu.py --device cpu --dtype bfloat16 --arch T224 \\
      --batches 1 2 --iters 2 --no-write                                     # CPU smoke run
Results go to RESULTS.md between the bench-gpu markers (with the device's name).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from locate import find_repmlp_infer  # noqa: E402

from repmlp.artifact import DTYPES, build_artifact  # noqa: E402
from repmlp.model import create_model, fuse_model  # noqa: E402
from repmlp.utils import randomize_model_  # noqa: E402

BEGIN, END = "<!-- bench-gpu:begin -->", "<!-- bench-gpu:end -->"
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}


def log(message: str) -> None:
    print(message, flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} logical cores)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="B224")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--iters", type=int, default=20, help="timed calls per configuration and batch")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the iterations are spread over")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cache-dir", default=os.path.join(HERE, ".cache"))
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA device")
    if min(args.batches) < 1 or args.iters < 1 or args.rounds < 1:
        parser.error("--batches, --iters and --rounds must be >= 1")
    dtype = DTYPES[args.dtype]
    started = time.time()
    log(f"RepMLPNet GPU bench: {args.arch} {args.dtype} on {device_name(device)}, torch {torch.__version__}")

    torch.manual_seed(0)
    model = create_model(args.arch)
    randomize_model_(model, seed=0)
    fused = fuse_model(model).to(device=device, dtype=dtype).eval()
    shape = (model.config.in_channels, *model.config.img_size)

    os.makedirs(args.cache_dir, exist_ok=True)
    artifact = os.path.join(args.cache_dir, f"{args.arch}-{args.dtype}-{device.type}.pt")
    log(f"building {artifact} (verified on {device})")
    build_artifact(args.arch, out=artifact, dtype=args.dtype, device=str(device), force=True, seed=0,
                   progress=lambda line: log("  " + line))

    configs: Dict[str, Callable[[np.ndarray, torch.Tensor], torch.Tensor]] = {}

    def eager_dev(host: np.ndarray, on_device: torch.Tensor) -> torch.Tensor:
        out = fused(on_device)
        synchronize(device)
        return out

    def eager_host(host: np.ndarray, on_device: torch.Tensor) -> torch.Tensor:
        x = torch.from_numpy(host).to(device, non_blocking=True).to(dtype)
        return fused(x).float().cpu()

    configs["eager-dev"] = eager_dev
    configs["eager-host"] = eager_host
    skipped: Dict[str, str] = {}
    try:
        import repmlp_rt

        runtime = repmlp_rt.Runtime(artifact, device=str(device))
        configs["rt"] = lambda host, on_device: torch.from_numpy(runtime.infer(host))
        # a tensor already on the GPU goes in through DLPack, read in place
        configs["rt-dev"] = lambda host, on_device: runtime.infer(on_device)
    except Exception as error:  # not built, or built without CUDA
        skipped["rt"] = f"{type(error).__name__}: {error}"

    rows: List[Dict[str, object]] = []
    with torch.inference_mode():
        for batch in args.batches:
            rng = np.random.default_rng(batch)
            host = rng.standard_normal((batch, *shape), dtype=np.float32)
            on_device = torch.from_numpy(host).to(device).to(dtype)
            reference = eager_dev(host, on_device)
            for name, call in configs.items():
                err = relative_error(call(host, on_device), reference)
                if not err <= TOLERANCE[args.dtype]:
                    raise SystemExit(f"{name} at batch {batch}: relative error {err:.2e} > {TOLERANCE[args.dtype]:.0e}")
                log(f"  check {name} b{batch}: max|diff|/max|logit| {err:.1e}")
                for _ in range(args.warmup):
                    call(host, on_device)
            times: Dict[str, List[float]] = {name: [] for name in configs}
            per_round = max(1, args.iters // args.rounds)
            for _ in range(args.rounds):
                for name, call in configs.items():
                    for _ in range(per_round):
                        start = time.perf_counter()
                        call(host, on_device)
                        times[name].append(time.perf_counter() - start)
            for name, samples in times.items():
                ms = statistics.median(samples) * 1e3
                rows.append({"config": name, "batch": batch, "ms_per_batch": ms, "ms_per_image": ms / batch,
                             "images_per_s": batch * 1e3 / ms, "n": len(samples)})
                log(f"  b{batch} {name:10s} {ms:9.3f} ms/batch  {batch * 1e3 / ms:9.1f} images/s")
            try:
                bench = run_cli(artifact, str(device), batch, args.iters, args.warmup)
                rows.append({"config": "cli", "batch": batch, "ms_per_batch": bench["p50_ms"],
                             "ms_per_image": bench["p50_ms"] / batch, "images_per_s": batch * 1e3 / bench["p50_ms"],
                             "n": args.iters, "first_call_ms": bench["first_call_ms"], "load_ms": bench["load_ms"]})
                log(f"  b{batch} cli        {bench['p50_ms']:9.3f} ms/batch (p50), load {bench['load_ms']:.0f} ms, "
                    f"first call {bench['first_call_ms']:.1f} ms")
            except Exception as error:
                skipped["cli"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"

    lines = [
        BEGIN,
        "## GPU run (generated by benchmarks/bench_gpu.py)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; wall time {(time.time() - started) / 60:.1f} min",
        f"- command: `{' '.join([os.path.relpath(sys.executable, ROOT)] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}`",
        f"- device: {device_name(device)}; torch {torch.__version__}",
        f"- model: {args.arch}, {args.dtype}, random weights (seed 0, randomized BN stats); medians of "
        f"{args.iters} calls per cell in {args.rounds} interleaved rounds after {args.warmup} warm-up calls",
        "",
        "| config | batch | ms / batch | ms / image | images/s | x vs eager-host |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["config"] == "eager-host")
        speedup = float(base["ms_per_batch"]) / float(row["ms_per_batch"])
        lines.append(f"| {row['config']} | {row['batch']} | {row['ms_per_batch']:.3f} | {row['ms_per_image']:.3f} | "
                     f"{row['images_per_s']:.1f} | {speedup:.2f} |")
    for name, why in skipped.items():
        lines.append(f"\n- skipped {name}: {why}")
    lines.append(END)
    section = "\n".join(lines) + "\n"
    print(section)
    if args.no_write:
        return
    text = open(args.out).read() if os.path.exists(args.out) else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(args.out + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(args.out + ".tmp", args.out)
    log(f"wrote {args.out}")
    if skipped and args.device != "cpu":
        # On a GPU the point of the run is the C++ runtime: a skipped contender is a failure.
        sys.exit(f"bench_gpu: skipped {', '.join(skipped)} (see above)")


if __name__ == "__main__":
    main()
