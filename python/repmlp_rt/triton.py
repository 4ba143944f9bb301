"""A Triton Inference Server model repository from an artifact.

    repmlp-triton-repo ARTIFACT REPO [--backend libtorch|python] [--name NAME] [--max-batch-size 8]
                       [--kind cpu|gpu] [--instances N] [--threads N] [--python-path DIR]...

writes, with the default ``--backend libtorch`` (Triton's PyTorch backend)::

    REPO/<name>/config.pbtxt   platform pytorch_libtorch, INPUT__0 -> OUTPUT__0, dynamic batching
    REPO/<name>/labels.txt     one label per line (Triton's classification extension)
    REPO/<name>/1/model.pt     the artifact itself (a frozen TorchScript file)

and with ``--backend python`` (Triton's Python backend, running ``repmlp_rt``)::

    REPO/<name>/config.pbtxt   backend python, INPUT__0 or IMAGE -> OUTPUT__0 (or the feature maps)
    REPO/<name>/labels.txt     for a logits artifact
    REPO/<name>/1/model.py     repmlp_rt.triton_backend, copied
    REPO/<name>/1/artifact.pt  the artifact itself (.pt2 for an AOTInductor one)

The LibTorch backend calls the module's ``forward``: ``INPUT__0`` is the float32 (N, C, H, W)
batch, already normalized as the manifest's ``preprocessing`` says, and ``OUTPUT__0`` the
float32 (N, classes) logits. The Python-backend model takes the same ``INPUT__0`` or encoded
images (``IMAGE``) and serves every output kind; its tensors are those of ``repmlp_rt.oip``.
Only the standard library and the runtime are needed (a serving host has them);
``repmlp-build --triton-repo`` calls the same writer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import repmlp_rt

from . import triton_backend
from ._cli import current_umask, positive_int
from .contract import check_model_name
from .oip import LOGITS, TensorSpec, model_interface

PROG = "repmlp-triton-repo"
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
BACKENDS = ("libtorch", "python")
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.pt"  # the libtorch flavour: the artifact under the name the backend loads
PYTHON_MODEL_FILE = "model.py"
TRITON_TYPES = {"FP32": "TYPE_FP32", "BYTES": "TYPE_STRING"}
# Characters a --python-path folder may not hold: the separator of the parameter, and what the
# protobuf text format would need escaped.
PATH_FORBIDDEN = (os.pathsep, '"', "\\", "\n", "\r")


@dataclass(frozen=True)
class TritonModel:
    """What was written: the model folder and the values its config declares."""

    path: Path
    name: str
    max_batch_size: int
    input_dims: tuple[int, ...]
    output_dims: tuple[int, ...]
    backend: str = "libtorch"
    outputs: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (name, dims) of every output


@dataclass(frozen=True)
class ConfigOptions:
    """The settings of config.pbtxt besides the tensors."""

    backend: str
    max_batch_size: int
    kind: str
    instances: int
    queue_delay_us: int
    threads: int | None = None
    artifact_file: str = MODEL_FILE
    python_path: tuple[str, ...] = ()


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself, from 2 up (a
    batch of 1 is never worth waiting for)."""
    sizes = {1 << i for i in range(1, max_batch_size.bit_length()) if 1 << i <= max_batch_size}
    sizes.add(max_batch_size)
    return sorted(size for size in sizes if size >= 2) or [max_batch_size]


def _tensor_text(spec: TensorSpec, *, optional: bool = False, nchw: bool = False, labels: bool = False) -> str:
    lines = [f'    name: "{spec.name}"', f"    data_type: {TRITON_TYPES[spec.datatype]}"]
    if nchw:
        lines.append("    format: FORMAT_NCHW")
    lines.append(f"    dims: [ {', '.join(str(d) for d in spec.dims)} ]")
    if optional:
        lines.append("    optional: true")
    if labels:
        lines.append(f'    label_filename: "{LABELS_FILE}"')
    return "  {\n" + "\n".join(lines) + "\n  }"


def _parameters_text(values: dict[str, str]) -> str:
    return "".join(f'parameters: {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
                   for key, value in values.items())


def _backend_parameters(options: ConfigOptions) -> dict[str, str]:
    if options.backend == "python":
        values = {triton_backend.ARTIFACT: options.artifact_file}
        if options.threads is not None:
            values[triton_backend.THREADS] = str(options.threads)
        if options.python_path:
            values[triton_backend.PYTHON_PATH] = os.pathsep.join(options.python_path)
        return values
    # On CPU the artifact runs with TorchScript's optimizing executor off (docs/ARTIFACT.md):
    # the graph is frozen and there is no CPU fuser. On GPU it stays on (it fuses there).
    values = {"DISABLE_OPTIMIZED_EXECUTION": "true" if options.kind == "KIND_CPU" else "false",
              "INFERENCE_MODE": "true"}
    if options.threads is not None:
        values["INTRA_OP_THREAD_COUNT"] = str(options.threads)
    return values


