"""A real Triton Inference Server serving repositories that repmlp-triton-repo --backend python
wrote, queried with tritonclient over HTTP and gRPC.

The server is the ``tritonserver`` binary of the nvidia-pytriton wheel with its Python backend,
installed by ``make triton-server`` into ``.triton/`` (with numpy 1.x for the backend's stub,
which the repository's ``--python-path`` puts first). It runs on free loopback ports and is
stopped by its process id when the module ends.
"""

import concurrent.futures
import os
import socket

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import repmlp_rt
from helpers import ROOT, SMALL_ARCH
from repmlp.artifact import build_artifact
from repmlp_rt.oip import ServerProcess
from repmlp_rt.triton import tritonserver_command, write_triton_repository
from test_serve import DIGIT_PNGS, cli_topk  # noqa: F401  (cli_topk is a fixture)

TRITONSERVER = os.path.join(ROOT, ".triton", "server", "pytriton", "tritonserver", "bin", "tritonserver")
NUMPY1 = os.path.join(ROOT, ".triton", "numpy1")
# The folder that holds the repmlp_rt package in use (the stub does not read PYTHONPATH).
RUNTIME_DIR = os.path.dirname(os.path.dirname(os.path.abspath(repmlp_rt.__file__)))
MAX_BATCH = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_backend_repository(repository, artifact, name, **options):
    """The digits model as the Triton tests serve it: python backend, numpy 1.x and this
    checkout's repmlp_rt first on the stub's path."""
    return write_triton_repository(artifact, repository, name=name, backend="python", max_batch_size=MAX_BATCH,
                                   threads=1, python_path=[NUMPY1, RUNTIME_DIR], **options)


class Triton:
    """A started server: its URLs and process."""

    def __init__(self, server: ServerProcess, repository, http_port: int, grpc_port: int) -> None:
        self.server = server
        self.repository = repository
        self.http_url = f"127.0.0.1:{http_port}"
        self.grpc_url = f"127.0.0.1:{grpc_port}"


def start_triton(repository, log) -> Triton:
    if not os.access(TRITONSERVER, os.X_OK):  # a failure, not a skip: `make test` installs it
        raise FileNotFoundError(f"{TRITONSERVER} is missing: run `make triton-server`")
    http_port, grpc_port = free_port(), free_port()
    # A model that fails to load must not stop the server (the truncated-artifact case);
    # readiness then means "responsive", and each model says whether it is ready.
    command = tritonserver_command(TRITONSERVER, repository, http_port=http_port, grpc_port=grpc_port,
                                   extra=["--exit-on-error=false", "--strict-readiness=false",
                                          "--exit-timeout-secs=5"])
    server = ServerProcess(command, f"http://127.0.0.1:{http_port}", str(log))
    try:
        server.wait_ready(300)
    except BaseException:
        server.stop()
        raise
    return Triton(server, repository, http_port, grpc_port)


@pytest.fixture(scope="module")
def features_artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton-features") / "features.pt"
    build_artifact(SMALL_ARCH, img_size=32, out=str(path), output="features", out_indices=(0, 3), seed=2)
    return str(path)


@pytest.fixture(scope="module")
def triton(tmp_path_factory, digits_artifact, features_artifact):
    """digits and a features artifact (python backend), and a copy of digits whose artifact
    was truncated after writing."""
    repository = tmp_path_factory.mktemp("triton-repo")
    python_backend_repository(repository, digits_artifact, "digits")
    python_backend_repository(repository, features_artifact, "features")
    # numpy 2 (this environment's) first on the stub's path: refused at load time
    write_triton_repository(digits_artifact, repository, name="numpy2", backend="python",
                            python_path=[os.path.dirname(os.path.dirname(np.__file__)), RUNTIME_DIR])
    broken = python_backend_repository(repository, digits_artifact, "broken")
    artifact = broken.path / "1" / "artifact.pt"
    artifact.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    started = start_triton(repository, tmp_path_factory.mktemp("triton-log") / "tritonserver.log")
    try:
        client = httpclient.InferenceServerClient(started.http_url)
        assert client.is_model_ready("digits"), started.server.log_text()[-4000:]
        yield started
    finally:
        started.server.stop()


