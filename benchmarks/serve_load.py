"""Bounded loopback load test: repmlp-serve's classify endpoint vs direct repmlp_rt calls.

For each artifact: a local Ray starts (once), the artifact is deployed with dynamic batching
(max batch B), and C concurrent clients (aiohttp, 127.0.0.1 only) send N classify requests of
one encoded image each. Reported: requests/s, p50/p99 request latency, the mean batch size the
replica ran (X-Batch-Size). The direct baseline, in the benchmark process with the same thread
count: decode B images from the same bytes and call Runtime.classify on the batch, repeated;
reported as images/s and p50/p99 per batch call. The two alternate in --rounds rounds (3), so
both see the same host load. Everything is bounded: N requests per artifact, a per-request
timeout, and a wall-clock cap per phase.

    repmlp-build --out /tmp/digits.pt
    repmlp-build --arch B224 --out /tmp/b224.pt
    python -m benchmarks.serve_load /tmp/digits.pt /tmp/b224.pt --json results.json

Per artifact size: ``--requests``, ``--concurrency`` and ``--max-batch-size`` default by input
size (digits: 2000 / 64 / 16; 224x224: 96 / 16 / 8).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any

import numpy as np

import repmlp_rt
from benchmarks.harness import ROOT, host_line, loadavg, markdown_table

DIGIT_PNG = os.path.join(ROOT, "examples", "digits", "images")
PHASE_CAP_S = 300.0  # hard wall-clock cap per load phase
REQUEST_TIMEOUT_S = 60.0


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def sample_image(runtime: repmlp_rt.Runtime) -> bytes:
    """The encoded image every request sends: a shipped digit for small inputs, otherwise a
    seeded random 500x375 PNG (the artifact resizes and crops it)."""
    if runtime.input_shape[1] <= 64:
        first = sorted(os.listdir(DIGIT_PNG))[0]
        with open(os.path.join(DIGIT_PNG, first), "rb") as f:
            return f.read()
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def direct_times(runtime: repmlp_rt.Runtime, image: bytes, batch: int, calls: int) -> list[float]:
    """Seconds per call of: decode `batch` images from the request bytes, classify them at once."""
    times = []
    deadline = time.perf_counter() + PHASE_CAP_S
    for _ in range(calls):
        start = time.perf_counter()
        images = np.stack([repmlp_rt.decode_image_bytes(image) for _ in range(batch)])
        runtime.classify(images)
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return times


def direct_summary(times: list[float], batch: int) -> dict[str, Any]:
    p50, p99 = percentiles(times)
    return {"batch": batch, "calls": len(times), "images_per_s": batch * len(times) / sum(times),
            "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3}


def serve_summary(rounds: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    latencies = [x for r in rounds for x in r["latencies"]]
    sizes = [x for r in rounds for x in r["sizes"]]
    p50, p99 = percentiles(latencies)
    return {"requests": len(latencies), "errors": sum(r["errors"] for r in rounds), "concurrency": concurrency,
            "requests_per_s": len(latencies) / sum(r["wall"] for r in rounds),
            "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "mean_batch": float(np.mean(sizes))}


async def load(url: str, image: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    """`concurrency` clients in a closed loop until `requests` answers (or the phase cap)."""
    import aiohttp

    latencies: list[float] = []
    sizes: list[int] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + PHASE_CAP_S

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal issued, errors
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            start = time.perf_counter()
            try:
                async with session.post(url, data=image, headers={"Content-Type": "image/png"}) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                        continue
                    sizes.append(int(response.headers["X-Batch-Size"]))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors += 1
                if errors > requests // 10:  # the server is gone, not slow: stop early
                    raise
                continue
            latencies.append(time.perf_counter() - start)

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "sizes": sizes, "errors": errors, "wall": wall}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def defaults_for(runtime: repmlp_rt.Runtime) -> dict[str, int]:
    small = runtime.input_shape[1] <= 64
    return {"requests": 2000 if small else 96, "concurrency": 64 if small else 16, "max_batch_size": 16 if small else 8}


def measure_artifact(artifact: str, args: argparse.Namespace, port: int) -> dict[str, Any]:
    """Deploys one artifact, then alternates the direct and the Serve phase; one result row."""
    from repmlp_rt import serve as rt_serve

    probe = repmlp_rt.Runtime(artifact, warmup=0)
    d = defaults_for(probe)
    batch = args.max_batch_size or d["max_batch_size"]
    image = sample_image(probe)
    requests = args.requests or d["requests"]
    concurrency = args.concurrency or d["concurrency"]
    runtime = repmlp_rt.Runtime(artifact, threads=args.threads, warmup_batch=batch)
    specs = rt_serve.load_specs([artifact])
    options = rt_serve.ServeOptions(max_batch_size=batch, batch_wait_ms=args.batch_wait_ms,
                                    max_ongoing_requests=args.max_ongoing_requests or max(batch, concurrency),
                                    threads=args.threads, retry_answers=not args.no_retry_answers)
    url = rt_serve.deploy(specs, options, port=port)
    endpoint = f"{url}/v1/models/{specs[0].name}/classify"
    asyncio.run(load(endpoint, image, 2 * batch, batch))  # warm the proxy and the replica
    # Interleaved rounds, so both paths see the same (shared, noisy) host.
    times, rounds = [], []
    for _ in range(args.rounds):
        times += direct_times(runtime, image, batch, max(1, requests // batch // args.rounds))
        rounds.append(asyncio.run(load(endpoint, image, max(1, requests // args.rounds), concurrency)))
    rt_serve.undeploy(specs)
    return {"artifact": os.path.basename(artifact), "input": list(probe.input_shape), "threads": args.threads,
            "max_ongoing_requests": options.max_ongoing_requests,
            "direct": direct_summary(times, batch), "serve": serve_summary(rounds, concurrency)}


def results_table(results: list[dict[str, Any]]) -> str:
    """Direct and Serve rows per artifact; Serve rows give max ongoing requests per replica in brackets."""
    rows = []
    for r in results:
        b, s = r["direct"], r["serve"]
        rows.append([r["artifact"], b["batch"], f"direct `classify` ({b['calls']} calls)", f"{b['images_per_s']:.3g} img/s",
                     f"{b['p50_ms']:.1f} (per call)", f"{b['p99_ms']:.1f}", b["batch"]])
        rows.append([r["artifact"], b["batch"], f"Serve [{r['max_ongoing_requests']}], {s['concurrency']} clients "
                     f"({s['requests']} req, {s['errors']} errors)", f"{s['requests_per_s']:.3g} req/s",
                     f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}", f"{s['mean_batch']:.1f}"])
    return markdown_table(["artifact", "max batch", "path", "rate", "p50 ms", "p99 ms", "mean batch"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of the replica and of the direct runtime")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--requests", type=int, help="requests per artifact (default by input size)")
    p.add_argument("--concurrency", type=int, help="concurrent clients (default by input size)")
    p.add_argument("--max-batch-size", type=int, help="Serve's max batch = the direct batch (default by input size)")
    p.add_argument("--max-ongoing-requests", type=int,
                   help="per replica (default: the concurrency; Serve's own default of 5 caps batches at 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the direct and the Serve phase")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--no-retry-answers", action="store_true",
                   help="serve without repmlp_rt.serve_retry in the proxies (to measure its cost)")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback benchmark: no token under $HOME
    import ray
    from ray import serve

    info = {"host": host_line(), "loadavg": loadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(info), file=sys.stderr)
    results = []
    port = free_port()  # one for the run: Serve's proxy keeps the port it started with
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir:
        ray.init(num_cpus=max(2, args.threads), include_dashboard=False, logging_level="ERROR",
                 _temp_dir=temp_dir, log_to_driver=False)
        try:
            for artifact in args.artifacts:
                results.append(measure_artifact(artifact, args, port))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(results_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
