"""The image preprocessing baked into every artifact, as a scriptable module.

Training code (examples/digits), the artifact's ``forward_images`` and therefore the C++
runtime all run this one implementation.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .variants import Preprocessing

__all__ = ["ImageTransform"]


class ImageTransform(nn.Module):
    """uint8 (N, H, W, 3) RGB images of any size -> normalized float32 (N, 3, crop_h, crop_w).

    Resize (short side, torchvision's rule, or exact), center crop, ``(x - mean) / std`` on
    0..255 values. Values are not re-quantized to uint8 after resizing.
    """

    short_side: torch.jit.Final[bool]
    resize_h: torch.jit.Final[int]
    resize_w: torch.jit.Final[int]
    crop_h: torch.jit.Final[int]
    crop_w: torch.jit.Final[int]
    interpolation: torch.jit.Final[str]
    antialias: torch.jit.Final[bool]

    def __init__(self, config: Preprocessing) -> None:
        super().__init__()
        config.validate()
        self.short_side = config.resize_mode == "short_side"
        self.resize_h, self.resize_w = config.resize
        self.crop_h, self.crop_w = config.crop
        self.interpolation = config.interpolation
        self.antialias = config.antialias
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).reshape(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[3] != 3 or images.dtype != torch.uint8:
            raise ValueError(
                "expected uint8 images (N, H, W, 3), got {} {}".format(images.dtype, list(images.shape))
            )
        if images.shape[0] < 1 or images.shape[1] < 1 or images.shape[2] < 1:
            raise ValueError("expected non-empty images, got {}".format(list(images.shape)))
        x = images.permute(0, 3, 1, 2).float()
        h = x.shape[2]
        w = x.shape[3]
        if self.short_side:
            # torchvision's rule: the short side becomes the size, the long side is truncated.
            if h <= w:
                new_h = self.resize_h
                new_w = int(self.resize_h * w / h)
            else:
                new_w = self.resize_h
                new_h = int(self.resize_h * h / w)
        else:
            new_h = self.resize_h
            new_w = self.resize_w
        if new_h != h or new_w != w:
            if self.interpolation == "nearest":
                x = F.interpolate(x, size=[new_h, new_w], mode="nearest")
            else:
                x = F.interpolate(
                    x,
                    size=[new_h, new_w],
                    mode=self.interpolation,
                    align_corners=False,
                    antialias=self.antialias,
                )
        top = int(round((new_h - self.crop_h) / 2.0))
        left = int(round((new_w - self.crop_w) / 2.0))
        x = x[:, :, top : top + self.crop_h, left : left + self.crop_w]
        return (x - self.mean) / self.std
