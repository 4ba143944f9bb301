"""What every benchmark here shares: the host's description, the interleaved timing loop, output
checks against a reference, and the writer of benchmarks/RESULTS.md.

Figures are only comparable within one run on one host: each table is written with the host
line (CPU vendor and model, ISA, cores, torch) and the command that produced it.
"""

import datetime
import os
import platform
import shutil
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from repmlp.utils import output_error

try:
    from repmlp.utils import first_line
except ImportError:  # older trees keep it with the manifest code
    from repmlp.artifact.manifest import first_line

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_PATH = os.path.join(HERE, "RESULTS.md")
CACHE_DIR = os.path.join(HERE, ".cache")

# cpu_features() reports these for any AVX2 or AVX-512 host; the host line names the others.
_BASE_ISA = ("avx2", "fma3", "avx512_f")
_LEVEL_NAMES = {"AVX512": "AVX-512", "AVX2": "AVX2", "DEFAULT": "no vector kernels"}


def log(message: str) -> None:
    print(message, flush=True)


def _cpuinfo_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_features() -> Dict[str, Any]:
    """The runtime's view of the CPU (``repmlp_rt.cpu_features()``: name, torch's kernel level,
    ISA extensions), or torch's kernel level alone where the runtime is not built."""
    try:
        import repmlp_rt

        return dict(repmlp_rt.cpu_features())
    except ImportError:
        return {"name": _cpuinfo_model(), "kernel_level": torch.backends.cpu.get_cpu_capability(), "isa": None}


def isa_summary(features: Optional[Mapping[str, Any]] = None) -> str:
    """e.g. ``x86-64 AVX-512 (avx512_bf16, avx512_vnni, no AMX)``."""
    features = features or cpu_features()
    arch = platform.machine().replace("_", "-")
    level = _LEVEL_NAMES.get(features["kernel_level"], features["kernel_level"])
    isa = features.get("isa")
    if isa is None:
        return f"{arch} {level} (extensions unknown: repmlp_rt not built)"
    extras = sorted(f for f in isa if f not in _BASE_ISA and not f.startswith("amx"))
    extras.append("AMX" if "amx_tile" in isa else "no AMX")
    return f"{arch} {level} ({', '.join(extras)})"


def host_line() -> str:
    """CPU vendor and model, ISA, cores and torch version, in one line."""
    features = cpu_features()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{features['name']}, {isa_summary(features)}, {cores} cores, torch {torch.__version__.split('+')[0]}"


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def markdown_table(headers: List[str], rows: List[List[object]]) -> str:
    """A GitHub markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(module: str, argv: Optional[Sequence[str]] = None) -> str:
    """How to rerun this measurement: ``python -m benchmarks.NAME ARGS``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module] + args)


def append_results(title: str, command: str, body: str, path: str = RESULTS_PATH) -> None:
    """Appends a section to benchmarks/RESULTS.md (or ``path``): the title, date, host line,
    command and body."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"\n## {title}\n\n- date: {when}\n- host: {host_line()}\n- command: `{command}`\n\n{body.strip()}\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(section)
    log(f"appended '{title}' to {path}")


def publish(title: str, module: str, argv: Optional[Sequence[str]], body: str, write: bool) -> None:
    """Prints a script's result; with ``write``, appends it to RESULTS.md with the command
    ``python -m MODULE ARGV`` that reproduces it."""
    print(f"\n{host_line()}\n\n{body}")
    if write:
        append_results(title, command_line(module, argv), body)


def time_rounds(calls: Mapping[str, Callable[[], object]], rounds: int, per_round: int = 1,
                after: Optional[Callable[[str], None]] = None,
                between: Optional[Callable[[int], None]] = None) -> Dict[str, List[float]]:
    """Seconds per call of each callable, in interleaved rounds: round r runs every callable
    ``per_round`` times, starting one callable later than round r - 1, so that each leads in
    turn (the slot after a switch of library or thread pool can run slow) and a host whose
    speed drifts slows them all alike. ``after(name)`` runs untimed after each callable's turn
    (e.g. a pause for a peer's spinning threads); ``between(r)`` before each round."""
    times: Dict[str, List[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        if between is not None:
            between(r)
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            call = calls[name]
            for _ in range(per_round):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
            if after is not None:
                after(name)
    return times


def check_close(name: str, out: Any, ref: torch.Tensor, tolerance: float) -> float:
    """Asserts ``out`` within ``tolerance`` x max |ref| of ``ref`` element-wise (the metric of
    the builder's verification, :func:`repmlp.utils.output_error`); returns that relative error."""
    out = torch.as_tensor(out).float()
    scale = float(ref.abs().max())
    torch.testing.assert_close(out, ref.float(), rtol=0.0, atol=tolerance * scale, msg=lambda m: f"{name}: {m}")
    error = output_error(out, ref)[1]
    log(f"  check {name:<28} max|diff|/max|ref| = {error:.1e} (tolerance {tolerance:.0e})")
    return error


def find_repmlp_infer() -> Optional[str]:
    """The ``repmlp_infer`` binary next to this interpreter (the venv that built it), else on
    PATH; None if absent."""
    search = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("repmlp_infer", path=search)


def why(error: BaseException) -> str:
    """An exception as one short line, for a 'skipped' note."""
    return f"{type(error).__name__}: {first_line(error)[:300]}"
