"""RepMLPNet artifacts on Ray Serve: one application per artifact, with dynamic batching.

Each artifact becomes a Serve application at ``/v1/models/<name>``: its replicas each hold one
``repmlp_rt.Runtime`` and batch concurrent requests with ``@serve.batch``. A small index
application at ``/`` answers ``GET /v1/models``, ``GET /healthz`` and, as the longest-prefix
fallback of Serve's proxy, every unknown path (a JSON 404). Routes:

* ``POST /v1/models/<name>/classify``: a PNG/JPEG body, or a JSON list of base64 images ->
  top-k as ``repmlp_infer --json`` prints it (one object, or a list for a JSON list);
  query ``?topk=K``;
* ``POST /v1/models/<name>/infer``: a float32 ``.npy`` body (N, C, H, W), already normalized ->
  ``.npy`` float32 logits (N, classes);
* ``GET /v1/models/<name>``: the manifest;
* the Open Inference Protocol (KServe v2, as Triton serves it; ``repmlp_rt.oip``): ``GET /v2``,
  ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/<name>[/ready]`` and
  ``POST /v2/models/<name>/infer`` (``INPUT__0`` or ``IMAGE`` -> ``OUTPUT__0``), whose rows join
  the same batches as ``/v1`` infer requests.

Every answer to a classify/infer request carries ``X-Batch-Size``: the size of the batch each
of its images ran in (comma-separated, one per image). Every answer of a model application
carries ``X-Model-Version``: the first 16 hex digits of the SHA-256 of the artifact file that
answered, and ``X-Served-By``: ``<Ray node id>/<replica id>`` of the replica that answered.
Errors are a 4xx with one JSON line ``{"error": "..."}``; the replica keeps serving. A request
no replica could answer (its replica died, or none is ready) gets 503 with ``Retry-After``
and a JSON line naming the reason, from ``repmlp_rt.serve_retry`` in Serve's proxy (or, for a
``/v2`` request whose model replica died behind the index, the same answer from the index;
``X-Retry-Answered-By`` says which). The index runs on the Ray head node unless
``index_on_head`` is False. With ``access_log`` each replica also logs ``started <method>
<path>`` (with Serve's request id, the client's ``X-Request-ID`` if it sent one) when it takes
a request.

Command line: ``repmlp-serve ARTIFACT... [--address ADDR] [--port P]`` (``python -m
repmlp_rt.serve``); ``repmlp-serve ARTIFACT --update --address ADDR`` replaces a running model
of the same name by a rolling update and exits. Needs the ``serve`` extra: ``pip install
'repmlp[serve]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import repmlp_rt

from . import oip, serve_retry
from ._cli import add_ray_arguments, init_ray, positive_int
from .contract import check_model_name, topk_json

try:
    import ray
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.serve.api import RunTarget
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(f"repmlp_rt.serve needs Ray Serve ({error}): pip install 'repmlp[serve]'") from None

PROG = "repmlp-serve"
API_PREFIX = "/v1/models"
INDEX_APP = "repmlp-index"
NPY_MEDIA_TYPE = "application/octet-stream"
SINGLE_INPUT = "body"  # the "input" of a one-image request; images[i] for a JSON list
VERSION_HEADER = "X-Model-Version"
SERVED_BY_HEADER = "X-Served-By"
# Serve's proxies load their middlewares from this variable (set on the controller they inherit from).
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_LOCATIONS = ("EveryNode", "HeadOnly")
# What a stop may take beyond the replicas' graceful period: Serve deleting the applications.
SHUTDOWN_MARGIN_S = 10.0
# How often Serve's controller checks each replica (Serve's default: 10 s). A dead replica
# counts as gone, and is replaced, at most this long after Ray reports its actor or node dead;
# until then requests waiting for its model wait, then get 503 (repmlp_rt.serve_retry).
HEALTH_CHECK_PERIOD_S = 2.0
# The resource Ray gives the head node only (Serve pins its controller with it): a sliver of it
# pins the index, which takes no CPU, to the head, so a worker node's loss never takes the
# index (and with it every /v2 route and the model list) down with it.
HEAD_NODE_RESOURCE = "node:__internal_head__"


@dataclass(frozen=True)
class ServeOptions:
    """How each model deployment runs; the command-line defaults (see ``main``)."""

    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    replicas: int = 1
    # Serve's default of 5 ongoing requests per replica would cap every batch at 5.
    max_ongoing_requests: int = 64
    threads: int = 1  # intra-op threads per replica, also the CPUs each replica reserves
    device: str = "cpu"
    gemm: str = "auto"  # Runtime(gemm=...): each replica plans its GEMMs on its own node
    max_body_bytes: int = 16 << 20
    access_log: bool = False  # Serve's per-request log lines (they cost throughput under load)
    # Requests each caller (a proxy) may hold for the model beyond what its replicas take; the
    # excess is answered at once with 503 and Retry-After. None: unbounded (Serve's default).
    max_queued_requests: int | None = None
    retry_after_s: int = 1  # the Retry-After of every 503 (queue full, replica lost, none ready)
    # Serve's proxies answer requests no replica could answer with 503 + Retry-After
    # (repmlp_rt.serve_retry); False leaves Serve's own answers (a bare 500, or waiting).
    retry_answers: bool = True
    max_replicas_per_node: int | None = None  # 1 spreads the replicas over distinct nodes
    graceful_shutdown_s: float = 20.0  # how long a stopping replica lets its requests finish
    proxy_location: str = "EveryNode"
    index_on_head: bool = True  # the index replica on the head node (False: wherever Ray places it)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "replicas", "max_ongoing_requests", "threads", "max_body_bytes",
                     "max_queued_requests", "retry_after_s", "max_replicas_per_node"):
            value = getattr(self, name)
            if value is None and name in ("max_queued_requests", "max_replicas_per_node"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.graceful_shutdown_s, (int, float)) and 0 <= self.graceful_shutdown_s <= 3600):
            raise ValueError(f"graceful_shutdown_s must be in [0, 3600], got {self.graceful_shutdown_s!r}")
        if self.proxy_location not in PROXY_LOCATIONS:
            raise ValueError(f"proxy_location must be one of {', '.join(PROXY_LOCATIONS)}, got {self.proxy_location!r}")
        if not (isinstance(self.batch_wait_ms, (int, float)) and 0 <= self.batch_wait_ms <= 10_000):
            raise ValueError(f"batch_wait_ms must be in [0, 10000], got {self.batch_wait_ms!r}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or no batch could ever fill")


@dataclass(frozen=True)
class ModelSpec:
    """An artifact checked on the driver: name, absolute path, manifest, version (the first
    16 hex digits of the file's SHA-256)."""

    name: str
    path: str
    manifest: dict[str, Any] = field(repr=False)
    version: str = ""
    interface: oip.ModelInterface | None = field(default=None, repr=False)  # its v2 tensors


class RequestError(Exception):
    """A bad request: answered with ``status`` and one JSON error line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def model_name_for(path: str) -> str:
    """``digits`` for ``/x/digits.pt``."""
    return os.path.splitext(os.path.basename(path))[0]


def file_version(path: str) -> str:
    """The first 16 hex digits of the SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def load_specs(artifacts: list[str], names: list[str] | None = None) -> list[ModelSpec]:
    """Loads each artifact once here (no warm-up; the runtime's self-check runs) so a bad one
    fails before anything is deployed; returns their names, manifests and versions. Names
    default to the file stems."""
    if not artifacts:
        raise ValueError("expected at least one artifact")
    if names is not None and len(names) != len(artifacts):
        raise ValueError(f"expected one name per artifact ({len(artifacts)}), got {len(names)}")
    specs: list[ModelSpec] = []
    for i, path in enumerate(artifacts):
        name = check_model_name(names[i] if names is not None else model_name_for(path), path)
        if any(spec.name == name for spec in specs):
            raise ValueError(f"two artifacts are both named {name!r}: pass distinct names")
        runtime = repmlp_rt.Runtime(path, warmup=0)  # ArtifactError for a missing/corrupt/foreign file
        specs.append(ModelSpec(name, os.path.abspath(path), runtime.manifest, version=file_version(path),
                               interface=oip.model_interface(runtime)))
    return specs


async def read_body(request: Request, limit: int,
                    expected: str = "an image, a JSON list of base64 images or a .npy") -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading when the client
    says its length, else while reading) and with 400 when empty (``expected`` says what was)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    if size == 0:
        raise RequestError(400, f"empty request body: expected {expected}")
    return b"".join(chunks)


