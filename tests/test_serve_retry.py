"""repmlp_rt.serve_retry, the middleware in Serve's proxy, on fake ASGI apps (no Ray): which
failures become 503 + Retry-After with a JSON reason, and which answers pass unchanged.
tests/test_cluster_faults.py sees it at work in a real proxy, at a node kill."""

import asyncio
import json

import pytest

pytest.importorskip("starlette")
from repmlp_rt import serve_retry  # noqa: E402


def scope(path="/v1/models/m/classify", request_id=b"r-1"):
    return {"type": "http", "path": path, "headers": [(b"x-request-id", request_id)]}


async def no_receive():
    return {"type": "http.disconnect"}


def run(app, ready=None, path="/v1/models/m/classify", retry_after_s=3):
    """The messages the client gets from RetryAnswers(app) for one request."""
    sent = []

    async def send(message):
        sent.append(message)

    async def main():
        watcher = ready or serve_retry.ReadyReplicas(fetch=_never, period_s=3600)
        middleware = serve_retry.RetryAnswers(app, retry_after_s=retry_after_s, ready=watcher)
        await middleware(scope(path), no_receive, send)
        watcher.task.cancel()

    asyncio.run(main())
    return sent


async def _never():
    await asyncio.sleep(3600)


def answer(sent):
    start, body = sent
    headers = {key: value for key, value in start["headers"]}
    return start["status"], headers, json.loads(body["body"])


def test_a_request_left_without_an_answer_is_a_503_replica_lost():
    async def dead_replica(scope, receive, send):  # Serve's proxy sends nothing after a RayActorError
        return

    status, headers, body = answer(run(dead_replica))
    assert status == 503 and headers[b"retry-after"] == b"3" and headers[b"x-request-id"] == b"r-1"
    assert body["reason"] == "replica_lost" and body["retry_after_s"] == 3 and "retry after 3 s" in body["error"]
    assert headers[b"x-retry-answered-by"] == b"proxy" and body["answered_by"] == "proxy"


def test_retry_response_is_one_answer_for_both_layers():
    headers, body = serve_retry.retry_response("no_replica_ready", "m", 2, "index", "detail", b"r-9")
    assert headers == [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"retry-after", b"2"), (b"x-retry-answered-by", b"index"), (b"x-request-id", b"r-9")]
    assert json.loads(body) == {"error": "no replica of model 'm' is ready: retry after 2 s (detail)",
                                "reason": "no_replica_ready", "retry_after_s": 2, "answered_by": "index"}
    proxy_headers, proxy_body = serve_retry.retry_response("no_replica_ready", "m", 2, "proxy", "detail")
    assert proxy_headers == [*headers[:3], (b"x-retry-answered-by", b"proxy")]  # no X-Request-ID given
    assert json.loads(proxy_body) == {**json.loads(body), "answered_by": "proxy"}
    with pytest.raises(ValueError, match="answered_by must be one of proxy, index, got 'replica'"):
        serve_retry.retry_response("replica_lost", None, 1, "replica")


def test_the_index_answers_a_lost_v2_replica_with_the_same_answer_saying_index():
    """The index's /v2 route, its model's replica dying behind the handle (RayActorError): the
    proxy's answer, headers included, but answered_by index."""
    pytest.importorskip("ray.serve")
    from ray.exceptions import RayActorError
    from starlette.requests import Request

    from repmlp_rt import serve

    class LostReplica:
        async def handle(self, method, path, headers, body):
            raise RayActorError()

    index = serve.IndexDeployment({}, retry_after_s=4)
    index.v2 = LostReplica()
    request = Request({"type": "http", "method": "GET", "path": "/v2/models/m/ready", "headers": [],
                       "query_string": b""}, no_receive)
    response = asyncio.run(index(request))
    expected_headers, expected_body = serve_retry.retry_response("replica_lost", "m", 4, "index")
    assert response.status_code == 503 and response.body == expected_body
    assert sorted(response.raw_headers) == sorted(expected_headers)
    assert json.loads(response.body)["answered_by"] == "index"


