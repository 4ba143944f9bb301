"""The artifact contract, as constants and value types every other module of the package reads.

Nothing here imports from the package: the scripted module, the formats, the manifest and the
build all depend on this module and never the other way round (docs/ARTIFACT.md is the text).
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

__all__ = [
    "ARTIFACT_FORMAT_VERSION",
    "DTYPES",
    "EXPORTED_METHODS",
    "FORMAT_NAMES",
    "MANIFEST_NAME",
    "OUTPUT_KINDS",
    "ArtifactFormat",
    "OutputSpec",
    "Step",
]

# Bump when the artifact's methods or the manifest's meaning change; the C++ runtime checks it
# (kFormatVersion).
ARTIFACT_FORMAT_VERSION = 1
# The manifest's record name (extra/manifest.json in either format).
MANIFEST_NAME = "manifest.json"
# The file formats, the default first.
FORMAT_NAMES = ("torchscript", "aoti")
# dtype name -> what the input is cast to and the float layers compute in. int8 artifacts keep
# float32 there and run their large GEMMs in int8 (repmlp.quantize).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.float32}
# Methods besides forward that freezing must keep and the runtime calls.
EXPORTED_METHODS = (
    "forward_images",
    "format_version",
    "input_shape",
    "labels",
    "compute_dtype",
    "output_kind",
    "output_names",
)
OUTPUT_KINDS = ("logits", "features", "embedding")


@dataclass(frozen=True)
class OutputSpec:
    """What an artifact outputs. ``out_indices`` and ``pre_downsample`` apply to features;
    ``final_norm`` is part of the network (a checkpoint has the final BN or not). Checked once,
    where the build's options are resolved."""

    kind: str = "logits"
    out_indices: Tuple[int, ...] = (0, 1, 2, 3)
    final_norm: bool = True
    pre_downsample: bool = False

    def model_kwargs(self) -> Dict[str, Any]:
        """The RepMLPNet arguments that make ``forward_backbone`` give these outputs."""
        return {
            "out_indices": tuple(sorted(self.out_indices)),
            "final_norm": self.final_norm,
            "pre_downsample": self.pre_downsample,
        }


@dataclass(frozen=True)
class Step:
    """One step of a format from the deploy form to the form that is written."""

    name: str
    run: Callable[[Any, torch.Tensor, torch.Tensor], Any]  # (form, verify batch, verify images) -> next form
    verify: bool = True  # compare the new form's outputs with the reference


@dataclass(frozen=True)
class ArtifactFormat:
    """One file format: its steps, how its files are written and read, its manifest section."""

    name: str  # one of FORMAT_NAMES
    suffix: str  # of the default output path
    temp_suffix: str  # of the temporary file it is written to first
    probe_record: str  # the probe's extra-file name (repmlp.integrity)
    steps: Tuple[Step, ...]  # after the deploy form, before save and reload
    write: Callable[[Any, str, Dict[str, Any]], None]  # (form, path, extra files: name -> contents)
    load: Callable[[str, torch.device, Any], Tuple[Any, str]]  # (path, device, form written) -> (form, manifest text)
    is_format: Callable[[str], bool]  # whether the file at a path is in this format (by content)
    read_manifest: Callable[[str], Dict[str, Any]]  # the manifest of a file in this format
    manifest_section: Optional[Callable[[torch.device], Dict[str, Any]]] = None  # extra manifest keys
