"""repmlp_rt: run RepMLPNet artifacts (TorchScript ``.pt`` or AOTInductor ``.pt2``) with the
C++ LibTorch runtime from Python.

A thin layer over the compiled extension ``repmlp_rt._runtime`` (which binds the same C++
core that the ``repmlp_infer`` binary uses; every check of inputs and options is made there).
Inputs are numpy arrays or torch tensors, and the names mean what they mean in C++:

* ``Runtime.infer``: either kind below, chosen by dtype;
* ``Runtime.infer_normalized``: float NCHW batches, already normalized -> logits ``(N, classes)``;
* ``Runtime.infer_images``: uint8 NHWC RGB images of any size -> the artifact's own
  preprocessing -> logits;
* ``Runtime.classify``: either kind -> softmax top-k ``(scores, indices)``.
* ``Runtime.infer_outputs``: either kind -> a dict of every output by name (the feature maps
  of a features artifact, the vector of an embedding artifact; docs/BACKBONE.md).

numpy in gives numpy out; torch in gives torch out (CPU tensors). A contiguous numpy array is
used without a copy; a torch tensor goes to the core through DLPack, read in place on its
device (a CUDA tensor is not copied to the host). The GIL is released while the model runs,
so several threads can share one ``Runtime``. Importing this package does not import torch.

Errors: wrong rank/channels/size/dtype -> ``ValueError`` (``repmlp_rt.InputError``);
unreadable, corrupt or foreign artifact -> ``repmlp_rt.ArtifactError`` (a ``RuntimeError``);
an unusable device -> ``repmlp_rt.DeviceError`` (a ``RuntimeError``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

import numpy as np

from ._runtime import (
    DEFAULT_MAX_IMAGE_PIXELS,
    FORMAT_VERSION,
    ArtifactError,
    DeviceError,
    InputError,
    built_with_cuda,
    cpu_features,
    decode_image,
    decode_image_bytes,
    has_image_decoding,
)
from ._runtime import Runtime as _CoreRuntime
from ._version import __version__
from .contract import GEMM_MODES

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "FORMAT_VERSION",
    "GEMM_MODES",
    "ArtifactError",
    "DeviceError",
    "InputError",
    "Runtime",
    "__version__",
    "built_with_cuda",
    "cpu_features",
    "clear_cache",
    "decode_image",
    "decode_image_bytes",
    "has_image_decoding",
    "infer",
]


def _is_torch_tensor(x: Any) -> bool:
    # Never import torch here: if x is a tensor, torch is already in sys.modules.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _to_core(x: Any) -> Any:
    """What the core takes: a numpy array as is, a torch tensor as a DLPack capsule (on its
    device, no copy). The core checks dtype and shape."""
    if _is_torch_tensor(x):
        return x.detach().__dlpack__()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"expected a numpy.ndarray or a torch.Tensor, got {type(x).__name__}")


def _from_core(result: Any) -> Any:
    """The core's result back in the caller's type: numpy stays numpy, a DLPack capsule
    becomes a torch tensor."""
    if isinstance(result, np.ndarray):
        return result
    return sys.modules["torch"].from_dlpack(result)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _call_with_ints(call: Any, *args: Any, **ints: Any) -> Any:
    """``call(*args, **ints)`` with the int keyword arguments type-checked (TypeError); the core checks
    their ranges. A Python int beyond 64 bits is out of every range: it reaches the core
    clamped to the int64 limit, and the core's message gets the caller's number back."""
    clamped: dict[str, int | None] = {}
    for name, value in ints.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        clamped[name] = None if value is None else min(max(int(value), _INT64_MIN), _INT64_MAX)
    try:
        return call(*args, **clamped)
    except InputError as error:
        message = str(error)
        for name, value in ints.items():
            if value is not None and clamped[name] != value:
                message = message.replace(f"got {clamped[name]}", f"got {value}")
        if message == str(error):
            raise
        raise InputError(message) from None


_T = TypeVar("_T")


class _FromCore(Generic[_T]):
    """A read-only ``Runtime`` attribute that the core runtime holds: read from the core on
    each access, through ``convert`` where the type promised here differs (a tuple, or a list
    of the caller's own)."""

    def __init__(self, convert: Callable[[Any], _T] | None = None, doc: str | None = None) -> None:
        self._convert = convert
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, runtime: None, owner: type | None = None) -> _FromCore[_T]: ...
    @overload
    def __get__(self, runtime: Runtime, owner: type | None = None) -> _T: ...

    def __get__(self, runtime: Runtime | None, owner: type | None = None) -> Any:
        if runtime is None:
            return self
        value = getattr(runtime._core, self._name)
        return value if self._convert is None else self._convert(value)

    def __set__(self, runtime: Runtime, value: Any) -> None:
        raise AttributeError(f"property {self._name!r} of 'Runtime' object has no setter")


