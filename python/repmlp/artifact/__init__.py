"""Checkpoint -> one verified, frozen TorchScript artifact with an embedded manifest.

- :mod:`.module`: the scripted wrapper (the artifact's methods),
- :mod:`.manifest`: the manifest's schema, writing and reading it back,
- :mod:`.aoti`: the AOTInductor package format (``.pt2``),
- :mod:`.build`: the pipeline (options -> weights -> deploy -> verified steps -> publish).

docs/ARTIFACT.md is the contract.
"""

from .build import (
    DEFAULT_TOLERANCE,
    FORMATS,
    BuildOptions,
    BuildReport,
    StageResult,
    build_artifact,
    check_out_path,
    default_checkpoint,
    default_out_path,
    resolve_options,
)
from .errors import BuildError
from .manifest import ARTIFACT_FORMAT_VERSION, MANIFEST_NAME, read_manifest
from .module import DTYPES, EXPORTED_METHODS, ArtifactModule

__all__ = [
    "ARTIFACT_FORMAT_VERSION",
    "DEFAULT_TOLERANCE",
    "DTYPES",
    "FORMATS",
    "EXPORTED_METHODS",
    "MANIFEST_NAME",
    "ArtifactModule",
    "BuildError",
    "BuildOptions",
    "BuildReport",
    "StageResult",
    "build_artifact",
    "check_out_path",
    "default_checkpoint",
    "default_out_path",
    "read_manifest",
    "resolve_options",
]
