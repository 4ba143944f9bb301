"""What Serve's HTTP proxy answers when no replica can answer a request: 503 with ``Retry-After``.

Serve's own proxy answers a request whose replica died while answering (its process or node
lost) with a bare 500, and holds a request for a model with no replica ready until one is
back, however long that takes. ``RetryAnswers``, an ASGI middleware run inside each proxy,
turns every such case into one answer a client can act on: status 503, ``Retry-After: N``,
``X-Retry-Answered-By: proxy`` and one JSON line ``{"error": ..., "reason": ...,
"retry_after_s": N, "answered_by": "proxy"}``, where ``reason`` is

* ``replica_lost``: the replica holding the request stopped before it answered;
* ``no_replica_ready``: the model has no running replica (the request is refused at once, or,
  when it was already waiting, as soon as no replica that could hold it is left);
* ``queue_full``: Serve's own back-pressure answer (``max_queued_requests``), rewritten to JSON
  with its ``Retry-After``;
* ``proxy_error``: the proxy failed before any answer started.

``retry_response`` builds that whole answer; the index application's ``/v2`` route answers a
replica lost behind its handle with the same one, saying ``index`` instead of ``proxy``, so a
client's logs tell which layer answered (both mean the same to a client: retry).

Every answer a replica gives (200, or its own JSON 4xx/5xx) passes through unchanged. The
readiness view comes from the Serve controller (``ReadyReplicas``), refreshed in the
background every ``WATCH_PERIOD_S``; nothing is asked per request.

Serve installs it from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` = ``CALLBACK``, which
``repmlp_rt.serve`` sets on the Serve controller it starts (its proxies inherit the
controller's environment). Only the standard library and Starlette are imported at load;
Ray only in the proxy's background task.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

CALLBACK = "repmlp_rt.serve_retry:middlewares"
RETRY_AFTER_ENV = "REPMLP_SERVE_RETRY_AFTER_S"
WATCH_PERIOD_S = 0.5
MODEL_PATH = re.compile(r"/v[12]/models/([^/]+)")
# Replica states in which a replica may hold a request (Serve's ReplicaState): only a model
# with none of these left has no one to answer a waiting request.
HOLDING_STATES = frozenset({"RUNNING", "UPDATING", "RECOVERING", "STOPPING", "PENDING_MIGRATION"})
REASONS = {
    "replica_lost": "the replica answering this request stopped before it answered (its process or node was lost)",
    "no_replica_ready": "no replica of model {name!r} is ready",
    "queue_full": "the requests waiting for model {name!r} are at their bound",
    "proxy_error": "Serve's proxy failed to route this request",
}

# Which layer gave a retry answer: Serve's HTTP proxy (this middleware) or the index
# application's /v2 route (repmlp_rt.serve), in the header and in the body's "answered_by".
ANSWERED_BY_HEADER = b"x-retry-answered-by"
ANSWERED_BY = ("proxy", "index")

Counts = dict[str, tuple[int, int]]  # application -> (running replicas, replicas that may hold requests)


def retry_answer(reason: str, name: str | None, retry_after_s: int, answered_by: str, detail: str = "") -> bytes:
    """The JSON body of a 503: what failed, why, when to retry, and which layer answered."""
    if answered_by not in ANSWERED_BY:
        raise ValueError(f"answered_by must be one of {', '.join(ANSWERED_BY)}, got {answered_by!r}")
    message = REASONS[reason].format(name=name or "?") + f": retry after {retry_after_s} s"
    if detail:
        message += f" ({detail})"
    return json.dumps({"error": message, "reason": reason, "retry_after_s": retry_after_s,
                       "answered_by": answered_by}).encode() + b"\n"


def retry_response(reason: str, name: str | None, retry_after_s: int, answered_by: str, detail: str = "",
                   request_id: bytes | None = None) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The whole 503 answer, as (ASGI headers, body), given by the proxy and by the index alike.
    ``request_id``: the proxy's own answers echo the client's ``X-Request-ID`` (Serve's request
    id middleware, inside ours, adds it only to answers that pass through it, as the index's do)."""
    body = retry_answer(reason, name, retry_after_s, answered_by, detail)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", str(retry_after_s).encode()), (ANSWERED_BY_HEADER, answered_by.encode())]
    if request_id:
        headers.append((b"x-request-id", request_id))
    return headers, body


def model_counts(details: dict[str, Any]) -> Counts:
    """(running, holding) replicas of the ``model`` deployment of each application, from the
    controller's instance details; applications without one (the index, others) are left out."""
    counts: Counts = {}
    for name, app in (details.get("applications") or {}).items():
        deployment = (app.get("deployments") or {}).get("model")
        if deployment is None:
            continue
        states = [replica.get("state") for replica in deployment.get("replicas") or []]
        counts[name] = (states.count("RUNNING"), sum(1 for state in states if state in HOLDING_STATES))
    return counts


