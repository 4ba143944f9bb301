"""The Open Inference Protocol of repmlp-serve (repmlp_rt.oip) next to a real Triton server.

Both servers serve the digits artifact: Triton through a python-backend repository, repmlp-serve
as its command (a child process with its own local Ray). The same tritonclient code talks to
both; only the URL changes. Both are stopped by their process ids when the module ends.
"""

import concurrent.futures
import io
import json
import os
import struct
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import repmlp_rt
from repmlp_rt.oip import ServerProcess
from test_serve import DIGIT_PNGS, RAY_ENV
from test_triton_server import (assert_logits_close, encoded, free_port, http_infer, python_backend_repository,
                                start_triton)


@pytest.fixture(scope="module")
def triton_url(tmp_path_factory, digits_artifact):
    repository = tmp_path_factory.mktemp("oip-triton-repo")
    python_backend_repository(repository, digits_artifact, "digits")
    started = start_triton(repository, tmp_path_factory.mktemp("oip-triton-log") / "tritonserver.log")
    try:
        yield started.http_url
    finally:
        started.server.stop()


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory, digits_artifact):
    """``repmlp-serve digits.pt`` on a free loopback port (batches of up to 16, 20 ms wait)."""
    port = free_port()
    folder = tmp_path_factory.mktemp("oip-serve")
    command = [sys.executable, "-m", "repmlp_rt.serve", digits_artifact, "--port", str(port), "--num-cpus", "2",
               "--batch-wait-ms", "20"]
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": str(folder)}
    server = ServerProcess(command, f"http://127.0.0.1:{port}", str(folder / "serve.log"), env=env)
    try:
        server.wait_ready(300)
        yield f"127.0.0.1:{port}"
    finally:
        assert server.stop(60) == 0, server.log_text()[-4000:]


@pytest.fixture(params=["triton", "repmlp-serve"])
def url(request):
    return request.getfixturevalue({"triton": "triton_url", "repmlp-serve": "serve_url"}[request.param])


def test_same_client_code_same_logits(triton_url, serve_url, digits_artifact):
    """INPUT__0 (binary and JSON) and IMAGE through both servers: equal logits, and the runtime's."""
    runtime = repmlp_rt.Runtime(digits_artifact)
    batch = np.random.default_rng(3).standard_normal((4, *runtime.input_shape)).astype(np.float32)
    images = encoded(DIGIT_PNGS[:4])
    expected_images = np.concatenate([runtime.infer(repmlp_rt.decode_image(p)[None]) for p in DIGIT_PNGS[:4]])
    for binary in (True, False):
        answers = {url: http_infer(url, "INPUT__0", batch, binary=binary) for url in (triton_url, serve_url)}
        assert_logits_close(answers[serve_url], answers[triton_url])
        assert_logits_close(answers[serve_url], runtime.infer(batch))
    from_images = {url: http_infer(url, "IMAGE", images) for url in (triton_url, serve_url)}
    assert_logits_close(from_images[serve_url], from_images[triton_url])
    assert_logits_close(from_images[serve_url], expected_images)
    # the classification extension, with the artifact's labels on both
    tops = {url: http_infer(url, "IMAGE", images, class_count=2) for url in (triton_url, serve_url)}
    parsed = {url: [[item.decode().split(":")[1:] for item in row] for row in top] for url, top in tops.items()}
    assert parsed[serve_url] == parsed[triton_url]


def test_health_and_metadata_through_tritonclient(triton_url, serve_url):
    """repmlp-serve answers tritonclient's health and metadata calls as Triton does."""
    metadata = {}
    for url in (triton_url, serve_url):
        client = httpclient.InferenceServerClient(url)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
        assert not client.is_model_ready("nope")
        metadata[url] = client.get_model_metadata("digits")
        assert client.get_server_metadata()["extensions"]
    for key in ("name", "versions", "inputs", "outputs"):
        assert metadata[serve_url][key] == metadata[triton_url][key], key
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        httpclient.InferenceServerClient(serve_url).get_model_metadata("nope")


