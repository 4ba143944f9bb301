"""Accuracy of artifacts on a labelled image set: decide whether a conversion (bf16, int8, ...)
is good enough on your own classes.

    repmlp-eval ARTIFACT... DATA [--json] [--plot confusion.png]

DATA is a folder of class folders (the ImageFolder layout: ``DATA/<label>/*.png``, searched
recursively inside each class folder) or a text file of ``path label`` lines (paths relative
to the file's folder; blank lines and lines starting with ``#`` are skipped). A label is one of
the artifacts' labels (manifest ``labels``) or, in a list file whose labels are all integers
and not all label names, a class index. Every artifact must output logits and have the same
labels. Images are decoded once with the runtime's decoder and go through each artifact's own
preprocessing (``Runtime.infer_images``), with the load-time self-check on.

Printed per artifact: top-1 and top-5 accuracy, the top-1 agreement with the first artifact
(the share of images where both predict the same class) and throughput (images/s of the model
calls alone, decoding excluded). ``--json`` prints one JSON object instead; ``--plot FILE``
writes a PNG with one confusion-matrix panel per artifact (needs matplotlib). Bad input
(a missing or empty DATA, unknown labels, an undecodable image, a bad artifact): one message
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import repmlp_rt

from ._cli import IMAGE_EXTENSIONS, current_umask, positive_int

PROG = "repmlp-eval"
TOPK = 5
# Each confusion-matrix panel is PANEL_INCHES at PLOT_DPI: the PNG is panels x (600 x 550) pixels.
PANEL_INCHES = (6.0, 5.5)
PLOT_DPI = 100
# Up to this many classes, every cell of a panel shows its count.
ANNOTATE_MAX_CLASSES = 30


class EvalError(ValueError):
    """Bad input to the evaluation: the message names what was expected and what was given."""


@dataclass
class Dataset:
    """Image paths with their true labels (label text, as written in DATA)."""

    source: str
    kind: str  # "folders" or "list"
    paths: list[str]
    labels: list[str]


def _images_under(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, name) for name in sorted(files) if name.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def read_folders(root: str) -> Dataset:
    """DATA as ImageFolder: every sub-folder is a class named after the folder."""
    classes = sorted(name for name in os.listdir(root)
                     if os.path.isdir(os.path.join(root, name)) and not name.startswith("."))
    if not classes:
        raise EvalError(f"DATA folder {root!r} has no class folders (expected {root}/<label>/<image files>)")
    paths: list[str] = []
    labels: list[str] = []
    for name in classes:
        images = _images_under(os.path.join(root, name))
        if not images:
            raise EvalError(f"class folder {os.path.join(root, name)!r} holds no images "
                            f"(expected files ending in {'/'.join(IMAGE_EXTENSIONS)})")
        paths += images
        labels += [name] * len(images)
    return Dataset(root, "folders", paths, labels)


def read_list(list_file: str) -> Dataset:
    """DATA as ``path label`` lines; a path may hold spaces (the label is the last field)."""
    try:
        with open(list_file, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise EvalError(f"cannot read the list file {list_file!r}: {getattr(error, 'strerror', None) or error}") from None
    base = os.path.dirname(os.path.abspath(list_file))
    paths: list[str] = []
    labels: list[str] = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.rsplit(None, 1)
        if len(fields) != 2:
            raise EvalError(f"{list_file}:{number}: expected 'path label', got {text!r}")
        path = os.path.join(base, fields[0])
        if not os.path.isfile(path):
            raise EvalError(f"{list_file}:{number}: no such image file: {fields[0]!r}")
        paths.append(path)
        labels.append(fields[1])
    if not paths:
        raise EvalError(f"list file {list_file!r} has no 'path label' lines")
    return Dataset(list_file, "list", paths, labels)


def read_dataset(data: str) -> Dataset:
    if os.path.isdir(data):
        return read_folders(data)
    if os.path.isfile(data):
        return read_list(data)
    raise EvalError(f"DATA {data!r} does not exist (expected a folder of class folders or a 'path label' list file)")


def class_indices(dataset: Dataset, labels: Sequence[str]) -> np.ndarray:
    """The artifact's class index of every image. Names first; a list file may use indices."""
    position = {name: i for i, name in enumerate(labels)}
    unknown = sorted(set(dataset.labels) - set(position))
    if not unknown:
        return np.array([position[name] for name in dataset.labels], dtype=np.int64)
    if dataset.kind == "list" and all(label.isdigit() for label in dataset.labels):
        indices = np.array([int(label) for label in dataset.labels], dtype=np.int64)
        if indices.max() < len(labels):
            return indices
        raise EvalError(f"class index {int(indices.max())} in {dataset.source!r} is out of range: "
                        f"the artifacts have {len(labels)} classes (0..{len(labels) - 1})")
    what = "class folder(s)" if dataset.kind == "folders" else "label(s)"
    shown = ", ".join(repr(name) for name in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    known = ", ".join(repr(name) for name in labels[:10]) + (", ..." if len(labels) > 10 else "")
    raise EvalError(f"{what} {shown} in {dataset.source!r} are not among the artifacts' {len(labels)} labels ({known})")


def load_runtimes(paths: Sequence[str], device: str, threads: int | None, batch_size: int) -> list[repmlp_rt.Runtime]:
    """Each artifact with its self-check; all must output logits over the same labels."""
    runtimes = []
    for path in paths:
        if not os.path.isfile(path):
            raise EvalError(f"artifact {path!r} " + ("is a folder, expected an artifact file" if os.path.isdir(path) else "does not exist"))
        runtime = repmlp_rt.Runtime(path, device=device, threads=threads, warmup_batch=batch_size)
        if runtime.output_kind != "logits":
            raise EvalError(f"artifact {path!r} outputs {runtime.output_kind}, expected logits (a classifier)")
        if runtimes and runtime.labels != runtimes[0].labels:
            raise EvalError(f"artifacts {paths[0]!r} and {path!r} have different labels "
                            f"({runtimes[0].num_classes} and {runtime.num_classes} classes)")
        runtimes.append(runtime)
    return runtimes


@dataclass
class Tally:
    """Running results of one artifact."""

    top1: list[np.ndarray] = field(default_factory=list)
    top5_hits: int = 0
    seconds: float = 0.0


class Progress:
    """A one-line bar on stderr, redrawn at most once per percent."""

    def __init__(self, total: int, enabled: bool, width: int = 30) -> None:
        self.total, self.enabled, self.width, self.shown = total, enabled, width, -1

    def update(self, done: int) -> None:
        percent = done * 100 // self.total
        if not self.enabled or percent == self.shown:
            return
        self.shown = percent
        filled = done * self.width // self.total
        sys.stderr.write(f"\r{PROG} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} images")
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _decode_batch(paths: Sequence[str]) -> dict[tuple[int, ...], list[tuple[int, np.ndarray]]]:
    """Decoded images of one batch, grouped by shape (a model call takes one size)."""
    groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for i, path in enumerate(paths):
        try:
            image = repmlp_rt.decode_image(path)
        except ValueError as error:  # repmlp_rt.InputError: unreadable or not an image
            raise EvalError(f"cannot decode image {path!r}: {error}") from None
        groups.setdefault(image.shape, []).append((i, image))
    return groups


def run(runtimes: Sequence[repmlp_rt.Runtime], dataset: Dataset, truth: np.ndarray, batch_size: int,
        progress: Progress) -> list[Tally]:
    """Every image through every artifact, batch by batch (each batch decoded once)."""
    tallies = [Tally() for _ in runtimes]
    k = min(TOPK, runtimes[0].num_classes)
    progress.update(0)
    for start in range(0, len(dataset.paths), batch_size):
        paths = dataset.paths[start:start + batch_size]
        groups = _decode_batch(paths)
        for runtime, tally in zip(runtimes, tallies):
            top1 = np.empty(len(paths), dtype=np.int64)
            for members in groups.values():
                images = np.stack([image for _, image in members])
                began = time.perf_counter()
                logits = runtime.infer_images(images)
                tally.seconds += time.perf_counter() - began
                rows = [start + i for i, _ in members]
                top1[[i for i, _ in members]] = logits.argmax(1)
                topk = np.argpartition(-logits, k - 1, axis=1)[:, :k]
                tally.top5_hits += int((topk == truth[rows, None]).any(1).sum())
            tally.top1.append(top1)
        progress.update(start + len(paths))
    return tallies


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Rows: the true classes present in DATA; columns: the same classes, then one column of
    predictions outside them (when a model has more classes than DATA holds)."""
    column = {int(c): i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes) + 1), dtype=np.int64)
    for t, p in zip(truth, predicted):
        matrix[column[int(t)], column.get(int(p), len(classes))] += 1
    return matrix if matrix[:, -1].any() else matrix[:, :-1]


def summarize(paths: Sequence[str], runtimes: Sequence[repmlp_rt.Runtime], dataset: Dataset, truth: np.ndarray,
              tallies: Sequence[Tally]) -> dict[str, Any]:
    """The result as the JSON object ``--json`` prints."""
    labels = runtimes[0].labels
    classes = np.unique(truth)
    first = np.concatenate(tallies[0].top1)
    n = len(truth)
    results = []
    for path, runtime, tally in zip(paths, runtimes, tallies):
        predicted = np.concatenate(tally.top1)
        correct = int((predicted == truth).sum())
        results.append({
            "artifact": path,
            "compute_dtype": runtime.compute_dtype,
            "top1": correct / n,
            "top5": tally.top5_hits / n,
            "top1_correct": correct,
            "top5_correct": tally.top5_hits,
            "agreement": float((predicted == first).mean()),
            "seconds": tally.seconds,
            "images_per_second": n / tally.seconds if tally.seconds > 0 else None,
            "confusion": confusion_matrix(truth, predicted, classes).tolist(),
        })
    return {
        "data": {"source": dataset.source, "kind": dataset.kind, "images": n,
                 "classes": [labels[int(c)] for c in classes]},
        "topk": min(TOPK, len(labels)),
        "artifacts": results,
    }


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend; EvalError when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise EvalError(f"--plot needs matplotlib ({error}): pip install matplotlib") from None
    return plt


def plot_confusion(summary: dict[str, Any], out: str) -> None:
    """One panel per artifact: counts, true class down, predicted class across."""
    plt = pyplot()
    names = summary["data"]["classes"]
    artifacts = summary["artifacts"]
    figure, axes = plt.subplots(1, len(artifacts), squeeze=False,
                                figsize=(PANEL_INCHES[0] * len(artifacts), PANEL_INCHES[1]), dpi=PLOT_DPI)
    for axis, result in zip(axes[0], artifacts):
        matrix = np.array(result["confusion"])
        axis.imshow(matrix, cmap="Blues", interpolation="nearest", aspect="auto")
        columns = names + (["other"] if matrix.shape[1] > len(names) else [])
        if len(names) <= ANNOTATE_MAX_CLASSES:
            axis.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
            axis.set_yticks(range(len(names)), names, fontsize=7)
            peak = matrix.max()
            for (row, col), count in np.ndenumerate(matrix):
                if count:
                    axis.text(col, row, str(count), ha="center", va="center", fontsize=6,
                              color="white" if count > peak / 2 else "black")
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(f"{os.path.basename(result['artifact'])}: top-1 {100 * result['top1']:.2f}%", fontsize=9)
    figure.tight_layout()
    # Written beside OUT, then renamed: an error never leaves a partial PNG.
    handle, temporary = tempfile.mkstemp(prefix=".repmlp-eval-", suffix=".png", dir=os.path.dirname(os.path.abspath(out)))
    os.close(handle)
    try:
        figure.savefig(temporary, format="png", dpi=PLOT_DPI)
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, out)
    except OSError as error:
        raise EvalError(f"cannot write --plot {out!r}: {error.strerror or error}") from None
    finally:
        plt.close(figure)
        if os.path.exists(temporary):
            os.unlink(temporary)


def format_table(summary: dict[str, Any]) -> str:
    data = summary["data"]
    k = summary["topk"]
    lines = [f"{data['source']}: {data['images']} images, {len(data['classes'])} classes",
             f"{'artifact':<32} {'dtype':<9} {'top-1':>8} {f'top-{k}':>8} {'agree':>8} {'images/s':>9}"]
    for i, r in enumerate(summary["artifacts"]):
        agree = "-" if i == 0 else f"{100 * r['agreement']:.2f}%"
        speed = "-" if r["images_per_second"] is None else f"{r['images_per_second']:.1f}"
        lines.append(f"{os.path.basename(r['artifact']):<32} {r['compute_dtype']:<9} {100 * r['top1']:>7.2f}% "
                     f"{100 * r['top5']:>7.2f}% {agree:>8} {speed:>9}")
    return "\n".join(lines)


def evaluate(artifacts: Sequence[str], data: str, *, batch_size: int = 32, device: str = "cpu",
             threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Evaluates ``artifacts`` on ``data`` (see the module); returns what ``--json`` prints.
    Raises ``EvalError`` (a ValueError) on bad input, ``repmlp_rt.ArtifactError`` on a bad file."""
    dataset = read_dataset(data)
    runtimes = load_runtimes(artifacts, device, threads, batch_size)
    truth = class_indices(dataset, runtimes[0].labels)
    tallies = run(runtimes, dataset, truth, batch_size, Progress(len(truth), progress))
    return summarize(list(artifacts), runtimes, dataset, truth, tallies)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Top-1/top-5 accuracy, agreement and throughput of "
                                "RepMLPNet artifacts on a labelled image set.")
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="artifact files; the first is the reference for agreement")
    p.add_argument("data", metavar="DATA", help="folder of class folders, or a text file of 'path label' lines")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="FILE", help="write confusion matrices (one panel per artifact) to this PNG")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per model call (default 32)")
    p.add_argument("--threads", type=positive_int, help="intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        print(f"{PROG}: error: --plot {args.plot!r}: its folder does not exist", file=sys.stderr)
        return 2
    try:
        if args.plot:
            pyplot()  # before the evaluation: a missing matplotlib fails at once
        summary = evaluate(args.artifacts, args.data, batch_size=args.batch_size, device=args.device,
                           threads=args.threads, progress=not args.no_progress)
        if args.plot:
            plot_confusion(summary, args.plot)
    except (ValueError, RuntimeError) as error:  # EvalError, InputError, ArtifactError, DeviceError
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    summary["plot"] = args.plot
    print(json.dumps(summary) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