async def controller_counts() -> Counts:
    """``model_counts`` of the running Serve controller (called inside a proxy)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    return model_counts(await controller.get_serve_instance_details.remote())


class Exchange:
    """One request's answer as it passes: whether it started, and a Serve back-pressure 503
    held back to be answered in JSON."""

    __slots__ = ("send", "started", "cancelled", "held", "held_headers", "held_body")

    def __init__(self, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.send = send
        self.started = False
        self.cancelled = False  # by ReadyReplicas: no replica left to answer it
        self.held = False
        self.held_headers: dict[bytes, bytes] = {}
        self.held_body = b""

    async def forward(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            headers = {key.lower(): value for key, value in message.get("headers") or []}
            if message["status"] == 503 and not headers.get(b"content-type", b"").startswith(b"application/json"):
                self.held, self.held_headers = True, headers  # Serve's own text answer
                return
        elif self.held:
            self.held_body += message.get("body", b"")
            return
        await self.send(message)


class ReadyReplicas:
    """The replicas of each model as the controller reports them, refreshed every
    ``period_s`` by one background task; when a model that has had a running replica has no
    replica left that could hold a request, the requests waiting for it (no answer started)
    are cancelled. A model whose first replicas are still starting (a new server, a slow load:
    the runtime's self-check and GEMM plan) is left to Serve, which holds its requests until
    one is up, as it does without this middleware."""

    def __init__(self, fetch: Callable[[], Awaitable[Counts]] = controller_counts,
                 period_s: float = WATCH_PERIOD_S) -> None:
        self.fetch = fetch
        self.period_s = period_s
        self.counts: Counts = {}
        self.has_run: set[str] = set()  # models seen with a running replica
        self.waiting: dict[str, dict[asyncio.Task, Exchange]] = {}
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._watch())

    def none_running(self, name: str) -> bool:
        """Known to have lost every running replica (False for a model not seen running yet)."""
        counts = self.counts.get(name)
        return counts is not None and counts[0] == 0 and name in self.has_run

    def update(self, counts: Counts) -> None:
        self.counts = counts
        self.has_run.update(name for name, (running, _) in counts.items() if running > 0)
        for name, (_, holding) in counts.items():
            if holding == 0 and name in self.has_run:
                for task, exchange in list(self.waiting.get(name, {}).items()):
                    if not exchange.started and not exchange.cancelled:
                        exchange.cancelled = True
                        task.cancel()

    async def _watch(self) -> None:
        while True:
            try:
                counts = await self.fetch()
            except Exception:  # the controller is unreachable or restarting: no view, no fast answers
                counts = {}
            self.update(counts)
            await asyncio.sleep(self.period_s)


class RetryAnswers:
    """The ASGI middleware (see the module's docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]], retry_after_s: int | None = None,
                 ready: ReadyReplicas | None = None) -> None:
        self.app = app
        self.retry_after_s = retry_after_s or max(1, int(os.environ.get(RETRY_AFTER_ENV, "1")))
        self.ready = ready or ReadyReplicas()

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.ready.start()
        match = MODEL_PATH.match(scope["path"])
        name = match.group(1) if match else None
        if name is not None and self.ready.none_running(name):
            await self._answer(scope, send, "no_replica_ready", name)
            return
        exchange = Exchange(send)
        task = asyncio.current_task()
        waiting = self.ready.waiting.setdefault(name, {}) if name is not None else {}
        waiting[task] = exchange
        try:
            await self.app(scope, receive, exchange.forward)
        except asyncio.CancelledError:
            if not exchange.cancelled:
                raise
        except Exception as error:  # the proxy itself failed; nothing of an answer went out yet
            if exchange.started and not exchange.held:
                raise
            await self._answer(scope, send, "proxy_error", name, f"{type(error).__name__}: {error}")
            return
        finally:
            waiting.pop(task, None)
        if exchange.cancelled and task.cancelling():
            task.uncancel()  # the proxy swallowed our cancel as a client disconnect
        if exchange.held:
            retry = exchange.held_headers.get(b"retry-after", b"").decode()  # none: the model failed to deploy
            await self._answer(scope, send, "queue_full" if retry else "no_replica_ready", name,
                               exchange.held_body.decode(errors="replace").strip(),
                               int(retry) if retry.isdigit() else None)
        elif not exchange.started:
            await self._answer(scope, send, "no_replica_ready" if exchange.cancelled else "replica_lost", name)

    async def _answer(self, scope: dict[str, Any], send: Callable, reason: str, name: str | None,
                      detail: str = "", retry_after_s: int | None = None) -> None:
        retry = self.retry_after_s if retry_after_s is None else retry_after_s
        headers, body = retry_response(reason, name, retry, "proxy", detail,
                                       dict(scope.get("headers") or []).get(b"x-request-id"))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def middlewares() -> list:
    """Serve's HTTP proxy callback: the middlewares its proxies run."""
    from starlette.middleware import Middleware

    return [Middleware(RetryAnswers)]
