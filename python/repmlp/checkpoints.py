"""Reading and writing RepMLPNet weights in the official and the mmcls/mmpretrain layouts.

Loading is always strict: the layout (official or mmcls) and the form (training or deploy)
are detected from the keys, the keys are mapped onto this package's layout, and any missing,
unexpected or mis-shaped tensor is an error that names the offending keys.

This package's state-dict keys are the official ones, except that a block's local branches
live in ``local_convs.{i}`` (in the order of ``reparam_conv_kernels``) where upstream names
them ``repconv{k}``.
"""

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .model import RepMLPNet
from .utils import sha256_file

__all__ = ["Checkpoint", "CheckpointError", "CheckpointInfo", "load_checkpoint", "export_state_dict", "read_checkpoint"]

LAYOUTS = ("official", "mmcls")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model."""


@dataclass(frozen=True)
class CheckpointInfo:
    layout: str  # "official" | "mmcls"
    form: str  # "training" | "deploy"
    num_tensors: int
    path: Optional[str] = None
    sha256: Optional[str] = None
    # The classifier: "loaded"; "absent" (a backbone-only checkpoint into a model without
    # one); "ignored" (the checkpoint's head.* left out of a model without a classifier).
    head: str = "loaded"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read once: its flat state dict and what its keys say about it."""

    state: Dict[str, torch.Tensor]
    layout: str  # "official" | "mmcls"
    form: str  # "training" | "deploy"
    path: Optional[str] = None  # None for an in-memory state dict
    sha256: Optional[str] = None
    meta: Optional[Mapping[str, Any]] = None  # the file's ``meta`` (mmcls/mmpretrain save a config there)

    def official_state(self) -> Dict[str, torch.Tensor]:
        """The tensors under the official layout's names (``repconv{k}`` kept)."""
        if self.layout == "official":
            return dict(self.state)
        return {_rename(key, to_mmcls=False): value for key, value in self.state.items()}

    def info(self) -> CheckpointInfo:
        return CheckpointInfo(self.layout, self.form, len(self.state), self.path, self.sha256)


# (official prefix, mmcls prefix): whole-prefix renames, first match wins.
_PREFIX_RULES: Tuple[Tuple[str, str], ...] = (
    ("conv_embedding.conv.", "backbone.patch_embed.projection."),
    ("conv_embedding.bn.", "backbone.patch_embed.norm."),
    ("embeds.", "backbone.downsample_layers."),
    ("head_norm.", "backbone.final_norm."),
    ("head.", "head.fc."),
    ("stages.", "backbone.stages."),
)
# Renames inside a block: (official, mmcls).
_INNER_RULES: Tuple[Tuple[str, str], ...] = (
    (".gp.fc1.", ".gp.conv1.conv."),
    (".gp.fc2.", ".gp.conv2.conv."),
    (".prebn1.", ".norm1."),
    (".prebn2.", ".norm2."),
)


def _rename(key: str, to_mmcls: bool) -> str:
    src, dst = (0, 1) if to_mmcls else (1, 0)
    for rule in _PREFIX_RULES:
        if key.startswith(rule[src]):
            key = rule[dst] + key[len(rule[src]) :]
            break
    for rule in _INNER_RULES:
        key = key.replace(rule[src], rule[dst])
    return key


_REPCONV = re.compile(r"\.repconv(\d+)\.")
_LOCAL = re.compile(r"\.local_convs\.(\d+)\.")


def _official_to_native(key: str, kernels: List[int]) -> str:
    match = _REPCONV.search(key)
    if match and int(match.group(1)) in kernels:
        index = kernels.index(int(match.group(1)))
        key = key[: match.start()] + f".local_convs.{index}." + key[match.end() :]
    return key


def _native_to_official(key: str, kernels: List[int]) -> str:
    match = _LOCAL.search(key)
    if match:
        key = key[: match.start()] + f".repconv{kernels[int(match.group(1))]}." + key[match.end() :]
    return key


def detect_layout(keys: List[str]) -> str:
    if any(k.startswith("backbone.") for k in keys):
        return "mmcls"
    if any(k.startswith("conv_embedding.") for k in keys):
        return "official"
    raise CheckpointError(
        "not a RepMLPNet checkpoint: expected keys starting with 'conv_embedding.' (official) or "
        f"'backbone.' (mmcls/mmpretrain), got {keys[:3]}"
    )


