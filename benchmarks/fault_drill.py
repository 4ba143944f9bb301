"""Fault drill for repmlp-serve and repmlp-classify on a local multi-node Ray cluster.

    python -m benchmarks.fault_drill [--artifact digits.pt] [--clients 8] [--seconds 12] [--scenarios ...]

A head (no CPUs: it runs Ray's and Serve's control actors and the HTTP proxy) and two worker
nodes (one logical CPU and a custom resource ``node_<name>`` each) on 127.0.0.1, started with
``ray.cluster_utils.Cluster``. Under a steady load of HTTP clients it injects the faults a
serving system meets: a worker node killed (and a fresh one joining), a rolling update, an
update whose artifact fails its self-check, SIGTERM, the node of a model's only replica killed
while no other node has room for it, a burst past the queue bound; then a
``repmlp-classify`` job that loses a node mid-job. Prints one table. The scenarios are plain
functions returning their counts; tests/test_cluster_faults.py runs them and asserts them.

Every request carries its own ``X-Request-ID``; the server runs with ``--access-log``, so each
replica logs ``started`` with that id when it takes a request, into its Serve log file (all
nodes here share one session folder). At a node kill the drill reads the killed replica's
file: the requests in flight on that node when it died are those it started and never
answered (no 200 carrying its ``X-Served-By``).
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import repmlp_rt
from repmlp_rt.oip import terminate_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGIT_PNGS = sorted(glob.glob(os.path.join(ROOT, "examples", "digits", "images", "*.png")))
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray then resolves 127.0.0.1 in an address to the loopback
# address, not to the host's outward one, so every node, driver and server stays on 127.0.0.1.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# A node counts as dead after 3 missed health checks 0.5 s apart (Ray's defaults: 5 x 3 s).
HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
MODEL = "digits"
INDEX_APP = "repmlp-index"  # repmlp_rt.serve.INDEX_APP (imported there with Ray Serve)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A Ray head and worker nodes on 127.0.0.1; every process is stopped by its id."""

    def __init__(self, workers: int = 2, worker_cpus: int = 1, temp_dir: str | None = None) -> None:
        from ray._common.utils import get_default_ray_temp_dir
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        self.saved = ({key: os.environ.get(key) for key in RAY_ENV}, ray_constants.ENABLE_RAY_CLUSTER)
        os.environ.update(RAY_ENV)
        ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time; this process imported Ray already
        self.worker_cpus = worker_cpus
        # Cluster.add_node records the head's address in Ray's default folder (/tmp/ray), which a
        # fresh host lacks.
        os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
        self.count = 0
        head = {"num_cpus": 0, "resources": {"node_head": 1}, "include_dashboard": False,
                "node_ip_address": "127.0.0.1", "_system_config": HEALTH_CHECKS}
        self.node_args = {"node_ip_address": "127.0.0.1", **({"temp_dir": temp_dir} if temp_dir else {})}
        head.update(self.node_args)
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        self.workers: dict[str, Any] = {}
        for _ in range(workers):
            self.add_worker()
        self.cluster.wait_for_nodes()
        self.address = self.cluster.address
        self.session_dir = self.cluster.head_node.get_session_dir_path()

    def add_worker(self) -> str:
        self.count += 1
        name = f"w{self.count}"
        self.workers[name] = self.cluster.add_node(num_cpus=self.worker_cpus, resources={f"node_{name}": 1},
                                                   **self.node_args)
        return name

    def node_names(self) -> dict[str, str]:
        """Ray node id -> worker name (``head``, ``w1``, ...) from each node's custom resource."""
        import ray

        names = {}
        for node in ray.nodes():
            if node["Alive"]:
                names[node["NodeID"]] = next((key[5:] for key in node["Resources"] if key.startswith("node_")), "?")
        return names

    def kill(self, name: str) -> None:
        """SIGKILL of every process of worker ``name`` (its raylet and the workers it started)."""
        self.cluster.remove_node(self.workers.pop(name), allow_graceful=False)

    def shutdown(self) -> None:
        """Stops every node's processes (by id), then restores this process's Ray settings."""
        from ray._private import ray_constants

        self.cluster.shutdown()
        environment, ray_constants.ENABLE_RAY_CLUSTER = self.saved
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Record:
    start: float
    end: float
    status: int  # 0: no HTTP answer (connection error or client time-out)
    version: str = ""
    answer: Any = None
    error: str = ""
    request_id: str = ""
    served_by: str = ""  # X-Served-By: "<node id>/<replica id>"
    retry_after: str = ""
    reason: str = ""  # a 503's JSON "reason"
    answered_by: str = ""  # a retry answer's X-Retry-Answered-By: proxy or index


