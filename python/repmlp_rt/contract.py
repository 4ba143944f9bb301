"""What every serving path of repmlp_rt agrees on: the model-name rule, the JSON shape of one
input's top-k, as ``repmlp_infer --json`` prints it, and the GEMM modes. No Ray, no torch."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# The values of Runtime(gemm=...), as the C++ runtime names them (kGemmModes in runtime.hpp;
# tests/test_gemm_plan.py checks that the runtime accepts exactly these).
GEMM_MODES = ("auto", "aten", "onednn", "mkl-packed")

MODEL_NAME_MAX = 64
# Letters, digits, '_', '.', '-', starting with a letter or digit: safe in a URL path, a Ray
# application name and a Triton model folder alike.
MODEL_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MODEL_NAME_MAX - 1}}}")


def check_model_name(name: str, source: str = "") -> str:
    """``name`` if it follows the rule, else ValueError naming the rule and where it came from."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        origin = f" (from {source!r})" if source else ""
        raise ValueError(f"model name {name!r}{origin}: expected letters, digits, '_', '.', '-' "
                         f"(at most {MODEL_NAME_MAX}, starting with a letter or digit)")
    return name


def topk_json(name: str, scores: Iterable[float], indices: Iterable[int], labels: list[str]) -> dict[str, Any]:
    """One input's result: ``{"input", "topk": [{"index", "label", "score"}]}``."""
    return {"input": name, "topk": [{"index": int(i), "label": labels[int(i)], "score": float(s)}
                                    for s, i in zip(scores, indices)]}
