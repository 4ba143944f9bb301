"""Writing a form with its records, reading it back as the runtime will, and publishing it."""

import json
import os
from typing import Any, Dict

import torch

from .. import integrity
from ..utils import new_file_mode, sha256_file
from .contract import MANIFEST_NAME, ArtifactFormat
from .errors import BuildError
from .manifest import manifest_text
from .state import BuildState
from .verify import CHECKS, worst_output

__all__ = ["load_checked", "publish", "write_form"]


def write_form(state: BuildState, form: Any, path: str, manifest: Dict[str, Any]) -> None:
    """Write a form in the build's format with its manifest and self-check probe, then append
    the digest of every record (seal) before anything reads it back (docs/ARTIFACT.md)."""
    fmt = state.format
    probe = integrity.probe_record_contents(state.probe, fmt.probe_record)
    fmt.write(form, path, {MANIFEST_NAME: manifest_text(manifest), fmt.probe_record: probe})
    integrity.seal(path)


def load_checked(fmt: ArtifactFormat, device: torch.device, path: str, manifest: Dict[str, Any], written: Any) -> Any:
    """Reload a written file as the runtime will: every record against its digest first (a
    .pt2's programs are shared libraries, loaded only once their bytes are known to be the
    ones written), then the file itself, whose manifest (and methods) must be the ones
    written, and the stored probe within its tolerance."""
    try:
        integrity.check_digest(path)
    except integrity.IntegrityError as exc:
        raise BuildError(f"the written file fails its own digest: {exc}") from None
    reloaded, text = fmt.load(path, device, written)
    if json.loads(text) != manifest:
        raise BuildError("the manifest read back differs from the one written")
    tolerance = manifest["probe"]["tolerance"][device.type]
    probe = integrity.load_probe(integrity.read_probe_record(path))
    for method, rel in integrity.probe_errors(reloaded, probe, device).items():
        if not rel <= tolerance:
            raise BuildError(f"the stored probe's {method}: relative error {rel:.3e} exceeds the tolerance {tolerance:.1e}")
    return reloaded


@torch.no_grad()
def publish(state: BuildState, verified: Any, out: str) -> str:
    """Write the final file (its manifest now lists every stage), reload that file and check
    it like the reload stage, then rename those same bytes into place. Returns their sha256."""
    final = state.manifest()
    write_form(state, verified, state.tmp_path, final)
    digest = sha256_file(state.tmp_path)
    reloaded = load_checked(state.format, state.options.device, state.tmp_path, final, verified)
    for check, call in CHECKS.items():
        _, rel, _ = worst_output(call(reloaded, state.inputs), state.reference[check])
        if not rel <= state.options.tolerance:
            raise BuildError(f"the final file's {check}: relative error {rel:.3e} exceeds the tolerance")
    if sha256_file(state.tmp_path) != digest:
        raise BuildError("the artifact changed on disk while it was being verified")
    os.chmod(state.tmp_path, new_file_mode())  # readable by a server running as another user
    os.replace(state.tmp_path, out)
    return digest
