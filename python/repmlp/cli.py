"""``repmlp-build`` / ``build_artifact.py``: checkpoint -> verified artifact (TorchScript or AOTInductor)."""

import argparse
import json
import math
import os
import re
import sys
from typing import List, Optional, Tuple, Union

# The Triton writer lives with the runtime, so a serving host has it too (repmlp-triton-repo).
from repmlp_rt._cli import positive_int
from repmlp_rt.triton import add_arguments as add_triton_arguments
from repmlp_rt.triton import write_triton_repository

from .artifact import (
    DEFAULT_TOLERANCE,
    DTYPES,
    FORMATS,
    OUTPUT_KINDS,
    BuildError,
    build_artifact,
    check_out_path,
    default_out_path,
    output_spec,
)
from .checkpoints import CheckpointError
from .variants import DEFAULT_ARCH, get_variant, list_variants

PROG = "repmlp-build"


def _size(text: str) -> Union[int, Tuple[int, int]]:
    match = re.fullmatch(r"(\d+)(?:[xX](\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected H or HxW (e.g. 224 or 224x160), got {text!r}")
    h = int(match.group(1))
    return h if match.group(2) is None else (h, int(match.group(2)))


def _check_img_size(parser: argparse.ArgumentParser, arch: str, size: Union[int, Tuple[int, int]]) -> None:
    """Each side a positive multiple of the variant's stride (the variant table says which)."""
    cfg = get_variant(arch)
    stride = cfg.input_stride
    dims = (size, size) if isinstance(size, int) else size
    if any(d < stride or d % stride for d in dims):
        text = "x".join(str(d) for d in dims)
        parser.error(
            f"argument --img-size: each side must be a positive multiple of {stride} (patch "
            f"{cfg.patch_size} x {stride // cfg.patch_size} from the downsamplings), got {text!r}"
        )