def test_serves_own_backpressure_503_becomes_json_with_its_retry_after():
    async def backpressure(scope, receive, send):
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"2")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure"})

    status, headers, body = answer(run(backpressure))
    assert status == 503 and headers[b"retry-after"] == b"2"
    assert body["reason"] == "queue_full" and "backpressure" in body["error"]


@pytest.mark.parametrize("status", [200, 400, 500, 503])
def test_a_replicas_own_json_answers_pass_unchanged(status):
    messages = [{"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]},
                {"type": "http.response.body", "body": b'{"error": "x"}'}]

    async def replica(scope, receive, send):
        for message in messages:
            await send(message)

    assert run(replica) == messages


def test_a_model_with_no_running_replica_is_refused_at_once():
    called = []

    async def app(scope, receive, send):
        called.append(scope)

    ready = serve_retry.ReadyReplicas(fetch=_never, period_s=3600)
    ready.update({"m": (1, 1)})
    ready.update({"m": (0, 1)})  # it ran, and has lost its replica
    status, headers, body = answer(run(app, ready))
    assert status == 503 and body["reason"] == "no_replica_ready" and "'m'" in body["error"] and not called
    ready.task = None
    other = answer(run(app, ready, path="/v1/models/other/classify"))  # another model: passed on to the app
    assert called and other[2]["reason"] == "replica_lost"  # (which answered nothing)


def test_a_model_still_starting_is_left_to_serve():
    """First replicas not running yet (a new server; the runtime's load can take seconds):
    requests pass on to Serve's proxy, which holds them, and waiting ones are not cancelled."""
    log = []

    async def fetch():
        return {"m": (0, 0)}

    async def main():
        ready = serve_retry.ReadyReplicas(fetch=fetch, period_s=0.01)
        middleware = serve_retry.RetryAnswers(waiting_app(log), retry_after_s=1, ready=ready)
        ready.start()
        await asyncio.sleep(0.05)  # the watcher has seen the model, with no replica running
        assert not ready.none_running("m")
        task = asyncio.ensure_future(middleware(scope(), no_receive, _drop))
        await asyncio.sleep(0.1)
        assert not task.done()  # passed on and waiting, not refused, not cancelled
        task.cancel()
        ready.task.cancel()

    asyncio.run(main())
    assert log == ["cancelled"]  # by the test's own cancel


def waiting_app(log):
    """Waits for a replica like Serve's proxy: a cancel ends it without an answer (a disconnect)."""
    async def app(scope, receive, send):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            log.append("cancelled")
    return app


def test_waiting_requests_get_503_once_no_replica_could_hold_them():
    log = []
    counts = iter([{"m": (1, 1)}, {"m": (0, 0)}])

    async def fetch():
        return next(counts, {"m": (0, 0)})

    status, headers, body = answer(run(waiting_app(log), serve_retry.ReadyReplicas(fetch=fetch, period_s=0.01)))
    assert status == 503 and body["reason"] == "no_replica_ready" and log == ["cancelled"]


def test_a_draining_replica_keeps_its_requests():
    """Running 0 but one replica stopping (it finishes what it holds): nothing is cancelled."""
    log = []
    counts = iter([{"m": (1, 1)}])

    async def fetch():
        return next(counts, {"m": (0, 1)})

    async def main():
        ready = serve_retry.ReadyReplicas(fetch=fetch, period_s=0.01)
        middleware = serve_retry.RetryAnswers(waiting_app(log), retry_after_s=1, ready=ready)
        ready.start()
        task = asyncio.ensure_future(middleware(scope(), no_receive, _drop))
        await asyncio.sleep(0.1)
        assert not task.done()
        task.cancel()
        ready.task.cancel()

    asyncio.run(main())
    assert log == ["cancelled"]  # by the test's own cancel, not by the watcher


async def _drop(message):
    pass


def test_model_counts_from_the_controllers_details():
    replicas = [{"state": state} for state in ("RUNNING", "STOPPING", "STARTING")]
    details = {"applications": {"m": {"deployments": {"model": {"replicas": replicas}}},
                                "repmlp-index": {"deployments": {"index": {"replicas": replicas}}}}}
    assert serve_retry.model_counts(details) == {"m": (1, 2)}
    assert serve_retry.model_counts({}) == {}