def parse_topk(request: Request, num_classes: int) -> int | None:
    text = request.query_params.get("topk")
    if text is None:
        return None
    if not text.isdigit() or not 1 <= int(text) <= num_classes:
        raise RequestError(400, f"topk must be an integer in [1, {num_classes}], got {text!r}")
    return int(text)


def decode_images(body: bytes, content_type: str) -> list[tuple[str, np.ndarray]]:
    """(input name, uint8 HWC image) for an image body or a JSON list of base64 images."""
    stripped = body.lstrip()
    if content_type.startswith("application/json") or stripped[:1] == b"[":
        try:
            items = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"body is not valid JSON: {error}") from None
        if not isinstance(items, list) or not items or not all(isinstance(item, str) for item in items):
            raise RequestError(400, "expected a non-empty JSON list of base64-encoded images (strings)")
        named = []
        for i, item in enumerate(items):
            try:
                named.append((f"images[{i}]", base64.b64decode(item, validate=True)))
            except (binascii.Error, ValueError):
                raise RequestError(400, f"images[{i}] is not valid base64") from None
    else:
        named = [(SINGLE_INPUT, body)]
    images = []
    for name, data in named:
        try:
            images.append((name, repmlp_rt.decode_image_bytes(data, name)))
        except ValueError as error:  # repmlp_rt.InputError
            raise RequestError(400, str(error)) from None
    return images


