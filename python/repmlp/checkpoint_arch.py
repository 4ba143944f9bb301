"""The architecture a checkpoint's tensors imply, read from their names and shapes.

Every constructor argument of RepMLPNet leaves a trace in the weights: the patch embedding's
kernel is (C0, in_channels, patch, patch); fc3 is (sharesets * area, area) with ``area`` the
stage's map size; the global perceptron's first conv is (C // gp_ratio, C); the local branches
are ``repconv{k}`` (training form only: the deploy form has folded them into fc3); the
classifier is (classes, C_last), absent in a backbone-only file. What the weights cannot tell
(the preprocessing, and H against W when fc3's area is not a square) comes from the caller or
the checkpoint's saved config (:mod:`repmlp.mm_config`).
"""

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from .checkpoints import Checkpoint, CheckpointError
from .mm_config import config_from_meta, preprocessing_from_config
from .variants import VARIANTS, ArchConfig

__all__ = ["ARCH_FIELDS", "CheckpointArch", "arch_mismatches", "describe_checkpoint", "infer_arch", "matching_variant"]

# The structural fields compared between a checkpoint and a requested architecture, with the
# names the options use.
ARCH_FIELDS = (
    ("channels", "channels"),
    ("depths", "depths"),
    ("sharesets", "sharesets"),
    ("kernels", "reparam_conv_kernels"),
    ("patch_size", "patch_size"),
    ("gp_ratio", "gp_ratio"),
    ("in_channels", "in_channels"),
    ("ffn_expand", "ffn_expand"),
)

_BLOCK = re.compile(r"^stages\.(\d+)\.(\d+)\.")
_REPCONV = re.compile(r"^stages\.\d+\.\d+\.repmlp_block\.repconv(\d+)\.conv\.weight$")
# This package's own state dict (``RepMLPNet.state_dict()``) keeps the branches as
# ``local_convs.{i}``; their kernel size is the weight's last dimension.
_LOCAL_CONV = re.compile(r"^stages\.\d+\.\d+\.repmlp_block\.local_convs\.\d+\.conv\.weight$")


@dataclass(frozen=True)
class CheckpointArch:
    """What a checkpoint's tensors say about the network that made them."""

    layout: str  # "official" | "mmcls"
    form: str  # "training" | "deploy"
    channels: Tuple[int, ...]
    depths: Tuple[int, ...]
    sharesets: Tuple[int, ...]
    kernels: Optional[Tuple[int, ...]]  # None: no local branches; unknown (None) in deploy form
    patch_size: int
    gp_ratio: int
    in_channels: int
    ffn_expand: int
    num_classes: Optional[int]  # None: no classifier in the file
    final_norm: bool
    areas: Tuple[int, ...]  # fc3's partition area (H * W of the map) per stage
    parameters: int

    @property
    def kernels_known(self) -> bool:
        return self.form == "training"

    def square_img_size(self) -> Optional[Tuple[int, int]]:
        """The square input size fc3's first partition implies, None if its area is not a square."""
        side = math.isqrt(self.areas[0])
        return (side * self.patch_size,) * 2 if side * side == self.areas[0] else None

    def config(self, img_size: Tuple[int, int], num_classes: int) -> ArchConfig:
        """An :class:`ArchConfig` with these numbers (kernels of a deploy file: none)."""
        return ArchConfig(
            channels=self.channels,
            depths=self.depths,
            sharesets=self.sharesets,
            reparam_conv_kernels=self.kernels,
            patch_size=self.patch_size,
            gp_ratio=self.gp_ratio,
            in_channels=self.in_channels,
            ffn_expand=self.ffn_expand,
            img_size=img_size,
            num_classes=num_classes,
        )

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["kernels"] = list(self.kernels) if self.kernels is not None else (None if self.kernels_known else "folded")
        return d


def _shape(state: Dict[str, torch.Tensor], key: str, dims: int) -> Tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"not a complete RepMLPNet checkpoint: no {key}")
    shape = tuple(state[key].shape)
    if len(shape) != dims:
        raise CheckpointError(f"{key} has shape {list(shape)}, expected {dims} dimensions")
    return shape


def _stage_depths(state: Dict[str, torch.Tensor]) -> Tuple[int, ...]:
    blocks: Dict[int, set] = {}
    for key in state:
        match = _BLOCK.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError(f"stages must be numbered 0..N-1, found {sorted(blocks)}")
    for stage, units in blocks.items():
        if sorted(units) != list(range(len(units))):
            raise CheckpointError(f"stage {stage}'s blocks must be numbered 0..N-1, found {sorted(units)}")
    return tuple(len(blocks[i]) for i in range(len(blocks)))


