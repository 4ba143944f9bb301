"""The Open Inference Protocol (KServe v2, Triton's HTTP API) for RepMLPNet artifacts.

One place for what a client of either server sees: the tensor names and shapes of a model
(``model_interface``, read by ``repmlp-triton-repo`` for ``config.pbtxt``, by the Triton
Python-backend model and by ``repmlp-serve``), the parsing of infer requests (JSON tensors
and the binary tensor data extension), the responses, and the ``/v2`` routes of
``repmlp-serve`` (``V2Router``). No web framework and no Ray here: the router takes a method,
path, headers and body and returns a status, headers and body.

Tensors of a model:

* ``INPUT__0`` FP32 ``[-1, C, H, W]``: a normalized batch, as the artifact's ``forward`` takes;
* ``IMAGE`` BYTES ``[-1, 1]``: one encoded PNG/JPEG/BMP per batch item, of any size, run
  through the artifact's own preprocessing;
* outputs: ``OUTPUT__0`` FP32 ``[-1, classes]`` (logits) for a logits artifact, else one FP32
  output per artifact output, under the artifact's name for it (``stage0``..., ``embedding``).

A request carries exactly one of the two inputs. Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import struct
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import repmlp_rt

INPUT = "INPUT__0"
IMAGE = "IMAGE"
LOGITS = "OUTPUT__0"
HEADER_LENGTH = "inference-header-content-length"
MODEL_VERSION = "1"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, protocol datatype and dims without the batch dim."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.dims]}


class ProtocolError(ValueError):
    """A request the protocol refuses: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def output_name(kind: str, name: str) -> str:
    """The protocol name of an artifact output: ``OUTPUT__0`` for logits (the LibTorch
    backend's naming, so clients work against either repository flavour), else its own."""
    return LOGITS if kind == "logits" else name


@dataclass(frozen=True)
class ModelInterface:
    """What a protocol client sees of an artifact: inputs, outputs, and the labels of the
    classification extension (empty unless the artifact outputs logits)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]


def model_interface(runtime: repmlp_rt.Runtime) -> ModelInterface:
    """The interface of a loaded artifact. The runtime says what the graph takes and returns;
    the dims of outputs other than logits are the manifest's record of them."""
    kind = runtime.output_kind
    dims = {out["name"]: tuple(out["shape"]) for out in runtime.manifest.get("outputs", [])}
    outputs = []
    for name in runtime.output_names:
        shape = (runtime.num_classes,) if kind == "logits" else dims.get(name)
        if shape is None:
            raise repmlp_rt.ArtifactError(f"'{runtime.path}': manifest.json does not record the shape of output {name!r}")
        outputs.append(TensorSpec(output_name(kind, name), "FP32", shape))
    inputs = (TensorSpec(INPUT, "FP32", tuple(runtime.input_shape)), TensorSpec(IMAGE, "BYTES", (1,)))
    return ModelInterface(inputs, tuple(outputs), tuple(runtime.labels) if kind == "logits" else ())