@dataclass
class Load:
    """``clients`` threads posting one PNG each to the classify route until ``stop``; with
    ``route="v2"``, one Open Inference Protocol infer request each (a JSON ``INPUT__0`` of
    zeros, shaped from the model's v2 metadata) instead. ``honor_retry_after``: after a 503
    with ``Retry-After``, a client waits that long (at most 5 s) before its next request, as
    docs/SERVING.md tells clients to. Request ids are ``<prefix><client>-<n>``."""

    url: str
    clients: int = 8
    timeout_s: float = 30.0
    route: str = "classify"
    honor_retry_after: bool = False
    prefix: str = "c"
    records: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.host, port = self.url.split("//")[1].split(":")
        self.port = int(port)
        if self.route == "v2":
            self.path, self.content_type = f"/v2/models/{MODEL}/infer", "application/json"
            self.images = [v2_zeros_body(self.host, self.port)]
        elif self.route == "classify":
            self.path, self.content_type = f"/v1/models/{MODEL}/classify", "image/png"
            self.images = [open(path, "rb").read() for path in DIGIT_PNGS]
        else:
            raise ValueError(f"route must be classify or v2, got {self.route!r}")
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]

    def start(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> list[Record]:
        self.done.set()
        for thread in self.threads:
            thread.join(self.timeout_s + 5)
        return sorted(self.records, key=lambda r: r.start)

    def _client(self, index: int) -> None:
        connection, i, sent = None, index, 0
        while not self.done.is_set():
            image = i % len(self.images)
            i += self.clients
            sent += 1
            connection = connection or http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            record = send(connection, self.path, self.images[image], f"{self.prefix}{index}-{sent}",
                          self.content_type)
            record.answer = (image, record.answer)
            self.records.append(record)
            if record.status == 0:
                connection.close()
                connection = None
                time.sleep(0.05)
            elif record.status == 503 and self.honor_retry_after and record.retry_after.isdigit():
                self.done.wait(min(5, int(record.retry_after)))


def v2_zeros_body(host: str, port: int) -> bytes:
    """A v2 infer request of one ``INPUT__0`` row of zeros, shaped from ``GET /v2/models/<MODEL>``."""
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("GET", f"/v2/models/{MODEL}")
    response = connection.getresponse()
    metadata = json.loads(response.read())
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"GET /v2/models/{MODEL}: {response.status} {metadata}")
    dims = next(spec["shape"][1:] for spec in metadata["inputs"] if spec["name"] == "INPUT__0")
    tensor = {"name": "INPUT__0", "datatype": "FP32", "shape": [1, *dims], "data": [0.0] * math.prod(dims)}
    return json.dumps({"inputs": [tensor]}).encode()


def send(connection: http.client.HTTPConnection, path: str, body: bytes, request_id: str = "",
         content_type: str = "image/png") -> Record:
    start = time.monotonic()
    headers = {"Content-Type": content_type, **({"X-Request-ID": request_id} if request_id else {})}
    try:
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as error:
        return Record(start, time.monotonic(), 0, error=f"{type(error).__name__}: {error}", request_id=request_id)
    record = Record(start, time.monotonic(), response.status, response.getheader("X-Model-Version") or "",
                    request_id=request_id, served_by=response.getheader("X-Served-By") or "",
                    retry_after=response.getheader("Retry-After") or "",
                    answered_by=response.getheader("X-Retry-Answered-By") or "")
    if response.status == 200:
        record.answer = json.loads(data)
    else:
        record.error = f"{response.getheader('Retry-After')}|{data[:200]!r}"
        try:
            record.reason = json.loads(data).get("reason", "")
        except (ValueError, AttributeError):
            pass
    return record


class ServeProcess:
    """``repmlp-serve`` on the cluster, in its own process; stopped by its id."""

    def __init__(self, address: str, artifact: str, *extra: str) -> None:
        # Serve runs one HTTP proxy per cluster: a later server on the same cluster answers at
        # the first one's address, which it prints (read by wait_ready).
        self.port = free_port()
        self.url = ""
        self.log = tempfile.TemporaryFile()
        args = [artifact, "--name", MODEL, "--address", address, "--port", str(self.port),
                "--proxy-location", "HeadOnly", *extra]
        self.process = subprocess.Popen(serve_command(*args), stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **RAY_ENV})
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"repmlp-serve exited with {self.process.returncode}: {self.output()}")
            serving = re.search(r"repmlp-serve: serving \S+ at http://127\.0\.0\.1:(\d+)/v1/models", self.output())
            if serving is None:
                time.sleep(0.5)
                continue
            self.port = int(serving.group(1))
            self.url = f"http://127.0.0.1:{self.port}"
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", f"/v1/models/{MODEL}")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"repmlp-serve not ready after {timeout_s} s: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-20000:]

    def terminate(self, timeout_s: float = 120.0) -> float:
        """SIGTERM; seconds until the process exited (SIGKILL past ``timeout_s``)."""
        return terminate_process(self.process, timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "repmlp_rt.serve", *args]


def expected_answers(artifact: str) -> list[list[tuple[int, float]]]:
    """(index, score) top-5 of each shipped PNG, from the runtime itself (no Ray)."""
    runtime = repmlp_rt.Runtime(artifact, warmup=0)
    answers = []
    for path in DIGIT_PNGS:
        scores, indices = runtime.classify(repmlp_rt.decode_image(path)[None], min(5, runtime.num_classes))
        answers.append([(int(i), float(s)) for s, i in zip(scores[0], indices[0])])
    return answers


def same_answer(answer: dict[str, Any], expected: list[tuple[int, float]], rtol: float = 1e-4) -> bool:
    got = [(t["index"], t["score"]) for t in answer["topk"]]
    return [i for i, _ in got] == [i for i, _ in expected] and all(
        math.isclose(s, e, rel_tol=rtol, abs_tol=1e-6) for (_, s), (_, e) in zip(got, expected))


