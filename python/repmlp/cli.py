"""``repmlp-build`` / ``build_artifact.py``: checkpoint -> verified artifact (TorchScript or AOTInductor)."""

import argparse
import json
import math
import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple, Union

from .artifact import (
    DEFAULT_TOLERANCE,
    DTYPES,
    FORMAT_NAMES,
    OUTPUT_KINDS,
    BuildError,
    OptionError,
    build_artifact,
    default_out_path,
)
from .checkpoint_arch import describe_checkpoint
from .checkpoints import CheckpointError, read_checkpoint
from .utils import shape_string
from .variants import DEFAULT_ARCH, INTERPOLATIONS, RESIZE_MODES, get_variant, list_variants

PROG = "repmlp-build"


def _size(text: str) -> Union[int, Tuple[int, int]]:
    match = re.fullmatch(r"(\d+)(?:[xX](\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected H or HxW (e.g. 224 or 224x160), got {text!r}")
    h = int(match.group(1))
    return h if match.group(2) is None else (h, int(match.group(2)))


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


def positive_int(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _ints(text: str) -> Tuple[int, ...]:
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,3, got {text!r}")
    return tuple(int(v) for v in text.split(","))


def _kernels(text: str) -> Tuple[int, ...]:
    return () if text.strip().lower() == "none" else _ints(text)


def _arch(text: str) -> str:
    if text == "auto":
        return text
    try:
        get_variant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _indices(text: str) -> Tuple[int, ...]:
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text):
        raise argparse.ArgumentTypeError(f"expected comma-separated stage indices such as 0,1,2,3, got {text!r}")
    return tuple(int(v) for v in text.split(","))


# build_artifact's keywords that are flags here (the rest have the same name with dashes).
_FLAGS = {"labels_file": "--labels", "out_indices": "--out-indices"}
_KEYWORDS = ("out", "force", "output", "out_indices", "pre_downsample", "num_classes", "labels", "labels_file",
             "img_size", "arch", "format", "dtype", "tolerance", "checkpoint", "final_norm", "channels", "depths",
             "sharesets", "kernels", "patch_size", "gp_ratio", "in_channels")


def _flag(keyword: str) -> str:
    return _FLAGS.get(keyword, "--" + keyword.replace("_", "-"))


def as_flags(message: str) -> str:
    """A library message with its ``keyword=value`` mentions spelled as this tool's flags."""

    def replace(match: "re.Match[str]") -> str:
        flag, value = _flag(match.group(1)), match.group(2).strip("'")
        if value in ("True", "False"):
            return flag if value == "True" else flag.replace("--", "--no-", 1)
        return f"{flag} {value}"

    pattern = r"\b(" + "|".join(_KEYWORDS) + r")=('[^']*'|<[^>]*>(?:x<[^>]*>)?|[\w.+-]+)"
    return re.sub(pattern, replace, message)


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arch",
        type=_arch,
        help=f"variant: {', '.join(list_variants())}, or auto: read from --checkpoint (the default "
        f"with a checkpoint; without one: {DEFAULT_ARCH}, the shipped digits model)",
    )
    p.add_argument(
        "--checkpoint",
        help="official or mmcls/mmpretrain .pth (training or deploy form). Default: the shipped "
        "checkpoint for the default arch, seeded random weights for any other",
    )
    p.add_argument("--inspect", metavar="CKPT", help="print what CKPT holds (layout, form, architecture, classes, "
                   "parameters, matching variant) and exit without building; --json for JSON")
    p.add_argument("--img-size", type=_size, help="input size H or HxW, each a multiple of the patch size x 2^(stages-1)")
    p.add_argument("--num-classes", type=positive_int, help="classifier width (default: the checkpoint's or the variant's)")
    p.add_argument("--labels", metavar="FILE", help="text file, one label per line")
    arch = p.add_argument_group("architecture (default: read from --checkpoint, else the variant's)")
    arch.add_argument("--channels", type=_ints, metavar="C,C,...", help="channels per stage")
    arch.add_argument("--depths", type=_ints, metavar="D,D,...", help="blocks per stage")
    arch.add_argument("--sharesets", type=_ints, metavar="S,S,...", help="fc3 sharesets per stage")
    arch.add_argument("--kernels", type=_kernels, metavar="K,K,...|none", help="local conv kernels (none: no branches)")
    arch.add_argument("--patch-size", type=positive_int, help="patch embedding stride and kernel")
    arch.add_argument("--gp-ratio", type=positive_int, help="global perceptron reduction ratio")
    arch.add_argument("--in-channels", type=positive_int, help="input image channels")


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    out = p.add_argument_group("outputs (docs/BACKBONE.md)")
    out.add_argument(
        "--output",
        choices=OUTPUT_KINDS,
        default="logits",
        help="logits (default); features: the backbone's maps at --out-indices, as mmcls computes "
        "them; embedding: final norm + global average pooling, the classifier's input",
    )
    out.add_argument(
        "--out-indices", type=_indices, metavar="I,J,...", help="stages output by --output features (default: all)"
    )
    out.add_argument(
        "--final-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the network has mmcls's final norm (default: as the checkpoint, else yes)",
    )
    out.add_argument(
        "--pre-downsample",
        action="store_true",
        help="features: each stage before its downsampling (timm-style strides 4..32), not mmcls's maps",
    )
    pre = p.add_argument_group("preprocessing overrides (default: the variant's or the checkpoint config's, see the README)")
    pre.add_argument("--resize-mode", choices=RESIZE_MODES, help="short_side keeps the aspect ratio")
    pre.add_argument("--resize", type=_size, help="short side N (short_side) or HxW (exact), before the center crop")
    pre.add_argument("--interpolation", choices=INTERPOLATIONS)
    pre.add_argument("--antialias", action=argparse.BooleanOptionalAction, default=None)
    pre.add_argument("--mean", type=_triple, help="R,G,B on the 0..255 scale")
    pre.add_argument("--std", type=_triple, help="R,G,B on the 0..255 scale")


