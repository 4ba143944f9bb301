#!/usr/bin/env python
"""Accuracy cost of the reduced-precision artifacts on the trained digits model (issue 18).

Builds the digits artifact in float32, bfloat16 and int8 (temporary folder), runs all 1797
digits through each artifact's own preprocessing (forward_images) and prints the held-out
accuracy (the recorded 450-image split), the top-1 agreement with float32 over all digits, the
build's worst verification error and its tolerance, and the file size. docs/PERFORMANCE.md
quotes its output.

  .venv/bin/python benchmarks/dtype_accuracy.py
"""

import os
import sys
import tempfile
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "digits"))
warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated")

from data import load_digits_rgb, split  # noqa: E402
from repmlp.artifact import build_artifact  # noqa: E402


def main() -> int:
    images, labels = load_digits_rgb()
    _, test_idx = split(labels)
    labels_t, test_t = torch.from_numpy(labels), torch.from_numpy(test_idx)
    top1 = {}
    with tempfile.TemporaryDirectory() as folder:
        for dtype in ("float32", "bfloat16", "int8"):
            path = os.path.join(folder, f"digits-{dtype}.pt")
            report = build_artifact(out=path, dtype=dtype)
            module = torch.jit.load(path).eval()
            with torch.no_grad(), torch.jit.optimized_execution(False):
                top1[dtype] = module.forward_images(torch.from_numpy(images)).argmax(1)
            verification = report.manifest["verification"]
            worst = max(s["max_rel_err"] for s in verification["stages"] if s["max_rel_err"] is not None)
            right = int((top1[dtype][test_t] == labels_t[test_t]).sum())
            agree = int((top1[dtype] == top1["float32"]).sum())
            print(f"{dtype:8s}  held-out {100 * right / len(test_idx):.2f}% ({right}/{len(test_idx)})  "
                  f"agreement with float32 {100 * agree / len(labels):.2f}% ({agree}/{len(labels)})  "
                  f"build worst error {worst:.1e} (tolerance {verification['tolerance']:.1e})  "
                  f"{os.path.getsize(path) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
