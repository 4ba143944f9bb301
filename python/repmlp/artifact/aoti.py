"""The AOTInductor artifact format: one PT2 archive (``.pt2``), from torch.export + AOTInductor.

The archive holds two compiled programs and the manifest (docs/FORMATS.md):

- ``forward``: :meth:`ArtifactModule.forward`, float32 (N, C, H, W) at the fixed input size,
  dynamic batch N >= 1;
- ``preprocess``: the image preprocessing (:class:`~repmlp.preprocess.ImageTransform`), uint8
  (N, H, W, 3) with dynamic N, H and W;
- ``extra/manifest.json``: the manifest, with an ``aoti`` section;
- ``extra/probe.pt.b64`` and ``extra/digest.json``: the self-check records (:mod:`repmlp.integrity`).

``forward_images`` is ``forward(preprocess(images))``, composed by whoever reads the package
(the C++ runtime, :class:`Pt2Artifact`), so the weights are compiled into one program only.
Compiled programs read their inputs as contiguous tensors whatever the strides passed, and do
not check shapes: readers make inputs contiguous and check them first.
"""

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import integrity
from ..utils import first_line
from .contract import MANIFEST_NAME, ArtifactFormat, Step
from .errors import BuildError
from .module import ArtifactModule

__all__ = [
    "FORMAT",
    "MANIFEST_RECORD",
    "PROGRAMS",
    "Pt2Artifact",
    "aoti_section",
    "compile_programs",
    "export_programs",
    "is_pt2_archive",
    "read_pt2_manifest",
    "write_pt2",
]

PROGRAMS = ("forward", "preprocess")
MANIFEST_RECORD = "extra/" + MANIFEST_NAME


def is_pt2_archive(path: str) -> bool:
    """True when the file at ``path`` is a PT2 archive (by its content, not its name)."""
    from torch.export.pt2_archive import is_pt2_package

    return os.path.isfile(path) and is_pt2_package(path)


def read_pt2_manifest(path: str) -> Dict[str, Any]:
    """The manifest of a ``.pt2`` artifact (BuildError if the archive has none)."""
    from torch.export.pt2_archive import PT2ArchiveReader

    try:
        with PT2ArchiveReader(path) as archive:
            if MANIFEST_RECORD not in archive.get_file_names():
                raise BuildError(f"{path} has no {MANIFEST_RECORD}: not a RepMLP artifact")
            return json.loads(archive.read_string(MANIFEST_RECORD))
    except BuildError:
        raise
    except Exception as exc:
        raise BuildError(f"cannot read the PT2 archive {path}: {first_line(exc)}") from None


def aoti_section(device: torch.device) -> Dict[str, Any]:
    """The manifest's ``aoti`` section: what a reader must match to load the programs."""
    return {
        "programs": {
            "forward": "float32 (N, C, H, W), dynamic N >= 1",
            "preprocess": "uint8 (N, H, W, 3), dynamic N, H, W >= 1 -> float32 (N, C, H, W)",
        },
        "forward_images": "forward(preprocess(images))",
        "torch_version": torch.__version__,
        "device": device.type,
    }


class _Preprocess(nn.Module):
    """The preprocessing alone, as its own program (export traces ``forward`` only)."""

    def __init__(self, wrapper: ArtifactModule) -> None:
        super().__init__()
        self.image_transform = wrapper.image_transform

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_transform(images)


class _Composed:
    """Both entry points of the artifact over two callables, as the runtime composes them."""

    def __init__(self, forward: Any, preprocess: Any) -> None:
        self._forward = forward
        self._preprocess = preprocess

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the entry point's name, as the probe calls it
        return self(x)

    def forward_images(self, images: torch.Tensor) -> torch.Tensor:
        return self(self._preprocess(images.contiguous()))


class ExportedArtifact(_Composed):
    """The two exported programs (torch.export), runnable for verification."""

    def __init__(self, programs: Dict[str, "torch.export.ExportedProgram"]) -> None:
        super().__init__(programs["forward"].module(), programs["preprocess"].module())
        self.programs = programs