def parse_npy(body: bytes, input_shape: tuple[int, ...]) -> np.ndarray:
    """A float32 (N, C, H, W) batch from a ``.npy`` body, checked against the model input."""
    if not body.startswith(b"\x93NUMPY"):
        raise RequestError(400, "body is not a .npy file (no NumPy header): expected a float32 NCHW batch "
                                "written by numpy.save")
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise RequestError(400, f"body is not a readable .npy array: {error}") from None
    expected = f"float32 (N, {', '.join(map(str, input_shape))})"
    if array.dtype != np.float32 or array.ndim != 4 or tuple(array.shape[1:]) != input_shape or array.shape[0] < 1:
        raise RequestError(400, f"expected a {expected} .npy batch, got {array.dtype} {tuple(array.shape)}")
    return np.ascontiguousarray(array)


class ModelDeployment:
    """One Serve replica: one Runtime, two batched entry points (classify and infer)."""

    def __init__(self, spec: ModelSpec, options: ServeOptions) -> None:
        # A replica started later (after a node loss) must not serve a file replaced since the
        # driver checked it under this version.
        if spec.version and file_version(spec.path) != spec.version:
            raise RuntimeError(f"{spec.path} changed since it was deployed as version {spec.version}: "
                               "deploy it again (repmlp-serve --update)")
        self.spec = spec
        self.options = options
        context = serve.get_replica_context()
        self.served_by = f"{ray.get_runtime_context().get_node_id()}/{context.replica_id.unique_id}"
        self.logger = logging.getLogger("ray.serve") if options.access_log else None
        self.runtime = repmlp_rt.Runtime(spec.path, device=options.device, threads=options.threads,
                                         warmup_batch=options.max_batch_size, gemm=options.gemm)
        self.labels = self.runtime.labels
        self.input_shape = self.runtime.input_shape
        for method in (self.classify_batch, self.infer_batch):
            method.set_max_batch_size(options.max_batch_size)
            method.set_batch_wait_timeout_s(options.batch_wait_ms / 1000.0)
        # The replica's own counters, for /v1/models/<name>/stats (batches and items run).
        self.batches = 0
        self.items = 0

    def _count(self, size: int) -> None:
        self.batches += 1
        self.items += size

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify_batch(self, items: list[tuple[np.ndarray, int]]) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Classifies one image per item; images of one size run as one batch."""
        self._count(len(items))
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (image, _) in enumerate(items):
            groups.setdefault(image.shape, []).append(i)
        results: list[Any] = [None] * len(items)
        for members in groups.values():
            batch = np.stack([items[i][0] for i in members])
            topk = max(items[i][1] for i in members)
            # The model runs in a worker thread so the event loop keeps queueing the next batch.
            scores, indices = await asyncio.to_thread(self.runtime.classify, batch, topk)
            for row, i in enumerate(members):
                k = items[i][1]
                results[i] = (scores[row, :k], indices[row, :k], len(items))
        return results

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def infer_batch(self, rows: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        """Logits for one item each: a normalized (C, H, W) row, or a uint8 (H, W, C) image
        (v2 ``IMAGE``); items of one dtype and shape run as one model call."""
        self._count(len(rows))
        results: list[Any] = [None] * len(rows)
        for members in oip.group_by_shape(rows):
            logits = await asyncio.to_thread(self.runtime.infer, np.stack([rows[i] for i in members]))
            for row, i in enumerate(members):
                results[i] = (logits[row], len(rows))
        return results

    async def v2_infer(self, items: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """The v2 infer route's items (called by the index through a handle), through ``infer_batch``."""
        answers = await asyncio.gather(*(self.infer_batch(item) for item in items))
        return np.stack([logits for logits, _ in answers]), [size for _, size in answers]

    def ready(self) -> bool:
        return True

    async def __call__(self, request: Request) -> Response:
        if self.logger is not None:  # Serve tags the line with the request id (the client's X-Request-ID)
            self.logger.info("started %s %s", request.method, request.url.path)
        response = await self._route(request)
        response.headers[VERSION_HEADER] = self.spec.version  # which artifact answered, errors included
        response.headers[SERVED_BY_HEADER] = self.served_by
        return response

    async def _route(self, request: Request) -> Response:
        route = request.url.path[len(f"{API_PREFIX}/{self.spec.name}"):].strip("/")
        try:
            if request.method == "GET" and route == "":
                return JSONResponse(self.spec.manifest)
            if request.method == "GET" and route == "stats":
                return JSONResponse({"batches": self.batches, "items": self.items, "version": self.spec.version,
                                     "node": ray.get_runtime_context().get_node_id()})
            if request.method == "POST" and route == "classify":
                return await self._classify(request)
            if request.method == "POST" and route == "infer":
                return await self._infer(request)
            if route in ("", "stats", "classify", "infer"):
                return error_response(405, f"method {request.method} is not allowed on {request.url.path}")
            return error_response(404, f"no route {request.url.path}: expected {API_PREFIX}/{self.spec.name}"
                                       "[/classify|/infer|/stats]")
        except RequestError as error:
            return error_response(error.status, str(error))
        except Exception as error:  # the model failed (e.g. out of memory): the replica keeps serving
            return error_response(500, f"{type(error).__name__}: {error}")

    async def _classify(self, request: Request) -> Response:
        default_topk = min(5, len(self.labels))
        topk = parse_topk(request, len(self.labels)) or default_topk
        body = await read_body(request, self.options.max_body_bytes)
        images = decode_images(body, request.headers.get("content-type", ""))
        answers = await asyncio.gather(*(self.classify_batch((image, topk)) for _, image in images))
        results = [topk_json(name, scores, indices, self.labels)
                   for (name, _), (scores, indices, _) in zip(images, answers)]
        is_list = images[0][0] != SINGLE_INPUT
        headers = {"X-Batch-Size": ",".join(str(size) for *_, size in answers)}
        return JSONResponse(results if is_list else results[0], headers=headers)

    async def _infer(self, request: Request) -> Response:
        body = await read_body(request, self.options.max_body_bytes)
        batch = parse_npy(body, self.input_shape)
        answers = await asyncio.gather(*(self.infer_batch(row) for row in batch))
        out = io.BytesIO()
        np.save(out, np.stack([logits for logits, _ in answers]))
        headers = {"X-Batch-Size": ",".join(str(size) for _, size in answers)}
        return Response(out.getvalue(), media_type=NPY_MEDIA_TYPE, headers=headers)