def http_infer(url, name, array, *, binary=True, class_count=0):
    """The client code shared with tests/test_oip.py: one request, the OUTPUT__0 array back."""
    client = httpclient.InferenceServerClient(url)
    datatype = "BYTES" if array.dtype == object else "FP32"
    given = httpclient.InferInput(name, list(array.shape), datatype)
    given.set_data_from_numpy(array, binary_data=binary)
    wanted = httpclient.InferRequestedOutput("OUTPUT__0", binary_data=binary, class_count=class_count)
    return client.infer("digits", [given], outputs=[wanted]).as_numpy("OUTPUT__0")


def encoded(paths) -> np.ndarray:
    """An IMAGE tensor: one encoded file per batch item, shape (N, 1)."""
    return np.array([[open(path, "rb").read()] for path in paths], dtype=object)


def assert_logits_close(got, expected):
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5,
                               atol=1e-6 * float(np.abs(expected).max()))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def test_images_match_repmlp_infer(triton, cli_topk):  # noqa: F811
    """Each shipped PNG through IMAGE: the top-1 and the top-k scores of repmlp_infer --json."""
    for path in DIGIT_PNGS:
        logits = http_infer(triton.http_url, "IMAGE", encoded([path]))
        expected = cli_topk[os.path.basename(path)]
        scores = softmax(logits)[0]
        order = np.argsort(-scores, kind="stable")
        assert int(order[0]) == expected[0]["index"]
        torch.testing.assert_close(torch.tensor(scores[order[: len(expected)]]),
                                   torch.tensor([t["score"] for t in expected], dtype=torch.float64),
                                   rtol=0, atol=1e-6)
        # Triton's classification extension, with the repository's labels.txt
        [[top]] = http_infer(triton.http_url, "IMAGE", encoded([path]), class_count=1)
        _, index, label = top.decode().split(":")
        assert (int(index), label) == (expected[0]["index"], expected[0]["label"])


def test_image_batch_matches_the_runtime(triton, digits_artifact):
    """Several images of one request, any size: the runtime's own preprocessing."""
    images = [repmlp_rt.decode_image(path) for path in DIGIT_PNGS[:MAX_BATCH]]
    expected = np.concatenate([repmlp_rt.Runtime(digits_artifact).infer(image[None]) for image in images])
    assert_logits_close(http_infer(triton.http_url, "IMAGE", encoded(DIGIT_PNGS[:MAX_BATCH])), expected)


def test_normalized_batches_over_http_and_grpc(triton, digits_artifact):
    runtime = repmlp_rt.Runtime(digits_artifact)
    batch = np.random.default_rng(1).standard_normal((5, *runtime.input_shape)).astype(np.float32)
    expected = runtime.infer(batch)
    assert_logits_close(http_infer(triton.http_url, "INPUT__0", batch, binary=True), expected)
    assert_logits_close(http_infer(triton.http_url, "INPUT__0", batch, binary=False), expected)
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    given = grpcclient.InferInput("INPUT__0", list(batch.shape), "FP32")
    given.set_data_from_numpy(batch)
    answer = client.infer("digits", [given], outputs=[grpcclient.InferRequestedOutput("OUTPUT__0")])
    assert_logits_close(answer.as_numpy("OUTPUT__0"), expected)


def batch_counts(client) -> dict[int, int]:
    """Executions per batch size, from Triton's statistics of the digits model."""
    [stats] = client.get_inference_statistics("digits")["model_stats"]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def test_concurrent_requests_run_in_batches(triton, digits_artifact):
    runtime = repmlp_rt.Runtime(digits_artifact)
    rows = np.random.default_rng(2).standard_normal((96, 1, *runtime.input_shape)).astype(np.float32)
    client = httpclient.InferenceServerClient(triton.http_url)
    before = batch_counts(client)
    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(lambda row: http_infer(triton.http_url, "INPUT__0", row), rows))
    for row, answer in zip(rows, answers):
        assert_logits_close(answer, runtime.infer(row))
    after = batch_counts(client)
    grown = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * count for size, count in grown.items()) == len(rows)
    assert any(size > 1 and count > 0 for size, count in grown.items()), grown