def group_by_shape(items: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of ``items`` grouped by (dtype, shape), first-seen order: each group stacks
    into one model call (images of different sizes, or rows beside images, cannot)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((item.dtype.str, item.shape), []).append(i)
    return list(groups.values())


def decode_images(encoded: np.ndarray, name: str = IMAGE) -> list[np.ndarray]:
    """uint8 HWC images from an IMAGE tensor (bytes objects, shape (N, 1)); ``ValueError``
    (``repmlp_rt.InputError``) naming the item for one that cannot be decoded."""
    images = []
    for i, data in enumerate(encoded.reshape(-1)):
        if not isinstance(data, (bytes, np.bytes_)):
            raise repmlp_rt.InputError(f"{name}[{i}]: expected encoded image bytes, got {type(data).__name__}")
        images.append(repmlp_rt.decode_image_bytes(bytes(data), f"{name}[{i}]"))
    return images


def request_items(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """What the runtime runs, one array per batch item, for a request's inputs: (C, H, W)
    float32 rows of ``INPUT__0``, or the decoded uint8 images of ``IMAGE``. Exactly one of
    the two must be given (``ValueError`` otherwise)."""
    given = sorted(name for name in (INPUT, IMAGE) if inputs.get(name) is not None)
    if len(given) != 1:
        raise repmlp_rt.InputError(f"expected exactly one of the inputs {INPUT} and {IMAGE}, got "
                                   f"{', '.join(given) if given else 'neither'}")
    if given[0] == IMAGE:
        return decode_images(inputs[IMAGE])
    return list(np.ascontiguousarray(inputs[INPUT], dtype=np.float32))


# --- infer requests -----------------------------------------------------------------------

@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    class_count: int = 0


@dataclass(frozen=True)
class InferRequest:
    """A parsed infer request: its id, its one input (name and array: float32 NCHW, or an
    object array of bytes for IMAGE) and the outputs asked for (all when none are named)."""

    id: str | None
    input_name: str
    array: np.ndarray
    outputs: list[RequestedOutput]


def _split_body(body: bytes, headers: Mapping[str, str]) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary tensor data after it (binary data extension)."""
    encoding = headers.get("content-encoding", "identity").lower()
    try:
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        elif encoding != "identity":
            raise ProtocolError(400, f"unsupported Content-Encoding {encoding!r}: expected gzip, deflate or none")
    except (OSError, zlib.error, EOFError) as error:
        raise ProtocolError(400, f"request body is not valid {encoding} data: {error}") from None
    declared = headers.get(HEADER_LENGTH)
    if declared is None:
        split = len(body)
    elif declared.isdigit() and int(declared) <= len(body):
        split = int(declared)
    else:
        raise ProtocolError(400, f"Inference-Header-Content-Length {declared!r}: expected an integer of at most "
                                 f"the body's {len(body)} bytes")
    try:
        header = json.loads(body[:split])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProtocolError(400, f"the inference request header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise ProtocolError(400, f"the inference request header must be a JSON object, got {type(header).__name__}")
    return header, body[split:]


def _binary_size(parameters: Any, where: str) -> int | None:
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise ProtocolError(400, f"{where}: 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ProtocolError(400, f"{where}: binary_data_size must be an integer >= 0, got {size!r}")
    return size


def _unpack_bytes(raw: bytes, count: int, where: str) -> np.ndarray:
    """A BYTES tensor in binary form: each element a 4-byte little-endian length, then the bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ProtocolError(400, f"{where}: BYTES data ends inside an element's length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(400, f"{where}: BYTES element {len(elements)} claims {length} bytes, "
                                     f"{len(raw) - offset} are left")
        elements.append(raw[offset:offset + length])
        offset += length
    if len(elements) != count:
        raise ProtocolError(400, f"{where}: expected {count} BYTES elements for its shape, got {len(elements)}")
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array


def _json_data(data: Any, datatype: str, count: int, where: str) -> np.ndarray:
    """A tensor's JSON ``data`` (flat or nested lists) as a flat array of ``count`` elements."""
    if datatype == "BYTES":
        flat = np.array(data, dtype=object).reshape(-1) if isinstance(data, list) else None
        if flat is None or not all(isinstance(item, str) for item in flat):
            raise ProtocolError(400, f"{where}: BYTES data must be a list of strings")
        encoded = np.empty(flat.size, dtype=object)
        encoded[:] = [item.encode("utf-8") for item in flat]
        flat = encoded
    else:
        try:
            flat = np.asarray(data, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise ProtocolError(400, f"{where}: FP32 data must be a list of numbers") from None
    if flat.size != count:
        raise ProtocolError(400, f"{where}: expected {count} elements for its shape, got {flat.size}")
    return flat


def _read_input(entry: Any, blob: bytes, offset: int, specs: Mapping[str, TensorSpec]) -> tuple[str, np.ndarray, int]:
    """(name, array, bytes of the binary section used) for one entry of ``inputs``."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ProtocolError(400, "every entry of 'inputs' must be an object with a 'name'")
    name = entry["name"]
    spec = specs.get(name)
    if spec is None:
        raise ProtocolError(400, f"unexpected input {name!r}: the model takes {' or '.join(specs)}")
    where = f"input {name}"
    shape, datatype = entry.get("shape"), entry.get("datatype")
    if datatype != spec.datatype:
        raise ProtocolError(400, f"{where}: expected datatype {spec.datatype}, got {datatype!r}")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or len(shape) < 1 or tuple(shape[1:]) != spec.dims or shape[0] < 1):
        raise ProtocolError(400, f"{where}: expected shape [N, {', '.join(map(str, spec.dims))}] with N >= 1, "
                                 f"got {shape!r}")
    count = int(np.prod(shape))
    size = _binary_size(entry.get("parameters"), where)
    if size is None:
        if "data" not in entry:
            raise ProtocolError(400, f"{where}: no 'data' and no binary_data_size")
        flat = _json_data(entry["data"], datatype, count, where)
    else:
        if offset + size > len(blob):
            raise ProtocolError(400, f"{where}: binary_data_size {size} runs past the {len(blob) - offset} "
                                     "bytes of binary data left")
        raw = blob[offset:offset + size]
        if datatype == "BYTES":
            flat = _unpack_bytes(raw, count, where)
        elif size != count * 4:
            raise ProtocolError(400, f"{where}: expected {count * 4} bytes of FP32 data for shape {shape}, got {size}")
        else:
            flat = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return name, flat.reshape(shape), 0 if size is None else size


def _requested_outputs(header: dict[str, Any], outputs: Sequence[TensorSpec]) -> list[RequestedOutput]:
    parameters = header.get("parameters") or {}
    default_binary = bool(isinstance(parameters, dict) and parameters.get("binary_data_output", False))
    asked = header.get("outputs")
    if asked is None:
        return [RequestedOutput(spec.name, default_binary) for spec in outputs]
    known = {spec.name for spec in outputs}
    requested = []
    for entry in asked if isinstance(asked, list) else [None]:
        if not isinstance(entry, dict) or entry.get("name") not in known:
            raise ProtocolError(400, f"each requested output must name one of {', '.join(sorted(known))}, "
                                     f"got {entry!r}")
        options = entry.get("parameters") or {}
        count = options.get("classification", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ProtocolError(400, f"output {entry['name']}: classification must be an integer >= 0, got {count!r}")
        requested.append(RequestedOutput(entry["name"], bool(options.get("binary_data", default_binary)), count))
    return requested


def parse_infer_request(body: bytes, headers: Mapping[str, str], inputs: Sequence[TensorSpec],
                        outputs: Sequence[TensorSpec]) -> InferRequest:
    """An infer request body (``headers`` with lower-case names) checked against the model's
    tensors; ``ProtocolError`` (400) for anything the model cannot run."""
    header, blob = _split_body(body, headers)
    entries = header.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise ProtocolError(400, "the request must have a non-empty 'inputs' list")
    specs = {spec.name: spec for spec in inputs}
    read, offset = {}, 0
    for entry in entries:
        name, array, used = _read_input(entry, blob, offset, specs)
        if name in read:
            raise ProtocolError(400, f"input {name} is given twice")
        read[name] = array
        offset += used
    if offset != len(blob):
        raise ProtocolError(400, f"{len(blob) - offset} bytes of binary data after the last input's")
    if len(read) != 1:
        raise ProtocolError(400, f"expected exactly one of the inputs {INPUT} and {IMAGE}, got {', '.join(read)}")
    request_id = header.get("id")
    [(name, array)] = read.items()
    return InferRequest(None if request_id is None else str(request_id), name, array,
                        _requested_outputs(header, outputs))


# --- responses ----------------------------------------------------------------------------

def classification(values: np.ndarray, count: int, labels: Sequence[str]) -> np.ndarray:
    """Triton's classification extension: the ``count`` largest values of each row as
    ``"value:index:label"`` BYTES, shape (N, count)."""
    count = min(count, values.shape[1])
    order = np.argsort(-values, axis=1, kind="stable")[:, :count]
    rows = [[f"{row[i]:f}:{i}" + (f":{labels[i]}" if i < len(labels) else "") for i in top]
            for row, top in zip(values, order)]
    out = np.empty((values.shape[0], count), dtype=object)
    out[:] = [[text.encode("utf-8") for text in row] for row in rows]
    return out


def _pack(array: np.ndarray) -> bytes:
    if array.dtype == object:
        return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def infer_response(model: str, request: InferRequest, results: Mapping[str, np.ndarray],
                   labels: Sequence[str]) -> tuple[bytes, dict[str, str]]:
    """The response body and headers for ``results`` (output name -> float32 array),
    carrying the requested outputs as JSON data or binary data, as each asks."""
    entries, blobs = [], []
    for wanted in request.outputs:
        array = results[wanted.name]
        if wanted.class_count:
            array = classification(array, wanted.class_count, labels)
        entry: dict[str, Any] = {"name": wanted.name, "datatype": "BYTES" if array.dtype == object else "FP32",
                                 "shape": list(array.shape)}
        if wanted.binary:
            blobs.append(_pack(array))
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        elif array.dtype == object:
            entry["data"] = [item.decode("utf-8") for item in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    answer: dict[str, Any] = {"model_name": model, "model_version": MODEL_VERSION, "outputs": entries}
    if request.id is not None:
        answer["id"] = request.id
    text = json.dumps(answer).encode("utf-8")
    if not blobs:
        return text, {"content-type": JSON_TYPE}
    return text + b"".join(blobs), {"content-type": BINARY_TYPE, HEADER_LENGTH: str(len(text))}


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode("utf-8")


def server_metadata(name: str) -> dict[str, Any]:
    return {"name": name, "version": repmlp_rt.__version__, "extensions": ["binary_tensor_data", "classification"]}


def model_metadata(name: str, interface: ModelInterface) -> dict[str, Any]:
    return {"name": name, "versions": [MODEL_VERSION], "platform": "repmlp_rt",
            "inputs": [spec.metadata() for spec in interface.inputs],
            "outputs": [spec.metadata() for spec in interface.outputs]}


# --- the /v2 routes of repmlp-serve -------------------------------------------------------

Response = tuple[int, dict[str, str], bytes]
# (model name, one array per batch item) -> (logits (N, ...), batch size each item ran in)
InferCall = Callable[[str, list[np.ndarray]], Awaitable[tuple[np.ndarray, list[int]]]]
ReadyCall = Callable[[str], Awaitable[bool]]
MODEL_ROUTE = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?")


def _json(status: int, value: Any) -> Response:
    return status, {"content-type": JSON_TYPE}, json.dumps(value).encode("utf-8")


def _error(status: int, message: str) -> Response:
    return status, {"content-type": JSON_TYPE}, error_body(message)


class V2Router:
    """The Open Inference Protocol routes of a set of models (name -> interface). ``infer``
    runs a model on one array per batch item (the deployment's batching path); ``ready`` says
    whether a model can serve."""

    def __init__(self, server: str, models: Mapping[str, ModelInterface], infer: InferCall, ready: ReadyCall) -> None:
        self.server = server
        self.models = dict(models)
        self.infer = infer
        self.ready = ready

    async def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Response:
        """One request; ``headers`` with lower-case names. Never raises for a bad request."""
        path = path.rstrip("/")
        try:
            if path in ("/v2", "/v2/health/live", "/v2/health/ready"):
                self._method(method, "GET", path)
                if path == "/v2":
                    return _json(200, server_metadata(self.server))
                if path.endswith("ready") and not all([await self.ready(name) for name in self.models]):
                    return _error(503, "not every model is ready")
                return 200, {"content-type": JSON_TYPE}, b""
            match = MODEL_ROUTE.fullmatch(path)
            if match is None:
                return _error(404, f"no route {path}: expected /v2, /v2/health/(live|ready) or "
                                   "/v2/models/<name>[/versions/1][/ready|/infer]")
            name, version, action = match.groups()
            self._model(name, version)
            if action == "/infer":
                self._method(method, "POST", path)
                return await self._infer(name, body, headers)
            self._method(method, "GET", path)
            if action == "/ready":
                return (200, {}, b"") if await self.ready(name) else _error(503, f"model {name!r} is not ready")
            return _json(200, model_metadata(name, self.models[name]))
        except ProtocolError as error:
            return _error(error.status, str(error))

    @staticmethod
    def _method(method: str, expected: str, path: str) -> None:
        if method != expected:
            raise ProtocolError(405, f"method {method} is not allowed on {path}: expected {expected}")

    def _model(self, name: str, version: str | None) -> None:
        if name not in self.models:
            raise ProtocolError(404, f"unknown model {name!r}: serving {', '.join(sorted(self.models))}")
        if version not in (None, MODEL_VERSION):
            raise ProtocolError(404, f"model {name!r} has no version {version!r}: it serves version {MODEL_VERSION}")

    async def _infer(self, name: str, body: bytes, headers: Mapping[str, str]) -> Response:
        interface = self.models[name]
        outputs = interface.outputs
        if len(outputs) != 1:
            raise ProtocolError(400, f"model {name!r} has {len(outputs)} outputs; repmlp-serve runs one-output "
                                     "artifacts (serve feature maps with the Triton Python-backend repository)")
        request = parse_infer_request(body, headers, interface.inputs, outputs)
        inputs = {request.input_name: request.array}
        try:  # decoding images off the event loop, which keeps taking requests meanwhile
            items = await asyncio.to_thread(request_items, inputs) if IMAGE in inputs else request_items(inputs)
        except ValueError as error:  # an undecodable image
            raise ProtocolError(400, str(error)) from None
        values, sizes = await self.infer(name, items)
        text, answer_headers = infer_response(name, request, {outputs[0].name: values}, interface.labels)
        answer_headers["x-batch-size"] = ",".join(map(str, sizes))
        return 200, answer_headers, text


# --- a local server process ---------------------------------------------------------------

class ServerProcess:
    """A server that speaks this protocol (tritonserver, repmlp-serve), run as a child process
    with its output in ``log``: ``wait_ready`` polls ``/v2/health/ready``; ``stop`` ends it by
    its process id (SIGTERM, then SIGKILL after ``grace`` seconds). The tests and the load
    benchmark use it; it is also a quick way to try a repository on one machine."""

    def __init__(self, command: Sequence[str], url: str, log: str, env: Mapping[str, str] | None = None) -> None:
        import subprocess

        self.url = url.rstrip("/")
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT,
                                            env=None if env is None else dict(env))

    def log_text(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as file:
            return file.read()

    def wait_ready(self, timeout: float, path: str = "/v2/health/ready") -> None:
        """Returns once ``path`` answers 200; RuntimeError (with the log's end) if the process
        exits or ``timeout`` seconds pass first."""
        import time
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready at {self.url}{path} after {timeout:.0f} s:\n{self.log_text()[-4000:]}")

    def stop(self, grace: float = 30.0) -> int:
        """Stops the process by its id; returns its exit status."""
        if self.process.poll() is None:
            terminate_process(self.process, grace)
        return self.process.returncode


def terminate_process(process: Any, grace: float) -> float:
    """SIGTERM to a ``subprocess.Popen``, then SIGKILL after ``grace`` seconds; returns the
    seconds until it exited (``inf`` when it had to be killed)."""
    import signal
    import subprocess
    import time

    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return float("inf")
    return time.monotonic() - start
