"""The Triton model repository (repmlp_rt.triton, repmlp-triton-repo).

config.pbtxt is parsed with tritonclient's ModelConfig protobuf (an unknown or misspelled
field fails to parse there, as it would in the server), and every dim it declares is checked
by running the copied model.pt's forward on a batch of max_batch_size.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import repmlp_rt
from repmlp_rt.triton import preferred_batch_sizes, write_triton_repository

TYPE_TO_TORCH = {model_config_pb2.TYPE_FP32: torch.float32}


def parse_config(model_dir) -> model_config_pb2.ModelConfig:
    with open(os.path.join(model_dir, "config.pbtxt"), encoding="utf-8") as f:
        return text_format.Parse(f.read(), model_config_pb2.ModelConfig())


def load_model(path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")


@pytest.mark.parametrize("kind, max_batch_size", [("cpu", 8), ("gpu", 5)])
def test_repository_config_matches_the_artifact(small_artifact, tmp_path, kind, max_batch_size):
    model = write_triton_repository(small_artifact, tmp_path, name="small", max_batch_size=max_batch_size,
                                    kind=kind, instances=2)
    runtime = repmlp_rt.Runtime(small_artifact)
    assert model.path == tmp_path / "small"
    assert sorted(os.listdir(model.path)) == ["1", "config.pbtxt", "labels.txt"]
    assert os.listdir(model.path / "1") == ["model.pt"]
    assert (model.path / "1" / "model.pt").read_bytes() == open(small_artifact, "rb").read()

    config = parse_config(model.path)
    assert config.name == "small" and config.platform == "pytorch_libtorch"
    assert config.max_batch_size == max_batch_size
    assert list(config.dynamic_batching.preferred_batch_size) == preferred_batch_sizes(max_batch_size)
    assert all(1 <= s <= max_batch_size for s in config.dynamic_batching.preferred_batch_size)
    group = config.instance_group[0]
    assert group.count == 2
    assert group.kind == {"cpu": model_config_pb2.ModelInstanceGroup.KIND_CPU,
                          "gpu": model_config_pb2.ModelInstanceGroup.KIND_GPU}[kind]
    assert config.parameters["DISABLE_OPTIMIZED_EXECUTION"].string_value == ("true" if kind == "cpu" else "false")
    [inp], [out] = config.input, config.output
    assert (inp.name, out.name) == ("INPUT__0", "OUTPUT__0")  # the LibTorch backend's naming
    assert list(inp.dims) == list(runtime.input_shape)
    labels = (model.path / out.label_filename).read_text(encoding="utf-8").splitlines()
    assert labels == runtime.labels

    # Every declared dim, through the file Triton would load, at the largest batch it may send.
    module = load_model(model.path / "1" / "model.pt")
    x = torch.randn(config.max_batch_size, *inp.dims, dtype=TYPE_TO_TORCH[inp.data_type])
    with torch.no_grad(), torch.jit.optimized_execution(False):
        y = module(x)
    assert y.dtype == TYPE_TO_TORCH[out.data_type]
    assert list(y.shape) == [config.max_batch_size, *out.dims]
    assert len(labels) == out.dims[0]
    expected = torch.from_numpy(runtime.infer(x.numpy()))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_misspelled_field_fails_to_parse(small_artifact, tmp_path):
    """The check above has teeth: the protobuf rejects what Triton would reject."""
    model = write_triton_repository(small_artifact, tmp_path)
    text = (model.path / "config.pbtxt").read_text().replace("max_batch_size", "max_batchsize")
    with pytest.raises(text_format.ParseError, match="max_batchsize"):
        text_format.Parse(text, model_config_pb2.ModelConfig())


def test_preferred_batch_sizes():
    assert preferred_batch_sizes(1) == [1]
    assert preferred_batch_sizes(2) == [2]
    assert preferred_batch_sizes(8) == [2, 4, 8]
    assert preferred_batch_sizes(12) == [2, 4, 8, 12]


def test_existing_model_needs_force_and_failures_leave_nothing(small_artifact, fake_artifact, tmp_path):
    write_triton_repository(small_artifact, tmp_path, name="m")
    with pytest.raises(ValueError, match="exists; pass force=True"):
        write_triton_repository(fake_artifact, tmp_path, name="m")
    write_triton_repository(fake_artifact, tmp_path, name="m", force=True)
    assert (tmp_path / "m" / "1" / "model.pt").read_bytes() == open(fake_artifact, "rb").read()

    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torchscript file")
    with pytest.raises(repmlp_rt.ArtifactError, match="cannot load artifact"):
        write_triton_repository(broken, tmp_path, name="broken")
    assert sorted(os.listdir(tmp_path)) == ["broken.pt", "m"]  # no staging folder left behind
    with pytest.raises(ValueError, match="model name"):
        write_triton_repository(small_artifact, tmp_path, name="../escape")
    with pytest.raises(ValueError, match="max_batch_size must be an int >= 1"):
        write_triton_repository(small_artifact, tmp_path, name="x", max_batch_size=0)
    with pytest.raises(ValueError, match="kind must be one of cpu, gpu"):
        write_triton_repository(small_artifact, tmp_path, name="x", kind="tpu")
    with pytest.raises(ValueError, match="does not exist"):
        write_triton_repository(small_artifact, tmp_path / "missing")


def run_command(*args):
    return subprocess.run([sys.executable, "-m", "repmlp_rt.triton", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_command(small_artifact, tmp_path):
    result = run_command(small_artifact, tmp_path, "--name", "small", "--max-batch-size", "4", "--kind", "gpu")
    assert result.returncode == 0, result.stderr
    assert "INPUT__0 [3, 32, 32], OUTPUT__0 [10], max_batch_size 4" in result.stderr
    config = parse_config(tmp_path / "small")
    assert config.max_batch_size == 4
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU

    again = run_command(small_artifact, tmp_path, "--name", "small")  # usage: exists without --force
    assert again.returncode == 2 and "--force" in again.stderr
    bad = run_command(tmp_path / "missing.pt", tmp_path)
    assert bad.returncode == 1 and "missing.pt" in bad.stderr and "no such file" in bad.stderr
    zero = run_command(small_artifact, tmp_path, "--max-batch-size", "0")
    assert zero.returncode == 2 and "expected an integer >= 1, got 0" in zero.stderr



def test_build_command_writes_the_repository(tmp_path, capsys):
    """repmlp-build --triton-repo: the artifact and its repository entry from one command."""
    from repmlp.cli import main

    out = tmp_path / "digits.pt"
    repo = tmp_path / "repo"
    with pytest.raises(SystemExit) as usage:  # a missing repository folder: usage, before the build
        main(["--out", str(out), "--triton-repo", str(repo)])
    assert usage.value.code == 2 and "is not an existing folder" in capsys.readouterr().err
    assert not out.exists()
    repo.mkdir()
    assert main(["--out", str(out), "--triton-repo", str(repo), "--triton-max-batch-size", "4"]) == 0
    config = parse_config(repo / "digits")
    assert config.max_batch_size == 4 and list(config.input[0].dims) == list(repmlp_rt.Runtime(out).input_shape)
    assert (repo / "digits" / "1" / "model.pt").read_bytes() == out.read_bytes()
    with pytest.raises(SystemExit) as exists:
        main(["--out", str(tmp_path / "other.pt"), "--triton-repo", str(repo), "--triton-name", "digits"])
    assert exists.value.code == 2 and "pass --force" in capsys.readouterr().err


def test_python_backend_repository(small_artifact, tmp_path):
    """The python flavour: both inputs optional, the runtime's outputs, model.py and the
    parameters it reads (its own parser of PYTHON_PATH agrees with the protobuf's)."""
    from repmlp_rt import triton_backend

    extra = tmp_path / "extra"
    extra.mkdir()
    repository = tmp_path / "repo"
    repository.mkdir()
    model = write_triton_repository(small_artifact, repository, name="py", backend="python", threads=3,
                                    python_path=[extra, tmp_path], instances=2, max_batch_size=4)
    runtime = repmlp_rt.Runtime(small_artifact)
    assert sorted(os.listdir(model.path / "1")) == ["artifact.pt", "model.py"]
    assert (model.path / "1" / "artifact.pt").read_bytes() == open(small_artifact, "rb").read()
    assert (model.path / "1" / "model.py").read_text() == open(triton_backend.__file__).read()
    config = parse_config(model.path)
    assert config.backend == "python" and config.platform == "" and config.max_batch_size == 4
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("INPUT__0", model_config_pb2.TYPE_FP32, list(runtime.input_shape), True),
        ("IMAGE", model_config_pb2.TYPE_STRING, [1], True)]
    [out] = config.output
    assert (out.name, list(out.dims), out.label_filename) == ("OUTPUT__0", [runtime.num_classes], "labels.txt")
    assert config.instance_group[0].count == 2
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters == {"ARTIFACT": "artifact.pt", "THREADS": "3", "PYTHON_PATH": f"{extra}:{tmp_path}"}
    assert triton_backend.configured_python_path(model.path / "config.pbtxt") == parameters["PYTHON_PATH"]
    assert (model.path / "labels.txt").read_text().splitlines() == runtime.labels


