"""repmlp_rt: run RepMLPNet artifacts with the C++ LibTorch runtime from Python.

A thin layer over the compiled extension ``repmlp_rt._runtime`` (which binds the same C++
core that the ``repmlp_infer`` binary uses). Inputs are numpy arrays or torch tensors:

* float32 NCHW batches, already normalized -> ``Runtime.infer`` -> logits ``(N, classes)``;
* uint8 NHWC RGB images of any size -> the artifact's own preprocessing -> logits.

numpy in gives numpy out; torch in gives torch out (CPU tensors). A contiguous float32 numpy
array is used without a copy, and the GIL is released while the model runs, so several
threads can share one ``Runtime``. Importing this package does not import torch.

Errors: wrong rank/channels/size/dtype -> ``ValueError`` (``repmlp_rt.InputError``);
unreadable, corrupt or foreign artifact -> ``repmlp_rt.ArtifactError`` (a ``RuntimeError``);
an unusable device -> ``repmlp_rt.DeviceError`` (a ``RuntimeError``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

import numpy as np

from ._runtime import (
    FORMAT_VERSION,
    ArtifactError,
    DeviceError,
    InputError,
    built_with_cuda,
    cpu_features,
    decode_image,
    has_image_decoding,
)
from ._runtime import Runtime as _CoreRuntime
from ._version import __version__

__all__ = [
    "FORMAT_VERSION",
    "ArtifactError",
    "DeviceError",
    "InputError",
    "Runtime",
    "__version__",
    "built_with_cuda",
    "cpu_features",
    "clear_cache",
    "decode_image",
    "has_image_decoding",
    "infer",
]


def _is_torch_tensor(x: Any) -> bool:
    # Never import torch here: if x is a tensor, torch is already in sys.modules.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _to_numpy(x: Any) -> tuple[np.ndarray, bool]:
    """Returns (array, came_from_torch)."""
    if _is_torch_tensor(x):
        torch = sys.modules["torch"]
        tensor = x.detach()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; forward accepts float32
            tensor = tensor.float()
        return tensor.cpu().numpy(), True
    if isinstance(x, np.ndarray):
        return x, False
    raise TypeError(f"expected a numpy.ndarray or a torch.Tensor, got {type(x).__name__}")


def _from_numpy(array: np.ndarray, to_torch: bool) -> Any:
    if to_torch:
        return sys.modules["torch"].from_numpy(array)
    return array


_MAX_THREADS = 4096  # as repmlp_infer --threads
_MAX_WARMUP = 1 << 20


def _checked_int(name: str, value: Any, low: int, high: int, note: str = "") -> int:
    """``value`` as an int in [low, high]: TypeError for a non-int, ValueError outside."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        extra = f" ({note})" if note else ""
        raise ValueError(f"{name} must be in [{low}, {high}]{extra}, got {value}")
    return int(value)


