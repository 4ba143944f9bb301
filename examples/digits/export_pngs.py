#!/usr/bin/env python
"""Write a few held-out digits as 8x8 RGB PNGs named <class>_<dataset index>.png.

    python examples/digits/export_pngs.py [--out examples/digits/images] [--per-class 2]

Takes the first ``--per-class`` held-out images of every class (the split of data.py), in
dataset order, so the set is deterministic. Pixels are exactly load_digits_rgb()'s (lossless).
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from data import load_digits_rgb, split

DEFAULT_DIR = os.path.join(HERE, "images")


def select(labels: np.ndarray, test_idx: np.ndarray, per_class: int):
    """The first ``per_class`` held-out dataset indices of each class, by class."""
    chosen = []
    for cls in range(10):
        chosen.extend(int(i) for i in test_idx[labels[test_idx] == cls][:per_class])
    return chosen


def png_name(label: int, index: int) -> str:
    return f"{label}_{index:04d}.png"


def export(out_dir: str = DEFAULT_DIR, per_class: int = 2):
    images, labels = load_digits_rgb()
    _, test_idx = split(labels)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name.endswith(".png"):
            os.remove(os.path.join(out_dir, name))
    paths = []
    for i in select(labels, test_idx, per_class):
        path = os.path.join(out_dir, png_name(int(labels[i]), i))
        Image.fromarray(images[i], mode="RGB").save(path, format="PNG")
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_DIR)
    parser.add_argument("--per-class", type=int, default=2)
    args = parser.parse_args(argv)
    paths = export(args.out, args.per_class)
    print(f"wrote {len(paths)} PNGs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