def export_programs(wrapper: ArtifactModule, batch: torch.Tensor, images: torch.Tensor) -> ExportedArtifact:
    """torch.export of both programs; ``batch`` and ``images`` are example inputs (N >= 2, so
    that the batch dimension is not specialized to 1)."""
    from torch.export import Dim, export

    n = Dim("batch", min=1)
    height, width = Dim("height", min=1), Dim("width", min=1)
    with torch.no_grad():
        programs = {
            "forward": export(wrapper, (batch.float(),), dynamic_shapes=({0: n},)),
            "preprocess": export(
                _Preprocess(wrapper), (images,), dynamic_shapes=({0: n, 1: height, 2: width},)
            ),
        }
    return ExportedArtifact(programs)


class CompiledArtifact:
    """The files AOTInductor generated for each program (not runnable before packaging)."""

    def __init__(self, files: Dict[str, List[Any]]) -> None:
        self.files = files


def compile_programs(exported: ExportedArtifact) -> CompiledArtifact:
    """AOTInductor compilation of each program into a shared library (minutes for B224)."""
    files: Dict[str, List[Any]] = {}
    for name in PROGRAMS:
        program = exported.programs[name]
        args, kwargs = program.example_inputs
        # The multi-program recipe of torch._inductor.aoti_compile_and_package's documentation.
        files[name] = torch._inductor.aot_compile(
            program.module(), args, kwargs, options={"aot_inductor.package": True}
        )
    return CompiledArtifact(files)


def write_pt2(compiled: CompiledArtifact, path: str, extra_files: Dict[str, str]) -> None:
    """One PT2 archive at ``path``: both programs' files and ``extra/<name>`` for each of
    ``extra_files`` (``manifest.json`` among them). Text only: torch's PT2 loader decodes every
    extra record as UTF-8."""
    from torch.export.pt2_archive._package import package_pt2

    if MANIFEST_NAME not in extra_files:
        raise BuildError(f"a RepMLP .pt2 needs extra/{MANIFEST_NAME}")
    with open(path, "wb") as fh:  # a file object: package_pt2 wants a .pt2 name otherwise
        package_pt2(fh, aoti_files=compiled.files, extra_files=dict(extra_files))


class Pt2Artifact(_Composed):
    """A ``.pt2`` artifact loaded in Python (AOTInductor's package loader), with its manifest.

    For verification and tests; serving goes through the C++ runtime (``repmlp_rt``), which
    checks inputs first. ``compiled`` keeps the files it was packaged from, for a re-write.
    """

    def __init__(self, path: str, device: torch.device, compiled: Optional[CompiledArtifact] = None) -> None:
        from torch._inductor.package import load_package

        self.manifest = read_pt2_manifest(path)
        index = device.index if device.type == "cuda" and device.index is not None else -1
        programs = {name: load_package(path, name, device_index=index) for name in PROGRAMS}
        super().__init__(programs["forward"], programs["preprocess"])
        self.compiled = compiled


def _write(form: Any, path: str, extra_files: Dict[str, Any]) -> None:
    write_pt2(form.compiled if isinstance(form, Pt2Artifact) else form, path, extra_files)


def _load(path: str, device: torch.device, written: Any) -> Tuple[Any, str]:
    """The package loaded back (``written``: the compiled form, kept for a re-write)."""
    compiled = written.compiled if isinstance(written, Pt2Artifact) else written
    if not isinstance(compiled, CompiledArtifact):
        raise BuildError(f"a .pt2 is reloaded from its compiled form, got {type(written).__name__}")
    reloaded = Pt2Artifact(path, device, compiled)
    return reloaded, json.dumps(reloaded.manifest, indent=2)


def _export_step(form: Any, batch: torch.Tensor, images: torch.Tensor) -> Any:
    return export_programs(form, batch, images)


def _compile_step(form: Any, batch: torch.Tensor, images: torch.Tensor) -> Any:
    return compile_programs(form)


FORMAT = ArtifactFormat(
    name="aoti",
    suffix=".pt2",
    temp_suffix=".tmp.pt2",  # AOTInductor's package loader warns about names not ending in .pt2
    probe_record=integrity.PROBE_TEXT_RECORD,  # torch's PT2 loader reads extra records as UTF-8 text
    steps=(Step("export", _export_step), Step("compile", _compile_step, verify=False)),
    write=_write,
    load=_load,
    is_format=is_pt2_archive,
    read_manifest=read_pt2_manifest,
    manifest_section=lambda device: {"aoti": aoti_section(device)},
)
