"""The module that gets scripted: the fused model plus its input contract and preprocessing.

Its exported methods are the artifact's interface (docs/ARTIFACT.md): what the C++ runtime
reads about the artifact comes from these methods, not from a second copy of the facts.
"""

from typing import List

import torch
from torch import nn

from ..model import RepMLPNet
from ..preprocess import ImageTransform
from .manifest import ARTIFACT_FORMAT_VERSION

__all__ = ["DTYPES", "EXPORTED_METHODS", "ArtifactModule"]

# dtype name -> what the input is cast to and the float layers compute in. int8 artifacts keep
# float32 there and run their large GEMMs in int8 (repmlp.quantize).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.float32}
# Methods besides forward that freezing must keep and the runtime calls.
EXPORTED_METHODS = ("forward_images", "format_version", "input_shape", "labels", "compute_dtype")


class ArtifactModule(nn.Module):
    """The fused model, its input checks, its preprocessing and what it says about itself."""

    format_version_: torch.jit.Final[int]
    in_chans: torch.jit.Final[int]
    img_h: torch.jit.Final[int]
    img_w: torch.jit.Final[int]
    dtype_name: torch.jit.Final[str]

    def __init__(self, model: RepMLPNet, dtype_name: str = "float32") -> None:
        super().__init__()
        cfg = model.config
        self.model = model
        self.format_version_ = ARTIFACT_FORMAT_VERSION
        self.in_chans = cfg.in_channels
        self.img_h, self.img_w = cfg.img_size
        self.dtype_name = dtype_name
        self.label_list: List[str] = list(cfg.class_labels())
        self.image_transform = ImageTransform(cfg.preprocessing)
        self.compute_dtype_ = DTYPES[dtype_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float (N, C, H, W) -> float32 logits (N, num_classes)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[2] != self.img_h or x.shape[3] != self.img_w:
            raise ValueError(
                "expected a (N, {}, {}, {}) batch, got {}".format(
                    self.in_chans, self.img_h, self.img_w, list(x.shape)
                )
            )
        if not x.is_floating_point():
            raise ValueError("expected a floating-point batch, got {}".format(x.dtype))
        if x.shape[0] < 1:
            raise ValueError("expected a batch of N >= 1, got N = 0")
        return self.model(x.to(self.compute_dtype_)).float()

    @torch.jit.export
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB -> normalized float32 (N, 3, img_h, img_w)."""
        return self.image_transform(images)

    @torch.jit.export
    def forward_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB images of any size -> float32 logits, preprocessing included."""
        return self.forward(self.preprocess(images))

    @torch.jit.export
    def format_version(self) -> int:
        return self.format_version_

    @torch.jit.export
    def input_shape(self) -> List[int]:
        return [self.in_chans, self.img_h, self.img_w]

    @torch.jit.export
    def labels(self) -> List[str]:
        return self.label_list

    @torch.jit.export
    def compute_dtype(self) -> str:
        return self.dtype_name
