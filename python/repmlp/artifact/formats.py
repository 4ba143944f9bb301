"""The registry of file formats (each defined in its own module) and reading any artifact's manifest."""

from typing import Any, Dict

from . import aoti, torchscript
from .contract import FORMAT_NAMES, ArtifactFormat

__all__ = ["FORMATS", "read_manifest"]

FORMATS: Dict[str, ArtifactFormat] = {fmt.name: fmt for fmt in (torchscript.FORMAT, aoti.FORMAT)}
assert tuple(FORMATS) == FORMAT_NAMES


def read_manifest(path: str) -> Dict[str, Any]:
    """The manifest embedded in an artifact of either format (BuildError if absent or
    unreadable); the format is told from the file's content."""
    for fmt in reversed(list(FORMATS.values())):  # TorchScript, the catch-all, last
        if fmt.is_format(path):
            return fmt.read_manifest(path)
    raise AssertionError("the TorchScript format accepts every file")
