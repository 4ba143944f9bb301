#!/usr/bin/env python
"""RepMLPNet CPU benchmark (issue 8): every deploy path, side by side, in one run.

Configurations, all fp32 on CPU, same random weights (seed 0, randomized BN statistics):

  (a) upstream  the upstream deploy formulation (benchmarks/upstream_reference.py), eager
  (b) eager     the project's fused deploy model (repmlp.model.fuse_model), eager
  (c) jit       the artifact via torch.jit.load in Python
  (c+) jit-opt  (c) + torch.jit.optimize_for_inference after load        [runtime choice]
  (d) rt        the C++ runtime via repmlp_rt.Runtime(...).infer
  (d+) rt-opt   (d) with optimize=True                                   [runtime choice]
  (e) cli       `repmlp_infer --bench --json` (a subprocess; its p50, its peak RSS)
  (h) rt-pt2    the C++ runtime on the AOTInductor package (repmlp-build --format aoti, .pt2);
                its cold compile time and file size are reported next to the .pt's
  (f) ort-up    ONNX Runtime on the ONNX export of (a)
  (g) ort       ONNX Runtime on the ONNX export of (b) (one file, dynamic batch: repmlp.onnx_export)
  (o) ov        OpenVINO on the same file as (g), f32 inference precision
  (o16) ov-bf16 OpenVINO on the same file, bf16 inference precision hint
  (d16) rt-bf16 the C++ runtime on a `--dtype bfloat16` artifact of the same weights
  (d8) rt-int8  the C++ runtime on a `--dtype int8` artifact of the same weights
  gemm          the host's GEMM rates at each thread count, measured in the same rounds: MKL's
                torch.mm and oneDNN's linear in fp32 (the best of the two is the fp32 ceiling),
                bf16 and int8 (the ceilings of the bf16 and int8 rows); 4096^3 each

Noise control (the machine is shared): for each (threads, batch) cell the configurations run
in interleaved rounds (round r runs every configuration once for its iterations, starting
one configuration later than round r - 1), and the reported latency is the median of all
per-call latencies of that configuration in that cell. After each ONNX Runtime configuration
the round waits --ort-settle seconds: ORT's threads spin after a run and would otherwise slow
whatever runs next. Outputs of (a), (c), (f), (g) are
checked against (b) before anything is timed, the reduced-precision ones at their build tolerance.

Usage (from the repository root):
  .venv/bin/python benchmarks/bench.py                       # full run, writes RESULTS.md
  .venv/bin/python benchmarks/bench.py --quick --no-write    # smoke run (~2-4 min)
Anything not available (repmlp_rt not built, no repmlp_infer, no onnxruntime, an export that
fails) is reported as skipped; the run goes on.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, HERE)
warnings.filterwarnings("ignore")  # TorchScript deprecation warnings, ONNX exporter chatter

import numpy as np  # noqa: E402
import torch  # noqa: E402

from repmlp.model import create_model, fuse_model  # noqa: E402
from repmlp.quantize import WEIGHT_LEVELS  # noqa: E402
from repmlp.utils import count_flops, randomize_model_  # noqa: E402
from locate import find_repmlp_infer  # noqa: E402
from upstream_reference import from_project_model  # noqa: E402

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
LABELS = {
    "a": "(a) upstream eager",
    "b": "(b) fused eager",
    "c": "(c) artifact jit.load",
    "c+": "(c+) jit.load + optimize_for_inference",
    "d": "(d) repmlp_rt",
    "d+": "(d+) repmlp_rt optimize=True",
    "e": "(e) repmlp_infer --bench",
    "h": "(h) repmlp_rt on the .pt2 (AOTInductor)",
    "f": "(f) ORT on ONNX(a)",
    "g": "(g) ORT on ONNX(b)",
    "o": "(o) OpenVINO f32 on ONNX(b)",
    "o16": "(o16) OpenVINO bf16 on ONNX(b)",
    "d16": "(d16) repmlp_rt bfloat16 artifact",
    "d8": "(d8) repmlp_rt int8 artifact",
}
# Which GEMM ceiling a configuration's "% of best GEMM" is taken against.
PRECISION = {"o16": "bf16", "d16": "bf16", "d8": "int8"}
# CPU features that decide which dtype runs fast (cpuinfo flag names).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
ALL = list(LABELS)


def log(msg: str) -> None:
    print(msg, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def sha_files(paths: List[str], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        with open(p, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:12]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


def check_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """assert_close with an absolute tolerance of tol x the logit scale."""
    scale = float(ref.abs().max())
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.0, atol=tol * scale, msg=lambda m: f"{name}: {m}")
    err = rel_err(out, ref)
    log(f"  check {name:<10} max|diff|/max|ref| = {err:.2e} (tol {tol:.0e})")
    return err


def machine_info() -> Dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for key in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache", "Hypervisor vendor"):
            m = re.search(rf"^{re.escape(key)}:\s*(.+)$", out, re.M)
            if m:
                info[key] = m.group(1).strip()
        flags = re.search(r"^Flags:\s*(.+)$", out, re.M)
        if flags:
            f = flags.group(1).split()
            info["isa"] = " ".join(x for x in ISA_FLAGS if x in f)
    except Exception as e:  # lscpu missing
        info["lscpu"] = f"unavailable ({e})"
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except Exception:
        info["onnxruntime"] = "not installed"
    try:
        import openvino

        info["openvino"] = openvino.__version__
    except Exception:
        info["openvino"] = "not installed"
    info["torch cpu capability"] = torch.backends.cpu.get_cpu_capability()
    info["torch parallel"] = torch.__config__.parallel_info().splitlines()[0:1][0] if torch.__config__.parallel_info() else ""
    return info


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


# ----------------------------------------------------------------------------- preparation


def source_files(folder: str) -> List[str]:
    """Every .py file under ``folder`` (the builder is a package), sorted, for cache keys."""
    found = []
    for base, _, files in os.walk(folder):
        found += [os.path.join(base, f) for f in files if f.endswith(".py")]
    return sorted(found)


def build_or_reuse_artifact(arch: str, seed: int, cache: str, format: str = "torchscript",
                            dtype: str = "float32") -> Tuple[str, Dict[str, Any]]:
    """The artifact's path and its build record (seconds per stage, size), built once per
    source state. An aoti build compiles with an empty Inductor cache: its time is a cold
    compile, as on a fresh machine."""
    import tempfile

    from repmlp.artifact import build_artifact

    key = sha_files(source_files(os.path.join(ROOT, "python", "repmlp")), f"{arch}-{seed}-{format}-{dtype}-{torch.__version__}")
    suffix = "" if dtype == "float32" else f"-{dtype}"
    path = os.path.join(cache, f"{arch}{suffix}-{key}.{'pt2' if format == 'aoti' else 'pt'}")
    record_path = path + ".build.json"
    if os.path.exists(path) and os.path.exists(record_path):
        log(f"  artifact: cached {path}")
        with open(record_path) as fh:
            return path, json.load(fh)
    log(f"  artifact: building {path} ({format}, {dtype}, random weights, seed {seed}) ...")
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as inductor_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
        try:
            t0 = time.perf_counter()
            report = build_artifact(arch, out=path, seed=seed, force=True, format=format, dtype=dtype,
                                    progress=lambda line: log("    " + line))
            total = time.perf_counter() - t0
        finally:
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
    record = {"build_s": total, "size_bytes": report.size_bytes, "load avg": loadavg(),
              "stages_s": {s.stage: s.seconds for s in report.stages}}
    with open(record_path, "w") as fh:
        json.dump(record, fh)
    log(f"  artifact built in {total:.0f} s")
    return path, record


def export_onnx_static(model: torch.nn.Module, path: str, x: torch.Tensor) -> str:
    """ONNX export of the upstream formulation (a) for the batch size of ``x``; returns the
    exporter used. The fused model has its own dynamic-batch export (repmlp.onnx_export)."""
    if os.path.exists(path):
        return "cached"
    tmp = path + ".tmp"
    try:
        torch.onnx.export(model, (x,), tmp, dynamo=True, external_data=False)
        note = "dynamo exporter"
    except Exception as e:
        log(f"    dynamo export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); trying the TorchScript exporter")
        torch.onnx.export(model, (x,), tmp, dynamo=False, input_names=["x"], output_names=["logits"])
        note = "TorchScript exporter"
    os.replace(tmp, path)
    return note


def openvino_request(path: str, threads: int, precision: str, **config: Any) -> Any:
    """An infer request of OpenVINO's CPU plugin on an ONNX file, one stream of ``threads``
    threads, latency mode; ``precision`` (f32 or bf16) is its inference precision hint;
    ``config``: further properties (PERF_COUNT=True for profile_ops.py)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": precision,
        **config,
    })
    return compiled.create_infer_request()