def _stage(state: Dict[str, torch.Tensor], i: int) -> Tuple[int, int, int, int, int]:
    """(channels, sharesets, area, gp ratio, ffn expansion) of stage ``i``, from its first block."""
    prefix = f"stages.{i}.0."
    hidden, channels = _shape(state, prefix + "repmlp_block.gp.fc1.weight", 4)[:2]
    rows, area = _shape(state, prefix + "repmlp_block.fc3.weight", 4)[:2]
    if hidden < 1 or rows % area:
        raise CheckpointError(f"{prefix}repmlp_block: fc3 {rows}x{area} and gp {hidden}x{channels} are not a RepMLP block")
    ratio = channels // hidden
    if channels // ratio != hidden:
        raise CheckpointError(f"{prefix}repmlp_block.gp: width {hidden} is no C // ratio of {channels} channels")
    ffn = _shape(state, prefix + "ffn_block.ffn_fc1.conv.weight", 4)[0]
    if ffn % channels:
        raise CheckpointError(f"{prefix}ffn_block: {ffn} hidden channels are no multiple of {channels}")
    return channels, rows // area, area, ratio, ffn // channels


def _kernels(state: Dict[str, torch.Tensor], form: str) -> Optional[Tuple[int, ...]]:
    found = {int(m.group(1)) for m in map(_REPCONV.match, state) if m}
    found |= {int(state[key].shape[-1]) for key in state if _LOCAL_CONV.match(key)}
    return tuple(sorted(found)) if found and form == "training" else None


def _uniform(values: List[Any], what: str) -> Any:
    if len(set(values)) != 1:
        raise CheckpointError(f"stages disagree on {what}: {values}")
    return values[0]


def infer_arch(checkpoint: Checkpoint) -> CheckpointArch:
    """The architecture of a checkpoint (CheckpointError if its tensors are not a RepMLPNet's)."""
    state = checkpoint.official_state()
    c0, in_channels, patch, patch_w = _shape(state, "conv_embedding.conv.weight", 4)
    if patch != patch_w:
        raise CheckpointError(f"the patch embedding's kernel is {patch}x{patch_w}, expected a square")
    depths = _stage_depths(state)
    stages = [_stage(state, i) for i in range(len(depths))]
    channels = tuple(s[0] for s in stages)
    if channels[0] != c0:
        raise CheckpointError(f"the patch embedding gives {c0} channels, stage 0 has {channels[0]}")
    head = state.get("head.weight")
    return CheckpointArch(
        layout=checkpoint.layout,
        form=checkpoint.form,
        channels=channels,
        depths=depths,
        sharesets=tuple(s[1] for s in stages),
        kernels=_kernels(state, checkpoint.form),
        patch_size=patch,
        gp_ratio=_uniform([s[3] for s in stages], "the global perceptron's ratio"),
        in_channels=in_channels,
        ffn_expand=_uniform([s[4] for s in stages], "the FFN expansion"),
        num_classes=int(head.shape[0]) if head is not None and head.dim() == 2 else None,
        final_norm=any(k.startswith("head_norm.") for k in state),
        areas=tuple(s[2] for s in stages),
        parameters=sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked")),
    )


def _value(config: ArchConfig, field: str) -> Any:
    value = getattr(config, field)
    return tuple(value) if isinstance(value, list) else value


def arch_mismatches(found: CheckpointArch, config: ArchConfig, requested: str) -> List[str]:
    """``"<field>: checkpoint X, <requested> Y"`` for each structural field where ``config``
    differs from the checkpoint (kernels only when the file still has its local branches)."""
    out = []
    for name, field in ARCH_FIELDS:
        if name == "kernels" and not found.kernels_known:
            continue
        have, want = getattr(found, name), _value(config, field)
        if have != want:
            out.append(f"{name}: checkpoint {_text(have)}, {requested} {_text(want)}")
    return out


def _text(value: Any) -> str:
    return "none" if value is None else str(value)


def matching_variant(config: ArchConfig, kernels_known: bool = True) -> Optional[str]:
    """The published variant with this structure and input size (kernels compared only when
    ``kernels_known``), None if none has."""
    fields = [f for n, f in ARCH_FIELDS if kernels_known or n != "kernels"] + ["img_size"]
    for name, variant in VARIANTS.items():
        if all(_value(variant, f) == _value(config, f) for f in fields):
            return name
    return None


def describe_checkpoint(checkpoint: Checkpoint) -> Dict[str, Any]:
    """What a checkpoint holds, as JSON-ready data: layout, form, architecture, classes,
    parameters, the input size fc3 implies (square), the variant it matches, and the input
    size and preprocessing of the config saved in its ``meta`` (if any)."""
    found = infer_arch(checkpoint)
    size = found.square_img_size()
    variant = None
    if size is not None:
        variant = matching_variant(found.config(size, found.num_classes or 0), found.kernels_known)
    info = found.to_dict()
    meta = preprocessing_from_config(config_from_meta(checkpoint.meta))
    described = {
        "path": checkpoint.path,
        "layout": info.pop("layout"),
        "form": info.pop("form"),
        "num_classes": info.pop("num_classes"),
        "parameters": info.pop("parameters"),
        "final_norm": info.pop("final_norm"),
        "arch": info,
        "img_size": list(size) if size is not None else None,
        "variant": variant,
        "config_preprocessing": meta,
    }
    return json.loads(json.dumps(described))  # tuples as lists, as a reader of the JSON sees them
