"""The artifact's manifest (``manifest.json``): its schema, made from plain values.

The manifest is the human- and tool-readable record of an artifact; docs/ARTIFACT.md lists
every key. Each fact is stored once: labels under ``output``, preprocessing under
``preprocessing``, the network's structure under ``arch.config``.
"""

import datetime
import json
import os
from typing import Any, Dict, List, Mapping, Optional

import torch

from .. import __version__, integrity
from ..checkpoints import Checkpoint
from ..quantize import quantization_record
from ..variants import ArchConfig
from .contract import ARTIFACT_FORMAT_VERSION, OutputSpec
from .formats import FORMATS

__all__ = ["make_manifest", "manifest_text", "utc_now", "weights_section"]


def weights_section(checkpoint: Optional[Checkpoint], head: Optional[str], seed: int) -> Dict[str, Any]:
    """Where the weights came from: the checkpoint (``head``: CheckpointInfo.head) or a seed."""
    if checkpoint is None:
        return {"source": "random", "seed": seed}
    return {
        "source": "checkpoint",
        "file": os.path.basename(checkpoint.path or ""),
        "sha256": checkpoint.sha256,
        "layout": checkpoint.layout,
        "form": checkpoint.form,
        "head": head,
    }


def make_manifest(
    *,
    arch: Dict[str, Any],
    config: ArchConfig,
    dtype: str,
    output: OutputSpec,
    outputs: List[Dict[str, Any]],
    weights: Dict[str, Any],
    model_stats: Dict[str, Any],
    device: torch.device,
    built_at: str,
    verification: Dict[str, Any],
    file_format: str,
    probe: Mapping[str, torch.Tensor],
    probe_tolerances: Mapping[str, float],
) -> Dict[str, Any]:
    """The manifest as JSON-ready data (tuples already turned into lists).

    ``arch``: the ``arch`` section without ``config`` (the name, and where the numbers came
    from); ``outputs`` describes every output the artifact's methods return, in order."""
    manifest = {
        "format": "repmlp-artifact",
        "format_version": ARTIFACT_FORMAT_VERSION,
        "arch": {**arch, "config": config.architecture_dict()},
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
        "output": _output_summary(config, output),
        "outputs": outputs,
        "weights": weights,
        "deploy_form": "fused (locality injection + BN folding), fc3 as batched matmul",
        "model": model_stats,
        "build": {
            "repmlp_version": __version__,
            "torch_version": torch.__version__,
            "built_at": built_at,
            "verify_device": str(device),
        },
        "verification": verification,
    }
    if dtype == "int8":
        manifest["quantization"] = quantization_record(config)
    fmt = FORMATS[file_format]
    manifest["file_format"] = file_format
    if fmt.manifest_section is not None:
        manifest.update(fmt.manifest_section(device))
    manifest["probe"] = integrity.probe_section(
        probe, probe_tolerances, f"the loaded model in eval mode, float32, on {device}", fmt.probe_record
    )
    manifest["digest"] = integrity.digest_section()
    # A JSON round trip turns tuples into lists, so later comparisons are like for like.
    return json.loads(json.dumps(manifest))


def _output_summary(config: ArchConfig, output: OutputSpec) -> Dict[str, Any]:
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