class Runtime:
    """A loaded artifact on one device.

    Args:
        path: the artifact file written by ``repmlp-build``: TorchScript (``.pt``) or
            AOTInductor (``.pt2``), told apart by content, not by name.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: intra-op threads in [1, 4096]; ``None`` leaves torch's default. Note that
            torch's thread pool is process-wide, so this affects every runtime in the process.
        warmup: calls of both entry points on a zero batch at load time, so the first real
            call is as fast as a steady one. ``None``: 1 on CPU (calls run without
            TorchScript's profiling executor; one call pays the one-time costs), 2 on CUDA
            (the executor profiles, then fuses). 0 loads fastest.
        warmup_batch: batch size of that zero batch; use the batch size you will serve.
        optimize: apply ``torch.jit.optimize_for_inference`` after loading (in memory only;
            TorchScript artifacts only, a ``.pt2`` is compiled already).
        verify: the load-time self-check (docs/ARTIFACT.md): every record must match the
            artifact's SHA-256 digest and the stored probe, run as the first warm-up call, must
            reproduce the build's outputs within the tolerance for this device; otherwise
            ``ArtifactError`` ("self-check failed"). ``False`` skips both and loads a corrupt
            file without a word: only for those who must load fastest and trust their files.
        verify_digest: with ``verify``, the digest half alone; ``False`` keeps the probe and
            skips hashing every record (about 30% of a B224 load on one core), so that bytes
            the probe cannot see (labels, the manifest) may change unnoticed.
        gemm: how a TorchScript artifact's matrix products run on CPU, planned once at load
            before the self-check: ``"auto"`` (the runtime chooses), ``"aten"``, ``"onednn"``
            or ``"mkl-packed"``; anything else raises ``ValueError``. ``gemm_plan`` says what
            was done.
        keep_freed_memory: keep the memory a call freed for the next call instead of handing it
            back to the kernel (glibc's malloc trim and mmap thresholds, process-wide, set once
            and never over a ``MALLOC_*_`` or ``GLIBC_TUNABLES`` environment): no page faults in
            steady state, at the cost of keeping the peak heap (docs/PERFORMANCE.md).
    """

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", threads: int | None = None,
                 *, warmup: int | None = None, warmup_batch: int = 1, optimize: bool = False,
                 verify: bool = True, verify_digest: bool = True, gemm: str = "auto",
                 keep_freed_memory: bool = True) -> None:
        if not isinstance(device, str):
            raise TypeError(f"device must be a str such as 'cpu' or 'cuda:0', got {type(device).__name__}")
        if not isinstance(gemm, str):
            raise TypeError(f"gemm must be a str such as 'auto', got {type(gemm).__name__}")
        load = functools.partial(_CoreRuntime, os.fspath(path), device=device, optimize=optimize,
                                 verify=bool(verify), verify_digest=bool(verify_digest), gemm=gemm,
                                 keep_freed_memory=bool(keep_freed_memory))
        self._core = _call_with_ints(load, threads=threads, warmup=warmup, warmup_batch=warmup_batch)
        self._manifest: dict[str, Any] | None = None
        self._digest_checked = bool(verify) and bool(verify_digest)

    @property
    def manifest(self) -> dict[str, Any]:
        """The artifact's ``manifest.json`` as a dict (a fresh copy each time)."""
        if self._manifest is None:
            try:
                self._manifest = json.loads(self._core.manifest_json)
            except json.JSONDecodeError as error:
                raise ArtifactError(f"'{self.path}': manifest.json is not valid JSON: {error}") from None
        return json.loads(json.dumps(self._manifest))

    # What the core runtime holds, read from it on each access.
    path = _FromCore[str]()
    device = _FromCore[str]()
    input_shape = _FromCore[tuple[int, int, int]](
        tuple, "``(C, H, W)`` that ``infer`` expects, read from the artifact.")  # type: ignore[arg-type]
    labels = _FromCore[list[str]](list)
    num_classes = _FromCore[int]()
    compute_dtype = _FromCore[str]()
    output_kind = _FromCore[str](
        doc='``"logits"``, ``"features"`` or ``"embedding"``: what the artifact was built to output.')
    output_names = _FromCore[list[str]](
        list, 'The names of the artifact\'s outputs, in order (``["logits"]``, ``["embedding"]`` or '
        '``["stage0", ...]``).')
    format_version = _FromCore[int]()
    gemm_plan = _FromCore[str](
        doc="What the load-time GEMM plan (the ``gemm`` argument) did to the graph; empty when nothing.")

    @property
    def self_check(self) -> dict[str, Any] | None:
        """The load-time self-check: ``{"digest": whether every record was hashed, "error": the
        probe's worst relative error, "tolerance": its bound}``, or None with ``verify=False``."""
        if not self._core.verified:
            return None
        return {"digest": self._digest_checked, "error": self._core.self_check_error,
                "tolerance": self._core.self_check_tolerance}

    def infer(self, x: Any) -> Any:
        """Logits for uint8 NHWC images of any size (via the artifact's preprocessing) or for a
        normalized float NCHW batch. Returns float32 ``(N, num_classes)`` on the CPU: numpy for
        numpy, torch for torch. A torch tensor is read where it is (a CUDA one on its GPU).
        An embedding artifact returns its ``(N, C)`` embedding; one with several outputs
        raises ValueError (use ``infer_outputs``)."""
        return _from_core(self._core.infer(_to_core(x)))

    def infer_outputs(self, x: Any) -> dict[str, Any]:
        """Every output of the artifact by name, in ``output_names`` order, for what ``infer``
        takes: float32 CPU arrays, numpy for numpy, torch for torch."""
        return {name: _from_core(value) for name, value in self._core.infer_outputs(_to_core(x))}

    def infer_normalized(self, x: Any) -> Any:
        """Logits for a normalized float NCHW batch only (float32 or the compute dtype)."""
        return _from_core(self._core.infer_normalized(_to_core(x)))

    def infer_images(self, images: Any) -> Any:
        """Logits for uint8 NHWC RGB images only, via the artifact's preprocessing."""
        return _from_core(self._core.infer_images(_to_core(images)))

    def classify(self, x: Any, topk: int | None = None) -> tuple[Any, Any]:
        """Top-k classes, like ``torch.topk``: ``(scores, indices)``, both ``(N, topk)``.

        ``topk`` defaults to ``min(5, num_classes)``.

        ``scores`` are softmax probabilities (over all classes) of the top-k classes, in
        descending order; ``indices`` are int64 class indices into ``labels``. ``x`` is what
        ``infer`` takes: uint8 NHWC images or a normalized float NCHW batch.
        """
        scores, indices = _call_with_ints(self._core.classify, _to_core(x), topk=topk)
        return _from_core(scores), _from_core(indices)

    def __repr__(self) -> str:
        return (f"repmlp_rt.Runtime({self.path!r}, device={self.device!r}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


_CACHE: dict[tuple[Any, ...], Runtime] = {}
_CACHE_LOCK = threading.Lock()


def _cached_runtime(path: str | os.PathLike[str], device: str, verify: bool) -> Runtime:
    real = os.path.realpath(os.fspath(path))
    try:
        stat = os.stat(real)
        key: tuple[Any, ...] = (real, device, bool(verify), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return Runtime(real, device=device, verify=verify)  # raises ArtifactError with a clear message
    with _CACHE_LOCK:
        runtime = _CACHE.get(key)
        if runtime is None:
            # A rebuilt artifact (new mtime/size) replaces the stale entry.
            for stale in [k for k in _CACHE if k[:3] == key[:3]]:
                del _CACHE[stale]
            runtime = _CACHE[key] = Runtime(real, device=device, verify=verify)
        return runtime


def infer(artifact: str | os.PathLike[str] | Runtime, x: Any, device: str = "cpu", *, verify: bool = True) -> Any:
    """Logits of ``x`` (float32 NCHW or uint8 NHWC) from ``artifact``.

    ``artifact`` is a ``Runtime`` or a path; a path is loaded once per (real path, device,
    verify) and cached (reloaded when the file changes), with the self-check unless
    ``verify=False`` (see ``Runtime``). numpy in gives numpy out, torch in gives torch out.
    """
    runtime = artifact if isinstance(artifact, Runtime) else _cached_runtime(artifact, device, verify)
    return runtime.infer(x)


def clear_cache() -> None:
    """Drops the runtimes that ``infer`` loaded from paths."""
    with _CACHE_LOCK:
        _CACHE.clear()
