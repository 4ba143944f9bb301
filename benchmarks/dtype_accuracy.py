"""Accuracy cost of the reduced-precision artifacts on the trained digits model.

Builds the digits artifact in float32, bfloat16 and int8 (temporary folder), runs all 1797
digits through each artifact's own preprocessing (forward_images) and prints the held-out
accuracy (the recorded 450-image split), the top-1 agreement with float32 over all digits, the
build's worst verification error and its tolerance, and the file size.

  python -m benchmarks.dtype_accuracy [--write]
"""

import argparse
import importlib.util
import os
import tempfile
from typing import List, Optional

import torch

from benchmarks.harness import ROOT, log, markdown_table, publish
from repmlp.artifact import build_artifact
from repmlp.utils import quiet_jit


def digits_data():
    """examples/digits/data.py (the dataset and its recorded split), loaded from its file."""
    spec = importlib.util.spec_from_file_location("digits_data", os.path.join(ROOT, "examples", "digits", "data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args(argv)
    data = digits_data()
    images, labels = data.load_digits_rgb()
    _, test_idx = data.split(labels)
    labels_t, test_t = torch.from_numpy(labels), torch.from_numpy(test_idx)
    top1, rows = {}, []
    with tempfile.TemporaryDirectory() as folder, quiet_jit():
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
            rows.append([dtype, f"{100 * right / len(test_idx):.2f}% ({right}/{len(test_idx)})",
                         f"{100 * agree / len(labels):.2f}% ({agree}/{len(labels)})",
                         f"{worst:.1e} ({verification['tolerance']:.1e})", f"{os.path.getsize(path) / 1e6:.2f}"])
            log(f"  {dtype}: done")
    body = markdown_table(["dtype", "held-out accuracy", "top-1 agreement with float32",
                           "build's worst error (tolerance)", "file MB"], rows)
    publish("Digits accuracy per artifact dtype", "benchmarks.dtype_accuracy", argv, body, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