class Runtime:
    """A loaded artifact on one device.

    Args:
        path: the artifact file (a TorchScript file with ``manifest.json``).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: intra-op threads; ``None`` leaves torch's default. Note that torch's thread
            pool is process-wide, so this affects every runtime in the process.
        warmup: calls of both entry points on a zero batch at load time, so the first real
            call is as fast as a steady one. ``None``: 1 on CPU (calls run without
            TorchScript's profiling executor; one call pays the one-time costs), 2 on CUDA
            (the executor profiles, then fuses). 0 loads fastest.
        warmup_batch: batch size of that zero batch; use the batch size you will serve.
        optimize: apply ``torch.jit.optimize_for_inference`` after loading (in memory only).
    """

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", threads: int | None = None,
                 *, warmup: int | None = None, warmup_batch: int = 1, optimize: bool = False) -> None:
        threads = 0 if threads is None else _checked_int("threads", threads, 1, _MAX_THREADS, "or None for torch's default")
        if warmup is not None:
            warmup = _checked_int("warmup", warmup, 0, _MAX_WARMUP, "or None for the device's default")
        warmup_batch = _checked_int("warmup_batch", warmup_batch, 1, _MAX_WARMUP)
        if not isinstance(device, str):
            raise TypeError(f"device must be a str such as 'cpu' or 'cuda:0', got {type(device).__name__}")
        self._core = _CoreRuntime(os.fspath(path), device=device, threads=threads, warmup=warmup,
                                  warmup_batch=warmup_batch, optimize=optimize)
        self._manifest: dict[str, Any] | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        """The artifact's ``manifest.json`` as a dict (a fresh copy each time)."""
        if self._manifest is None:
            try:
                self._manifest = json.loads(self._core.manifest_json)
            except json.JSONDecodeError as error:
                raise ArtifactError(f"'{self.path}': manifest.json is not valid JSON: {error}") from None
        return json.loads(json.dumps(self._manifest))

    @property
    def path(self) -> str:
        return self._core.path

    @property
    def device(self) -> str:
        return self._core.device

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` that ``infer`` expects, read from the artifact."""
        return tuple(self._core.input_shape)  # type: ignore[return-value]

    @property
    def labels(self) -> list[str]:
        return list(self._core.labels)

    @property
    def num_classes(self) -> int:
        return self._core.num_classes

    @property
    def compute_dtype(self) -> str:
        return self._core.compute_dtype

    @property
    def format_version(self) -> int:
        return self._core.format_version

    def infer(self, x: Any) -> Any:
        """Logits for a float32 NCHW batch, or for uint8 NHWC images (via the artifact's
        preprocessing). Returns float32 ``(N, num_classes)``: numpy for numpy, torch for torch."""
        array, from_torch = _to_numpy(x)
        if array.dtype == np.uint8:
            logits = self._core.infer_images(array)
        else:
            logits = self._core.infer(array)
        return _from_numpy(logits, from_torch)

    def infer_images(self, images: Any) -> Any:
        """Logits for uint8 NHWC RGB images of any size, via the artifact's preprocessing."""
        array, from_torch = _to_numpy(images)
        return _from_numpy(self._core.infer_images(array), from_torch)

    def classify(self, images: Any, topk: int | None = None) -> tuple[Any, Any]:
        """Top-k classes, like ``torch.topk``: ``(scores, indices)``, both ``(N, topk)``.

        ``topk`` defaults to ``min(5, num_classes)``.

        ``scores`` are softmax probabilities (over all classes) of the top-k classes, in
        descending order; ``indices`` are int64 class indices into ``labels``. ``images`` are
        uint8 NHWC images (the artifact preprocesses them) or a float32 NCHW batch.
        """
        if topk is not None:
            topk = _checked_int("topk", topk, 1, self.num_classes)
        array, from_torch = _to_numpy(images)
        scores, indices = self._core.classify(array, topk)
        return _from_numpy(scores, from_torch), _from_numpy(indices, from_torch)

    def __repr__(self) -> str:
        return (f"repmlp_rt.Runtime({self.path!r}, device={self.device!r}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


_CACHE: dict[tuple[Any, ...], Runtime] = {}
_CACHE_LOCK = threading.Lock()


def _cached_runtime(path: str | os.PathLike[str], device: str) -> Runtime:
    real = os.path.realpath(os.fspath(path))
    try:
        stat = os.stat(real)
        key: tuple[Any, ...] = (real, device, stat.st_mtime_ns, stat.st_size)
    except OSError:
        return Runtime(real, device=device)  # raises ArtifactError with a clear message
    with _CACHE_LOCK:
        runtime = _CACHE.get(key)
        if runtime is None:
            # A rebuilt artifact (new mtime/size) replaces the stale entry.
            for stale in [k for k in _CACHE if k[:2] == key[:2]]:
                del _CACHE[stale]
            runtime = _CACHE[key] = Runtime(real, device=device)
        return runtime


def infer(artifact: str | os.PathLike[str] | Runtime, x: Any, device: str = "cpu") -> Any:
    """Logits of ``x`` (float32 NCHW or uint8 NHWC) from ``artifact``.

    ``artifact`` is a ``Runtime`` or a path; a path is loaded once per (real path, device) and
    cached (reloaded when the file changes). numpy in gives numpy out, torch in gives torch out.
    """
    runtime = artifact if isinstance(artifact, Runtime) else _cached_runtime(artifact, device)
    return runtime.infer(x)


def clear_cache() -> None:
    """Drops the runtimes that ``infer`` loaded from paths."""
    with _CACHE_LOCK:
        _CACHE.clear()
