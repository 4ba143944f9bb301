#!/usr/bin/env python
"""Run the C++ ``repmlp_infer`` binary on the shipped digit PNGs and score it.

    python examples/digits/demo.py ARTIFACT [IMAGES_DIR]

ARTIFACT is a .pt built by ``build_artifact.py`` / ``repmlp-build`` (the default build uses the
shipped digits checkpoint); IMAGES_DIR defaults to examples/digits/images, whose files are
named ``<truth>_<dataset index>.png``. ``repmlp_infer`` is looked up on PATH (override with
--binary or $REPMLP_INFER). Prints each prediction next to the truth and the accuracy.
Exit status: 0 when the binary ran (even if some predictions are wrong), 1 when it is missing
or fails or its output cannot be read, 2 on bad arguments.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_IMAGES = os.path.join(HERE, "images")
NAME_RE = re.compile(r"^(?P<label>[^_]+)_(?P<index>\d+)\.png$", re.IGNORECASE)


def find_binary(explicit: str | None = None) -> str:
    candidate = explicit or os.environ.get("REPMLP_INFER") or "repmlp_infer"
    found = shutil.which(candidate)
    if found is None:
        # Next to this interpreter (a venv's bin/ need not be on PATH).
        local = os.path.join(os.path.dirname(sys.executable), candidate)
        if os.path.sep not in candidate and os.access(local, os.X_OK):
            return local
        raise FileNotFoundError(
            f"cannot find the {candidate!r} binary on PATH; build and install the C++ runtime "
            "(pip install --no-build-isolation -e .) or pass --binary"
        )
    return found


def list_images(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if NAME_RE.match(n))
    return [os.path.join(folder, n) for n in names]


def truth_of(path: str) -> str:
    m = NAME_RE.match(os.path.basename(path))
    assert m is not None
    return m.group("label")


def run(binary: str, artifact: str, images: list[str], topk: int = 1) -> dict[str, dict]:
    """{input path as given: the JSON object} for every image; raises RuntimeError on failure."""
    cmd = [binary, artifact, *images, "--json", "--topk", str(topk)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{os.path.basename(binary)} exited with status {proc.returncode}:\n{proc.stderr.strip()}"
        )
    results: dict[str, dict] = {}
    for line in proc.stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"unreadable JSON line from {binary}: {line!r} ({exc})") from None
        if "input" in obj and "topk" in obj:
            results[obj["input"]] = obj
    missing = [p for p in images if p not in results]
    if missing:
        raise RuntimeError(
            f"{os.path.basename(binary)} gave no result for {len(missing)} input(s), e.g. {missing[0]}"
        )
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="artifact .pt file")
    parser.add_argument("images", nargs="?", default=DEFAULT_IMAGES, help="folder of <truth>_<index>.png")
    parser.add_argument("--binary", default=None, help="repmlp_infer path (default: from PATH)")
    args = parser.parse_args(argv)

    if not os.path.isfile(args.artifact):
        print(f"error: artifact {args.artifact} not found (build it with build_artifact.py)", file=sys.stderr)
        return 2
    if not os.path.isdir(args.images):
        print(f"error: images folder {args.images} not found", file=sys.stderr)
        return 2
    images = list_images(args.images)
    if not images:
        print(f"error: no <truth>_<index>.png files in {args.images}", file=sys.stderr)
        return 2
    try:
        binary = find_binary(args.binary)
        results = run(binary, args.artifact, images)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    correct = 0
    print(f"{'image':<16} {'truth':>5} {'pred':>5} {'score':>7}")
    for path in images:
        truth = truth_of(path)
        top = results[path]["topk"][0]
        pred = str(top.get("label", top.get("index")))
        ok = pred == truth
        correct += ok
        score = float(top.get("score", float("nan")))
        print(f"{os.path.basename(path):<16} {truth:>5} {pred:>5} {score:7.3f}  {'ok' if ok else 'WRONG'}")
    print(f"accuracy: {correct}/{len(images)} = {100.0 * correct / len(images):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