def config_text(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                options: ConfigOptions) -> str:
    """config.pbtxt in protobuf text format (tritonclient's ModelConfig parses it). The
    libtorch flavour declares ``INPUT__0`` alone; the python one every input, each optional."""
    python = options.backend == "python"
    if not python:
        inputs = [spec for spec in inputs if spec.datatype == "FP32"]  # forward takes the normalized batch
    input_text = ",\n".join(_tensor_text(spec, optional=python, nchw=spec.datatype == "FP32") for spec in inputs)
    output_text = ",\n".join(_tensor_text(spec, labels=spec.name == LOGITS) for spec in outputs)
    preferred = ", ".join(str(s) for s in preferred_batch_sizes(options.max_batch_size))
    platform = 'backend: "python"' if python else 'platform: "pytorch_libtorch"'
    return f"""# Written by {PROG} from a RepMLPNet artifact (repmlp_rt {repmlp_rt.__version__}).
name: "{name}"
{platform}
max_batch_size: {options.max_batch_size}
input [
{input_text}
]
output [
{output_text}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {options.queue_delay_us}
}}
instance_group [
  {{
    count: {options.instances}
    kind: {options.kind}
  }}
]
{_parameters_text(_backend_parameters(options))}"""


def _check_arguments(name: str, backend: str, kind: str, ints: dict[str, tuple[object, int]],
                     python_path: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    """ValueError for a bad argument; returns the --python-path folders, absolute."""
    check_model_name(name)
    for label, (value, low) in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if isinstance(python_path, (str, os.PathLike)):
        raise ValueError(f"python_path must be a list of folders, got the single value {python_path!r}")
    if python_path and backend != "python":
        raise ValueError("python_path is for the python backend (the LibTorch backend runs no Python)")
    folders = []
    for folder in map(os.fspath, python_path):
        bad = [c for c in PATH_FORBIDDEN if c in folder]
        if bad:
            raise ValueError(f"python_path folder {folder!r} contains {bad[0]!r}, which config.pbtxt cannot carry")
        if not os.path.isdir(folder):
            raise ValueError(f"python_path folder {folder!r} does not exist")
        folders.append(os.path.abspath(folder))
    return tuple(folders)


def _write_files(staging: Path, artifact: str, runtime: repmlp_rt.Runtime, config: str, artifact_file: str,
                 backend: str) -> None:
    (staging / "1").mkdir()
    shutil.copyfile(artifact, staging / "1" / artifact_file)
    if backend == "python":
        shutil.copyfile(triton_backend.__file__, staging / "1" / PYTHON_MODEL_FILE)
    if runtime.output_kind == "logits":
        (staging / LABELS_FILE).write_text("".join(label + "\n" for label in runtime.labels), encoding="utf-8")
    (staging / "config.pbtxt").write_text(config, encoding="utf-8")


def write_triton_repository(artifact: str | os.PathLike[str], repository: str | os.PathLike[str], *,
                            name: str | None = None, max_batch_size: int = 8, kind: str = "cpu",
                            instances: int = 1, queue_delay_us: int = 1000, force: bool = False,
                            backend: str = "libtorch", threads: int | None = None,
                            python_path: Sequence[str | os.PathLike[str]] = ()) -> TritonModel:
    """Writes ``repository/<name>/`` for ``artifact``: with ``backend="libtorch"``
    config.pbtxt, labels.txt and 1/model.pt; with ``backend="python"`` config.pbtxt,
    labels.txt (logits artifacts), 1/model.py and 1/artifact.pt (or .pt2). ``threads`` sets the
    intra-op threads of each instance; ``python_path`` (python backend) the folders its
    model.py puts first on ``sys.path`` before importing numpy and repmlp_rt.

    The artifact is loaded first (a bad one raises ``repmlp_rt.ArtifactError``). The model
    folder is assembled under a temporary name in ``repository`` and renamed into place, so a
    failure leaves nothing behind; an existing folder is replaced only with ``force``.
    """
    artifact = os.fspath(artifact)
    name = name or os.path.splitext(os.path.basename(artifact))[0]
    ints = {"max_batch_size": (max_batch_size, 1), "instances": (instances, 1), "queue_delay_us": (queue_delay_us, 0)}
    if threads is not None:
        ints["threads"] = (threads, 1)
    folders = _check_arguments(name, backend, kind, ints, python_path)
    repository = Path(repository)
    if not repository.is_dir():
        raise ValueError(f"repository folder {str(repository)!r} does not exist")
    target = repository / name
    if target.exists() and not force:
        raise ValueError(f"{str(target)!r} exists; pass force=True (--force) to replace it")

    runtime = repmlp_rt.Runtime(artifact, warmup=0)
    if backend == "libtorch" and runtime.output_kind != "logits":  # forward returns one logits tensor
        raise ValueError(f"{artifact!r} outputs {runtime.output_kind}; a Triton repository is written for logits "
                         "artifacts with the libtorch backend (--backend python serves every output kind)")
    bad = [label for label in runtime.labels if "\n" in label or "\r" in label]
    if bad:
        raise ValueError(f"label {bad[0]!r} contains a line break; {LABELS_FILE} holds one label per line")
    interface = model_interface(runtime)
    inputs, outputs = interface.inputs, interface.outputs
    suffix = ".pt2" if artifact.endswith(".pt2") else ".pt"
    options = ConfigOptions(backend, max_batch_size, KINDS[kind], instances, queue_delay_us, threads,
                            MODEL_FILE if backend == "libtorch" else "artifact" + suffix, folders)

    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository))
    try:
        _write_files(staging, artifact, runtime, config_text(name, inputs, outputs, options),
                     options.artifact_file, backend)
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return TritonModel(target, name, max_batch_size, tuple(runtime.input_shape), outputs[0].dims, backend,
                       tuple((spec.name, spec.dims) for spec in outputs))