def _triple(text: str) -> Tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected three comma-separated finite numbers R,G,B, got {text!r}")
    return values  # type: ignore[return-value]


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _device(text: str) -> str:
    # Only the syntax here; whether CUDA is usable is found out (exit 1) when the build starts.
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _arch(text: str) -> str:
    try:
        get_variant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _indices(text: str) -> Tuple[int, ...]:
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text):
        raise argparse.ArgumentTypeError(f"expected comma-separated stage indices such as 0,1,2,3, got {text!r}")
    return tuple(int(v) for v in text.split(","))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Build a verified RepMLPNet artifact (frozen TorchScript, or an AOTInductor "
        "package with --format aoti) from a checkpoint.",
    )
    p.add_argument(
        "--arch",
        type=_arch,
        default=DEFAULT_ARCH,
        help=f"variant: {', '.join(list_variants())} (default: {DEFAULT_ARCH}, the shipped digits model)",
    )
    p.add_argument(
        "--checkpoint",
        help="official or mmcls/mmpretrain .pth (training or deploy form). Default: the shipped "
        "checkpoint for the default arch, seeded random weights for any other",
    )
    p.add_argument("--img-size", type=_size, help="input size H or HxW, each divisible by 32")
    p.add_argument("--num-classes", type=positive_int, help="classifier width (default: the variant's)")
    p.add_argument("--labels", metavar="FILE", help="text file, one label per line")
    out = p.add_argument_group("outputs (docs/BACKBONE.md)")
    out.add_argument(
        "--output",
        choices=OUTPUT_KINDS,
        default="logits",
        help="logits (default); features: the backbone's maps at --out-indices, as mmcls computes "
        "them; embedding: final norm + global average pooling, the classifier's input",
    )
    out.add_argument(
        "--out-indices", type=_indices, metavar="I,J,...", help="stages output by --output features (default: 0,1,2,3)"
    )
    out.add_argument(
        "--final-norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the network has mmcls's final norm (default: yes; --no-final-norm for checkpoints without it)",
    )
    out.add_argument(
        "--pre-downsample",
        action="store_true",
        help="features: each stage before its downsampling (timm-style strides 4..32), not mmcls's maps",
    )
    pre = p.add_argument_group("preprocessing overrides (default: the variant's, see the README)")
    pre.add_argument("--resize-mode", choices=["short_side", "exact"], help="short_side keeps the aspect ratio")
    pre.add_argument("--resize", type=_size, help="short side N (short_side) or HxW (exact), before the center crop")
    pre.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"])
    pre.add_argument("--antialias", action=argparse.BooleanOptionalAction, default=None)
    pre.add_argument("--mean", type=_triple, help="R,G,B on the 0..255 scale")
    pre.add_argument("--std", type=_triple, help="R,G,B on the 0..255 scale")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights and compute dtype (int8: int8 weights, activations quantized per row at run time; docs/PERFORMANCE.md)")
    p.add_argument(
        "--format",
        choices=list(FORMATS),
        default="torchscript",
        help="torchscript (default): one frozen TorchScript file (.pt); aoti: torch.export + "
        "AOTInductor, one .pt2 package compiled for this torch release, device and CPU (docs/FORMATS.md)",
    )
    p.add_argument("--out", help="artifact path (default: repmlp-<arch>.pt, or .pt2 for aoti, in the current folder)")
    p.add_argument(
        "--device",
        type=_device,
        default="cpu",
        help="device used for verification (cpu, cuda, cuda:N); with --format aoti, also the device compiled for",
    )
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        help="max |error| / max |logit| allowed at every stage (default: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TOLERANCE.items())
        + ")",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (no checkpoint)")
    p.add_argument("--json", action="store_true", help="print a machine-readable report on stdout")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out (and --triton-repo's model)")
    triton = p.add_argument_group("Triton model repository (also for an existing artifact: repmlp-triton-repo)")
    triton.add_argument("--triton-repo", metavar="DIR", help="also write DIR/<name>/{config.pbtxt,labels.txt,1/model.pt}")
    add_triton_arguments(triton, prefix="triton-")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # usage errors exit 2
    if args.img_size is not None:
        _check_img_size(parser, args.arch, args.img_size)
    try:  # an unusable --out or conflicting output options are usage errors too
        check_out_path(args.out or default_out_path(args.arch, args.format), args.force)
        output_spec(
            args.output, args.out_indices, args.final_norm, args.pre_downsample, args.num_classes, None, args.labels
        )
    except BuildError as exc:
        parser.error(str(exc))
    if args.triton_repo is not None:
        _check_triton_repo(parser, args)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        report = build_artifact(
            args.arch,
            checkpoint=args.checkpoint,
            out=args.out,
            img_size=args.img_size,
            num_classes=args.num_classes,
            labels_file=args.labels,
            preprocessing={
                "resize_mode": args.resize_mode,
                "resize": args.resize,
                "interpolation": args.interpolation,
                "antialias": args.antialias,
                "mean": args.mean,
                "std": args.std,
            },
            dtype=args.dtype,
            device=args.device,
            tolerance=args.tolerance,
            force=args.force,
            seed=args.seed,
            output=args.output,
            out_indices=args.out_indices,
            final_norm=args.final_norm,
            pre_downsample=args.pre_downsample,
            format=args.format,
            progress=progress,
        )
    except (BuildError, CheckpointError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted, nothing written", file=sys.stderr)
        return 130
    m = report.manifest
    worst = max((s.max_rel_err or 0.0) for s in report.stages)
    shape = "x".join(str(v) for v in m["input"]["shape"])
    print(
        f"{PROG}: wrote {report.path}\n"
        f"  arch {m['arch']['name']}, input {shape} {m['input']['dtype']} (computes in {m['input']['compute_dtype']}), "
        f"outputs {_describe_outputs(m)}, weights: {m['weights']['source']}\n"
        f"  params {m['model']['params_loaded']:,} loaded, {m['model']['params_deploy']:,} deployed; "
        f"{m['model']['gflop_per_image']:.3f} GFLOP/image\n"
        f"  worst relative error {worst:.2e} (tolerance {m['verification']['tolerance']:.1e})\n"
        f"  {report.size_bytes / 1e6:.2f} MB, sha256 {report.sha256}",
        file=sys.stderr,
    )
    if args.triton_repo is not None:
        try:
            model = write_triton_repository(report.path, args.triton_repo, name=args.triton_name,
                                            max_batch_size=args.triton_max_batch_size, kind=args.triton_kind,
                                            instances=args.triton_instances, force=args.force)
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"{PROG}: error: the artifact was written, the Triton repository was not: {exc}", file=sys.stderr)
            return 1
        print(f"{PROG}: wrote Triton model {model.path}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    return 0


def _describe_outputs(manifest: dict) -> str:
    """'10 classes' for logits; otherwise each output's name and shape."""
    if manifest["output"]["kind"] == "logits":
        return f"logits of {manifest['output']['num_classes']} classes"
    return ", ".join(f"{o['name']} {'x'.join(map(str, o['shape']))}" for o in manifest["outputs"])


def _check_triton_repo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors of --triton-repo, found before the build: a missing folder, an existing
    model folder without --force."""
    if args.format != "torchscript":
        parser.error("--triton-repo needs --format torchscript: Triton's PyTorch backend loads TorchScript")
    if not os.path.isdir(args.triton_repo):
        parser.error(f"--triton-repo {args.triton_repo!r} is not an existing folder")
    if args.output != "logits":
        parser.error(f"--triton-repo serves logits artifacts, not --output {args.output}")
    name = args.triton_name or os.path.splitext(os.path.basename(args.out or default_out_path(args.arch)))[0]
    if os.path.exists(os.path.join(args.triton_repo, name)) and not args.force:
        parser.error(f"{os.path.join(args.triton_repo, name)!r} exists; pass --force to replace it")


if __name__ == "__main__":
    sys.exit(main())
