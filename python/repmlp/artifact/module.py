"""The module that gets scripted: the fused model plus its input contract and preprocessing.

Its exported methods are the artifact's interface (docs/ARTIFACT.md): what the C++ runtime
reads about the artifact comes from these methods, not from a second copy of the facts.

Three output kinds (:class:`~.contract.OutputSpec`): ``logits`` (the classifier), ``embedding`` (final
norm then global average pooling: the classifier's input) and ``features`` (the backbone's
maps at ``out_indices``, as mmcls's RepMLPNet returns them, docs/BACKBONE.md). The first two
return one tensor; ``features`` returns a list of tensors, named by ``output_names()``.
"""

from typing import Any, Dict, List

import torch
from torch import nn

from ..model import RepMLPNet
from ..preprocess import ImageTransform
from .contract import ARTIFACT_FORMAT_VERSION, DTYPES

__all__ = ["ArtifactModule", "FeaturesArtifactModule", "artifact_module", "describe_outputs"]


def describe_outputs(model: RepMLPNet, kind: str) -> List[Dict[str, Any]]:
    """Every output of an artifact of this kind, in order: name, per-sample shape, dtype
    (and, for feature maps, layout and stride)."""
    cfg = model.config
    if kind == "logits":
        return [{"name": "logits", "shape": [cfg.num_classes], "dtype": "float32"}]
    if kind == "embedding":
        return [{"name": "embedding", "shape": [cfg.channels[-1]], "dtype": "float32"}]
    return [
        {"name": name, "shape": list(shape), "dtype": "float32", "layout": "NCHW", "stride": stride}
        for name, shape, stride in model.backbone_outputs()
    ]


class ArtifactModule(nn.Module):
    """The fused model, its input checks, its preprocessing and what it says about itself.

    ``forward`` returns the model's output: logits, or the embedding when the model has no
    classifier (``num_classes == 0``)."""

    # The input size and channels are the model's own constants (RepMLPNet.in_chans, img_h, img_w).
    format_version_: torch.jit.Final[int]
    dtype_name: torch.jit.Final[str]
    kind: torch.jit.Final[str]
    # Declared here: TorchScript cannot infer the element type of an empty list.
    label_list: List[str]
    output_name_list: List[str]

    def __init__(self, model: RepMLPNet, dtype_name: str = "float32", kind: str = "logits") -> None:
        super().__init__()
        cfg = model.config
        self.model = model
        self.format_version_ = ARTIFACT_FORMAT_VERSION
        self.dtype_name = dtype_name
        self.kind = kind
        # Only logits have classes to name.
        self.label_list = list(cfg.class_labels()) if kind == "logits" else []
        self.output_name_list = [o["name"] for o in describe_outputs(model, kind)]
        self.image_transform = ImageTransform(cfg.preprocessing, cfg.in_channels)
        self.compute_dtype_ = DTYPES[dtype_name]

    def checked(self, x: torch.Tensor) -> torch.Tensor:
        """A valid normalized batch, in the compute dtype (ValueError otherwise)."""
        c, h, w = self.model.in_chans, self.model.img_h, self.model.img_w
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] != h or x.shape[3] != w:
            raise ValueError("expected a (N, {}, {}, {}) batch, got {}".format(c, h, w, list(x.shape)))
        if not x.is_floating_point():
            raise ValueError("expected a floating-point batch, got {}".format(x.dtype))
        if x.shape[0] < 1:
            raise ValueError("expected a batch of N >= 1, got N = 0")
        return x.to(self.compute_dtype_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float (N, C, H, W) -> float32 logits (N, num_classes) or embedding (N, C)."""
        return self.model(self.checked(x)).float()

    @torch.jit.export
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB -> normalized float32 (N, 3, img_h, img_w)."""
        return self.image_transform(images)

    @torch.jit.export
    def forward_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB images of any size -> forward's output, preprocessing included."""
        return self.forward(self.preprocess(images))

    @torch.jit.export
    def format_version(self) -> int:
        return self.format_version_

    @torch.jit.export
    def input_shape(self) -> List[int]:
        return [self.model.in_chans, self.model.img_h, self.model.img_w]

    @torch.jit.export
    def labels(self) -> List[str]:
        return self.label_list

    @torch.jit.export
    def compute_dtype(self) -> str:
        return self.dtype_name

    @torch.jit.export
    def output_kind(self) -> str:
        """``logits``, ``features`` or ``embedding``."""
        return self.kind

    @torch.jit.export
    def output_names(self) -> List[str]:
        """The names of forward's outputs, in order (one name for a single tensor)."""
        return self.output_name_list


class FeaturesArtifactModule(ArtifactModule):
    """``forward`` returns the backbone's maps (float32 NCHW each), named by output_names()."""

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:  # type: ignore[override]
        return [out.float() for out in self.model.forward_backbone(self.checked(x))]

    @torch.jit.export
    def forward_images(self, images: torch.Tensor) -> List[torch.Tensor]:  # type: ignore[override]
        return self.forward(self.preprocess(images))


def artifact_module(model: RepMLPNet, dtype_name: str, kind: str) -> ArtifactModule:
    """The wrapper for an output kind (the model built with that kind's arguments)."""
    if kind == "features":
        return FeaturesArtifactModule(model, dtype_name, kind)
    if (kind == "logits") != (model.config.num_classes > 0):
        raise ValueError(f"a {kind} artifact needs a model {'with' if kind == 'logits' else 'without'} a classifier")
    return ArtifactModule(model, dtype_name, kind)