def tritonserver_command(binary: str | os.PathLike[str], repository: str | os.PathLike[str], *, http_port: int,
                         grpc_port: int, host: str = "127.0.0.1", extra: Sequence[str] = ()) -> list[str]:
    """The command line of a ``tritonserver`` serving ``repository`` on ``host`` only, with the
    backends found beside the binary (``<binary>/../../backends``, the layout of Triton's
    images and of the ``nvidia-pytriton`` wheel) and no metrics port."""
    backends = Path(binary).resolve().parent.parent / "backends"
    return [os.fspath(binary), f"--model-repository={os.fspath(repository)}", f"--backend-directory={backends}",
            f"--http-address={host}", f"--http-port={http_port}", f"--grpc-address={host}",
            f"--grpc-port={grpc_port}", "--allow-metrics=false", *extra]


def add_arguments(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """The repository options, shared with ``repmlp-build --triton-repo`` (there prefixed)."""
    parser.add_argument(f"--{prefix}name", help="model name in the repository (default: the artifact's file stem)")
    parser.add_argument(f"--{prefix}max-batch-size", type=positive_int, default=8,
                        help="Triton's max_batch_size (default 8); preferred batch sizes are derived from it")
    parser.add_argument(f"--{prefix}kind", choices=sorted(KINDS), default="cpu",
                        help="instance_group kind: cpu (KIND_CPU) or gpu (KIND_GPU) (default cpu)")
    parser.add_argument(f"--{prefix}instances", type=positive_int, default=1, help="model instances (default 1)")


def add_backend_arguments(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """The backend choice and its options (``--backend``, ``--threads``, ``--python-path``);
    prefixed like ``add_arguments``."""
    parser.add_argument(f"--{prefix}backend", choices=BACKENDS, default="libtorch",
                        help="libtorch: Triton's PyTorch backend runs the TorchScript file (logits artifacts); "
                             "python: Triton's Python backend runs repmlp_rt (INPUT__0 or IMAGE, every output "
                             "kind, .pt and .pt2) (default libtorch)")
    parser.add_argument(f"--{prefix}threads", type=positive_int,
                        help="intra-op threads per model instance (default: the backend's)")
    parser.add_argument(f"--{prefix}python-path", action="append", default=[], metavar="DIR",
                        help="python backend: a folder model.py puts first on sys.path before importing numpy "
                             "and repmlp_rt (repeat; e.g. a venv's site-packages, a folder with numpy<2)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Write a Triton Inference Server model repository entry "
                                "(pytorch_libtorch or python backend) for a RepMLPNet artifact.")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("repository", metavar="REPO", help="model repository folder (must exist)")
    add_arguments(p)
    add_backend_arguments(p)
    p.add_argument("--force", action="store_true", help="replace an existing REPO/<name>")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        model = write_triton_repository(args.artifact, args.repository, name=args.name,
                                        max_batch_size=args.max_batch_size, kind=args.kind,
                                        instances=args.instances, force=args.force, backend=args.backend,
                                        threads=args.threads, python_path=args.python_path)
    except ValueError as error:  # a bad name, a missing REPO, an existing model without --force
        parser.error(str(error))
    except (RuntimeError, OSError) as error:  # ArtifactError is a RuntimeError
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    outputs = ", ".join(f"{name} {list(dims)}" for name, dims in model.outputs)
    inputs = f"INPUT__0 {list(model.input_dims)}" + (" or IMAGE [1]" if model.backend == "python" else "")
    print(f"{PROG}: wrote {model.path} ({model.backend} backend, {inputs}, {outputs}, "
          f"max_batch_size {model.max_batch_size})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