def test_truncated_artifact_leaves_the_model_unavailable(triton):
    """The self-check's message reaches the load error and the server's log; the other model serves."""
    client = httpclient.InferenceServerClient(triton.http_url)
    assert not client.is_model_ready("broken")
    assert client.is_model_ready("digits")
    [entry] = [m for m in client.get_model_repository_index() if m["name"] == "broken"]
    assert entry["state"] == "UNAVAILABLE"
    with pytest.raises(repmlp_rt.ArtifactError) as error:
        repmlp_rt.Runtime(triton.repository / "broken" / "1" / "artifact.pt")
    assert str(error.value) in entry["reason"]
    assert str(error.value) in triton.server.log_text()
    given = httpclient.InferInput("INPUT__0", [1, 3, 32, 32], "FP32")
    given.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException, match="broken"):
        client.infer("broken", [given])


def test_numpy_2_leaves_the_model_unavailable(triton):
    """The stub misreads numpy 2 arrays, so model.py refuses to load under it, saying why."""
    assert np.__version__.startswith("2."), "this environment's numpy is expected to be 2.x"
    client = httpclient.InferenceServerClient(triton.http_url)
    [entry] = [m for m in client.get_model_repository_index() if m["name"] == "numpy2"]
    assert entry["state"] == "UNAVAILABLE"
    assert f"numpy {np.__version__}" in entry["reason"] and "put a folder with numpy<2 first" in entry["reason"]


def test_bad_image_fails_only_its_own_request(triton, cli_topk):  # noqa: F811
    """Garbage and good images sent together (so they can share a batch): each garbage
    request gets the decoder's error, every good one its answer, and the next request works."""
    good, garbage = encoded(DIGIT_PNGS[:1]), np.array([[b"\x89PNG but not really"]], dtype=object)
    mixed = [garbage if i % 3 == 0 else good for i in range(24)]

    def call(image):
        try:
            return http_infer(triton.http_url, "IMAGE", image)
        except InferenceServerException as error:
            return error

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(call, mixed))
    top1 = cli_topk[os.path.basename(DIGIT_PNGS[0])][0]["index"]
    for image, answer in zip(mixed, answers):
        if image is garbage:
            assert isinstance(answer, InferenceServerException) and "IMAGE[0]" in str(answer)
            assert "cannot decode image" in str(answer), answer
        else:
            assert not isinstance(answer, Exception), answer
            assert int(np.argmax(answer[0])) == top1
    assert int(np.argmax(http_infer(triton.http_url, "IMAGE", good)[0])) == top1


def test_features_artifact_serves_every_feature_map(triton, features_artifact):
    """One named output per feature map, from INPUT__0 and from IMAGE, over gRPC."""
    runtime = repmlp_rt.Runtime(features_artifact)
    batch = np.random.default_rng(6).standard_normal((3, *runtime.input_shape)).astype(np.float32)
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    metadata = client.get_model_metadata("features", as_json=True)
    assert [o["name"] for o in metadata["outputs"]] == runtime.output_names
    for name, data, datatype, expected in (
            ("INPUT__0", batch, "FP32", runtime.infer_outputs(batch)),
            ("IMAGE", encoded(DIGIT_PNGS[:2]), "BYTES",
             runtime.infer_outputs(np.stack([repmlp_rt.decode_image(p) for p in DIGIT_PNGS[:2]])))):
        given = grpcclient.InferInput(name, list(data.shape), datatype)
        given.set_data_from_numpy(data)
        answer = client.infer("features", [given])
        for output, want in expected.items():
            assert_logits_close(answer.as_numpy(output), want)


def test_a_request_needs_exactly_one_input(triton):
    client = httpclient.InferenceServerClient(triton.http_url)
    both = [httpclient.InferInput("INPUT__0", [1, 3, 32, 32], "FP32"), httpclient.InferInput("IMAGE", [1, 1], "BYTES")]
    both[0].set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    both[1].set_data_from_numpy(encoded(DIGIT_PNGS[:1]))
    with pytest.raises(InferenceServerException, match="expected exactly one of the inputs INPUT__0 and IMAGE, "
                                                       "got IMAGE, INPUT__0"):
        client.infer("digits", both)
