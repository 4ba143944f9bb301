"""repmlp-serve and repmlp-classify on a local multi-node Ray cluster, under faults.

A head (no CPUs) and two worker nodes (one logical CPU and a custom resource each) on
127.0.0.1, from benchmarks/fault_drill.py, whose scenarios these tests run under a short load
and whose counts they assert: requests lost at a node kill (only those in flight on the killed
node, each answered 503 with Retry-After) and after recovery, failures and
mixed answers during a rolling update, in-flight requests answered across SIGTERM, a model
left without any replica answered 503 no_replica_ready (on /v1 and /v2) until it is back,
overload answered with fast 503s, rows lost when a node dies mid-job. The tests share one
cluster and run in file order: the SIGTERM test stops the shared two-replica server, which
frees both workers for the tests after it.
"""

import json
import math
import sys

import pytest

from helpers import ROOT

if ROOT not in sys.path:  # benchmarks/ is a package at the repository root
    sys.path.insert(0, ROOT)
from benchmarks import fault_drill  # noqa: E402

pytestmark = pytest.mark.slow
CLIENTS = 8
SECONDS = 8.0  # load phase per fault


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + two workers, connected; every Ray process is stopped by its id at the end."""
    import ray

    local = fault_drill.LocalCluster(temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        ray.init(address=local.address, logging_level="WARNING")
        yield local
    finally:
        ray.shutdown()
        local.shutdown()


@pytest.fixture(scope="module")
def server(cluster, digits_artifact):
    """repmlp-serve --replicas 2 --max-replicas-per-node 1 on the cluster (stopped by the last
    test); --access-log: each replica logs the request ids it starts."""
    process = fault_drill.ServeProcess(cluster.address, digits_artifact, "--replicas", "2",
                                       "--max-replicas-per-node", "1", "--graceful-shutdown-s", "10", "--access-log")
    yield process
    process.kill()


@pytest.fixture(scope="module")
def versions(digits_artifact, fake_artifact):
    """{artifact version: the runtime's own top-5 of each shipped PNG} for both artifacts."""
    return {fault_drill.repmlp_rt_version(path): fault_drill.expected_answers(path)
            for path in (digits_artifact, str(fake_artifact))}


def test_replicas_spread_and_a_node_loss_costs_only_in_flight_requests(cluster, server):
    result = fault_drill.node_loss(cluster, server.url, CLIENTS, SECONDS)
    # In full, with each failed request's id, status, reason, X-Served-By and times after the kill.
    shown = json.dumps(result, default=str)
    print(shown)  # shown by pytest -rA for a passing run too
    assert result["placement"] == {"w1": 1, "w2": 1}, shown  # one replica per worker, none on the head
    assert result["recovery_s"] < math.inf, shown  # the replica was re-created (within 120 s)
    assert sorted(result["after"].values()) == [1, 1] and "w1" not in result["after"], shown
    assert result["index_after"] == {"head": 1}, shown  # --index-on-head: a worker's loss leaves it up
    assert result["requests"] > 0
    assert result["started_on_killed_node"] > 0 and result["served_by_killed_node"] > 0, shown  # it did serve
    # Only requests in flight on the killed node fail, each with the answer that says "retry".
    assert result["failed_during"] <= result["in_flight_on_killed_node"], shown
    assert result["failed_not_in_flight_there"] == [], shown
    assert result["failed_without_retry_after"] == 0, shown
    assert set(result["failure_reasons"]) <= {"replica_lost"}, shown
    assert set(result["failures_answered_by"]) <= {"proxy"}, shown  # /v1: the proxy's middleware answers
    assert result["failed_after"] == 0, shown


def test_a_rolling_update_loses_nothing_and_mixes_nothing(cluster, server, fake_artifact, versions):
    result = fault_drill.rolling_update(cluster.address, server.url, str(fake_artifact), versions, CLIENTS, SECONDS)
    assert result["update_rc"] == 0, result["update_output"]
    assert result["failed"] == 0, result
    assert result["wrong_answers"] == 0, result  # each answer is exactly one version's answer
    assert result["old_after_swap"] == 0, result
    assert result["versions"] == sorted(versions), result  # both versions answered


def test_an_update_failing_its_self_check_is_refused(cluster, server, fake_artifact, tmp_path):
    bad = fault_drill.flipped_copy(str(fake_artifact), str(tmp_path / "digits.pt"))
    result = fault_drill.refused_update(cluster.address, server.url, bad, CLIENTS, SECONDS / 2)
    assert result["update_rc"] == 1 and "self-check failed" in result["update_output"], result["update_output"]
    assert result["failed"] == 0, result
    assert result["versions"] == [fault_drill.repmlp_rt_version(str(fake_artifact))], result


def test_sigterm_answers_the_requests_in_flight_then_exits(server):
    result = fault_drill.graceful_stop(server, CLIENTS, SECONDS / 2)
    assert result["rc"] == 0, server.output()
    assert result["failed_before_signal"] == 0, result
    # It exits by itself (terminate() would SIGKILL it after 120 s); the time is the drill's to report.
    assert result["exit_s"] != math.inf, result


def test_a_model_whose_only_replica_is_lost_gets_503_no_replica_ready_until_it_is_back(cluster, server,
                                                                                      digits_artifact):
    """One replica (``--replicas 1``), its worker killed while the other worker's CPU is held,
    so the model has no replica until a new worker joins; /v1 and /v2 (the index) under load.
    It runs after the SIGTERM test: the shared server's two replicas would hold both workers."""
    if server.process.poll() is None:  # run alone (-k): the SIGTERM test did not stop it
        server.terminate()
    single = fault_drill.ServeProcess(cluster.address, digits_artifact, "--graceful-shutdown-s", "5", "--access-log")
    try:
        result = fault_drill.no_replica(cluster, single.url, CLIENTS, SECONDS)
        assert single.terminate() != math.inf
    finally:
        single.kill()
    shown = json.dumps(result, default=str)
    assert list(result["single_replica"].values()) == [1] and list(result["after"].values()) == [1], shown
    assert result["index_before"] == {"head": 1}, shown  # so /v2 fails only for the model's own loss
    assert set(result["after"]) - set(result["single_replica"]), shown  # re-created on another (the new) node
    for route in ("v1", "v2"):  # both served before the kill and after recovery
        assert result[route]["ok_before_kill"] > 0 and result[route]["ok_after_recovery"] > 0, shown
    # Every failure is a 503 with Retry-After and a JSON reason; none timed out or went unanswered.
    assert result["no_answer"] == 0 and result["failed_without_retry_after"] == 0, shown
    assert result["v2"]["not_503_retry_after"] == 0, shown  # /v2 included: never a bare 500
    # Each retry answer names its layer, through the real proxy: /v1's the proxy, /v2's either.
    assert set(result["v1"]["answered_by"]) <= {"proxy"}, shown
    assert set(result["v2"]["answered_by"]) <= {"proxy", "index"}, shown
    assert set(result["failure_reasons"]) <= {"replica_lost", "no_replica_ready"}, shown
    # Requests sent once the proxy knew no replica was running: no_replica_ready, at once; every
    # one sent before the new worker joined (none could be served) among them.
    assert result["sent_while_down"] > 0 and result["while_down_not_refused"] == 0, shown
    assert result["refused_at_once"] >= result["sent_while_down"], shown
    assert result["refused_at_once_other_reason"] == 0, shown
    assert result["slowest_refusal_s"] <= fault_drill.REFUSED_AT_ONCE_S, shown
    # Requests in flight at the kill (or sent before the controller reported the replica gone)
    # are answered, 200 or 503, once Ray has declared the node dead and Serve's controller and
    # the proxy have seen it: within WAIT_BOUND_S of the kill, far below the clients' time-out.
    assert result["slowest_wait_after_kill_s"] <= fault_drill.WAIT_BOUND_S, shown
    assert result["no_replica_ready"] > 0, shown
    assert result["failed_after"] == 0, shown


def test_a_burst_past_the_queue_bound_gets_fast_503s(cluster, digits_artifact):
    queued = 4
    server = fault_drill.ServeProcess(cluster.address, digits_artifact, "--max-batch-size", "4",
                                      "--max-ongoing-requests", "4", "--max-queued-requests", str(queued))
    try:
        result = fault_drill.overload(server.url, queued, capacity=4)
        assert server.terminate() != math.inf
    finally:
        server.kill()
    assert result["other_failures"] == 0, result  # no time-outs, no 500s: 200 or 503
    assert result["refused_503"] > 0 and result["refused_with_retry_after"] == result["refused_503"], result
    assert result["ok"] + result["refused_503"] == 10 * queued
    assert result["failed_after"] == 0, result


def test_a_classify_job_survives_a_node_loss(cluster, digits_artifact, tmp_path):
    result = fault_drill.data_node_loss(cluster, digits_artifact, str(tmp_path), 2000, baseline=False)
    assert result["killed"] is not None, result["output"]  # the node died while the job ran
    assert result["rc"] == 0, result["output"]
    assert result["rows"] == 2000 and result["rows_lost"] == 0 and result["duplicates"] == 0, result
    assert result["in_order"], result
    assert result["wrong"] == 0, result