def replica_placement(cluster: LocalCluster, app: str = MODEL, deployment: str = "model") -> dict[str, list[str]]:
    """Worker name -> ids of the live replicas of ``app`` there (from the actors' node ids)."""
    import ray

    names = cluster.node_names()
    placement: dict[str, list[str]] = {}
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if not actor["name"].startswith(prefix):
            continue
        handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
        node = ray.get(handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=30)
        placement.setdefault(names.get(node, "?"), []).append(actor["name"][len(prefix):])
    return placement


def replica_nodes(cluster: LocalCluster, app: str = MODEL, deployment: str = "model") -> dict[str, int]:
    """Worker name -> live replicas of ``app`` there."""
    return {name: len(ids) for name, ids in replica_placement(cluster, app, deployment).items()}


STARTED_LINE = re.compile(r" (\S+) -- started ")


def started_requests(session_dir: str, replica_ids: list[str], app: str = MODEL) -> set[str]:
    """The request ids the replicas ``replica_ids`` logged as started (``--access-log``), from
    their Serve log files under the session folder, which outlive a killed node's processes."""
    started: set[str] = set()
    for replica in replica_ids:
        for path in glob.glob(os.path.join(session_dir, "logs", "serve", f"replica_{app}_model_{replica}*.log")):
            with open(path, encoding="utf-8", errors="replace") as file:
                started.update(match.group(1) for match in map(STARTED_LINE.search, file) if match)
    return started


def running_replicas(app: str = MODEL) -> int:
    return sum(1 for state in replica_states(app).values() if state == "RUNNING")


