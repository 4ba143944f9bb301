"""The upstream deploy formulation of RepMLPNet, for benchmark comparison (the "upstream" rows).

This re-states the *computation* of the official / mmcls deploy model (after locality
injection, before any further folding) in plain PyTorch:

* every BN stays a separate op (patch embedding, downsampling, BN1, BN2, both FFN convs,
  final norm) -- upstream folds none of them;
* the GlobalPerceptron runs as two 1x1 convolutions on the pooled 1x1 map;
* the partition perceptron reshapes the map into partitions (a 6-d permute), flattens
  ``num_sharesets`` consecutive channels into one ``(S*h*w, 1, 1)`` vector and runs fc3 as a
  grouped 1x1 convolution with S groups, then permutes back.

It is not meant for deployment and is not scriptable (neither is upstream). Its state-dict keys
are the official deploy-form keys, which are exactly those of the project's model after
:func:`repmlp.model.reparameterize_model`, so ``load_state_dict(strict=True)`` from that model
works and the two can be checked for equal outputs.
"""

from typing import Sequence, Tuple

import torch
from torch import nn


class ConvBN(nn.Module):
    """conv (no bias) -> BN (-> ReLU), BN kept separate as upstream does."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, relu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, 0, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class GlobalPerceptron(nn.Module):
    """avg pool -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid, convs on a 1x1 map (upstream)."""

    def __init__(self, channels: int, ratio: int) -> None:
        super().__init__()
        self.channels = channels
        self.fc1 = nn.Conv2d(channels, channels // ratio, 1, bias=True)
        self.fc2 = nn.Conv2d(channels // ratio, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.sigmoid(self.fc2(x))
        return x.view(-1, self.channels, 1, 1)


class RepMLPBlock(nn.Module):
    """Deploy-form block: fc3 is a grouped 1x1 conv (with bias) on a 1x1 map."""

    def __init__(self, channels: int, h: int, w: int, sharesets: int, gp_ratio: int) -> None:
        super().__init__()
        self.channels, self.h, self.w, self.sharesets = channels, h, w, sharesets
        self.vec = sharesets * h * w
        self.gp = GlobalPerceptron(channels, gp_ratio)
        self.fc3 = nn.Conv2d(self.vec, self.vec, 1, 1, 0, bias=True, groups=sharesets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gp(x)
        shape = x.shape
        hp, wp = shape[2] // self.h, shape[3] // self.w
        # (N, C, H, W) -> (N, hp, wp, C, h, w): one partition per (hp, wp) cell
        parts = x.reshape(-1, self.channels, hp, self.h, wp, self.w).permute(0, 2, 4, 1, 3, 5)
        out = self.fc3(parts.reshape(-1, self.vec, 1, 1))
        out = out.reshape(-1, hp, wp, self.sharesets, self.h, self.w)  # fc3_bn is Identity
        out = out.permute(0, 3, 1, 4, 2, 5)
        return out.reshape(shape) * gate


class ConvFFN(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.ffn_fc1 = ConvBN(channels, hidden, 1)
        self.ffn_fc2 = ConvBN(hidden, channels, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_fc2(self.act(self.ffn_fc1(x)))


class Unit(nn.Module):
    def __init__(self, channels: int, h: int, w: int, sharesets: int, gp_ratio: int, expand: int) -> None:
        super().__init__()
        self.repmlp_block = RepMLPBlock(channels, h, w, sharesets, gp_ratio)
        self.ffn_block = ConvFFN(channels, channels * expand)
        self.prebn1 = nn.BatchNorm2d(channels)
        self.prebn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.repmlp_block(self.prebn1(x))
        return y + self.ffn_block(self.prebn2(y))


class UpstreamRepMLPNet(nn.Module):
    """Upstream deploy-form RepMLPNet classifier (official key names)."""

    def __init__(
        self,
        channels: Sequence[int],
        depths: Sequence[int],
        sharesets: Sequence[int],
        img_size: Tuple[int, int] = (224, 224),
        in_channels: int = 3,
        patch: int = 4,
        gp_ratio: int = 4,
        ffn_expand: int = 4,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.conv_embedding = ConvBN(in_channels, channels[0], patch, patch, relu=True)
        h, w = img_size[0] // patch, img_size[1] // patch
        self.stages = nn.ModuleList()
        self.embeds = nn.ModuleList()
        for i, c in enumerate(channels):
            sh, sw = h >> i, w >> i
            self.stages.append(
                nn.Sequential(*[Unit(c, sh, sw, sharesets[i], gp_ratio, ffn_expand) for _ in range(depths[i])])
            )
            if i < len(channels) - 1:
                self.embeds.append(ConvBN(c, channels[i + 1], 2, 2, relu=True))
        self.head_norm = nn.BatchNorm2d(channels[-1])
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_embedding(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.embeds):
                x = self.embeds[i](x)
        x = nn.functional.adaptive_avg_pool2d(self.head_norm(x), 1).flatten(1)
        return self.head(x)


def from_project_model(model: nn.Module) -> UpstreamRepMLPNet:
    """An upstream deploy model with the weights of a project model (any form but fused).

    The project model is locality-injected on a copy (``reparameterize_model``), whose
    state dict has exactly the official deploy keys; it is loaded strictly.
    """
    from repmlp.model import reparameterize_model

    cfg = model.config  # type: ignore[attr-defined]
    deploy = reparameterize_model(model)
    ref = UpstreamRepMLPNet(
        cfg.channels, cfg.depths, cfg.sharesets, tuple(cfg.img_size), cfg.in_channels,
        cfg.patch_size, cfg.gp_ratio, cfg.ffn_expand, cfg.num_classes,
    )
    ref.load_state_dict(deploy.state_dict(), strict=True)
    return ref.eval()
