"""Shared pieces of the benchmark scripts: the host line, markdown tables, RESULTS.md sections."""

from __future__ import annotations

import os
import platform

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def host_line() -> str:
    """CPU model, ISA extensions that matter here, cores, torch version."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else platform.machine())
    extras = [f for f in ("avx512_bf16", "avx512_vnni") if f in flags] + ([] if "amx_tile" in flags else ["no AMX"])
    return f"{model}, x86-64 {isa} ({', '.join(extras)}), {os.cpu_count()} cores, torch {torch.__version__}"


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(title: str, command: str, body: str) -> None:
    """Appends ``## title``, the host, the command and ``body`` to benchmarks/RESULTS.md."""
    with open(RESULTS, "a", encoding="utf-8") as results:
        results.write(f"\n## {title}\n\nHost: {host_line()}.\n\n```\n{command}\n```\n\n{body}\n")
