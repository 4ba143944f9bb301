"""Checkpoint -> one verified, frozen TorchScript artifact with an embedded manifest.

- :mod:`.module`: the scripted wrapper (the artifact's methods),
- :mod:`.manifest`: the manifest's schema, writing and reading it back,
- :mod:`.aoti`: the AOTInductor package format (``.pt2``),
- :mod:`.build`: the pipeline (options -> weights -> deploy -> verified steps -> publish).

docs/ARTIFACT.md is the contract.
"""

from . import build, errors, module
from .build import *  # noqa: F403
from .errors import *  # noqa: F403
from .manifest import ARTIFACT_FORMAT_VERSION, MANIFEST_NAME, read_manifest
from .module import *  # noqa: F403

__all__ = [
    *build.__all__,
    *errors.__all__,
    "ARTIFACT_FORMAT_VERSION",
    "MANIFEST_NAME",
    "read_manifest",
    *module.__all__,
]
