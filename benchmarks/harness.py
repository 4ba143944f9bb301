"""What the benchmarks share: the host line, markdown tables, and the writer of RESULTS.md
(a minimal version of the shared benchmark harness)."""

from __future__ import annotations

import datetime
import os

import repmlp_rt

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_PATH = os.path.join(HERE, "RESULTS.md")


def host_line() -> str:
    """CPU model, ISA, cores and torch version, in one line."""
    import torch

    features = repmlp_rt.cpu_features()
    isa = sorted(features.get("isa") or [])
    extras = [f for f in isa if f in ("avx512_bf16", "avx512_vnni")] + ["AMX" if "amx_tile" in isa else "no AMX"]
    cores = len(os.sched_getaffinity(0))
    return (f"{features['name']}, x86-64 {features['kernel_level']} ({', '.join(extras)}), {cores} cores, "
            f"torch {torch.__version__.split('+')[0]}")


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(title: str, command: str, body: str) -> None:
    """Appends a section (title, date, host line, command, body) to benchmarks/RESULTS.md."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(RESULTS_PATH, "a", encoding="utf-8") as fh:
        fh.write(f"\n## {title}\n\n- date: {when}\n- host: {host_line()}\n- command: `{command}`\n\n{body.strip()}\n")
