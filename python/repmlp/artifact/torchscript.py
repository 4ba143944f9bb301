"""The TorchScript artifact format (``.pt``, the default): the wrapper scripted, frozen and
saved with its records under ``extra/`` (the manifest, the probe, the digest)."""

import json
from typing import Any, Dict, Tuple

import torch

from .. import integrity
from ..utils import first_line, quiet_jit, script_module
from .contract import EXPORTED_METHODS, MANIFEST_NAME, ArtifactFormat, Step
from .errors import BuildError

__all__ = ["FORMAT", "read_manifest"]


def _script(form: Any, batch: torch.Tensor, images: torch.Tensor) -> Any:
    return script_module(form)


def _freeze(form: Any, batch: torch.Tensor, images: torch.Tensor) -> Any:
    return torch.jit.freeze(form.eval(), preserved_attrs=list(EXPORTED_METHODS))


def write(module: Any, path: str, extra_files: Dict[str, Any]) -> None:
    torch.jit.save(module, path, _extra_files=extra_files)


def load(path: str, device: torch.device, written: Any = None) -> Tuple[Any, str]:
    """The saved module (with every exported method) and its manifest's text."""
    extra = {MANIFEST_NAME: ""}
    reloaded = torch.jit.load(path, map_location=device, _extra_files=extra)
    missing = [m for m in EXPORTED_METHODS if not hasattr(reloaded, m)]
    if missing:
        raise BuildError(f"the saved artifact lost its methods {missing}")
    return reloaded, extra[MANIFEST_NAME]


def read_manifest(path: str) -> Dict[str, Any]:
    """The manifest of a TorchScript artifact (BuildError if absent or unreadable)."""
    extra = {MANIFEST_NAME: ""}
    try:
        with quiet_jit():
            torch.jit.load(path, map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise BuildError(f"cannot load artifact {path}: {first_line(exc)}") from None
    if not extra[MANIFEST_NAME]:
        raise BuildError(f"{path} has no {MANIFEST_NAME}: not a RepMLP artifact")
    return json.loads(extra[MANIFEST_NAME])


FORMAT = ArtifactFormat(
    name="torchscript",
    suffix=".pt",
    temp_suffix=".tmp",
    probe_record=integrity.PROBE_RECORD,
    steps=(Step("script", _script), Step("freeze", _freeze)),
    write=write,
    load=load,
    is_format=lambda path: True,  # whatever is not another format is tried as TorchScript
    read_manifest=read_manifest,
)