def _add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights and compute dtype (int8: int8 weights, activations quantized per row at run time; docs/PERFORMANCE.md)")
    p.add_argument(
        "--format",
        choices=FORMAT_NAMES,
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


def _add_triton_arguments(p: argparse.ArgumentParser) -> None:
    triton = p.add_argument_group("Triton model repository (also for an existing artifact: repmlp-triton-repo; "
                                  "needs the runtime, repmlp_rt)")
    triton.add_argument("--triton-repo", metavar="DIR", help="also write DIR/<name>/{config.pbtxt,labels.txt,1/model.pt}")
    try:  # the repository options live with the runtime; without it they are not offered
        from repmlp_rt.triton import add_arguments, add_backend_arguments
    except ImportError:
        return
    add_arguments(triton, prefix="triton-")
    add_backend_arguments(triton, prefix="triton-")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Build a verified RepMLPNet artifact (frozen TorchScript, or an AOTInductor "
        "package with --format aoti) from a checkpoint.",
    )
    _add_model_arguments(p)
    _add_output_arguments(p)
    _add_build_arguments(p)
    _add_triton_arguments(p)
    return p


def _build_options(args: argparse.Namespace) -> Dict[str, Any]:
    """build_artifact's keywords from the parsed flags."""
    preprocessing = {k: getattr(args, k) for k in ("resize_mode", "resize", "interpolation", "antialias", "mean", "std")}
    return dict(
        checkpoint=args.checkpoint, out=args.out, img_size=args.img_size, num_classes=args.num_classes,
        labels_file=args.labels, preprocessing=preprocessing, dtype=args.dtype, device=args.device,
        tolerance=args.tolerance, force=args.force, seed=args.seed, output=args.output,
        out_indices=args.out_indices, final_norm=args.final_norm, pre_downsample=args.pre_downsample,
        format=args.format, channels=args.channels, depths=args.depths, sharesets=args.sharesets,
        kernels=args.kernels, patch_size=args.patch_size, gp_ratio=args.gp_ratio, in_channels=args.in_channels,
    )


def _summary(report: Any) -> str:
    m = report.manifest
    worst = max((s.max_rel_err or 0.0) for s in report.stages)
    return (
        f"{PROG}: wrote {report.path}\n"
        f"  arch {m['arch']['name']} (from the {m['arch']['source']}), input {shape_string(m['input']['shape'])} "
        f"{m['input']['dtype']} (computes in {m['input']['compute_dtype']}), "
        f"outputs {_describe_outputs(m)}, weights: {m['weights']['source']}\n"
        f"  params {m['model']['params_loaded']:,} loaded, {m['model']['params_deploy']:,} deployed; "
        f"{m['model']['gflop_per_image']:.3f} GFLOP/image\n"
        f"  worst relative error {worst:.2e} (tolerance {m['verification']['tolerance']:.1e})\n"
        f"  {report.size_bytes / 1e6:.2f} MB, sha256 {report.sha256}"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # usage errors exit 2
    if args.inspect is not None:
        return _inspect(args.inspect, args.json)
    if args.triton_repo is not None:
        _check_triton_repo(parser, args)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        report = build_artifact(args.arch, progress=progress, **_build_options(args))
    except OptionError as exc:  # options that contradict each other or the checkpoint
        parser.error((f"argument {_flag(exc.option)}: " if exc.option else "") + as_flags(str(exc)))
    except (BuildError, CheckpointError, ValueError) as exc:
        print(f"{PROG}: error: {as_flags(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted, nothing written", file=sys.stderr)
        return 130
    print(_summary(report), file=sys.stderr)
    if args.triton_repo is not None and _write_triton(args, report.path) != 0:
        return 1
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    return 0


def _inspect(path: str, as_json: bool) -> int:
    """``--inspect``: what the checkpoint holds, without building."""
    try:
        info = describe_checkpoint(read_checkpoint(path))
    except CheckpointError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    arch = info["arch"]
    size = shape_string(info["img_size"]) if info["img_size"] else "not square: give --img-size"
    print(f"{info['path']}: {info['layout']} layout, {info['form']} form, {info['parameters']:,} parameters\n"
          f"  channels {arch['channels']}, depths {arch['depths']}, sharesets {arch['sharesets']}, "
          f"kernels {arch['kernels']}, patch {arch['patch_size']}, gp ratio {arch['gp_ratio']}, "
          f"in channels {arch['in_channels']}, ffn expansion {arch['ffn_expand']}\n"
          f"  classes {info['num_classes'] if info['num_classes'] is not None else 'none (backbone only)'}, "
          f"final norm {'yes' if info['final_norm'] else 'no'}, input {size} (from fc3)\n"
          f"  variant {info['variant'] or 'none (custom)'}"
          + (f"\n  saved config: {info['config_preprocessing']}" if info["config_preprocessing"] else ""))
    return 0


def _write_triton(args: argparse.Namespace, artifact: str) -> int:
    """The Triton model for the artifact just written (imports the runtime, which loads it)."""
    from repmlp_rt.triton import write_triton_repository

    try:
        model = write_triton_repository(artifact, args.triton_repo, name=args.triton_name,
                                        max_batch_size=args.triton_max_batch_size, kind=args.triton_kind,
                                        instances=args.triton_instances, force=args.force,
                                        backend=args.triton_backend, threads=args.triton_threads,
                                        python_path=args.triton_python_path)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"{PROG}: error: the artifact was written, the Triton repository was not: {exc}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote Triton model {model.path}", file=sys.stderr)
    return 0


def _describe_outputs(manifest: dict) -> str:
    """'10 classes' for logits; otherwise each output's name and shape."""
    if manifest["output"]["kind"] == "logits":
        return f"logits of {manifest['output']['num_classes']} classes"
    return ", ".join(f"{o['name']} {shape_string(o['shape'])}" for o in manifest["outputs"])


def _check_triton_repo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors of --triton-repo, found before the build: no runtime, a missing folder, an
    existing model folder without --force."""
    if not hasattr(args, "triton_name"):
        parser.error("--triton-repo needs the runtime (repmlp_rt and its compiled extension), which cannot be imported")
    if args.triton_backend == "libtorch" and args.format != "torchscript":
        parser.error("--triton-repo with --triton-backend libtorch needs --format torchscript: Triton's PyTorch "
                     "backend loads TorchScript (--triton-backend python serves .pt2 too)")
    if not os.path.isdir(args.triton_repo):
        parser.error(f"--triton-repo {args.triton_repo!r} is not an existing folder")
    if args.triton_backend == "libtorch" and args.output != "logits":
        parser.error(f"--triton-repo with --triton-backend libtorch serves logits artifacts, not --output "
                     f"{args.output} (--triton-backend python serves every output kind)")
    if args.out is None and args.arch in (None, "auto") and args.checkpoint is not None:
        return  # the model's name follows the architecture read from the checkpoint
    name = args.triton_name or os.path.splitext(os.path.basename(args.out or default_out_path(args.arch or DEFAULT_ARCH)))[0]
    if os.path.exists(os.path.join(args.triton_repo, name)) and not args.force:
        parser.error(f"{os.path.join(args.triton_repo, name)!r} exists; pass --force to replace it")


if __name__ == "__main__":
    sys.exit(main())
