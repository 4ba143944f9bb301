"""The values a build's steps share: the seeded inputs, the stage log, the build's state."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .. import integrity
from ..variants import ArchConfig
from .contract import ArtifactFormat
from .formats import FORMATS
from .manifest import make_manifest, utc_now, weights_section
from .options import BuildOptions

__all__ = ["BuildReport", "BuildState", "StageResult", "VerifyInputs", "VERIFY_BATCH", "VERIFY_SEED"]

VERIFY_BATCH = 2
VERIFY_SEED = 1234
ENTRY_POINTS = ("forward", "forward_images")  # what every form is checked through


@dataclass(frozen=True)
class VerifyInputs:
    """Seeded inputs every form of the artifact is checked on, one per entry point."""

    batch: torch.Tensor  # normalized float (N, C, H, W)
    images: torch.Tensor  # uint8 (N, H', W', 3), deliberately not the input size

    @staticmethod
    def make(config: ArchConfig, device: torch.device) -> "VerifyInputs":
        gen = torch.Generator().manual_seed(VERIFY_SEED)
        c, (h, w) = config.in_channels, config.img_size
        batch = torch.randn(VERIFY_BATCH, c, h, w, generator=gen)
        images = torch.randint(0, 256, (VERIFY_BATCH, h + 7, w + 3, 3), generator=gen, dtype=torch.uint8)
        return VerifyInputs(batch.to(device), images.to(device))


@dataclass
class StageResult:
    stage: str
    seconds: float
    max_abs_err: Optional[float] = None
    max_rel_err: Optional[float] = None
    note: str = ""


@dataclass
class BuildReport:
    path: str
    manifest: Dict[str, Any]
    stages: List[StageResult] = field(default_factory=list)
    sha256: str = ""  # of the published file, which was reloaded and checked before the rename
    size_bytes: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "stages": [vars(s) for s in self.stages],
            "manifest": self.manifest,
        }


@dataclass
class BuildState:
    """What the steps share: the options, the seeded inputs, the reference, the stage log."""

    options: BuildOptions
    inputs: VerifyInputs
    reference: Dict[str, List[torch.Tensor]]  # per entry point, every output of the loaded model
    model_stats: Dict[str, Any]
    outputs: List[Dict[str, Any]]  # the manifest's description of every output, in order
    head: Optional[str] = None  # CheckpointInfo.head of the loaded checkpoint
    probe: Dict[str, torch.Tensor] = field(default_factory=dict)  # stored in the artifact; checked at load
    tmp_path: str = ""
    written: Dict[str, Any] = field(default_factory=dict)  # the manifest in tmp_path
    stages: List[StageResult] = field(default_factory=list)
    built_at: str = field(default_factory=utc_now)

    @property
    def format(self) -> ArtifactFormat:
        return FORMATS[self.options.format]

    @property
    def output_names(self) -> List[str]:
        return [output["name"] for output in self.outputs]

    def manifest(self) -> Dict[str, Any]:
        """The manifest as of now: its verification lists the stages run so far."""
        opts = self.options
        return make_manifest(
            arch={"name": opts.arch_name, "source": opts.arch_source},
            config=opts.config,
            dtype=opts.dtype,
            output=opts.output,
            outputs=self.outputs,
            weights=weights_section(opts.checkpoint, self.head, opts.seed),
            model_stats=self.model_stats,
            device=opts.device,
            built_at=self.built_at,
            verification={
                "input": f"seeded N(0, 1) batch of {VERIFY_BATCH} and uint8 images of another size (seed {VERIFY_SEED})",
                "reference": "the loaded model in eval mode, float32 (eager preprocessing for images)",
                "entry_points": list(ENTRY_POINTS),
                "metric": "max |out - ref| / max |ref| per output, the worst output and entry point",
                "tolerance": opts.tolerance,
                "stages": [vars(s) for s in self.stages],
            },
            file_format=opts.format,
            probe=self.probe,
            probe_tolerances=integrity.probe_tolerances(opts.dtype, str(opts.device), opts.tolerance),
        )
