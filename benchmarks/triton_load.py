"""Side-by-side load test over the Open Inference Protocol: repmlp-serve's /v2 route vs Triton
(Python backend running repmlp_rt), driven by the same tritonclient HTTP code.

For each artifact (digits and B224 by default) and each server in turn (one at a time, so they
never share the CPUs): the server starts on a loopback port, serves the artifact with dynamic
batching (max batch ``--max-batch-size``, ``--threads`` intra-op threads, one replica/instance),
and for each client count (1 / 8 / 32) a fixed number of requests, each one normalized image as
``INPUT__0`` (FP32 binary data), is sent by that many threads, each with its own client.
Reported: requests/s, p50 and p99 request latency, and the mean batch size the server ran
(Triton: its statistics' ``batch_stats``; repmlp-serve: its replica's ``/v1/models/<name>/stats``).

    make triton-server                       # .triton/: tritonserver and numpy 1.x for its stub
    python -m benchmarks.triton_load [--digits digits.pt] [--b224 b224.pt] [--record]

Without ``--digits``/``--b224`` the artifacts are built into a temporary folder (B224 with
seeded random weights). ``--record`` appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
import tritonclient.http as httpclient

import repmlp_rt
from repmlp_rt.oip import ServerProcess
from repmlp_rt.triton import tritonserver_command, write_triton_repository

from .harness import append_results, host_line, markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITONSERVER = os.path.join(ROOT, ".triton", "server", "pytriton", "tritonserver", "bin", "tritonserver")
NUMPY1 = os.path.join(ROOT, ".triton", "numpy1")
RUNTIME_DIR = os.path.dirname(os.path.dirname(os.path.abspath(repmlp_rt.__file__)))
MODEL = "model"
START_TIMEOUT_S = 600


@dataclass
class Settings:
    max_batch_size: int
    threads: int
    clients: list[int]
    folder: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_triton(artifact: str, settings: Settings) -> tuple[ServerProcess, str]:
    repository = tempfile.mkdtemp(prefix="triton-repo-", dir=settings.folder)
    write_triton_repository(artifact, repository, name=MODEL, backend="python", threads=settings.threads,
                            max_batch_size=settings.max_batch_size, python_path=[NUMPY1, RUNTIME_DIR])
    http_port, grpc_port = free_port(), free_port()
    command = tritonserver_command(TRITONSERVER, repository, http_port=http_port, grpc_port=grpc_port,
                                   extra=["--exit-timeout-secs=10"])
    server = ServerProcess(command, f"http://127.0.0.1:{http_port}", os.path.join(repository, "tritonserver.log"))
    return server, f"127.0.0.1:{http_port}"


def start_serve(artifact: str, settings: Settings) -> tuple[ServerProcess, str]:
    port = free_port()
    log = tempfile.mkdtemp(prefix="serve-", dir=settings.folder)
    linked = os.path.join(log, MODEL + os.path.splitext(artifact)[1])  # served under the model name
    os.symlink(os.path.abspath(artifact), linked)
    command = [sys.executable, "-m", "repmlp_rt.serve", linked, "--port", str(port), "--threads",
               str(settings.threads), "--max-batch-size", str(settings.max_batch_size), "--num-cpus",
               str(max(2, settings.threads))]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": log}
    return ServerProcess(command, f"http://127.0.0.1:{port}", os.path.join(log, "serve.log"), env=env), \
        f"127.0.0.1:{port}"


def batch_totals(server: str, url: str) -> tuple[int, int]:
    """(items, executions) the server has run so far."""
    if server == "triton":
        [stats] = httpclient.InferenceServerClient(url).get_inference_statistics(MODEL)["model_stats"]
        pairs = [(int(b["batch_size"]), int(b["compute_infer"]["count"])) for b in stats.get("batch_stats", [])]
        return sum(size * count for size, count in pairs), sum(count for _, count in pairs)
    with urllib.request.urlopen(f"http://{url}/v1/models/{MODEL}/stats", timeout=30) as answer:
        stats = json.load(answer)
    return stats["items"], stats["batches"]


def run_clients(url: str, row: np.ndarray, clients: int, requests: int) -> tuple[float, list[float]]:
    """(wall seconds, per-request seconds) of ``requests`` requests from ``clients`` threads."""
    per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]

    def client_loop(count: int) -> list[float]:
        client = httpclient.InferenceServerClient(url, network_timeout=300, connection_timeout=60)
        given = httpclient.InferInput("INPUT__0", list(row.shape), "FP32")
        given.set_data_from_numpy(row, binary_data=True)
        wanted = [httpclient.InferRequestedOutput("OUTPUT__0", binary_data=True)]
        times = []
        for _ in range(count):
            start = time.perf_counter()
            client.infer(MODEL, [given], outputs=wanted).as_numpy("OUTPUT__0")
            times.append(time.perf_counter() - start)
        client.close()
        return times

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = [t for times in pool.map(client_loop, per_client) for t in times]
    return time.perf_counter() - start, latencies


def measure(server: str, artifact: str, label: str, requests: int, settings: Settings) -> list[list[object]]:
    """The rows of one server on one artifact: one per client count."""
    runtime = repmlp_rt.Runtime(artifact, warmup=0)
    row = np.random.default_rng(0).standard_normal((1, *runtime.input_shape)).astype(np.float32)
    process, url = (start_triton if server == "triton" else start_serve)(artifact, settings)
    rows: list[list[object]] = []
    try:
        process.wait_ready(START_TIMEOUT_S)
        run_clients(url, row, 2, 4)  # warm-up: connections, first calls
        for clients in settings.clients:
            items0, batches0 = batch_totals(server, url)
            wall, latencies = run_clients(url, row, clients, requests)
            items1, batches1 = batch_totals(server, url)
            p50, p99 = np.percentile(latencies, [50, 99]) * 1000
            mean_batch = (items1 - items0) / max(1, batches1 - batches0)
            rows.append([label, server, clients, requests, f"{requests / wall:.1f}", f"{p50:.1f}", f"{p99:.1f}",
                         f"{mean_batch:.2f}"])
            print("| " + " | ".join(map(str, rows[-1])) + " |", flush=True)
    finally:
        process.stop()
    return rows


def build_missing(args: argparse.Namespace, folder: str) -> list[tuple[str, str, int]]:
    """(label, artifact path, requests) for each artifact, building the ones not given."""
    from repmlp.artifact import build_artifact

    chosen = []
    for label, path, arch, requests in (("digits", args.digits, "digits", args.requests),
                                        ("B224", args.b224, "B224", args.b224_requests)):
        if label.lower() in args.skip:
            continue
        if path is None:
            path = os.path.join(folder, f"{label.lower()}.pt")
            print(f"building {label} into {path}", flush=True)
            build_artifact(arch, out=path, seed=5) if arch != "digits" else build_artifact(out=path)
        chosen.append((label, path, requests))
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--digits", help="digits artifact (default: build one)")
    p.add_argument("--b224", help="B224 artifact (default: build one with seeded random weights)")
    p.add_argument("--skip", nargs="*", default=[], choices=["digits", "b224"])
    p.add_argument("--requests", type=int, default=400, help="requests per client count, digits (default 400)")
    p.add_argument("--b224-requests", type=int, default=48, help="requests per client count, B224 (default 48)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the replica / model instance")
    p.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if not os.access(TRITONSERVER, os.X_OK):
        p.error(f"{TRITONSERVER} is missing: run `make triton-server`")
    print(f"host: {host_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="triton-load-") as folder:
        settings = Settings(args.max_batch_size, args.threads, args.clients, folder)
        rows = []
        for label, artifact, requests in build_missing(args, folder):
            for server in ("repmlp-serve", "triton"):
                rows += measure(server, artifact, label, requests, settings)
    table = markdown_table(["model", "server", "clients", "requests", "req/s", "p50 ms", "p99 ms", "mean batch"],
                           rows)
    print(table)
    if args.record:
        command = "python -m benchmarks.triton_load " + " ".join(argv if argv is not None else sys.argv[1:])
        append_results("Triton (Python backend) vs repmlp-serve over the Open Inference Protocol", command,
                       f"max batch {args.max_batch_size}, {args.threads} intra-op thread(s), one instance/replica, "
                       f"one FP32 INPUT__0 image per request (binary data), tritonclient HTTP.\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
