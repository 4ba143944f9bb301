"""Offline classification of image sets on Ray Data: a pool of runtime actors, JSON lines out.

    repmlp-classify ARTIFACT INPUT... --out results.jsonl [--address ADDR] [--actors N]

INPUT is an image folder (its image files, sorted by name, not recursive), an image file, or
a text file listing image paths (``@list.txt``, one per line). Each actor of the pool
(``ActorPoolStrategy``) holds one ``repmlp_rt.Runtime``; images are decoded inside the actors
with the runtime's own decoder and classified in batches (same-size images together). The
output has one line per input, in input order, shaped as ``repmlp_infer --json`` prints:
``{"input": path, "topk": [{"index", "label", "score"}]}``, or ``{"input": path, "error": ...}``
for a file that cannot be decoded (the command then exits 1 after writing everything).

Locally it starts its own Ray; with ``--address`` it runs on that cluster, where every node
must see the same paths (a shared file system). Needs the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

import repmlp_rt

from ._cli import IMAGE_EXTENSIONS, add_ray_arguments, current_umask, init_ray, positive_int
from .contract import topk_json

try:
    import ray
    import ray.data
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(f"repmlp_rt.batch needs Ray Data ({error}): pip install 'repmlp[serve]'") from None

PROG = "repmlp-classify"


def list_images(inputs: Iterable[str]) -> list[str]:
    """Expands folders (their image files, sorted) and ``@list.txt`` files into image paths,
    keeping the given order otherwise. ValueError for a missing input or an empty result."""
    paths: list[str] = []
    for item in inputs:
        if item.startswith("@"):
            try:
                with open(item[1:], encoding="utf-8") as listing:
                    paths += [line.strip() for line in listing if line.strip()]
            except OSError as error:
                raise ValueError(f"cannot read the path list {item[1:]!r}: {error.strerror}") from None
        elif os.path.isdir(item):
            paths += [os.path.join(item, name) for name in sorted(os.listdir(item))
                      if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(item, name))]
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise ValueError(f"no such file or folder: {item!r}")
    if not paths:
        raise ValueError(f"no images found in {', '.join(map(repr, inputs))} (expected {'/'.join(IMAGE_EXTENSIONS)})")
    return paths


class Classifier:
    """A Ray Data actor: decodes the paths of a batch and classifies them."""

    def __init__(self, artifact: str, threads: int, topk: int | None, device: str, gemm: str = "auto") -> None:
        self.runtime = repmlp_rt.Runtime(artifact, device=device, threads=threads, gemm=gemm)
        self.labels = self.runtime.labels
        self.topk = topk

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lines: list[str | None] = [None] * len(batch["path"])
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for i, path in enumerate(batch["path"]):
            try:
                image = repmlp_rt.decode_image(str(path))
            except ValueError as error:  # repmlp_rt.InputError: unreadable or undecodable
                lines[i] = json.dumps({"input": str(path), "error": str(error)})
                continue
            groups.setdefault(image.shape, []).append((i, image))
        for members in groups.values():
            scores, indices = self.runtime.classify(np.stack([image for _, image in members]), self.topk)
            for row, (i, _) in enumerate(members):
                lines[i] = json.dumps(topk_json(str(batch["path"][i]), scores[row], indices[row], self.labels))
        return {"order": batch["order"], "line": np.array(lines, dtype=object)}


def classify_images(artifact: str, paths: Sequence[str], *, topk: int | None = None, batch_size: int = 32,
                    actors: int = 1, threads: int = 1, device: str = "cpu",
                    gemm: str = "auto") -> list[dict[str, Any]]:
    """Classifies ``paths`` on the connected Ray (``ray.init`` first) with a pool of ``actors``
    runtime actors; returns one dict per path, in the order given."""
    if not paths:
        raise ValueError("expected at least one image path")
    for name, value in (("batch_size", batch_size), ("actors", actors), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    # Fail here, on the driver, for a bad artifact or topk, not inside every actor.
    probe = repmlp_rt.Runtime(artifact, warmup=0)
    if topk is not None and not (isinstance(topk, int) and 1 <= topk <= probe.num_classes):
        raise ValueError(f"topk must be an int in [1, {probe.num_classes}], got {topk!r}")
    artifact = os.path.abspath(artifact)
    items = [{"order": i, "path": os.fspath(path)} for i, path in enumerate(paths)]
    # Ray Data restarts a lost actor and retries its batches (max_restarts and max_task_retries
    # of -1, its defaults for actor pools), so a node lost mid-job costs time, not rows.
    dataset = ray.data.from_items(items).map_batches(
        Classifier,
        fn_constructor_kwargs={"artifact": artifact, "threads": threads, "topk": topk, "device": device, "gemm": gemm},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=threads,
        num_gpus=0 if device == "cpu" else 1,
    )
    return _in_order(dataset.iter_rows(), paths)


def _in_order(rows: Iterable[dict[str, Any]], paths: Sequence[str]) -> list[dict[str, Any]]:
    """The results of ``rows`` (``order``, ``line``) by input order; RuntimeError where an input
    has no row or more than one (a retried batch must replace its rows, never add to them)."""
    lines: list[str | None] = [None] * len(paths)
    for row in rows:
        order = int(row["order"])
        if lines[order] is not None:
            raise RuntimeError(f"Ray Data returned two results for input {order} ({paths[order]!r})")
        lines[order] = row["line"]
    missing = [paths[i] for i, line in enumerate(lines) if line is None]
    if missing:
        raise RuntimeError(f"Ray Data returned no result for {len(missing)} input(s), first {missing[0]!r}")
    return [json.loads(line) for line in lines]  # type: ignore[arg-type]


def write_jsonl(results: Iterable[dict[str, Any]], out: str) -> None:
    """Writes JSON lines under a temporary name beside ``out``, then renames it into place."""
    folder = os.path.dirname(os.path.abspath(out))
    handle, temporary = tempfile.mkstemp(prefix=".repmlp-classify-", suffix=".jsonl", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            for result in results:
                file.write(json.dumps(result) + "\n")
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, out)
    except BaseException:
        os.unlink(temporary)
        raise




def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Classify an image set with a RepMLPNet artifact on "
                                "Ray Data (a pool of runtime actors); writes JSON lines in input order.")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image folder, image file, or @list.txt of paths")
    p.add_argument("--out", required=True, help="JSON lines file to write (replaced at the end)")
    p.add_argument("--topk", type=positive_int, help="classes per image (default min(5, classes))")
    p.add_argument("--actors", type=positive_int, default=1, help="runtime actors in the pool (default 1)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per model call (default 32)")
    p.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bars")
    add_ray_arguments(p, worker="actor", threads=1)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    out_folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_folder):
        parser.error(f"--out {args.out!r}: folder {out_folder!r} does not exist")
    try:
        paths = list_images(args.inputs)
    except ValueError as error:
        parser.error(str(error))
    init_ray(args.address, args.num_cpus)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = not args.no_progress
        results = classify_images(args.artifact, paths, topk=args.topk, batch_size=args.batch_size,
                                  actors=args.actors, threads=args.threads, device=args.device,
                                  gemm=args.gemm)
        write_jsonl(results, args.out)
    except (ValueError, RuntimeError) as error:  # bad topk, ArtifactError, a failed job
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    failed = [r for r in results if "error" in r]
    print(f"{PROG}: wrote {len(results)} results to {args.out}"
          + (f"; {len(failed)} image(s) failed, first: {failed[0]['error']}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
