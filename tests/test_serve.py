"""Ray Serve (repmlp_rt.serve) and Ray Data (repmlp-classify) against repmlp_infer --json.

One local Ray cluster serves the whole module (started once, ~15 s): usage statistics off, its
files under pytest's temp folder, no auth token written under $HOME, shut down at the end.
"""

import base64
import concurrent.futures
import glob
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import repmlp_rt
from helpers import ROOT, repmlp_infer_binary

try:
    import ray
    from ray import serve

    from repmlp_rt import serve as rt_serve
except ImportError as error:  # a failure, not a skip: `make test` installs the extra
    raise ImportError(f"{error}: the serve extra is missing, run `make serve-deps`") from None

DIGIT_PNGS = sorted(glob.glob(os.path.join(ROOT, "examples", "digits", "images", "*.png")))
MAX_BODY = 1 << 20  # small, so the oversized-body case stays cheap
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray for the whole test run; yields its GCS address."""
    saved = {key: os.environ.get(key) for key in RAY_ENV}
    os.environ.update(RAY_ENV)
    temp_dir = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", _temp_dir=str(temp_dir))
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def served(ray_cluster, digits_artifact):
    """The digits artifact on Serve (batches of up to 16, 10 ms wait, room for all 200 concurrent
    requests in the replica); yields the base URL."""
    specs = rt_serve.load_specs([digits_artifact])
    options = rt_serve.ServeOptions(max_batch_size=16, batch_wait_ms=10, max_ongoing_requests=256,
                                    max_body_bytes=MAX_BODY)
    url = rt_serve.deploy(specs, options, port=_free_port())
    yield url
    rt_serve.undeploy(specs)


@pytest.fixture(scope="module")
def cli_topk(digits_artifact):
    """repmlp_infer --json on the 20 shipped PNGs: {file name: topk list}."""
    result = subprocess.run([repmlp_infer_binary(), digits_artifact, *DIGIT_PNGS, "--json"],
                            capture_output=True, text=True, timeout=120, check=True)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["input"] for r in records] == DIGIT_PNGS
    return {os.path.basename(r["input"]): r["topk"] for r in records}


def request(url, data=None, content_type="application/octet-stream", method=None):
    """(status, headers, body bytes) of one HTTP request; 4xx/5xx are returned, not raised."""
    headers = {"Content-Type": content_type} if data is not None else {}
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def assert_same_topk(served_topk, cli_topk, rtol=1e-5):
    """Same classes in the same order, same labels; scores equal up to float32 rounding of a
    different batch composition (the runtime batches differently from repmlp_infer)."""
    assert [(t["index"], t["label"]) for t in served_topk] == [(t["index"], t["label"]) for t in cli_topk]
    torch.testing.assert_close(torch.tensor([t["score"] for t in served_topk]),
                               torch.tensor([t["score"] for t in cli_topk]), rtol=rtol, atol=1e-7)


def test_classify_matches_repmlp_infer(served, cli_topk):
    for path in DIGIT_PNGS:
        with open(path, "rb") as f:
            status, headers, body = request(f"{served}/v1/models/digits/classify", f.read(), "image/png")
        assert status == 200, body
        answer = json.loads(body)
        assert answer["input"] == "body"
        assert_same_topk(answer["topk"], cli_topk[os.path.basename(path)])
        assert headers["X-Batch-Size"].isdigit()


def test_classify_json_list_of_base64(served, cli_topk):
    images = [base64.b64encode(open(p, "rb").read()).decode() for p in DIGIT_PNGS]
    status, headers, body = request(f"{served}/v1/models/digits/classify?topk=3",
                                    json.dumps(images).encode(), "application/json")
    assert status == 200, body
    answers = json.loads(body)
    assert [a["input"] for a in answers] == [f"images[{i}]" for i in range(len(DIGIT_PNGS))]
    for answer, path in zip(answers, DIGIT_PNGS):
        assert_same_topk(answer["topk"], cli_topk[os.path.basename(path)][:3])
    assert len(headers["X-Batch-Size"].split(",")) == len(DIGIT_PNGS)


def test_infer_npy_matches_runtime(served, digits_artifact):
    runtime = repmlp_rt.Runtime(digits_artifact)
    batch = np.random.default_rng(0).standard_normal((3, *runtime.input_shape)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, batch)
    status, headers, body = request(f"{served}/v1/models/digits/infer", buffer.getvalue())
    assert status == 200, body
    logits = np.load(io.BytesIO(body), allow_pickle=False)
    assert logits.dtype == np.float32 and logits.shape == (3, runtime.num_classes)
    expected = runtime.infer(batch)
    torch.testing.assert_close(torch.from_numpy(logits), torch.from_numpy(expected), rtol=1e-5,
                               atol=1e-5 * float(np.abs(expected).max()))


def test_manifests_and_health(served, digits_artifact):
    manifest = repmlp_rt.Runtime(digits_artifact, warmup=0).manifest
    status, headers, body = request(f"{served}/v1/models/digits")
    assert status == 200 and json.loads(body) == manifest
    with open(digits_artifact, "rb") as f:  # the version header: the file's SHA-256, 16 hex digits
        assert headers["X-Model-Version"] == hashlib.sha256(f.read()).hexdigest()[:16]
    status, _, body = request(f"{served}/v1/models")
    assert status == 200 and json.loads(body) == {"models": [{"name": "digits", "manifest": manifest}]}
    status, _, body = request(f"{served}/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok", "models": ["digits"]}


def test_concurrent_requests_are_batched(served, cli_topk):
    """200 requests at once: every answer right, and the replica ran them in batches."""
    names = [os.path.basename(p) for p in DIGIT_PNGS]
    data = {name: open(p, "rb").read() for name, p in zip(names, DIGIT_PNGS)}
    _, _, before = request(f"{served}/v1/models/digits/stats")
    before = json.loads(before)
    chosen = [names[i % len(names)] for i in range(200)]

    def call(name):
        return name, request(f"{served}/v1/models/digits/classify", data[name], "image/png")

    with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
        answers = list(pool.map(call, chosen))
    sizes = []
    for name, (status, headers, body) in answers:
        assert status == 200, body
        assert_same_topk(json.loads(body)["topk"], cli_topk[name])
        sizes.append(int(headers["X-Batch-Size"]))
    _, _, after = request(f"{served}/v1/models/digits/stats")
    after = json.loads(after)
    items, batches = after["items"] - before["items"], after["batches"] - before["batches"]
    assert items == 200
    # Two views of the same batching: what each request saw, and the replica's own counters.
    assert np.mean(sizes) > 1, sizes
    assert items / batches > 1, (items, batches)


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


BAD_REQUESTS = {
    # name: (path, body, content type, method, status, fragment of the error)
    "undecodable image": ("/v1/models/digits/classify", b"not an image", "image/png", "POST", 400, "cannot decode image"),
    "empty body": ("/v1/models/digits/classify", b"", "image/png", "POST", 400, "empty request body"),
    "bad json": ("/v1/models/digits/classify", b"[1, 2", "application/json", "POST", 400, "not valid JSON"),
    "json not strings": ("/v1/models/digits/classify", b"[1, 2]", "application/json", "POST", 400, "base64"),
    "bad base64": ("/v1/models/digits/classify", b'["***"]', "application/json", "POST", 400, "images[0] is not valid base64"),
    "bad topk": ("/v1/models/digits/classify?topk=11", b"x", "image/png", "POST", 400, "topk must be an integer in [1, 10]"),
    "wrong shape": ("/v1/models/digits/infer", _npy(np.zeros((2, 3, 8, 8), np.float32)), None, "POST", 400,
                    "expected a float32 (N, 3, 32, 32) .npy batch, got float32 (2, 3, 8, 8)"),
    "wrong dtype": ("/v1/models/digits/infer", _npy(np.zeros((1, 3, 32, 32), np.float64)), None, "POST", 400,
                    "got float64"),
    "not npy": ("/v1/models/digits/infer", b"garbage", None, "POST", 400, "not a .npy file"),
    "unknown model": ("/v1/models/nope/classify", b"x", "image/png", "POST", 404, "unknown model 'nope'"),
    "unknown route": ("/v1/models/digits/explain", b"x", "image/png", "POST", 404, "no route"),
    "wrong method": ("/v1/models/digits/classify", None, None, "GET", 405, "method GET is not allowed"),
    "oversized body": ("/v1/models/digits/classify", b"\0" * (MAX_BODY + 1), "image/png", "POST", 413, "over the limit"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_then_good_request(served, cli_topk, case):
    path, body, content_type, method, status, fragment = BAD_REQUESTS[case]
    got, headers, answer = request(served + path, body, content_type or "application/octet-stream", method)
    assert got == status, answer
    assert headers["Content-Type"] == "application/json"
    assert answer.count(b"\n") == 0
    assert fragment in json.loads(answer)["error"]
    with open(DIGIT_PNGS[0], "rb") as f:
        got, _, answer = request(f"{served}/v1/models/digits/classify", f.read(), "image/png")
    assert got == 200, answer
    assert_same_topk(json.loads(answer)["topk"], cli_topk[os.path.basename(DIGIT_PNGS[0])])


def test_ray_data_classify_matches_repmlp_infer(ray_cluster, digits_artifact, cli_topk, tmp_path):
    """repmlp-classify on the PNG folder, as a second driver on the shared cluster (--address)."""
    out = tmp_path / "results.jsonl"
    folder = os.path.dirname(DIGIT_PNGS[0])
    result = subprocess.run([sys.executable, "-m", "repmlp_rt.batch", digits_artifact, folder, "--out", str(out),
                             "--address", ray_cluster, "--batch-size", "8", "--actors", "2", "--no-progress"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, **RAY_ENV})
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in records] == DIGIT_PNGS  # folder order, sorted by name
    for record in records:
        assert_same_topk(record["topk"], cli_topk[os.path.basename(record["input"])])


def test_ray_data_reports_undecodable_files(ray_cluster, digits_artifact, cli_topk, tmp_path):
    """A broken file gets an error line in its place; the others are still classified."""
    from repmlp_rt.batch import classify_images

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    paths = [DIGIT_PNGS[0], str(broken), DIGIT_PNGS[1]]
    results = classify_images(digits_artifact, paths, batch_size=2)
    assert [r["input"] for r in results] == paths
    assert "cannot decode image" in results[1]["error"]
    assert_same_topk(results[0]["topk"], cli_topk[os.path.basename(DIGIT_PNGS[0])])
    assert_same_topk(results[2]["topk"], cli_topk[os.path.basename(DIGIT_PNGS[1])])


def test_update_of_a_model_not_served_is_refused(served, small_artifact):
    specs = rt_serve.load_specs([small_artifact], ["not-served"])
    with pytest.raises(ValueError, match="no running model named 'not-served' to update \\(serving: digits\\)"):
        rt_serve.update(specs, rt_serve.ServeOptions())