def detect_form(keys: List[str]) -> str:
    training = any(".fc3_bn." in k or ".repconv" in k for k in keys)
    deploy = any(k.endswith(".fc3.bias") for k in keys)
    if training and deploy:
        raise CheckpointError("checkpoint mixes training (fc3_bn/repconv) and deploy (fc3.bias) keys")
    if not (training or deploy):
        raise CheckpointError("checkpoint has neither fc3_bn (training form) nor fc3.bias (deploy form) keys")
    return "training" if training else "deploy"


def _load_failure(exc: Exception) -> str:
    """One line on why torch.load(weights_only=True) failed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours part of its message
    marker = "WeightsUnpickler error:"
    reason = text.split(marker, 1)[1].strip().splitlines()[0].split(" Please use", 1)[0].strip().rstrip(".") if marker in text else ""
    if reason.startswith("Unsupported global"):  # a real pickle with non-tensor objects in it
        return (
            f"it holds objects that weights_only=True refuses ({reason}). If the file is trusted, "
            "load it once with weights_only=False and save only its state dict"
        )
    if isinstance(exc, EOFError):
        return "the file is empty or truncated"
    first = reason or (text.strip().splitlines()[0] if text.strip() else "")
    return f"not a PyTorch checkpoint ({type(exc).__name__}{': ' + first if first else ''})"


def read_checkpoint(source: Union[str, os.PathLike, Mapping[str, Any], Checkpoint]) -> Checkpoint:
    """Read a checkpoint file (``weights_only=True``) or take a state dict, unwrap it
    (``state_dict``/``model``), strip ``module.`` prefixes and detect layout and form.

    A :class:`Checkpoint` passes through unchanged, so callers can read a file once and load it
    later. Raises :class:`CheckpointError` (a ``ValueError``) naming the problem.
    """
    if isinstance(source, Checkpoint):
        return source
    path: Optional[str] = None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad files
            raise CheckpointError(f"cannot read checkpoint {path}: {_load_failure(exc)}") from None
    else:
        obj = source
    meta = obj.get("meta") if isinstance(obj, Mapping) and isinstance(obj.get("meta"), Mapping) else None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"checkpoint {path or ''} holds {type(obj).__name__}, expected a non-empty state dict".replace("  ", " ")
        )
    state: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint key {key!r} ({type(key).__name__}) is not a parameter name (str)")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint entry {key!r} is a {type(value).__name__}, expected a tensor")
        state[key[len("module.") :] if key.startswith("module.") else key] = value
    keys = list(state)
    return Checkpoint(
        state=state,
        layout=detect_layout(keys),
        form=detect_form(keys),
        path=os.path.abspath(path) if path else None,
        sha256=sha256_file(path) if path else None,
        meta=meta,
    )


def _model_kernels(model: RepMLPNet) -> List[int]:
    kernels = model.config.reparam_conv_kernels
    return list(kernels) if kernels is not None else []


def load_checkpoint(
    model: nn.Module, source: Union[str, os.PathLike, Mapping[str, Any], Checkpoint]
) -> CheckpointInfo:
    """Load official or mmcls/mmpretrain weights into ``model``, strictly.

    ``source`` is a file path (read with ``torch.load(weights_only=True)``), a state dict
    (possibly wrapped in ``state_dict``/``model``, with ``module.`` prefixes) or a
    :class:`Checkpoint` from :func:`read_checkpoint`.
    Raises :class:`CheckpointError` (a ``ValueError``) naming the problem.
    """
    if not isinstance(model, RepMLPNet):
        raise CheckpointError(f"load_checkpoint needs a RepMLPNet, got {type(model).__name__}")
    checkpoint = read_checkpoint(source)
    state, layout, form = checkpoint.state, checkpoint.layout, checkpoint.form
    model_form = model.form
    if model_form == "fused":
        raise CheckpointError(
            "the model's BNs are already fused; load into a model from create_model(), then call fuse_model()"
        )
    if form == "training" and model_form != "training":
        raise CheckpointError(
            f"the checkpoint ({layout} layout) is in training form (fc3_bn, repconv) but the model is "
            "in deploy form: create it with deploy=False, load, then call reparameterize_model()"
        )
    if form == "deploy" and model_form != "deploy":
        raise CheckpointError(
            f"the checkpoint ({layout} layout) is in deploy form (fc3.bias, no fc3_bn/repconv) but the "
            "model is in training form: create it with deploy=True"
        )
    kernels = _model_kernels(model)
    mapped: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        official = _rename(key, to_mmcls=False) if layout == "mmcls" else key
        mapped[_official_to_native(official, kernels)] = value
    head = _match_head(model, mapped, layout)
    expected = model.state_dict()
    # Old checkpoints may lack BN's num_batches_tracked; BN fills it in, as torch does.
    missing = [k for k in expected if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in expected]
    mismatched = [
        k for k in mapped if k in expected and tuple(mapped[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        to_file = _key_in_file_namer(layout, kernels)
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {[to_file(k) for k in missing[:3]]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {[to_file(k) for k in unexpected[:3]]})")
        if mismatched:
            shown = ", ".join(
                f"{to_file(k)}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(expected[k].shape)}"
                for k in mismatched[:3]
            )
            problems.append(f"{len(mismatched)} with the wrong shape ({shown})")
            problems += _shape_hints(mismatched, mapped, expected)
        problems += _final_norm_hints(missing, unexpected)
        arch = _describe(model)
        raise CheckpointError(
            f"checkpoint ({layout} layout, {form} form) does not match {arch}: " + "; ".join(problems)
        )
    with torch.no_grad():
        model.load_state_dict(mapped, strict=True)
    return replace(checkpoint.info(), head=head)


def _match_head(model: RepMLPNet, mapped: Dict[str, torch.Tensor], layout: str) -> str:
    """Reconcile the checkpoint's classifier with the model's (drops head.* from ``mapped``
    when the model has none); raises when a classifier is needed and the checkpoint has none."""
    head_keys = [k for k in mapped if k.startswith("head.")]
    if model.config.num_classes == 0:
        # Features and embeddings need only the backbone: a classifier's weights are unused.
        for key in head_keys:
            del mapped[key]
        return "ignored" if head_keys else "absent"
    if not head_keys:
        named = "head.fc.*" if layout == "mmcls" else "head.*"
        raise CheckpointError(
            f"the checkpoint ({layout} layout) has no classifier ({named} keys): a backbone-only "
            f"checkpoint gives features or embeddings, not the model's {model.config.num_classes} "
            "class logits; create the model with num_classes=0, or build output='features' or "
            "output='embedding'"
        )
    return "loaded"


def _shape_hints(
    mismatched: List[str], found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> List[str]:
    """What the two usual causes of shape mismatches (input size, class count) say to do."""
    hints = []
    fc3 = [k for k in mismatched if k.endswith("repmlp_block.fc3.weight")]
    if fc3:
        # fc3's rows are sharesets x (H/4/2^i) x (W/4/2^i): its size follows the input size.
        key = fc3[0]
        hints.append(
            f"fc3 sizes follow the input size ({key}: {found[key].shape[1]} vs {expected[key].shape[1]} "
            "positions per shareset): build at the checkpoint's input size, img_size=<H>x<W>"
        )
    if "head.weight" in mismatched:
        hints.append(
            f"the checkpoint's classifier has {found['head.weight'].shape[0]} classes: "
            "pass num_classes=<N>"
        )
    return hints


def _final_norm_hints(missing: List[str], unexpected: List[str]) -> List[str]:
    """A checkpoint with or without the final norm (mmcls's final_norm) the model lacks or has."""
    if any(k.startswith("head_norm.") for k in missing):
        return ["the checkpoint has no final norm: create the model with final_norm=False"]
    if any(k.startswith("head_norm.") for k in unexpected):
        return ["the checkpoint has a final norm: create the model with final_norm=True"]
    return []


def _key_in_file_namer(layout: str, kernels: List[int]):
    """Report keys as the file spells them (native keys of unexpected entries pass through)."""

    def name(key: str) -> str:
        if ".local_convs." in key:
            key = _native_to_official(key, kernels)
        return _rename(key, to_mmcls=True) if layout == "mmcls" else key

    return name


def _describe(model: RepMLPNet) -> str:
    cfg = model.config
    return (
        f"RepMLPNet(channels={list(cfg.channels)}, depths={list(cfg.depths)}, "
        f"sharesets={list(cfg.sharesets)}, img_size={list(cfg.img_size)}, "
        f"num_classes={cfg.num_classes}, kernels={cfg.reparam_conv_kernels})"
    )


def export_state_dict(model: nn.Module, layout: str = "official") -> Dict[str, torch.Tensor]:
    """The model's weights under the official or the mmcls/mmpretrain key names.

    Works for the training and the (locality-injected) deploy form; a fused model has no
    upstream counterpart.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(model, RepMLPNet):
        raise ValueError(f"export_state_dict needs a RepMLPNet, got {type(model).__name__}")
    if model.form == "fused":
        raise ValueError("a fused model has no upstream layout; export before fuse_model()")
    kernels = _model_kernels(model)
    out: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in model.state_dict().items():
        official = _native_to_official(key, kernels)
        out[_rename(official, to_mmcls=True) if layout == "mmcls" else official] = value.detach().clone()
    return out
