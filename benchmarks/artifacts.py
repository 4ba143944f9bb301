"""The files the benchmarks run: artifacts built by the project's builder and ONNX exports, cached
in benchmarks/.cache (git-ignored) under a key of the model sources, so that a change to the
model code rebuilds them and an unchanged tree reuses them."""

import hashlib
import json
import os
import tempfile
import time
from typing import Any, Dict, Iterable, Tuple

import torch

from benchmarks.harness import CACHE_DIR, ROOT, log, loadavg
from repmlp.model import create_model
from repmlp.utils import randomize_model_

_SOURCES = (os.path.join(ROOT, "python", "repmlp"), os.path.join(ROOT, "benchmarks", "upstream_reference.py"))


def _python_files(paths: Iterable[str]) -> Iterable[str]:
    for path in paths:
        if os.path.isfile(path):
            yield path
        for base, _, files in sorted(os.walk(path)):
            yield from (os.path.join(base, f) for f in sorted(files) if f.endswith(".py"))


def source_key(*parts: object) -> str:
    """12 hex digits over the model sources, the torch version and ``parts``."""
    digest = hashlib.sha256("-".join(map(str, (*parts, torch.__version__))).encode())
    for path in _python_files(_SOURCES):
        with open(path, "rb") as fh:
            digest.update(fh.read())
    return digest.hexdigest()[:12]


def seeded_model(arch: str, seed: int) -> torch.nn.Module:
    """The benchmarked model in its training form: random weights, randomized BN statistics."""
    model = create_model(arch).eval()
    randomize_model_(model, seed=seed)
    return model


def checkpoint(arch: str, seed: int, cache: str = CACHE_DIR) -> str:
    """:func:`seeded_model`'s weights as a checkpoint file, so that every artifact is built
    from the very weights the benchmarks' reference model has (whatever the builder's default
    weights for ``arch`` are)."""
    path = os.path.join(cache, f"{arch}-seed{seed}-{source_key(arch, seed)}.pth")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        torch.save(seeded_model(arch, seed).state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def artifact(arch: str, seed: int, *, dtype: str = "float32", format: str = "torchscript",
             cache: str = CACHE_DIR) -> Tuple[str, Dict[str, Any]]:
    """Path of the artifact of :func:`seeded_model` and its build record (seconds per stage,
    size), built once per source state. An AOTInductor build compiles with an empty Inductor
    cache: its time is a cold compile, as on a fresh machine."""
    from repmlp.artifact import build_artifact

    os.makedirs(cache, exist_ok=True)
    weights = checkpoint(arch, seed, cache)
    suffix = "" if dtype == "float32" else f"-{dtype}"
    path = os.path.join(cache, f"{arch}{suffix}-{source_key(arch, seed, format, dtype)}.{'pt2' if format == 'aoti' else 'pt'}")
    record_path = path + ".build.json"
    if os.path.exists(path) and os.path.exists(record_path):
        with open(record_path) as fh:
            return path, json.load(fh)
    log(f"  building {os.path.relpath(path, ROOT)} ({format}, {dtype}, random weights, seed {seed}) ...")
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as inductor_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
        try:
            start = time.perf_counter()
            report = build_artifact(arch=arch, checkpoint=weights, out=path, force=True, format=format, dtype=dtype,
                                    progress=lambda line: log("    " + line))
            seconds = time.perf_counter() - start
        finally:
            if saved is None:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
    record = {"build_s": seconds, "size_bytes": report.size_bytes, "load avg": loadavg(),
              "stages_s": {s.stage: s.seconds for s in report.stages}}
    with open(record_path, "w") as fh:
        json.dump(record, fh)
    return path, record


def fused_onnx(fused: torch.nn.Module, arch: str, seed: int, cache: str = CACHE_DIR) -> str:
    """The fused model's ONNX export with a dynamic batch (:func:`repmlp.onnx_export.export_onnx`):
    one file for ONNX Runtime and OpenVINO at every batch size."""
    from repmlp.onnx_export import export_onnx

    path = os.path.join(cache, f"{arch}-fused-dynamic-{source_key(arch, seed)}.onnx")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        start = time.perf_counter()
        export_onnx(fused, path)
        log(f"  exported {os.path.relpath(path, ROOT)} in {time.perf_counter() - start:.0f} s")
    return path


def upstream_onnx(upstream: torch.nn.Module, arch: str, seed: int, x: torch.Tensor, cache: str = CACHE_DIR) -> str:
    """The upstream formulation's ONNX export for ``x``'s batch size (static: its reshapes
    carry the batch), by the dynamo exporter, else the TorchScript one."""
    path = os.path.join(cache, f"{arch}-upstream-b{x.shape[0]}-{source_key(arch, seed)}.onnx")
    if os.path.exists(path):
        return path
    os.makedirs(cache, exist_ok=True)
    tmp = path + ".tmp"
    try:
        torch.onnx.export(upstream, (x,), tmp, dynamo=True, external_data=False)
    except Exception as error:  # the dynamo exporter fails on some torch versions
        log(f"  dynamo export failed ({type(error).__name__}); the TorchScript exporter instead")
        torch.onnx.export(upstream, (x,), tmp, dynamo=False, input_names=["x"], output_names=["logits"])
    os.replace(tmp, path)
    return path