def post(url, path, body, headers=None):
    """(status, headers, body) of a POST; errors are returned, not raised."""
    request = urllib.request.Request(f"http://{url}{path}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_binary_tensor_data_both_ways(url, digits_artifact):
    """A hand-built binary request (FP32 input, BYTES input) and a binary output, parsed by hand."""
    runtime = repmlp_rt.Runtime(digits_artifact)
    batch = np.random.default_rng(4).standard_normal((2, *runtime.input_shape)).astype(np.float32)
    raw = batch.astype("<f4").tobytes()
    header = json.dumps({"id": "r1", "inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": list(batch.shape),
                                                 "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "OUTPUT__0", "parameters": {"binary_data": True}}]}).encode()
    status, headers, body = post(url, "/v2/models/digits/infer", header + raw,
                                 {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"})
    assert status == 200, body
    split = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:split])
    assert answer["id"] == "r1" and answer["model_name"] == "digits"
    [output] = answer["outputs"]
    assert output["name"] == "OUTPUT__0" and output["datatype"] == "FP32" and output["shape"] == [2, 10]
    assert output["parameters"]["binary_data_size"] == len(body) - split == 2 * 10 * 4
    logits = np.frombuffer(body[split:], dtype="<f4").reshape(2, 10)
    assert_logits_close(logits, runtime.infer(batch))

    png = open(DIGIT_PNGS[0], "rb").read()
    element = struct.pack("<I", len(png)) + png
    header = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1],
                                     "parameters": {"binary_data_size": len(element)}}]}).encode()
    status, headers, body = post(url, "/v2/models/digits/infer", header + element,
                                 {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, body
    [output] = json.loads(body)["outputs"]  # no binary output asked for: JSON data
    expected = runtime.infer(repmlp_rt.decode_image(DIGIT_PNGS[0])[None])
    assert_logits_close(np.array(output["data"], dtype=np.float32).reshape(1, 10), expected)


def _infer_body(inputs, **extra):
    return json.dumps({"inputs": inputs, **extra}).encode()


ZEROS = {"name": "INPUT__0", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}
BAD_REQUESTS = {
    # name: (path, body, headers, status on repmlp-serve, fragment of its message)
    "not json": ("/v2/models/digits/infer", b"{nope", {}, 400, "not valid JSON"),
    "no inputs": ("/v2/models/digits/infer", _infer_body([]), {}, 400, "non-empty 'inputs'"),
    "wrong datatype": ("/v2/models/digits/infer", _infer_body([{**ZEROS, "datatype": "FP16"}]), {}, 400,
                       "expected datatype FP32, got 'FP16'"),
    "wrong shape": ("/v2/models/digits/infer", _infer_body([{**ZEROS, "shape": [1, 3, 8, 8]}]), {}, 400,
                    "expected shape [N, 3, 32, 32]"),
    "too little data": ("/v2/models/digits/infer", _infer_body([{**ZEROS, "data": [0.0] * 5}]), {}, 400,
                        "expected 3072 elements"),
    "unknown input": ("/v2/models/digits/infer", _infer_body([{**ZEROS, "name": "x"}]), {}, 400,
                      "unexpected input 'x'"),
    "both inputs": ("/v2/models/digits/infer", _infer_body([ZEROS, {"name": "IMAGE", "datatype": "BYTES",
                                                                    "shape": [1, 1], "data": ["x"]}]), {}, 400,
                    "exactly one of the inputs"),
    "garbage image": ("/v2/models/digits/infer", _infer_body([{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1],
                                                               "data": ["not an image"]}]), {}, 400,
                      "cannot decode image"),
    "header past the body": ("/v2/models/digits/infer", _infer_body([ZEROS]),
                             {"Inference-Header-Content-Length": "999999"}, 400, "Inference-Header-Content-Length"),
    "unknown output": ("/v2/models/digits/infer", _infer_body([ZEROS], outputs=[{"name": "OUT"}]), {}, 400,
                       "each requested output must name one of OUTPUT__0"),
    "unknown model": ("/v2/models/nope/infer", _infer_body([ZEROS]), {}, 404, "unknown model 'nope'"),
    "unknown version": ("/v2/models/digits/versions/2/infer", _infer_body([ZEROS]), {}, 404, "no version '2'"),
    "empty body": ("/v2/models/digits/infer", b"", {}, 400, "empty request body: expected an inference request"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_protocol_errors(triton_url, serve_url, case):
    """Each bad request: an error status with one JSON object {"error": "..."} from both servers
    (status and message checked on repmlp-serve), and the next request is answered."""
    path, body, headers, status, fragment = BAD_REQUESTS[case]
    for url in (triton_url, serve_url):
        got, _, answer = post(url, path, body, {"Content-Type": "application/json", **headers})
        assert got >= 400, (url, got, answer)  # Triton answers some with 500 (e.g. JSON it cannot parse)
        error = json.loads(answer)
        assert list(error) == ["error"] and isinstance(error["error"], str), (url, answer)
        if url == serve_url:
            assert got == status and fragment in error["error"], answer
        assert http_infer(url, "INPUT__0", np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 10)


def test_wrong_method_and_route(serve_url):
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://{serve_url}/v2/models/digits/infer", timeout=30)
    assert error.value.code == 405 and "method GET is not allowed" in json.loads(error.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://{serve_url}/v2/models/digits/explain", timeout=30)
    assert error.value.code == 404 and "no route" in json.loads(error.value.read())["error"]


def test_v2_requests_join_the_v1_batches(serve_url, digits_artifact):
    """One /v1 .npy request among concurrent v2 requests runs in a batch with them: its
    X-Batch-Size exceeds its own single row (tried over a few bursts)."""
    runtime = repmlp_rt.Runtime(digits_artifact)
    row = np.random.default_rng(5).standard_normal((1, *runtime.input_shape)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, row)

    def v1():
        status, headers, body = post(serve_url, "/v1/models/digits/infer", buffer.getvalue())
        assert status == 200, body
        assert_logits_close(np.load(io.BytesIO(body)), runtime.infer(row))
        return int(headers["X-Batch-Size"])

    sizes = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        for _ in range(5):
            v2 = [pool.submit(http_infer, serve_url, "INPUT__0", row) for _ in range(12)]
            sizes.append(pool.submit(v1).result())
            for future in v2:
                assert_logits_close(future.result(), runtime.infer(row))
            if sizes[-1] > 1:
                break
    assert max(sizes) > 1, sizes