def test_python_backend_rejects_bad_paths(small_artifact, tmp_path):
    with pytest.raises(ValueError, match="python_path is for the python backend"):
        write_triton_repository(small_artifact, tmp_path, python_path=[tmp_path])
    with pytest.raises(ValueError, match="does not exist"):
        write_triton_repository(small_artifact, tmp_path, backend="python", python_path=[tmp_path / "missing"])
    quoted = tmp_path / 'a"b'
    quoted.mkdir()
    with pytest.raises(ValueError, match="which config.pbtxt cannot carry"):
        write_triton_repository(small_artifact, tmp_path, backend="python", python_path=[quoted])
    with pytest.raises(ValueError, match="a list of folders"):
        write_triton_repository(small_artifact, tmp_path, backend="python", python_path=str(tmp_path))
    with pytest.raises(ValueError, match="backend must be one of libtorch, python"):
        write_triton_repository(small_artifact, tmp_path, backend="onnx")
    assert sorted(os.listdir(tmp_path)) == ['a"b']


def test_python_backend_command(small_artifact, tmp_path):
    result = run_command(small_artifact, tmp_path, "--backend", "python", "--python-path", tmp_path,
                         "--threads", "2")
    assert result.returncode == 0, result.stderr
    assert "python backend, INPUT__0 [3, 32, 32] or IMAGE [1], OUTPUT__0 [10]" in result.stderr
    config = parse_config(tmp_path / "small")
    assert config.parameters["PYTHON_PATH"].string_value == str(tmp_path)
    bad = run_command(small_artifact, tmp_path, "--name", "x", "--python-path", tmp_path)
    assert bad.returncode == 2 and "python_path is for the python backend" in bad.stderr