def index_retry_response(reason: str, name: str | None, retry_after_s: int) -> Response:
    """The proxy's 503 retry answer (``serve_retry.retry_response``), given by the index: the
    same headers and body, ``answered_by`` ``index``."""
    headers, body = serve_retry.retry_response(reason, name, retry_after_s, "index")
    return Response(body, status_code=503, headers={key.decode("latin-1"): value.decode("latin-1")
                                                    for key, value in headers})


class IndexDeployment:
    """``/``: the model list, health, the ``/v2`` routes (handed to the model deployments
    through handles), and a JSON 404 for every path no model owns."""

    def __init__(self, manifests: dict[str, dict[str, Any]], interfaces: dict[str, oip.ModelInterface] | None = None,
                 max_body_bytes: int = ServeOptions.max_body_bytes,
                 retry_after_s: int = ServeOptions.retry_after_s) -> None:
        self.manifests = manifests
        self.interfaces = interfaces or {}
        self.max_body_bytes = max_body_bytes
        self.retry_after_s = retry_after_s
        self.v2 = oip.V2Router(PROG, self.interfaces, self._v2_infer, self._v2_ready)

    async def _v2_infer(self, name: str, items: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        return await serve.get_deployment_handle("model", app_name=name).v2_infer.remote(items)

    async def _v2_ready(self, name: str) -> bool:
        try:
            return await asyncio.wait_for(serve.get_deployment_handle("model", app_name=name).ready.remote(), 10)
        except Exception:  # not deployed (yet), or its replica is gone
            return False

    async def _v2(self, request: Request) -> Response:
        try:
            body = (await read_body(request, self.max_body_bytes, "an inference request (JSON, then any binary tensor "
                                    "data)") if request.method == "POST" else b"")
        except RequestError as error:
            return error_response(error.status, str(error))
        headers = {key.lower(): value for key, value in request.headers.items()}
        try:
            status, answer_headers, answer = await self.v2.handle(request.method, request.url.path, headers, body)
        except RayActorError:  # the model's replica died while it held the request
            model = serve_retry.MODEL_PATH.match(request.url.path)
            return index_retry_response("replica_lost", model.group(1) if model else None, self.retry_after_s)
        media = answer_headers.pop("content-type", None)
        return Response(answer, status_code=status, headers=answer_headers, media_type=media)

    def served_models(self) -> tuple[dict[str, dict[str, Any]], dict[str, oip.ModelInterface]]:
        """The manifests and v2 interfaces this index serves (read by an update, which
        redeploys the index)."""
        return self.manifests, self.interfaces

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except Exception as error:  # a JSON 500, never a bare one (the proxy's 503 means "retry")
            return error_response(500, f"{type(error).__name__}: {error}")

    async def _route(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if path == "/v2" or path.startswith("/v2/"):
            return await self._v2(request)
        if request.method == "GET" and path == "/healthz":
            return JSONResponse({"status": "ok", "models": sorted(self.manifests)})
        if request.method == "GET" and path == API_PREFIX:
            return JSONResponse({"models": [{"name": name, "manifest": manifest}
                                            for name, manifest in sorted(self.manifests.items())]})
        if path.startswith(API_PREFIX + "/"):
            name = path[len(API_PREFIX) + 1:].split("/")[0]
            return error_response(404, f"unknown model {name!r}: serving {', '.join(sorted(self.manifests))}")
        return error_response(404, f"no route {request.url.path}: expected /healthz, {API_PREFIX} or "
                                   f"{API_PREFIX}/<name>/(classify|infer)")


def index_application(manifests: dict[str, dict[str, Any]], interfaces: dict[str, oip.ModelInterface],
                      options: ServeOptions) -> tuple[str, str, Any]:
    placement: dict[str, Any] = {"num_cpus": 0}
    if options.index_on_head:
        placement["resources"] = {HEAD_NODE_RESOURCE: 0.001}
    index = serve.deployment(IndexDeployment, name="index", ray_actor_options=placement, max_ongoing_requests=1000)
    return INDEX_APP, "/", index.bind(manifests, interfaces, options.max_body_bytes, options.retry_after_s)


def model_applications(specs: list[ModelSpec], options: ServeOptions) -> list[tuple[str, str, Any]]:
    """(application name, route prefix, bound application) for each model."""
    apps = []
    for spec in specs:
        model = serve.deployment(
            ModelDeployment,
            name="model",
            num_replicas=options.replicas,
            max_ongoing_requests=options.max_ongoing_requests,
            # Past this many waiting requests a caller answers 503 with Retry-After at once.
            max_queued_requests=-1 if options.max_queued_requests is None else options.max_queued_requests,
            backpressure_config={"status_code": 503, "retry_after_s": options.retry_after_s},
            max_replicas_per_node=options.max_replicas_per_node,
            graceful_shutdown_timeout_s=options.graceful_shutdown_s,
            health_check_period_s=HEALTH_CHECK_PERIOD_S,
            ray_actor_options={"num_cpus": options.threads, "num_gpus": 1 if options.device != "cpu" else 0},
        )
        apps.append((spec.name, f"{API_PREFIX}/{spec.name}", model.bind(spec, options)))
    return apps


def build_applications(specs: list[ModelSpec], options: ServeOptions) -> list[tuple[str, str, Any]]:
    """(application name, route prefix, bound application) for the index and each model."""
    interfaces = {spec.name: spec.interface for spec in specs if spec.interface}
    return [index_application({spec.name: spec.manifest for spec in specs}, interfaces, options),
            *model_applications(specs, options)]


def _run(apps: list[tuple[str, str, Any]], options: ServeOptions) -> None:
    logging = {"enable_access_log": options.access_log}
    serve.run_many([RunTarget(app, name=name, route_prefix=prefix, logging_config=logging)
                    for name, prefix, app in apps])


def controller_options(options: ServeOptions) -> dict[str, Any] | None:
    """The Serve controller's environment, inherited by its proxies: the retry answers'
    middleware (``repmlp_rt.serve_retry``) and their Retry-After. Serve applies it only when it
    starts the controller: on a cluster where Serve already runs, its proxies keep theirs."""
    if not options.retry_answers:
        return None
    return {"runtime_env": {"env_vars": {PROXY_CALLBACK_ENV: serve_retry.CALLBACK,
                                         serve_retry.RETRY_AFTER_ENV: str(options.retry_after_s)}}}


def deploy(specs: list[ModelSpec], options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Starts Serve's HTTP proxy on host:port (on an already connected Ray) and deploys every
    application; waits until they are running. Returns the base URL. Where Serve already runs
    on this cluster, its proxy keeps the address it was started with (Serve logs that)."""
    serve.start(http_options={"host": host, "port": port}, proxy_location=options.proxy_location,
                controller_options=controller_options(options))
    _run(build_applications(specs, options), options)
    # Serve has one proxy per cluster: where it already ran, its own address stands. Serve
    # exposes that only through its client object.
    from ray.serve.context import _get_global_client

    config = _get_global_client().http_config
    host, port = config.host, config.port
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def update(specs: list[ModelSpec], options: ServeOptions) -> None:
    """Replaces running models of the same names on the connected cluster by Serve's rolling
    update: a new replica starts (and passes the self-check) before an old one is asked to
    stop, and an old one finishes its requests before it exits. Returns when every new
    version is running. ValueError for a name that is not being served."""
    running = serve.status().applications
    missing = [spec.name for spec in specs if spec.name not in running]
    if missing or INDEX_APP not in running:
        raise ValueError(f"no running model named {', '.join(map(repr, missing or [spec.name for spec in specs]))} "
                         f"to update (serving: {', '.join(sorted(set(running) - {INDEX_APP})) or 'nothing'})")
    manifests, interfaces = serve.get_app_handle(INDEX_APP).served_models.remote().result()
    manifests.update({spec.name: spec.manifest for spec in specs})
    interfaces.update({spec.name: spec.interface for spec in specs if spec.interface})
    _run(model_applications(specs, options), options)
    _run([index_application(manifests, interfaces, options)], options)  # only once the new versions answer


def undeploy(specs: list[ModelSpec], timeout_s: float = 3600.0) -> None:
    """Deletes the applications ``deploy`` created (the Serve instance itself stays), all at
    once; each replica first finishes its requests (up to ``graceful_shutdown_s``). Returns
    when they are gone or after ``timeout_s``."""
    names = [*(spec.name for spec in specs), INDEX_APP]
    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and set(names) & set(serve.status().applications):
        time.sleep(0.2)




def _duration(unit: str, high: int):
    """An argparse type: a number of ``unit`` in [0, high]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {unit}, got {text!r}") from None
        if not 0 <= value <= high:
            raise argparse.ArgumentTypeError(f"expected 0..{high} {unit}, got {text!r}")
        return value
    return parse


_wait_ms = _duration("milliseconds", 10_000)
_wait_s = _duration("seconds", 3600)


def _parser() -> argparse.ArgumentParser:
    defaults = ServeOptions()
    p = argparse.ArgumentParser(prog=PROG, description="Serve RepMLPNet artifacts over HTTP on Ray Serve "
                                "(one application per artifact at /v1/models/<name>).")
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="artifact files; each is served under its file stem")
    p.add_argument("--name", action="append", dest="names", metavar="NAME",
                   help="model name for each artifact, in order (repeat; default: the file stems)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=positive_int, default=defaults.replicas, help="replicas per model")
    p.add_argument("--max-batch-size", type=positive_int, default=defaults.max_batch_size)
    p.add_argument("--batch-wait-ms", type=_wait_ms, default=defaults.batch_wait_ms,
                   help="how long a batch waits to fill (default %(default)s)")
    p.add_argument("--max-ongoing-requests", type=positive_int, default=defaults.max_ongoing_requests,
                   help="requests in flight per replica (default %(default)s); must be >= --max-batch-size")
    p.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / (1 << 20),
                   help="largest request body accepted, MiB (default %(default)s)")
    p.add_argument("--access-log", action="store_true", help="log every request (Serve's access log)")
    p.add_argument("--max-queued-requests", type=positive_int,
                   help="requests the proxy holds per model beyond what the replicas take; the excess gets "
                        "503 with Retry-After at once (default: unbounded)")
    p.add_argument("--retry-after-s", type=positive_int, default=defaults.retry_after_s,
                   help="the Retry-After of those 503 answers, seconds (default %(default)s)")
    p.add_argument("--max-replicas-per-node", type=positive_int,
                   help="at most this many replicas of a model on one node (1: each on its own node)")
    p.add_argument("--graceful-shutdown-s", type=_wait_s, default=defaults.graceful_shutdown_s,
                   help="how long a stopping replica lets its requests finish (default %(default)s)")
    p.add_argument("--proxy-location", choices=PROXY_LOCATIONS, default=defaults.proxy_location,
                   help="HTTP proxies on every node with a replica, or on the head only (default %(default)s)")
    p.add_argument("--index-on-head", action=argparse.BooleanOptionalAction, default=defaults.index_on_head,
                   help="run the index application (the model list, /healthz, /v2) on the Ray head node, so a "
                        "worker node's loss leaves it up (default: on)")
    p.add_argument("--update", action="store_true",
                   help="replace the running models of these names on --address by a rolling update, then exit")
    add_ray_arguments(p, worker="replica", threads=defaults.threads)
    return p


def _options(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                        replicas=args.replicas, max_ongoing_requests=args.max_ongoing_requests,
                        threads=args.threads, device=args.device, gemm=args.gemm, access_log=args.access_log,
                        max_body_bytes=max(1, int(args.max_body_mb * (1 << 20))),
                        max_queued_requests=args.max_queued_requests, retry_after_s=args.retry_after_s,
                        max_replicas_per_node=args.max_replicas_per_node,
                        graceful_shutdown_s=args.graceful_shutdown_s, proxy_location=args.proxy_location,
                        index_on_head=args.index_on_head)


def _update(specs: list[ModelSpec], options: ServeOptions, address: str) -> int:
    init_ray(address)
    try:
        update(specs, options)
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # the new replicas could not start: Serve keeps the old version
        print(f"{PROG}: error: update failed, the running version keeps serving: {error}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    print(f"{PROG}: updated {', '.join(f'{spec.name} to {spec.version}' for spec in specs)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        options = _options(args)
    except ValueError as error:
        parser.error(str(error))
    if args.update and not args.address:
        parser.error("--update needs --address: the cluster whose running models it replaces")
    try:
        specs = load_specs(args.artifacts, args.names)
    except (ValueError, RuntimeError) as error:  # bad name, ArtifactError (a failed self-check)
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    if args.update:
        return _update(specs, options, args.address)
    init_ray(args.address, args.num_cpus)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a background shell job ignores it by default
        signal.signal(signum, lambda *_: stop.set())
    try:
        url = deploy(specs, options, host=args.host, port=args.port)
        print(f"{PROG}: serving {', '.join(spec.name for spec in specs)} at {url}{API_PREFIX} (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        stop.wait()
    except Exception as error:  # a replica that cannot start: Serve reports it as a deploy failure
        print(f"{PROG}: error: deployment failed: {error}", file=sys.stderr)
        return 1
    finally:
        try:  # on a shared cluster, remove only this command's applications
            undeploy(specs, timeout_s=options.graceful_shutdown_s + SHUTDOWN_MARGIN_S)
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
