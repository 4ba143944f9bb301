"""A Triton Inference Server model repository from an artifact (PyTorch/LibTorch backend).

    repmlp-triton-repo ARTIFACT REPO [--name NAME] [--max-batch-size 8] [--kind cpu|gpu]

writes::

    REPO/<name>/config.pbtxt   platform pytorch_libtorch, INPUT__0 -> OUTPUT__0, dynamic batching
    REPO/<name>/labels.txt     one label per line (Triton's classification extension)
    REPO/<name>/1/model.pt     the artifact itself (a frozen TorchScript file)

Triton's LibTorch backend calls the module's ``forward``: ``INPUT__0`` is the float32
(N, C, H, W) batch, already normalized as the manifest's ``preprocessing`` says, and
``OUTPUT__0`` the float32 (N, classes) logits. Only the standard library and the runtime are
needed (a serving host has them); ``repmlp-build --triton-repo`` calls the same writer.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import repmlp_rt

from ._cli import current_umask, positive_int

PROG = "repmlp-triton-repo"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class TritonModel:
    """What was written: the model folder and the values its config declares."""

    path: Path
    name: str
    max_batch_size: int
    input_dims: tuple[int, ...]
    output_dims: tuple[int, ...]


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself, from 2 up (a
    batch of 1 is never worth waiting for)."""
    sizes = {1 << i for i in range(1, max_batch_size.bit_length()) if 1 << i <= max_batch_size}
    sizes.add(max_batch_size)
    return sorted(size for size in sizes if size >= 2) or [max_batch_size]


def config_text(name: str, input_dims: tuple[int, ...], num_classes: int, *, max_batch_size: int, kind: str,
                instances: int, queue_delay_us: int) -> str:
    """config.pbtxt in protobuf text format (tritonclient's ModelConfig parses it)."""
    dims = ", ".join(str(d) for d in input_dims)
    preferred = ", ".join(str(s) for s in preferred_batch_sizes(max_batch_size))
    # On CPU the artifact runs with TorchScript's optimizing executor off (docs/ARTIFACT.md):
    # the graph is frozen and there is no CPU fuser. On GPU it stays on (it fuses there).
    optimized = "true" if kind == "KIND_CPU" else "false"
    return f"""# Written by {PROG} from a RepMLPNet artifact (repmlp_rt {repmlp_rt.__version__}).
name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: {max_batch_size}
input [
  {{
    name: "INPUT__0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "OUTPUT__0"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]
    label_filename: "{LABELS_FILE}"
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [
  {{
    count: {instances}
    kind: {kind}
  }}
]
parameters: {{
  key: "DISABLE_OPTIMIZED_EXECUTION"
  value: {{ string_value: "{optimized}" }}
}}
parameters: {{
  key: "INFERENCE_MODE"
  value: {{ string_value: "true" }}
}}
"""


def write_triton_repository(artifact: str | os.PathLike[str], repository: str | os.PathLike[str], *,
                            name: str | None = None, max_batch_size: int = 8, kind: str = "cpu",
                            instances: int = 1, queue_delay_us: int = 1000, force: bool = False) -> TritonModel:
    """Writes ``repository/<name>/`` (config.pbtxt, labels.txt, 1/model.pt) for ``artifact``.

    The artifact is loaded first (a bad one raises ``repmlp_rt.ArtifactError``). The model
    folder is assembled under a temporary name in ``repository`` and renamed into place, so a
    failure leaves nothing behind; an existing folder is replaced only with ``force``.
    """
    artifact = os.fspath(artifact)
    name = name or os.path.splitext(os.path.basename(artifact))[0]
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(f"model name {name!r}: expected letters, digits, '_', '.', '-' (starting with a letter or digit)")
    for label, value, low in (("max_batch_size", max_batch_size, 1), ("instances", instances, 1),
                              ("queue_delay_us", queue_delay_us, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    repository = Path(repository)
    if not repository.is_dir():
        raise ValueError(f"repository folder {str(repository)!r} does not exist")
    target = repository / name
    if target.exists() and not force:
        raise ValueError(f"{str(target)!r} exists; pass force=True (--force) to replace it")

    runtime = repmlp_rt.Runtime(artifact, warmup=0)
    if runtime.output_kind != "logits":  # the config describes one logits output
        raise ValueError(f"{artifact!r} outputs {runtime.output_kind}; a Triton repository is written for logits artifacts")
    labels = runtime.labels
    bad = [label for label in labels if "\n" in label or "\r" in label]
    if bad:
        raise ValueError(f"label {bad[0]!r} contains a line break; {LABELS_FILE} holds one label per line")

    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository))
    try:
        (staging / "1").mkdir()
        shutil.copyfile(artifact, staging / "1" / MODEL_FILE)
        (staging / LABELS_FILE).write_text("".join(label + "\n" for label in labels), encoding="utf-8")
        (staging / "config.pbtxt").write_text(config_text(
            name, runtime.input_shape, runtime.num_classes, max_batch_size=max_batch_size, kind=KINDS[kind],
            instances=instances, queue_delay_us=queue_delay_us), encoding="utf-8")
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return TritonModel(target, name, max_batch_size, tuple(runtime.input_shape), (runtime.num_classes,))


def add_arguments(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """The repository options, shared with ``repmlp-build --triton-repo`` (there prefixed)."""
    parser.add_argument(f"--{prefix}name", help="model name in the repository (default: the artifact's file stem)")
    parser.add_argument(f"--{prefix}max-batch-size", type=positive_int, default=8,
                        help="Triton's max_batch_size (default 8); preferred batch sizes are derived from it")
    parser.add_argument(f"--{prefix}kind", choices=sorted(KINDS), default="cpu",
                        help="instance_group kind: cpu (KIND_CPU) or gpu (KIND_GPU) (default cpu)")
    parser.add_argument(f"--{prefix}instances", type=positive_int, default=1, help="model instances (default 1)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Write a Triton Inference Server model repository entry "
                                "(pytorch_libtorch) for a RepMLPNet artifact.")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("repository", metavar="REPO", help="model repository folder (must exist)")
    add_arguments(p)
    p.add_argument("--force", action="store_true", help="replace an existing REPO/<name>")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        model = write_triton_repository(args.artifact, args.repository, name=args.name,
                                        max_batch_size=args.max_batch_size, kind=args.kind,
                                        instances=args.instances, force=args.force)
    except ValueError as error:  # a bad name, a missing REPO, an existing model without --force
        parser.error(str(error))
    except (RuntimeError, OSError) as error:  # ArtifactError is a RuntimeError
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {model.path} (INPUT__0 {list(model.input_dims)}, OUTPUT__0 {list(model.output_dims)}, "
          f"max_batch_size {model.max_batch_size})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