def replica_states(app: str = MODEL, deployment: str = "model") -> dict[str, str]:
    """Replica id -> state (``RUNNING``, ``STARTING``, ...) of ``app``, as Serve's controller
    reports them."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details = ray.get(controller.get_serve_instance_details.remote(), timeout=30)
    deployments = ((details.get("applications") or {}).get(app) or {}).get("deployments") or {}
    return {replica["replica_id"]: replica["state"] for replica in (deployments.get(deployment) or {}).get("replicas") or []}


def wait_replaced(lost: set[str], count: int, since: float, timeout_s: float = 120.0) -> tuple[float, float]:
    """Waits until ``count`` replicas other than ``lost`` run. The controller goes on reporting
    a lost replica RUNNING until Ray has declared its node dead and the controller has checked
    it, so a running count alone would read "recovered" before the loss was even seen. Returns
    (seconds after ``since`` at which none of ``lost`` was running any more, at which ``count``
    others ran), math.inf for a moment not reached."""
    noticed = math.inf
    while time.monotonic() - since < timeout_s:
        running = {replica for replica, state in replica_states().items() if state == "RUNNING"}
        now = time.monotonic() - since
        if noticed == math.inf and not running & lost:
            noticed = now
        if len(running - lost) >= count:
            return min(noticed, now), now
        time.sleep(0.2)
    return noticed, math.inf


def node_loss(cluster: LocalCluster, url: str, clients: int, seconds: float) -> dict[str, Any]:
    """Load; kill a worker holding a replica; a fresh worker joins; load until ``seconds``
    after the replica is re-created. Failures are split at the recovery time; the requests in
    flight on the killed node are those its replica logged as started (the server must run with
    ``--access-log``) and never answered (no 200 with its ``X-Served-By``)."""
    replicas = replica_placement(cluster)
    placement = {name: len(ids) for name, ids in replicas.items()}
    victim = sorted(name for name in placement if name != "head")[0]
    load = Load(url, clients).start()
    time.sleep(seconds / 3)
    killed = time.monotonic()
    cluster.kill(victim)
    kill_done = time.monotonic()  # its raylet got SIGKILL in [killed, kill_done]
    cluster.add_worker()
    joined = time.monotonic()
    noticed_s, recovery_s = wait_replaced(set(replicas[victim]), sum(placement.values()), killed)
    recovered = killed + recovery_s
    time.sleep(seconds)
    records = load.stop()
    failed = [r for r in records if r.status != 200]
    started = started_requests(cluster.session_dir, replicas[victim])
    victim_ids = tuple("/" + replica for replica in replicas[victim])  # X-Served-By ends with one of them
    # The node's worker processes outlive its raylet by up to a second or so (they exit once they
    # see it gone) and may take requests meanwhile: in flight there at its death = taken by its
    # replica and never answered by it. Only the load's own requests count (not, say, the
    # server's readiness probe, which sent no X-Request-ID).
    answered_there = [r for r in records if r.status == 200 and r.served_by.endswith(victim_ids)]
    on_victim = (started & {r.request_id for r in records}) - {r.request_id for r in answered_there}
    return {"fault": f"worker node {victim} killed (SIGKILL), a new node joins", "placement": placement,
            "replica_ids": replicas, "after": replica_nodes(cluster), "requests": len(records),
            "index_after": replica_nodes(cluster, INDEX_APP, "index"),
            "in_flight_at_kill": sum(1 for r in records if r.start <= kill_done and r.end > killed),
            "kill_s": kill_done - killed, "join_s": joined - killed, "loss_seen_s": noticed_s,
            "last_ok_from_killed_node_s": max((r.end - killed for r in answered_there), default=-math.inf),
            "in_flight_on_killed_node": len(on_victim), "started_on_killed_node": len(started),
            "in_flight_there_ids": sorted(on_victim),
            "failed_during": sum(1 for r in failed if r.start < recovered),
            "failed_after": sum(1 for r in failed if r.start >= recovered),
            "failed_not_in_flight_there": sorted(r.request_id for r in failed if r.request_id not in on_victim),
            "failed_without_retry_after": sum(1 for r in failed if r.status != 503 or not r.retry_after.isdigit()),
            "failure_reasons": sorted({r.reason for r in failed}),
            "failures_answered_by": sorted({r.answered_by for r in failed}),
            "served_by_killed_node": len(answered_there), "recovery_s": recovery_s,
            "errors": sorted({(r.status, r.error[:80]) for r in failed})[:5],
            # Each failed request: id, status, reason, X-Served-By, sent and answered (seconds
            # after the kill), whether the killed replica logged it as started, the body's start.
            "failed_requests": [(r.request_id, r.status, r.reason, r.served_by, round(r.start - killed, 3),
                                 round(r.end - killed, 3), r.request_id in started, r.error[:120])
                                for r in failed][:20]}


# The bounds no_replica documents and the tests assert. A request sent once the proxy knows
# the model has no running replica (it reads the controller every 0.5 s; one second after the
# controller reports none) is refused at once, from the proxy's own view: REFUSED_AT_ONCE_S.
# A request waiting when the node died (or sent before anyone knew) is answered 503 once Ray
# has declared the node dead (3 missed checks 0.5 s apart here) and Serve's controller has
# checked the replica (every 2 s) and the proxy has read that (0.5 s): about 4 s, with the
# killed node's worker processes lingering about a second; WAIT_BOUND_S leaves room for a
# loaded two-core host and stays far below the clients' 30 s time-out.
KNOWN_DOWN_MARGIN_S = 1.0
REFUSED_AT_ONCE_S = 1.0
WAIT_BOUND_S = 10.0


def hold_workers(cluster: LocalCluster, names: list[str]) -> list[Any]:
    """One placeholder actor holding all the logical CPUs of each worker in ``names`` (pinned by
    the node's custom resource), so no replica can start there; ``ray.kill`` them to free it."""
    import ray

    @ray.remote
    class Placeholder:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    actors = [Placeholder.options(num_cpus=cluster.worker_cpus, resources={f"node_{name}": 1}).remote()
              for name in names]
    ray.get([actor.node.remote() for actor in actors], timeout=120)
    return actors


def no_replica(cluster: LocalCluster, url: str, clients: int, seconds: float, v2_clients: int = 2,
               refusing_s: float = 3.0) -> dict[str, Any]:
    """A model served by one replica (``--replicas 1 --access-log``) loses it: the worker
    holding it is killed while every other worker's CPUs are held by placeholder actors, so
    Serve has nowhere to re-create it; ``refusing_s`` after the controller reports no replica
    running, a fresh worker joins and the replica starts there. Under load: ``clients`` on
    ``/v1/.../classify`` and ``v2_clients`` on ``/v2/models/<name>/infer`` (through the index
    application), all honouring ``Retry-After``. Each failure is classed by when it was sent:
    before the proxy could know (waiting at the kill: ``replica_lost`` or ``no_replica_ready``
    within ``WAIT_BOUND_S``), or after (``no_replica_ready`` within ``REFUSED_AT_ONCE_S``).
    Recovery: the first 200 to a request sent after the new worker joined."""
    replicas = replica_placement(cluster)
    if sum(map(len, replicas.values())) != 1:
        raise RuntimeError(f"expected a model with one replica, got {replicas}")
    victim = next(iter(replicas))
    index_before = replica_nodes(cluster, INDEX_APP, "index")
    timeline, records, v2_records, after = _lose_the_only_replica(
        cluster, url, victim, clients, seconds, v2_clients, refusing_s)
    return _no_replica_summary(cluster, replicas, victim, index_before, after, records, v2_records, **timeline)


def _lose_the_only_replica(cluster: LocalCluster, url: str, victim: str, clients: int, seconds: float,
                           v2_clients: int, refusing_s: float) -> tuple[dict[str, float], list, list, Any]:
    """``no_replica``'s fault under load: its moments (monotonic seconds), the requests of both
    routes, and the placement after it."""
    import ray

    blockers = hold_workers(cluster, sorted(name for name in cluster.workers if name != victim))
    load = Load(url, clients, honor_retry_after=True).start()
    v2 = Load(url, v2_clients, route="v2", honor_retry_after=True, prefix="v").start()
    try:
        time.sleep(seconds / 3)
        killed = time.monotonic()
        cluster.kill(victim)
        kill_done = time.monotonic()
        while running_replicas() > 0 and time.monotonic() - killed < 60:
            time.sleep(0.1)
        down = time.monotonic()  # the controller reports no running replica
        time.sleep(refusing_s)
        joined = time.monotonic()
        cluster.add_worker()
        while running_replicas() < 1 and time.monotonic() - joined < 120:
            time.sleep(0.2)
        running = time.monotonic()
        time.sleep(seconds / 2)
    finally:
        records, v2_records = load.stop(), v2.stop()
        after = replica_nodes(cluster)
        for actor in blockers:
            ray.kill(actor)
    deadline = time.monotonic() + 30  # the placeholders' CPUs free again, for the next scenario
    while ray.available_resources().get("CPU", 0) < len(blockers) * cluster.worker_cpus and time.monotonic() < deadline:
        time.sleep(0.2)
    timeline = {"killed": killed, "kill_done": kill_done, "down": down, "joined": joined, "running": running}
    return timeline, records, v2_records, after


def _no_replica_summary(cluster: LocalCluster, replicas: dict, victim: str, index_before: Any, after: Any,
                        records: list, v2_records: list, *, killed: float, kill_done: float, down: float,
                        joined: float, running: float) -> dict[str, Any]:
    """``no_replica``'s counts from its requests and moments."""
    both = [("v1", r) for r in records] + [("v2", r) for r in v2_records]
    ok_after_join = [r.end for _, r in both if r.status == 200 and r.start >= joined]
    recovered = min(ok_after_join, default=math.inf)
    known = down + KNOWN_DOWN_MARGIN_S
    failed = [(route, r) for route, r in both if r.status != 200]
    during = [(route, r) for route, r in failed if r.start < recovered]
    # In flight at the kill or sent before the proxy could know, whatever their answer.
    waiting = [r for _, r in both if r.start < known and r.end > killed]
    refused = [r for _, r in during if r.start >= known]
    # Sent while no replica could exist (the new worker had not joined): all must be refused.
    while_down = [r for _, r in both if known <= r.start < joined]
    started = started_requests(cluster.session_dir, replicas[victim])
    victim_id = "/" + replicas[victim][0]  # X-Served-By ends with it
    answered_there = {r.request_id for r in records if r.status == 200 and r.served_by.endswith(victim_id)}
    on_victim = started - answered_there
    lost = [(route, r) for route, r in failed if r.reason == "replica_lost"]

    def counts(route: str) -> dict[str, Any]:
        mine = [r for name, r in both if name == route]
        bad = [r for r in mine if r.status != 200]
        return {"requests": len(mine), "ok_before_kill": sum(1 for r in mine if r.status == 200 and r.end < killed),
                "ok_after_recovery": sum(1 for r in mine if r.status == 200 and r.start >= recovered),
                "failed": len(bad), "reasons": sorted({r.reason for r in bad}),
                "answered_by": sorted({r.answered_by for r in bad}),
                "not_503_retry_after": sum(1 for r in bad if r.status != 503 or not r.retry_after.isdigit()),
                "statuses": sorted({r.status for r in bad})}

    return {"fault": f"worker node {victim} with the only replica killed, no room elsewhere until a new node joins",
            "single_replica": {name: len(ids) for name, ids in replicas.items()}, "after": after,
            "index_before": index_before, "requests": len(both), "v1": counts("v1"), "v2": counts("v2"),
            "kill_s": kill_done - killed, "down_s": down - killed, "refusing_s": joined - down,
            "replica_start_s": running - joined, "recovery_s": recovered - killed,
            "first_ok_after_running_s": recovered - running,
            "failed_during": len(during), "failed_after": sum(1 for _, r in failed if r.start >= recovered),
            "no_replica_ready": sum(1 for _, r in failed if r.reason == "no_replica_ready"),
            "replica_lost": len(lost),
            "replica_lost_v1_started_there": sum(1 for route, r in lost if route == "v1" and r.request_id in on_victim),
            "in_flight_on_killed_node": len(on_victim),
            "refused_at_once": len(refused), "refused_at_once_other_reason": sum(1 for r in refused
                                                                                 if r.reason != "no_replica_ready"),
            "slowest_refusal_s": max((r.end - r.start for r in refused), default=0.0),
            "sent_while_down": len(while_down),
            "while_down_not_refused": sum(1 for r in while_down if r.reason != "no_replica_ready"),
            "waiting_at_kill": len(waiting), "waiting_at_kill_failed": sum(1 for r in waiting if r.status != 200),
            "slowest_wait_after_kill_s": max((r.end - max(r.start, killed) for r in waiting), default=0.0),
            "refused_after_running": sum(1 for r in refused if r.start >= running),
            "no_answer": sum(1 for _, r in both if r.status == 0),
            "failure_reasons": sorted({r.reason for _, r in failed}),
            "failed_without_retry_after": sum(1 for _, r in failed if r.status != 503 or not r.retry_after.isdigit()),
            "errors": sorted({(r.status, r.error[:80]) for _, r in failed})[:5],
            "failed_requests": [(r.request_id, r.status, r.reason, round(r.start - killed, 3), round(r.end - killed, 3))
                                for _, r in failed if r.start < known][:20]}


def rolling_update(address: str, url: str, new_artifact: str, answers: dict[str, list], clients: int,
                   seconds: float) -> dict[str, Any]:
    """Load; ``repmlp-serve NEW --update``; load on. Every answer must be exactly one known
    version's answer; after the command returns, only the new version's."""
    load = Load(url, clients).start()
    time.sleep(seconds / 2)
    started = time.monotonic()
    result = subprocess.run(serve_command(new_artifact, "--name", MODEL, "--address", address, "--update",
                                          "--replicas", "2", "--max-replicas-per-node", "1"),
                            capture_output=True, text=True, timeout=300, env={**os.environ, **RAY_ENV})
    swapped = time.monotonic()
    time.sleep(seconds / 2)
    records = load.stop()
    new = repmlp_rt_version(new_artifact)
    ok = [r for r in records if r.status == 200]
    return {"fault": "rolling update to a new artifact", "update_rc": result.returncode,
            "update_output": result.stderr[-2000:], "requests": len(records),
            "failed": len(records) - len(ok), "update_s": swapped - started,
            "wrong_answers": sum(1 for r in ok if r.version not in answers
                                 or not same_answer(r.answer[1], answers[r.version][r.answer[0]])),
            "old_after_swap": sum(1 for r in ok if r.start > swapped and r.version != new),
            "versions": sorted({r.version for r in ok})}


def repmlp_rt_version(path: str) -> str:
    from repmlp_rt.serve import file_version

    return file_version(path)


def refused_update(address: str, url: str, bad_artifact: str, clients: int, seconds: float) -> dict[str, Any]:
    """An update whose artifact fails its self-check: refused before anything is deployed."""
    load = Load(url, clients).start()
    result = subprocess.run(serve_command(bad_artifact, "--name", MODEL, "--address", address, "--update"),
                            capture_output=True, text=True, timeout=300, env={**os.environ, **RAY_ENV})
    time.sleep(seconds)
    records = load.stop()
    return {"fault": "update with an artifact failing its self-check", "update_rc": result.returncode,
            "update_output": result.stderr[-1000:], "requests": len(records),
            "failed": sum(1 for r in records if r.status != 200), "versions": sorted({r.version for r in records})}


def overload(url: str, queued: int, capacity: int, factor: int = 10) -> dict[str, Any]:
    """A burst of ``factor`` x ``queued`` concurrent requests at once, then a few more. The
    excess must be 503 with Retry-After, fast; nothing may time out."""
    burst = factor * queued
    barrier = threading.Barrier(burst)
    records: list[Record] = []
    host, port = url.split("//")[1].split(":")
    image = open(DIGIT_PNGS[0], "rb").read()

    def one() -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.connect()
        barrier.wait()
        records.append(send(connection, f"/v1/models/{MODEL}/classify", image))
        connection.close()

    threads = [threading.Thread(target=one) for _ in range(burst)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    after = [send(connection, f"/v1/models/{MODEL}/classify", image) for _ in range(5)]
    refused = [r for r in records if r.status == 503]
    served = sorted(r.end - r.start for r in records if r.status == 200)
    return {"fault": f"burst of {burst} concurrent requests (queue bound {queued})", "requests": burst + len(after),
            "ok": len(served), "refused_503": len(refused), "capacity": capacity + queued,
            "refused_with_retry_after": sum(1 for r in refused if not r.error.startswith("None|")),
            "other_failures": sum(1 for r in records if r.status not in (200, 503)),
            "slowest_503_s": max((r.end - r.start for r in refused), default=0.0),
            "p99_ok_s": served[min(len(served) - 1, int(0.99 * len(served)))] if served else math.nan,
            "failed_after": sum(1 for r in after if r.status != 200)}


def graceful_stop(server: ServeProcess, clients: int, seconds: float) -> dict[str, Any]:
    """SIGTERM under load: the requests already sent must be answered; seconds to exit."""
    load = Load(server.url, clients).start()
    time.sleep(seconds)
    signalled = time.monotonic()
    exit_s = server.terminate()
    records = load.stop()
    before = [r for r in records if r.start < signalled]
    return {"fault": "SIGTERM to repmlp-serve under load", "requests": len(before), "exit_s": exit_s,
            "refused_after_signal": sum(1 for r in records if r.start >= signalled and r.status != 200),
            "rc": server.process.returncode, "in_flight_at_signal": sum(1 for r in before if r.end > signalled),
            "failed_before_signal": sum(1 for r in before if r.status != 200),
            "errors": sorted({(r.status, r.error[:80]) for r in before if r.status != 200})[:5]}


def image_list(folder: str, count: int) -> list[str]:
    """``count`` distinct paths (symlinks) to the shipped PNGs, repeated in order."""
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"img_{i:05d}.png")
        if not os.path.lexists(path):
            os.symlink(DIGIT_PNGS[i % len(DIGIT_PNGS)], path)
        paths.append(path)
    return paths


def classify_job(address: str, artifact: str, paths: list[str], out: str, cluster: LocalCluster | None = None,
                 kill_after_s: float = 1.0) -> dict[str, Any]:
    """``repmlp-classify`` with two actors; with ``cluster``, kills a worker ``kill_after_s``
    after both actors hold their CPUs, and a new worker joins."""
    import ray

    listing = out + ".list"
    with open(listing, "w", encoding="utf-8") as file:
        file.write("\n".join(paths) + "\n")
    command = [sys.executable, "-m", "repmlp_rt.batch", artifact, f"@{listing}", "--out", out, "--address", address,
               "--actors", "2", "--batch-size", "8", "--no-progress"]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **RAY_ENV})
    fault = None
    if cluster is not None:
        while ray.available_resources().get("CPU", 0) > 0 and process.poll() is None:
            time.sleep(0.1)
        time.sleep(kill_after_s)
        if process.poll() is None:
            fault = sorted(cluster.workers)[0]
            cluster.kill(fault)
            cluster.add_worker()
    output = process.communicate(timeout=600)[0].decode(errors="replace")
    return {"rc": process.returncode, "seconds": time.monotonic() - started, "killed": fault, "output": output[-2000:]}


