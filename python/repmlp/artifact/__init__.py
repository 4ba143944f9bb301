"""Checkpoint -> one verified, frozen TorchScript artifact with an embedded manifest.

- :mod:`.module`: the scripted wrapper (the artifact's methods),
- :mod:`.manifest`: the manifest's schema, writing and reading it back,
- :mod:`.build`: the pipeline (options -> weights -> deploy -> verified steps -> publish).

docs/ARTIFACT.md is the contract.
"""

from .build import (
    DEFAULT_TOLERANCE,
    BuildOptions,
    BuildReport,
    StageResult,
    build_artifact,
    check_out_path,
    default_checkpoint,
    default_out_path,
    output_spec,
    resolve_options,
)
from .errors import BuildError
from .manifest import ARTIFACT_FORMAT_VERSION, MANIFEST_NAME, read_manifest
from .module import DTYPES, EXPORTED_METHODS, OUTPUT_KINDS, ArtifactModule, FeaturesArtifactModule, OutputSpec

__all__ = [
    "ARTIFACT_FORMAT_VERSION",
    "DEFAULT_TOLERANCE",
    "DTYPES",
    "EXPORTED_METHODS",
    "MANIFEST_NAME",
    "OUTPUT_KINDS",
    "ArtifactModule",
    "FeaturesArtifactModule",
    "OutputSpec",
    "BuildError",
    "BuildOptions",
    "BuildReport",
    "StageResult",
    "build_artifact",
    "check_out_path",
    "default_checkpoint",
    "default_out_path",
    "output_spec",
    "read_manifest",
    "resolve_options",
]