def openvino_runner(path: str, threads: int, precision: str) -> Callable[[Any], Any]:
    """openvino_request as a function of the input."""
    request = openvino_request(path, threads, precision)
    return lambda x: request.infer({0: x})[0]


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def run_cli(cli: str, artifact: str, batch: int, threads: int, iters: int, warmup: int, timeout: float) -> Dict[str, Any]:
    """One `repmlp_infer --bench --json` run; its JSON plus the child's peak RSS (MiB)."""
    cmd = [cli, artifact, "--bench", "--json", "--iters", str(iters), "--warmup", str(warmup),
           "--batch", str(batch), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {err.strip()[-300:]}")
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{") and '"bench"' in line:
            return json.loads(line)["bench"]
    # text fallback
    res: Dict[str, Any] = {}
    m = re.search(r"p50/p90/p99:\s*([\d.]+)", out)
    if m:
        res["p50_ms"] = float(m.group(1))
    m = re.search(r"first call:\s*([\d.]+)", out)
    if m:
        res["first_call_ms"] = float(m.group(1))
    m = re.search(r"load \(incl. warm-up\):\s*([\d.]+)", out)
    if m:
        res["load_ms"] = float(m.group(1))
    if "p50_ms" not in res:
        raise RuntimeError(f"could not parse repmlp_infer output: {out[-300:]}")
    return res


def run_cli_rss(cli: str, artifact: str, batch: int, threads: int, iters: int, warmup: int) -> Tuple[Dict[str, Any], float]:
    """Like run_cli, under /usr/bin/time -v for the binary's own peak RSS (MiB).

    (ru_maxrss from wait4 on a child forked from this big Python process counts the pages it
    shares with the parent before exec, so it overstates; GNU time forks from a small process.)
    """
    gnu_time = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if gnu_time is None:
        return run_cli(cli, artifact, batch, threads, iters, warmup, timeout=900), float("nan")
    cmd = [gnu_time, "-v", cli, artifact, "--bench", "--json", "--iters", str(iters), "--warmup", str(warmup),
           "--batch", str(batch), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", proc.stderr)
    rss = int(m.group(1)) / 1024.0 if m else float("nan")
    for line in proc.stdout.splitlines():
        if line.strip().startswith("{") and '"bench"' in line:
            return json.loads(line)["bench"], rss
    raise RuntimeError(f"could not parse repmlp_infer output: {proc.stdout[-300:]}")


class GemmRates:
    """The host's n^3 GEMM rates (GFLOP/s, 2 n^3 per call): MKL's torch.mm and oneDNN's linear
    (mkldnn tensors) in fp32, torch.mm in bf16 (oneDNN, AMX where present) and torch._int_mm in
    int8 (what the int8 artifact runs). One warm-up per thread count, then one timed call of
    each per sample."""

    KINDS = ("mkl_fp32", "onednn_fp32", "bf16", "int8")

    def __init__(self, n: int = 4096) -> None:
        self.n = n
        a, b = torch.randn(n, n), torch.randn(n, n)
        a_dnn, b_dnn, bias_dnn = a.to_mkldnn(), b.to_mkldnn(), torch.zeros(n).to_mkldnn()
        a16, b16 = a.bfloat16(), b.bfloat16()
        # The weight operand in the artifact's range (WEIGHT_LEVELS): with full-range codes a CPU
        # without VNNI runs the same kernel but its 16-bit pair sums overflow.
        a8 = torch.randint(-127, 128, (n, n), dtype=torch.int8)
        b8 = torch.randint(-WEIGHT_LEVELS, WEIGHT_LEVELS + 1, (n, n), dtype=torch.int8)
        self.calls = {
            "mkl_fp32": lambda: torch.mm(a, b),
            "onednn_fp32": lambda: torch._C._nn.mkldnn_linear(a_dnn, b_dnn, bias_dnn),
            "bf16": lambda: torch.mm(a16, b16),
            "int8": lambda: torch._int_mm(a8, b8),
        }
        self.warm: set = set()

    def sample(self, threads: int) -> Dict[str, float]:
        torch.set_num_threads(threads)
        if threads not in self.warm:
            for call in self.calls.values():
                call()
            self.warm.add(threads)
        rates = {}
        for kind, call in self.calls.items():
            t0 = time.perf_counter()
            call()
            rates[kind] = 2.0 * self.n ** 3 / (time.perf_counter() - t0) / 1e9
        return rates


def op_profile(model: torch.nn.Module, x: torch.Tensor, threads: int, reps: int = 3, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    with torch.no_grad():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                model(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    lines = ["| op | self ms / forward | share | calls / forward |", "|---|---|---|---|"]
    for e in events[:rows]:
        lines.append(
            f"| {e.key} | {e.self_cpu_time_total / 1000 / reps:.1f} | {100 * e.self_cpu_time_total / total:.1f}% | {e.count // reps} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="B224")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--iters", type=int, default=None,
                   help="timed calls per configuration per cell (default 6 at batch 1, 3 at batch > 1; quick 2/1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per cell (default 3, quick 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing each config in a cell")
    p.add_argument("--only", nargs="+", default=None, choices=ALL, help="run only these configurations")
    p.add_argument("--skip", nargs="+", default=[], choices=ALL)
    p.add_argument("--quick", action="store_true", help="fewer iterations, no runtime-choice variants, no profile")
    p.add_argument("--ort-settle", type=float, default=2.0,
                   help="seconds to wait after each ONNX Runtime configuration, until its spinning threads go idle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.join(HERE, ".cache"))
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--json-out", default=None, help="also dump raw results as JSON here")
    args = p.parse_args(argv)

    rounds = args.rounds or (1 if args.quick else 3)

    def iters_for(b: int) -> int:
        return args.iters or ((2 if b == 1 else 1) if args.quick else (6 if b == 1 else 3))

    def per_round_for(b: int) -> int:
        return max(1, -(-iters_for(b) // rounds))
    configs = args.only or [c for c in ALL if not (args.quick and c in ("c+", "d+"))]
    configs = [c for c in configs if c not in args.skip]
    command = " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else sys.executable,
                        os.path.relpath(os.path.abspath(__file__), ROOT)] + (argv if argv is not None else sys.argv[1:]))
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    os.makedirs(args.cache_dir, exist_ok=True)
    info = machine_info()
    log(f"RepMLPNet bench: {args.arch}, batches {args.batches}, threads {args.threads}, configs {configs}")
    log(f"  {info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPUs, torch {info['torch']}, onnxruntime {info['onnxruntime']}; load avg {loadavg()}")

    skipped: Dict[str, str] = {}
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(args.threads))

    # models ---------------------------------------------------------------------------
    model = create_model(args.arch).eval()
    randomize_model_(model, seed=args.seed)
    cfg = model.config
    shape = (cfg.in_channels, *cfg.img_size)
    upstream = from_project_model(model)
    fused = fuse_model(model)
    del model
    try:
        flops = float(count_flops(fused))
        flop_note = "torch.utils.flop_counter on the fused model"
    except Exception as e:
        flops, flop_note = 13.3e9, f"13.3 GFLOP (flop counter failed: {e})"
    log(f"  {flops / 1e9:.2f} GFLOP per image ({flop_note})")

    gen = torch.Generator().manual_seed(1234)
    xcheck = torch.randn(2, *shape, generator=gen)
    with torch.no_grad():
        ref = fused(xcheck)
        up_out = upstream(xcheck)
    errors: Dict[str, float] = {}
    errors["a"] = check_close("(a) vs (b)", up_out, ref, 1e-5)

    runners: Dict[str, Callable[[int], Callable[[Any], Any]]] = {}  # config -> threads -> fn(x)
    inputs: Dict[str, str] = {}  # config -> "torch" | "numpy"
    runners["a"] = lambda t: upstream
    runners["b"] = lambda t: fused
    inputs["a"] = inputs["b"] = "torch"

    artifact = pt2 = None
    builds: Dict[str, Dict[str, Any]] = {}  # format -> build record
    if any(c in configs for c in ("c", "c+", "d", "d+", "e")):
        try:
            artifact, builds["torchscript"] = build_or_reuse_artifact(args.arch, args.seed, args.cache_dir)
        except Exception as e:
            for c in ("c", "c+", "d", "d+", "e"):
                skipped[c] = f"artifact build failed: {e}"
    if "h" in configs:
        try:
            pt2, builds["aoti"] = build_or_reuse_artifact(args.arch, args.seed, args.cache_dir, "aoti")
        except Exception as e:
            skipped["h"] = f".pt2 build failed: {e}"

    loaded: Dict[Tuple[str, int], Any] = {}
    first_calls: Dict[str, Dict[str, float]] = {}  # config@threads -> {load_s, first_ms, second_ms, ...}

    def load_once(config: str, t: int, load: Callable[[], Callable[[Any], Any]], x1: Any, **extra: str) -> Any:
        """Loads a configuration once per thread count, timing the load and its first 4 calls
        (how many warm-ups it needs); later calls get the loaded callable."""
        key = (config, t)
        if key not in loaded:
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            call = load()
            load_s = time.perf_counter() - t0
            calls = []
            with torch.no_grad():
                for _ in range(4):
                    t0 = time.perf_counter()
                    call(x1)
                    calls.append((time.perf_counter() - t0) * 1000)
            first_calls[f"{config}@{t}"] = {"load_s": load_s, "calls_ms": calls, "batch": args.batches[0], **extra}
            loaded[key] = call
        return loaded[key]

    def jit_runner(opt: bool) -> Callable[[int], Any]:
        def load() -> Any:
            mod = torch.jit.load(artifact).eval()
            return torch.jit.optimize_for_inference(mod) if opt else mod

        return lambda t: load_once("c+" if opt else "c", t, load, torch.randn(args.batches[0], *shape))

    if artifact is not None:
        try:
            with torch.no_grad():
                errors["c"] = check_close("(c) vs (b)", torch.jit.load(artifact)(xcheck), ref, 1e-4)
        except Exception as e:
            skipped["c"] = skipped["c+"] = f"jit.load failed: {e}"
        runners["c"] = jit_runner(False)
        runners["c+"] = jit_runner(True)
        inputs["c"] = inputs["c+"] = "torch"

    # repmlp_rt ------------------------------------------------------------------------
    rt_mod = None
    if any(c in configs for c in ("d", "d+", "d16", "d8")):
        try:
            import repmlp_rt as rt_mod  # type: ignore
        except Exception as e:
            for c in ("d", "d+", "d16", "d8"):
                skipped[c] = f"repmlp_rt not importable ({type(e).__name__}: {e}); build it with `pip install --no-build-isolation -e .`"

    if "h" in configs and pt2 is not None and rt_mod is None:
        try:
            import repmlp_rt as rt_mod  # type: ignore
        except Exception as e:
            skipped["h"] = f"repmlp_rt not importable ({type(e).__name__}: {e})"

    def rt_runner(opt: bool, config: str = "", path: str = "") -> Callable[[int], Any]:
        config, path = config or ("d+" if opt else "d"), path or artifact

        def make(t: int) -> Any:
            x1 = np.random.default_rng(0).standard_normal((args.batches[0], *shape), dtype=np.float32)
            load = lambda: rt_mod.Runtime(path, device="cpu", threads=t, optimize=opt).infer  # noqa: E731
            return load_once(config, t, load, x1, note="Runtime() includes its built-in warm-up")
        return make

    if rt_mod is not None:
        try:
            r = rt_mod.Runtime(artifact, device="cpu", threads=max(args.threads), warmup=0)
            errors["d"] = check_close("(d) vs (b)", torch.from_numpy(np.asarray(r.infer(xcheck.numpy()))), ref, 1e-4)
            del r
            runners["d"] = rt_runner(False)
            runners["d+"] = rt_runner(True)
            inputs["d"] = inputs["d+"] = "numpy"
        except Exception as e:
            skipped["d"] = skipped["d+"] = f"repmlp_rt failed: {type(e).__name__}: {e}"
    if "h" in configs and pt2 is not None and "h" not in skipped:
        try:
            r = rt_mod.Runtime(pt2, device="cpu", threads=max(args.threads), warmup=0)
            errors["h"] = check_close("(h) vs (b)", torch.from_numpy(np.asarray(r.infer(xcheck.numpy()))), ref, 1e-4)
            del r
            runners["h"] = rt_runner(False, "h", pt2)
            inputs["h"] = "numpy"
        except Exception as e:
            skipped["h"] = f"repmlp_rt on the .pt2 failed: {type(e).__name__}: {e}"

    # reduced-precision artifacts of the same weights, checked at the tolerance they were built with
    for c, dtype in (("d16", "bfloat16"), ("d8", "int8")):
        if c not in configs or rt_mod is None:
            continue
        try:
            path, _ = build_or_reuse_artifact(args.arch, args.seed, args.cache_dir, dtype=dtype)
            r = rt_mod.Runtime(path, device="cpu", threads=max(args.threads), warmup=0)
            tol = float(r.manifest["verification"]["tolerance"])
            errors[c] = check_close(f"({c}) vs (b)", torch.from_numpy(np.asarray(r.infer(xcheck.numpy()))), ref, tol)
            del r

            runners[c] = rt_runner(False, c, path)
            inputs[c] = "numpy"
        except Exception as e:
            skipped[c] = f"{dtype} artifact failed: {type(e).__name__}: {_first_line(e)}"

    cli = find_repmlp_infer() if "e" in configs and artifact is not None else None
    if "e" in configs and artifact is not None and cli is None:
        skipped["e"] = "repmlp_infer not found next to the interpreter or on PATH"

    # ONNX -----------------------------------------------------------------------------
    onnx_key = sha_files(source_files(os.path.join(ROOT, "python", "repmlp")) + [os.path.join(HERE, "upstream_reference.py")],
                         f"{args.arch}-{args.seed}-{torch.__version__}")
    if "f" in configs:
        try:
            import onnxruntime  # noqa: F401

            paths: Dict[int, str] = {}
            for b in args.batches:
                path = os.path.join(args.cache_dir, f"{args.arch}-upstream-b{b}-{onnx_key}.onnx")
                xb = torch.randn(b, *shape, generator=torch.Generator().manual_seed(100 + b))
                t0 = time.perf_counter()
                note = export_onnx_static(upstream, path, xb)
                log(f"  onnx upstream batch {b}: {note} ({time.perf_counter() - t0:.0f} s) {path}")
                sess = ort_session(path, max(args.threads))
                with torch.no_grad():
                    rb = fused(xb)
                errors[f"f@{b}"] = check_close(f"(f) b{b} vs (b)", torch.from_numpy(sess(xb.numpy())), rb, 1e-4)
                paths[b] = path
                del sess

            def make_ort_static(t: int, paths: Dict[int, str] = paths) -> Callable[[Any], Any]:
                sessions = {b: ort_session(p, t) for b, p in paths.items()}
                return lambda x: sessions[x.shape[0]](x)

            runners["f"] = make_ort_static
            inputs["f"] = "numpy"
        except Exception as e:
            skipped["f"] = f"ONNX export/ORT failed: {type(e).__name__}: {_first_line(e)}"
            log(traceback.format_exc(limit=2))

    # one dynamic-batch file of the fused model for ORT (g) and OpenVINO (o, o16)
    peers = {"g": (ort_session, "onnxruntime", 1e-4), "o": (lambda p, t: openvino_runner(p, t, "f32"), "openvino", 1e-4),
             "o16": (lambda p, t: openvino_runner(p, t, "bf16"), "openvino", 6e-2)}
    wanted = [c for c in peers if c in configs]
    fused_onnx = None
    if wanted:
        try:
            from repmlp.onnx_export import export_onnx

            fused_onnx = os.path.join(args.cache_dir, f"{args.arch}-fused-dynamic-{onnx_key}.onnx")
            if os.path.exists(fused_onnx):
                log(f"  onnx fused (dynamic batch): cached {fused_onnx}")
            else:
                t0 = time.perf_counter()
                export_onnx(fused, fused_onnx)
                log(f"  onnx fused (dynamic batch): exported in {time.perf_counter() - t0:.0f} s {fused_onnx}")
        except Exception as e:
            for c in wanted:
                skipped[c] = f"ONNX export failed: {type(e).__name__}: {_first_line(e)}"
            log(traceback.format_exc(limit=2))
    for c in wanted:
        if fused_onnx is None or c in skipped:
            continue
        make, package, tol = peers[c]
        try:
            __import__(package)
        except Exception:
            skipped[c] = f"{package} not installed (pip install onnxruntime openvino onnx onnxscript)"
            continue
        try:
            run = make(fused_onnx, max(args.threads))
            for b in sorted(set(args.batches)):  # every batch size from the one file
                xb = torch.randn(b, *shape, generator=torch.Generator().manual_seed(100 + b))
                with torch.no_grad():
                    rb = fused(xb)
                errors[f"{c}@{b}"] = check_close(f"({c}) b{b} vs (b)", torch.from_numpy(np.asarray(run(xb.numpy()))), rb, tol)
            del run
            runners[c] = lambda t, make=make: make(fused_onnx, t)
            inputs[c] = "numpy"
        except Exception as e:
            skipped[c] = f"{package} failed: {type(e).__name__}: {_first_line(e)}"
            log(traceback.format_exc(limit=2))

    active = [c for c in configs if c not in skipped and (c in runners or c == "e")]
    for c in configs:
        if c in skipped:
            log(f"  SKIP {LABELS[c]}: {skipped[c]}")

    # timing ---------------------------------------------------------------------------
    lat: Dict[Tuple[str, int, int], List[float]] = {}  # (config, threads, batch) -> per-call seconds
    gemm: Dict[int, Dict[str, List[float]]] = {t: {k: [] for k in GemmRates.KINDS} for t in args.threads}
    cli_runs: Dict[Tuple[int, int], List[Dict[str, Any]]] = {}
    cli_rss: Dict[Tuple[int, int], float] = {}
    gemm_rates = GemmRates()

    for t in args.threads:
        torch.set_num_threads(t)
        fns: Dict[str, Any] = {}
        for c in active:
            if c == "e":
                continue
            try:
                fns[c] = runners[c](t)
            except Exception as e:
                skipped[c] = f"setup failed at {t} threads: {type(e).__name__}: {e}"
                log(f"  SKIP {LABELS[c]}: {skipped[c]}")
        def settle_after(c: str) -> None:
            # ONNX Runtime's worker threads keep spinning for a while after a run (its default,
            # which helps its own back-to-back calls). On 2 cores that steals the CPU from
            # whatever runs next: repmlp_rt right after an ORT run measured 160-177 ms instead
            # of 105-128 (2 threads, batch 1). So the round waits for them to go idle.
            # OpenVINO's pool is given the same pause.
            if c in ("f", "g", "o", "o16"):
                time.sleep(args.ort_settle)

        for b in args.batches:
            xt = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b))
            xn = xt.numpy()
            cell = [c for c in active if c not in skipped]
            per_round = per_round_for(b)
            log(f"-- threads {t}, batch {b}: {rounds} round(s) x {per_round} call(s) of {cell}; load avg {loadavg()}")
            with torch.no_grad():
                for c in cell:  # warm-up in this cell (shape specialization, ORT arenas)
                    if c == "e":
                        continue
                    for _ in range(args.warmup):
                        torch.set_num_threads(t)
                        fns[c](xn if inputs[c] == "numpy" else xt)
                    settle_after(c)
                for r in range(rounds):
                    for kind, value in gemm_rates.sample(t).items():
                        gemm[t][kind].append(value)
                    # Each round starts one configuration later: the slot right after the GEMM
                    # samples runs slow (float32 repmlp_rt, always first before, was 21-43%
                    # slower at 2 threads than with the order rotated; RESULTS.md, run 3).
                    shift = r % len(cell)
                    for c in cell[shift:] + cell[:shift]:
                        torch.set_num_threads(t)
                        if c == "e":
                            if r != rounds // 2:  # one process per cell (its load dominates), mid-run
                                continue
                            try:
                                res, rss = run_cli_rss(cli, artifact, b, t, iters_for(b), args.warmup)
                                cli_rss[(t, b)] = rss
                                cli_runs.setdefault((t, b), []).append(res)
                                lat.setdefault((c, t, b), []).append(res["p50_ms"] / 1000)
                            except Exception as e:
                                skipped["e"] = f"repmlp_infer failed: {e}"
                                log(f"  SKIP {LABELS['e']}: {skipped['e']}")
                            continue
                        x = xn if inputs[c] == "numpy" else xt
                        f = fns[c]
                        for _ in range(per_round):
                            t0 = time.perf_counter()
                            f(x)
                            lat.setdefault((c, t, b), []).append(time.perf_counter() - t0)
                        settle_after(c)
                    log(f"   round {r + 1}: GEMM " + "/".join(f"{gemm[t][k][-1]:.0f}" for k in GemmRates.KINDS) +
                        " GFLOP/s (mkl/onednn/bf16/int8); " + ", ".join(
                        f"{c} {1000 * statistics.median(lat[(c, t, b)]) / b:.0f}" for c in cell if (c, t, b) in lat) + " ms/img (median so far)")
        for c in list(fns):
            if c in ("f", "g", "o", "o16"):
                fns[c] = None

    profile_md = ""
    if not args.quick:
        try:
            profile_md = op_profile(fused, torch.randn(1, *shape), max(args.threads))
        except Exception as e:
            profile_md = f"(profile failed: {e})"

    elapsed = time.perf_counter() - t_start
    rate = {t: {k: statistics.median(v) for k, v in kinds.items() if v} for t, kinds in gemm.items()}
    # the fp32 ceiling is the faster of MKL's mm and oneDNN's linear (issue 18)
    best_rate = {t: {"fp32": max(r.get("mkl_fp32", 0.0), r.get("onednn_fp32", 0.0)), "bf16": r.get("bf16", float("nan")),
                     "int8": r.get("int8", float("nan"))} for t, r in rate.items() if r}

    def ceiling(c: str, t: int) -> Tuple[str, float]:
        kind = PRECISION.get(c, "fp32")
        return kind, best_rate[t][kind]

    # report ---------------------------------------------------------------------------
    def ms_img(c: str, t: int, b: int) -> Optional[float]:
        v = lat.get((c, t, b))
        return None if not v else 1000 * statistics.median(v) / b

    rows = []
    header = "| config | threads | batch | ms/image | images/s | GFLOP/s | % of best GEMM | x vs (a) | x vs (f) | x vs (d) | n |"
    rows.append(header)
    rows.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for t in args.threads:
        for b in args.batches:
            for c in configs:
                m = ms_img(c, t, b)
                if m is None:
                    continue
                gf = flops / (m / 1000) / 1e9
                pa = ms_img("a", t, b)
                pf = ms_img("f", t, b)
                pd = ms_img("d", t, b)
                kind, top = ceiling(c, t)
                rows.append(
                    f"| {LABELS[c]} | {t} | {b} | {m:.1f} | {1000 / m:.2f} | {gf:.1f} | "
                    f"{100 * gf / top:.0f}% ({kind}) | {'' if pa is None else f'{pa / m:.2f}'} | "
                    f"{'' if pf is None else f'{pf / m:.2f}'} | {'' if pd is None else f'{pd / m:.2f}'} | {len(lat[(c, t, b)])} |"
                )
    table = "\n".join(rows)
    mm_line = "; ".join(
        f"{t} thread(s): " + ", ".join(f"{k} {rate[t][k]:.0f}" for k in GemmRates.KINDS if k in rate[t]) +
        f" (best fp32 {best_rate[t]['fp32']:.0f})" for t in rate if rate[t])

    fc_rows = ["| config@threads | load s | call 1 ms | call 2 ms | call 3 ms | call 4 ms | steady ms (same batch) | call 1 / steady |",
               "|---|---|---|---|---|---|---|---|"]
    for key, v in first_calls.items():
        c, t = key.split("@")
        steady = lat.get((c, int(t), v["batch"]))
        st = 1000 * statistics.median(steady) if steady else None
        cm = v["calls_ms"]
        fc_rows.append(f"| {key} (batch {v['batch']}) | {v['load_s']:.1f} | " + " | ".join(f"{x:.0f}" for x in cm) +
                       f" | {'' if st is None else f'{st:.0f}'} | {'' if st is None else f'{cm[0] / st:.2f}'} |")
    for (t, b), runs in sorted(cli_runs.items()):
        st = statistics.median([r["p50_ms"] for r in runs])
        fcs = [r.get("first_call_ms", float("nan")) for r in runs]
        lds = [r.get("load_ms", float("nan")) / 1000 for r in runs]
        fc_rows.append(f"| e@{t} (batch {b}, per process) | {statistics.median(lds):.1f} | {statistics.median(fcs):.0f} | | | | {st:.0f} | {statistics.median(fcs) / st:.2f} |")
    fc_table = "\n".join(fc_rows)

    # targets
    tgt: List[str] = []

    def target(name: str, value: Optional[float], goal: float, fmt: str = "{:.2f}", higher: bool = True) -> None:
        if value is None:
            tgt.append(f"- {name}: not measured")
            return
        ok = value >= goal if higher else value <= goal
        tgt.append(f"- {name}: {fmt.format(value)} (target {'>=' if higher else '<='} {fmt.format(goal)}) -> "
                   f"{'met' if ok else 'MISSED by ' + (f'{100 * (goal - value) / goal:.0f}%' if higher else f'{100 * (value - goal) / goal:.0f}%')}")

    def best_t(c: str, b: int) -> Tuple[Optional[int], Optional[float]]:
        vals = [(ms_img(c, t, b), t) for t in args.threads if ms_img(c, t, b) is not None]
        if not vals:
            return None, None
        m, t = min(vals)
        return t, m

    for b, goal in ((8, 80.0), (1, 70.0)):
        if b in args.batches:
            t, m = best_t("d", b)
            tgt.append("") if False else None
            target(f"repmlp_rt batch {b} % of the best fp32 GEMM rate (best thread count: {t})",
                   None if m is None else 100 * flops / (m / 1000) / 1e9 / best_rate[t]["fp32"], goal, "{:.0f}%")
    if 1 in args.batches:
        for t in args.threads:
            d, a, f, g, e = (ms_img(c, t, 1) for c in ("d", "a", "f", "g", "e"))
            target(f"batch 1, {t} thr: repmlp_rt speed-up vs (a)", None if d is None or a is None else a / d, 4.5, "{:.2f}x")
            target(f"batch 1, {t} thr: repmlp_rt speed-up vs (f)", None if d is None or f is None else f / d, 2.0, "{:.2f}x")
            target(f"batch 1, {t} thr: repmlp_rt vs (g) (time ratio g/d)", None if d is None or g is None else g / d, 1.0, "{:.2f}")
    # issue 18: level with OpenVINO in fp32 and bf16; int8 >= 2x fp32 at batch 8 on a VNNI host
    for t in args.threads:
        for b in args.batches:
            d, o, d16, o16, d8 = (ms_img(c, t, b) for c in ("d", "o", "d16", "o16", "d8"))
            target(f"{t} thr batch {b}: fp32 repmlp_rt vs OpenVINO f32 (time ratio o/d)", None if d is None or o is None else o / d, 1.0, "{:.2f}")
            target(f"{t} thr batch {b}: bf16 repmlp_rt vs OpenVINO bf16 (time ratio o16/d16)", None if d16 is None or o16 is None else o16 / d16, 1.0, "{:.2f}")
            if b == 8:
                vnni = any(f in info.get("isa", "").split() for f in ("avx512_vnni", "avx_vnni"))
                target(f"{t} thr batch 8: int8 repmlp_rt speed-up over fp32 (d/d8)", None if d is None or d8 is None else d / d8,
                       2.0 if vnni else 1.3, "{:.2f}x")
    for t in args.threads:
        for b in args.batches:
            d, e = ms_img("d", t, b), ms_img("e", t, b)
            target(f"{t} thr batch {b}: repmlp_rt time / repmlp_infer p50", None if d is None or e is None else d / e, 1.03, "{:.3f}", higher=False)
    for key, v in first_calls.items():
        if key.startswith("d@"):
            t = int(key.split("@")[1])
            steady = lat.get(("d", t, v["batch"]))
            if steady:
                target(f"{key} first call after load / steady", v["calls_ms"][0] / (1000 * statistics.median(steady)), 2.0, "{:.2f}", higher=False)
    targets_md = "\n".join(x for x in tgt if x)

    format_rows = ["| format | file size MB | build s (cold) | of which export + compile s | load s (1 thread, incl. warm-up) |",
                   "|---|---|---|---|---|"]
    for fmt, config in (("torchscript", "d"), ("aoti", "h")):
        if fmt in builds:
            rec = builds[fmt]
            stages = rec["stages_s"]
            compile_s = sum(stages.get(k, 0.0) for k in ("export", "compile")) if fmt == "aoti" else sum(
                stages.get(k, 0.0) for k in ("script", "freeze"))
            load = first_calls.get(f"{config}@{min(args.threads)}", {}).get("load_s")
            format_rows.append(f"| {fmt} | {rec['size_bytes'] / 1e6:.1f} | {rec['build_s']:.0f} | {compile_s:.0f}"
                               f"{' (script + freeze)' if fmt == 'torchscript' else ''} | "
                               f"{'' if load is None else f'{load:.1f}'} |")
    formats_md = "\n".join(format_rows) if len(format_rows) > 2 else ""

    skipped_md = "\n".join(f"- {LABELS[c]}: skipped -- {why}" for c, why in skipped.items() if c in configs) or "- none"
    err_md = ", ".join(f"{LABELS[c.split('@')[0]]}{' batch ' + c.split('@')[1] if '@' in c else ''} {v:.1e}" for c, v in errors.items())
    machine_md = "; ".join(f"{k}: {v}" for k, v in info.items())

    body = f"""{BEGIN}
## Latest run (generated by benchmarks/bench.py)

- date: {started.strftime('%Y-%m-%d %H:%M UTC')}; wall time {elapsed / 60:.1f} min; load average at end {loadavg()}
- command: `{command}`
- machine: {machine_md}
- model: {args.arch}, fp32 unless the row says otherwise, random weights (seed {args.seed}, randomized BN stats); {flops / 1e9:.2f} GFLOP/image ({flop_note})
- method: per (threads, batch) cell, {rounds} interleaved round(s) (each starting one configuration later) of {', '.join(f'{per_round_for(b)} call(s) at batch {b}' for b in args.batches)} per configuration, after {args.warmup} warm-up call(s) per configuration in the cell; medians of per-call latency. (e) is one process per cell, launched in the middle round, reporting its own p50 (--iters {'/'.join(str(iters_for(b)) for b in args.batches)} --warmup {args.warmup}). The round pauses {args.ort_settle:g} s after each ONNX Runtime configuration (its threads spin after a run).
- output checks before timing (max|diff| / max|logit| vs (b)): {err_md}
- GEMM rates 4096^3, GFLOP/s (int8: GOP/s): {mm_line}
- peak RSS of repmlp_infer --bench (GNU time -v): {', '.join(f'{t} thr batch {b}: {v:.0f} MiB' for (t, b), v in sorted(cli_rss.items())) or 'n/a'}

{table}

{"### TorchScript vs AOTInductor: build and file" + chr(10) + chr(10) + formats_md + chr(10) if formats_md else ""}
### First call after load vs steady state

{fc_table}

### Targets (issues 8 and 18)

{targets_md}

### Skipped

{skipped_md}
"""
    if profile_md:
        body += f"\n### Op profile: fused model, eager, batch 1, {max(args.threads)} threads (torch.profiler, self CPU time)\n\n{profile_md}\n"
    body += END + "\n"

    print()
    print(body)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"lat": {f"{c}|{t}|{b}": v for (c, t, b), v in lat.items()}, "gemm": gemm, "first_calls": first_calls,
                       "cli": {f"{t}|{b}": v for (t, b), v in cli_runs.items()}, "flops": flops, "skipped": skipped}, fh, indent=1)
    if not args.no_write:
        old = open(args.out).read() if os.path.exists(args.out) else "# RepMLPNet CPU benchmark results\n\n"
        if BEGIN in old and END in old:
            new = old[: old.index(BEGIN)] + body + old[old.index(END) + len(END) + 1:]
        else:
            new = old.rstrip("\n") + "\n\n" + body
        with open(args.out, "w") as fh:
            fh.write(new)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
