"""Checkpoint -> one verified, self-checking artifact with an embedded manifest, as frozen
TorchScript (``.pt``) or an AOTInductor package (``.pt2``).

The modules depend on each other in one direction only:

- :mod:`.contract`: format version, record names, entry points, dtypes, output kinds, format
  names, :class:`OutputSpec` (imports nothing from the package);
- :mod:`.module`: the wrapper that becomes the artifact (its exported methods);
- :mod:`.torchscript`, :mod:`.aoti`: one module per file format (its steps, write, load and
  manifest section), gathered by :mod:`.formats`;
- :mod:`.manifest`: the manifest's schema, made from plain values;
- :mod:`.options` (every option checked once), :mod:`.state`, :mod:`.verify`, :mod:`.publish`;
- :mod:`.build`: the pipeline, :func:`build_artifact`.

docs/ARTIFACT.md is the contract.
"""

from .build import build_artifact, deploy, load_weights
from .contract import (
    ARTIFACT_FORMAT_VERSION,
    DTYPES,
    EXPORTED_METHODS,
    FORMAT_NAMES,
    MANIFEST_NAME,
    OUTPUT_KINDS,
    OutputSpec,
)
from .errors import BuildError, OptionError
from .formats import FORMATS, read_manifest
from .module import ArtifactModule, FeaturesArtifactModule, artifact_module, describe_outputs
from .options import DEFAULT_TOLERANCE, BuildOptions, check_out_path, default_checkpoint, default_out_path, resolve_options
from .state import BuildReport, StageResult

__all__ = [
    "ARTIFACT_FORMAT_VERSION",
    "DEFAULT_TOLERANCE",
    "DTYPES",
    "EXPORTED_METHODS",
    "FORMATS",
    "FORMAT_NAMES",
    "MANIFEST_NAME",
    "OUTPUT_KINDS",
    "ArtifactModule",
    "BuildError",
    "BuildOptions",
    "BuildReport",
    "FeaturesArtifactModule",
    "OptionError",
    "OutputSpec",
    "StageResult",
    "artifact_module",
    "build_artifact",
    "check_out_path",
    "default_checkpoint",
    "default_out_path",
    "deploy",
    "describe_outputs",
    "load_weights",
    "read_manifest",
    "resolve_options",
]
