"""The artifact's manifest (``manifest.json``): its schema, how it is made and read back.

The manifest is the human- and tool-readable record of an artifact; docs/ARTIFACT.md lists
every key. Each fact is stored once: labels under ``output``, preprocessing under
``preprocessing``, the network's structure under ``arch.config``.
"""

import datetime
import json
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch

from .. import __version__
from ..quantize import quantization_record
from ..utils import quiet_jit
from ..variants import ArchConfig
from .errors import BuildError

if TYPE_CHECKING:  # build.py and module.py import this module
    from .build import BuildOptions
    from .module import OutputSpec

__all__ = ["ARTIFACT_FORMAT_VERSION", "MANIFEST_NAME", "make_manifest", "read_manifest"]

# Bump when the artifact's methods or the manifest's meaning change; the C++ runtime checks it
# (cpp/include/repmlp_rt/runtime.hpp, kFormatVersion).
ARTIFACT_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def make_manifest(
    options: "BuildOptions",
    *,
    outputs: List[Dict[str, Any]],
    head: Optional[str],
    model_stats: Dict[str, Any],
    verification: Dict[str, Any],
    built_at: str,
) -> Dict[str, Any]:
    """The manifest as JSON-ready data (tuples already turned into lists).

    ``outputs`` describes every output the artifact's methods return, in order; ``head`` is
    what became of the checkpoint's classifier (CheckpointInfo.head)."""
    config, checkpoint, dtype = options.config, options.checkpoint, options.dtype
    if checkpoint is not None:
        weights: Dict[str, Any] = {
            "source": "checkpoint",
            "file": os.path.basename(checkpoint.path or ""),
            "sha256": checkpoint.sha256,
            "layout": checkpoint.layout,
            "form": checkpoint.form,
            "head": head,
        }
    else:
        weights = {"source": "random", "seed": options.seed}
    manifest = {
        "format": "repmlp-artifact",
        "format_version": ARTIFACT_FORMAT_VERSION,
        "arch": {"name": options.arch_name, "config": config.architecture_dict()},
        "input": {
            "method": "forward",
            "layout": "NCHW",
            "shape": [config.in_channels, config.img_size[0], config.img_size[1]],
            "batch": "dynamic (N >= 1)",
            "dtype": "float32",
            "compute_dtype": dtype,
            "normalized": True,
        },
        "preprocessing": {
            "method": "forward_images",
            "input": "uint8 (N, H, W, 3) RGB, any H and W",
            **config.preprocessing.to_dict(),
        },
        "output": _output_summary(config, options.output),
        "outputs": outputs,
        "weights": weights,
        "deploy_form": "fused (locality injection + BN folding), fc3 as batched matmul",
        "model": model_stats,
        "build": {
            "repmlp_version": __version__,
            "torch_version": torch.__version__,
            "built_at": built_at,
            "verify_device": str(options.device),
        },
        "verification": verification,
    }
    if dtype == "int8":
        manifest["quantization"] = quantization_record(config)
    # A JSON round trip turns tuples into lists, so later comparisons are like for like.
    return json.loads(json.dumps(manifest))


def _output_summary(config: ArchConfig, output: "OutputSpec") -> Dict[str, Any]:
    """The ``output`` key: the kind and what defines it (the labels, for logits)."""
    summary: Dict[str, Any] = {"kind": output.kind, "dtype": "float32"}
    if output.kind == "logits":
        summary.update(num_classes=config.num_classes, labels=list(config.class_labels()))
    elif output.kind == "features":
        summary.update(
            out_indices=sorted(output.out_indices),
            final_norm=output.final_norm,
            pre_downsample=output.pre_downsample,
        )
    else:
        summary.update(final_norm=output.final_norm, pooling="global average")
    return summary


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def manifest_text(manifest: Dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2)


def read_manifest(path: str) -> Dict[str, Any]:
    """The manifest embedded in an artifact of either format (raises BuildError if absent or
    unreadable); the format is told from the file's content."""
    from .aoti import is_pt2_archive, read_pt2_manifest

    if is_pt2_archive(path):
        return read_pt2_manifest(path)
    extra = {MANIFEST_NAME: ""}
    try:
        with quiet_jit():
            torch.jit.load(path, map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise BuildError(f"cannot load artifact {path}: {first_line(exc)}") from None
    if not extra[MANIFEST_NAME]:
        raise BuildError(f"{path} has no {MANIFEST_NAME}: not a RepMLP artifact")
    return json.loads(extra[MANIFEST_NAME])


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (torch's messages carry long explanations)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
