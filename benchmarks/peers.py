"""The deploy paths the benchmarks time, each a small runner.

A :class:`Peer` says how to load a path at a thread count and what the loaded callable takes
(numpy or torch); ``ceiling`` names the GEMM rate its rows are measured against, ``tolerance``
the output check before timing, and ``settle`` whether its worker threads keep spinning after
a run (ONNX Runtime's default), so that the timing loop pauses before the next peer.
"""

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

# The runtime's GEMM paths (repmlp_rt.Runtime(..., gemm=MODE)); "auto" measures them at load.
GEMM_MODES = ("aten", "onednn", "mkl-packed", "auto")
# Output-check tolerances (x max |logit|) of the peers that are not artifacts.
TOLERANCE = {"float32": 1e-4, "bfloat16": 6e-2}


@dataclass
class Peer:
    label: str
    load: Callable[[int], Callable[[Any], Any]]
    numpy: bool = True
    ceiling: str = "fp32"
    tolerance: float = 1e-4
    settle: bool = False


def eager(label: str, model: torch.nn.Module) -> Peer:
    """A PyTorch module in eager mode (torch's thread pool: set by the timing loop)."""
    return Peer(label, lambda threads: model, numpy=False)


def jit(label: str, path: str, optimize: bool = False) -> Peer:
    """The artifact through ``torch.jit.load`` in Python, optionally ``optimize_for_inference``."""
    def load(threads: int) -> Callable[[Any], Any]:
        module = torch.jit.load(path).eval()
        return torch.jit.optimize_for_inference(module) if optimize else module

    return Peer(label, load, numpy=False)


def gemm_keyword() -> Optional[str]:
    """None where ``repmlp_rt.Runtime`` takes ``gemm=``, else why not (one line)."""
    try:
        import repmlp_rt
    except ImportError as error:
        return f"repmlp_rt not importable ({error})"
    init = repmlp_rt.Runtime.__init__
    if "gemm" in inspect.signature(init).parameters or "gemm" in (init.__doc__ or ""):
        return None
    return "this repmlp_rt.Runtime takes no gemm= keyword"


def runtime(label: str, path: str, dtype: str = "float32", **options: Any) -> Peer:
    """The C++ runtime through the binding: ``repmlp_rt.Runtime(path, threads=T, **options)``."""
    def load(threads: int) -> Callable[[Any], Any]:
        import repmlp_rt

        return repmlp_rt.Runtime(path, threads=threads, **options).infer

    ceiling = {"bfloat16": "bf16", "int8": "int8"}.get(dtype, "fp32")
    return Peer(label, load, ceiling=ceiling, tolerance=build_tolerance(path))


@functools.lru_cache(maxsize=None)
def build_tolerance(path: str) -> float:
    """The tolerance the artifact was verified with when it was built (its manifest)."""
    from repmlp.artifact import read_manifest

    return float(read_manifest(path)["verification"]["tolerance"])


def openvino_request(path: str, threads: int, precision: str, **config: Any) -> Any:
    """An infer request of OpenVINO's CPU plugin on an ONNX file: one stream of ``threads``
    threads, latency mode, ``precision`` (f32, bf16) as its inference precision hint; ``config``:
    further properties (``PERF_COUNT=True`` for per-node counters)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": precision, **config})
    return compiled.create_infer_request()


def openvino(label: str, path: str, precision: str) -> Peer:
    def load(threads: int) -> Callable[[Any], Any]:
        request = openvino_request(path, threads, precision)
        return lambda x: request.infer({0: x})[0]

    bf16 = precision == "bf16"
    return Peer(label, load, ceiling="bf16" if bf16 else "fp32", tolerance=TOLERANCE["bfloat16" if bf16 else "float32"],
                settle=True)


def ort_session(path: str, threads: int, entries: Optional[Dict[str, str]] = None, **settings: Any) -> Any:
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, sequential, every graph
    optimization; ``entries``: session config entries (``session.intra_op.allow_spinning``);
    ``settings``: further SessionOptions attributes (``enable_profiling``, ...)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for name, value in settings.items():
        setattr(options, name, value)
    for key, value in (entries or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def onnxruntime(label: str, paths: Dict[int, str]) -> Peer:
    """ONNX Runtime on ``paths`` (batch size -> file; key 0: one file for every batch size)."""
    def load(threads: int) -> Callable[[Any], Any]:
        sessions = {batch: ort_session(path, threads) for batch, path in paths.items()}
        name = next(iter(sessions.values())).get_inputs()[0].name
        return lambda x: sessions[0 if 0 in sessions else x.shape[0]].run(None, {name: x})[0]

    return Peer(label, load, settle=True)