def data_node_loss(cluster: LocalCluster, artifact: str, folder: str, count: int = 2000,
                   baseline: bool = True) -> dict[str, Any]:
    """The classify job over ``count`` images, without a fault (``baseline``) and with one;
    rows lost, duplicated, out of order or different from the runtime's own answers."""
    paths = image_list(folder, count)
    expected = expected_answers(artifact)
    clean = classify_job(cluster.address, artifact, paths, os.path.join(folder, "clean.jsonl")) if baseline else None
    faulted = classify_job(cluster.address, artifact, paths, os.path.join(folder, "faulted.jsonl"), cluster)
    rows = []
    if faulted["rc"] == 0:
        with open(os.path.join(folder, "faulted.jsonl"), encoding="utf-8") as file:
            rows = [json.loads(line) for line in file]
    inputs = [row["input"] for row in rows]
    return {"fault": "worker node killed mid classify job, a new node joins", "rows": len(rows), "inputs": count,
            "killed": faulted["killed"], "rc": faulted["rc"], "output": faulted["output"],
            "rows_lost": len(set(paths) - set(inputs)), "duplicates": len(inputs) - len(set(inputs)),
            "in_order": inputs == paths,
            "wrong": sum(1 for i, row in enumerate(rows) if "topk" not in row
                         or not same_answer(row, expected[i % len(DIGIT_PNGS)])),
            "seconds": faulted["seconds"], "baseline_s": clean["seconds"] if clean else math.nan}


