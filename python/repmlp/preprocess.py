"""The image preprocessing baked into every artifact, as a scriptable module.

Training code (examples/digits), the artifact's ``forward_images`` and therefore the C++
runtime all run this one implementation.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .utils import is_exporting
from .variants import Preprocessing

__all__ = ["LUMA", "ImageTransform"]

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601: RGB -> grey for one-channel models


class ImageTransform(nn.Module):
    """uint8 (N, H, W, 3) RGB images of any size -> normalized float32 (N, C, crop_h, crop_w).

    Resize (short side, torchvision's rule, or exact), center crop, ``(x - mean) / std`` on
    0..255 values. Values are not re-quantized to uint8 after resizing. For a model of one
    input channel (``channels=1``), the crop's luma (ITU-R BT.601 weights) is normalized with
    the first mean and std.
    """

    gray: torch.jit.Final[bool]

    short_side: torch.jit.Final[bool]
    resize_h: torch.jit.Final[int]
    resize_w: torch.jit.Final[int]
    crop_h: torch.jit.Final[int]
    crop_w: torch.jit.Final[int]
    interpolation: torch.jit.Final[str]
    antialias: torch.jit.Final[bool]

    def __init__(self, config: Preprocessing, channels: int = 3) -> None:
        super().__init__()
        config.validate()
        if channels not in (1, 3):
            raise ValueError(f"images are RGB: a model of {channels} input channels cannot take them (1 or 3)")
        self.gray = channels == 1
        self.short_side = config.resize_mode == "short_side"
        self.resize_h, self.resize_w = config.resize
        self.crop_h, self.crop_w = config.crop
        self.interpolation = config.interpolation
        self.antialias = config.antialias
        self.register_buffer("mean", torch.tensor(config.mean[:channels], dtype=torch.float32).reshape(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(config.std[:channels], dtype=torch.float32).reshape(1, channels, 1, 1))
        self.register_buffer("luma", torch.tensor(LUMA, dtype=torch.float32).reshape(1, 3, 1, 1))

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
        # Integer arithmetic throughout, with no branch on H or W when exported, so torch.export
        # can trace it with symbolic image sizes (the AOTInductor package, docs/FORMATS.md).
        # The values are torchvision's: int(size * long / short) equals size * long // short
        # for any image below 2**40 pixels a side, and (d + (d // 2) % 2) // 2 is round(d / 2)
        # (half to even, as Python's round()) for every d >= 0.
        exporting = is_exporting()
        if self.short_side:
            short = _min_size(h, w)
            new_h = self.resize_h * h // short
            new_w = self.resize_h * w // short
        else:
            new_h = self.resize_h
            new_w = self.resize_w
        # A resize to the same size is the identity (every mode samples each pixel's own
        # centre with weight 1); skipped except in an export, where the sizes are unknown.
        if exporting or new_h != h or new_w != w:
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
        dh = new_h - self.crop_h
        dw = new_w - self.crop_w
        top = (dh + (dh // 2) % 2) // 2
        left = (dw + (dw // 2) % 2) // 2
        x = x[:, :, top : top + self.crop_h, left : left + self.crop_w]
        if self.gray:
            x = (x * self.luma).sum(1, keepdim=True)
        # Contiguous NCHW, the layout forward is fastest in: kept in the channels-last layout the
        # image arrives in, B224's fc3 fell back to one GEMM per shareset and a conv weight was
        # re-laid out on every call (10% slower at batch 1, 2 threads; benchmarks/RESULTS.md).
        return ((x - self.mean) / self.std).contiguous()


def _min_size(a: int, b: int) -> int:
    """min(a, b); with torch.export's symbolic sizes, without a guard on which is smaller."""
    if torch.jit.is_scripting():
        return min(a, b)
    else:
        return torch.sym_min(a, b)