def flipped_copy(source: str, target: str) -> str:
    """``source`` with one byte flipped inside its largest weight record: its digest, part of
    the runtime's load-time self-check, no longer holds."""
    import zipfile

    data = bytearray(open(source, "rb").read())
    with zipfile.ZipFile(source) as archive:
        info = max((i for i in archive.infolist() if "/constants/" in i.filename), key=lambda i: i.compress_size)
    header = info.header_offset
    name_len, extra_len = int.from_bytes(data[header + 26:header + 28], "little"), \
        int.from_bytes(data[header + 28:header + 30], "little")
    data[header + 30 + name_len + extra_len + info.compress_size // 2] ^= 0xFF
    with open(target, "wb") as file:
        file.write(bytes(data))
    return target


def serving_drill(cluster: LocalCluster, digits: str, other: str, folder: str, clients: int,
                  seconds: float) -> list[dict[str, Any]]:
    """Node loss, rolling update, refused update and SIGTERM on one two-replica server."""
    answers = {repmlp_rt_version(digits): expected_answers(digits), repmlp_rt_version(other): expected_answers(other)}
    server = ServeProcess(cluster.address, digits, "--replicas", "2", "--max-replicas-per-node", "1", "--access-log")
    bad = flipped_copy(other, os.path.join(folder, "bad.pt"))
    try:
        return [report(node_loss(cluster, server.url, clients, seconds)),
                report(rolling_update(cluster.address, server.url, other, answers, clients, seconds)),
                report(refused_update(cluster.address, server.url, bad, clients, seconds / 2)),
                report(graceful_stop(server, clients, seconds / 2))]
    finally:
        server.kill()


def no_replica_drill(cluster: LocalCluster, digits: str, clients: int, seconds: float) -> list[dict[str, Any]]:
    """The one-replica node loss (``no_replica``) on its own server."""
    server = ServeProcess(cluster.address, digits, "--graceful-shutdown-s", "5", "--access-log")
    try:
        result = no_replica(cluster, server.url, clients, seconds)
        server.terminate()
    finally:
        server.kill()
    return [report(result)]


def report(result: dict[str, Any]) -> dict[str, Any]:
    """Prints ``result`` as one JSON line on stderr (the drill's log) and returns it."""
    print(json.dumps({k: v for k, v in result.items() if k not in ("output", "update_output")}, default=str),
          file=sys.stderr, flush=True)
    return result


def overload_drill(cluster: LocalCluster, digits: str, queued: int = 8) -> list[dict[str, Any]]:
    """One replica taking 4 requests at a time: a burst of 10 x ``queued`` with the queue
    bound, then the same burst with the bound lifted (an update without it)."""
    base = ["--max-batch-size", "4", "--max-ongoing-requests", "4"]
    server = ServeProcess(cluster.address, digits, *base, "--max-queued-requests", str(queued))
    try:
        bounded = overload(server.url, queued, capacity=4)
        subprocess.run(serve_command(digits, "--name", MODEL, "--address", cluster.address, "--update", *base),
                       check=True, capture_output=True, timeout=300, env={**os.environ, **RAY_ENV})
        unbounded = overload(server.url, queued, capacity=4)
        unbounded["fault"] = f"the same burst, queue unbounded ({unbounded['requests'] - 5} requests)"
        server.terminate()
    finally:
        server.kill()
    return [bounded, unbounded]


def table(results: list[dict[str, Any]]) -> str:
    from benchmarks.harness import markdown_table

    rows = []
    for r in results:
        failed_during = r.get("failed_during", r.get("failed", r.get("failed_before_signal", r.get("other_failures", "-"))))
        recovery = r.get("recovery_s", r.get("update_s", r.get("exit_s", r.get("slowest_503_s"))))
        rows.append([r["fault"], r.get("requests", r.get("inputs")), failed_during,
                     r.get("failed_after", r.get("old_after_swap", "-")),
                     f"{recovery:.1f}" if isinstance(recovery, float) else "-", r.get("rows_lost", "-"), _note(r)])
    return markdown_table(["fault injected", "requests sent", "failed during fault", "failed after recovery",
                           "recovery s", "rows lost", "notes"], rows)


def _note(r: dict[str, Any]) -> str:
    """What the table's columns mean for this row, and its own counts."""
    if "refused_at_once" in r:
        return (f"failed: {r['replica_lost']} replica_lost, {r['no_replica_ready']} no_replica_ready, "
                f"{r['failed_without_retry_after']} without 503 + Retry-After, {r['no_answer']} unanswered; "
                f"{r['waiting_at_kill_failed']} of {r['waiting_at_kill']} in flight at the kill or sent before the "
                f"proxy knew (slowest answer "
                f"{r['slowest_wait_after_kill_s']:.1f} s after the kill), {r['refused_at_once']} refused at once "
                f"(slowest {r['slowest_refusal_s']:.2f} s); /v2: {r['v2']['requests']} sent, {r['v2']['failed']} "
                f"failed ({', '.join(r['v2']['reasons']) or 'none'}; answered by "
                f"{', '.join(r['v2']['answered_by']) or 'none'}); no replica for "
                f"{r['down_s'] + r['refusing_s'] + r['replica_start_s']:.1f} s; recovery: first 200 after the join")
    if "placement" in r:
        reasons = ", ".join(r["failure_reasons"]) or "none"
        return (f"{r['in_flight_at_kill']} in flight at the kill, {r['in_flight_on_killed_node']} of them on the "
                f"killed node; failed: {len(r['failed_not_in_flight_there'])} not in flight there, "
                f"{r['failed_without_retry_after']} without 503 + Retry-After (reasons: {reasons}); "
                "recovery: replicas running again")
    if "wrong_answers" in r:
        return f"recovery: the update command; {r['wrong_answers']} mixed answers, {r['old_after_swap']} old after it"
    if "update_rc" in r:
        return f"update exit code {r['update_rc']}; still serving {', '.join(r['versions'])}"
    if "exit_s" in r:
        return (f"recovery: seconds to exit; {r['in_flight_at_signal']} in flight at the signal, failed: those sent "
                f"before it; {r['refused_after_signal']} sent after it refused")
    if "refused_503" in r:
        return (f"{r['ok']} served (p99 {r['p99_ok_s']:.2f} s), {r['refused_503']} got 503 + Retry-After; "
                f"recovery: slowest 503; after: the 5 next requests")
    return (f"{r['seconds']:.1f} s vs {r['baseline_s']:.1f} s without the fault; {r['duplicates']} duplicates, "
            f"in order: {r['in_order']}, {r['wrong']} answers unlike the runtime's")


SCENARIOS = ("serving", "no-replica", "overload", "data")


def _digits_artifact(folder: str, given: str | None) -> str:
    if given:
        return given
    path = os.path.join(folder, "digits.pt")
    subprocess.run(["repmlp-build", "--out", path], check=True, capture_output=True, timeout=600)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", help="the digits artifact (default: built with repmlp-build)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=12.0, help="load phase length per fault")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS),
                        help="which to run (always in this order; default: all): serving (node loss, updates, SIGTERM "
                             "on two replicas), no-replica (the only replica's node lost), overload, data "
                             "(repmlp-classify losing a node)")
    parser.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    import ray

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import runtime_helpers  # the fake artifact: another model to update to

    with tempfile.TemporaryDirectory(prefix="fault-drill-") as folder:
        digits = _digits_artifact(folder, args.artifact)
        other = str(runtime_helpers.save_fake_artifact(os.path.join(folder, "other.pt")))
        cluster = LocalCluster(temp_dir=os.path.join(folder, "ray"))
        try:
            ray.init(address=cluster.address, logging_level="WARNING")
            results = []
            if "serving" in args.scenarios:
                results += serving_drill(cluster, digits, other, folder, args.clients, args.seconds)
            if "no-replica" in args.scenarios:
                results += no_replica_drill(cluster, digits, args.clients, args.seconds)
            if "overload" in args.scenarios:
                results += [report(r) for r in overload_drill(cluster, digits)]
            if "data" in args.scenarios:
                results.append(report(data_node_loss(cluster, digits, folder, args.images)))
        finally:
            ray.shutdown()
            cluster.shutdown()
    body = table(results)
    print(body)
    if args.append_results:
        from benchmarks.harness import append_results

        append_results("Fault drill (local multi-node Ray)", "python -m benchmarks.fault_drill " + " ".join(argv or sys.argv[1:]), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
