"""RepMLPNet in plain PyTorch, scriptable, with exact and idempotent re-parameterization.

Paper: RepMLPNet: Hierarchical Vision MLP with Re-parameterized Locality
(Ding et al., CVPR 2022, https://arxiv.org/abs/2112.11081).

Two deploy steps, both methods on the blocks and both safe to call twice:

* ``RepMLPBlock.reparameterize()`` is the paper's *locality injection*: fc3's BN and the local
  conv branches fold into fc3, which gains a bias. The result has exactly the structure (and the
  state-dict keys) of the upstream deploy form; :func:`reparameterize_model` applies it.
* ``fuse_batchnorms()`` on the other modules folds every remaining foldable BN into the conv
  that precedes or follows it (patch embedding, downsampling, the FFN convs and the pre-FFN BN).
  :func:`fuse_model` applies both steps; the artifact builder uses it.

fc3 is evaluated as a (batched) matrix multiplication over sharesets in both forms, instead of
the upstream grouped 1x1 convolution on a 1x1 map, which is several times slower on CPU.
"""


import copy
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .utils import is_exporting
from .variants import ArchConfig, get_variant

__all__ = [
    "resolve_config",
    "ConvBN",
    "GlobalPerceptron",
    "RepMLPBlock",
    "ConvFFN",
    "RepMLPNetUnit",
    "RepMLPNet",
    "check_out_indices",
    "create_model",
    "reparameterize_model",
    "fuse_model",
    "fold_bn",
]


@torch.no_grad()
def fold_bn(
    weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BN that follows a conv/fc into its (weight, bias).

    ``weight``'s dim 0 may be a multiple of the BN's channels (fc3: one BN channel per shareset
    covers ``h*w`` outputs). Computed in float64, returned in the weight's dtype and device.
    """
    out_dim = weight.shape[0]
    repeat = out_dim // bn.num_features
    if repeat * bn.num_features != out_dim:
        raise ValueError(f"cannot fold a BN of {bn.num_features} channels into {out_dim} outputs")
    scale, shift = _bn_affine(bn)
    scale, shift = scale.repeat_interleave(repeat), shift.repeat_interleave(repeat)
    w = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias.double() * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)


def _bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BN as y = x * scale + shift (float64)."""
    assert bn.running_mean is not None and bn.running_var is not None
    std = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - bn.running_mean.double() * scale


def _replace_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A copy of ``conv``'s geometry with the given weight and a bias."""
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=True,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)  # type: ignore[union-attr]
    return new


class ConvBN(nn.Module):
    """conv -> BN (-> ReLU); after :meth:`fuse_batchnorms` a single conv with bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        relu: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn: Optional[nn.BatchNorm2d] = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.relu(x)

    def fused_weight_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (weight, bias) of a single conv equivalent to conv + BN."""
        if self.bn is None:
            bias = self.conv.bias
            assert bias is not None
            return self.conv.weight.detach(), bias.detach()
        return fold_bn(self.conv.weight, self.conv.bias, self.bn)

    @torch.no_grad()
    def fuse_batchnorms(self) -> None:
        if self.bn is None:
            return
        weight, bias = self.fused_weight_bias()
        self.conv = _replace_conv(self.conv, weight, bias)
        self.bn = None


class GlobalPerceptron(nn.Module):
    """Channel gate: average pool -> fc -> ReLU -> fc -> sigmoid (hidden width C // ratio)."""

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        hidden = channels // ratio
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean((2, 3))
        # The 1x1 convs act on a 1x1 map: a linear layer is the same math, and faster.
        hidden = F.relu(F.linear(pooled, self.fc1.weight.flatten(1), self.fc1.bias))
        gate = torch.sigmoid(F.linear(hidden, self.fc2.weight.flatten(1), self.fc2.bias))
        return gate.unsqueeze(-1).unsqueeze(-1)


class RepMLPBlock(nn.Module):
    """Global perceptron x (partition perceptron + local perceptron).

    The partition is the whole ``partition_size`` map (every published RepMLPNet). Channels are
    grouped in rows of ``num_sharesets`` consecutive channels; channel ``c`` uses the
    ``(h*w x h*w)`` matrix of shareset ``c % num_sharesets``. Checkpoint names (``fc3``,
    ``fc3_bn``) follow upstream; the local branches live in ``local_convs`` (upstream:
    ``repconv{k}``), in the order of ``kernel_sizes``.
    """

    __jit_unused_properties__ = ["is_reparameterized"]
    partition_h: torch.jit.Final[int]
    partition_w: torch.jit.Final[int]
    num_sharesets: torch.jit.Final[int]
    fc3_panels: torch.jit.Final[int]

    def __init__(
        self,
        channels: int,
        partition_size: Tuple[int, int],
        num_sharesets: int = 1,
        reparam_conv_kernels: Optional[Sequence[int]] = (1, 3),
        gp_ratio: int = 4,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if channels % num_sharesets:
            raise ValueError(f"{channels} channels are not divisible by {num_sharesets} sharesets")
        self.channels = channels
        self.partition_h, self.partition_w = partition_size
        self.num_sharesets = num_sharesets
        self.kernel_sizes: List[int] = list(reparam_conv_kernels or [])
        area = self.partition_h * self.partition_w
        # With one shareset, fc3 is one (h*w x h*w) matrix: computed as W @ rows^T with W's
        # output rows cut into this many panels, one batched GEMM (see forward).
        self.fc3_panels = 2 if area % 2 == 0 else 1
        self.gp = GlobalPerceptron(channels, gp_ratio)
        self.fc3 = nn.Conv2d(
            num_sharesets * area, num_sharesets * area, 1, groups=num_sharesets, bias=deploy
        )
        self.fc3_bn: Optional[nn.BatchNorm2d] = None if deploy else nn.BatchNorm2d(num_sharesets)
        self.local_convs = nn.ModuleList()
        if not deploy:
            for k in self.kernel_sizes:
                self.local_convs.append(
                    ConvBN(num_sharesets, num_sharesets, k, padding=k // 2, groups=num_sharesets)
                )

    @property
    def is_reparameterized(self) -> bool:
        return self.fc3_bn is None and len(self.local_convs) == 0 and self.fc3.bias is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if h != self.partition_h or w != self.partition_w:
            raise ValueError(
                "RepMLPBlock expects {}x{} maps, got {}x{}".format(
                    self.partition_h, self.partition_w, h, w
                )
            )
        gate = self.gp(x)
        sets = self.num_sharesets
        area = h * w
        rows = x.reshape(-1, sets, area)
        weight = self.fc3.weight.reshape(sets, area, area)
        bias = self.fc3.bias
        if sets == 1:
            # out^T = W @ rows^T, with W's rows (the outputs) split into panels that run as one
            # batched GEMM: MKL then gives each thread its own panel instead of splitting the
            # few (N*C) rows, and no weight is copied or re-laid out (the panels are a view).
            # B224 stage 0 (96 x 3136 x 3136) on the 2-core AVX2 CPU: 16-22% faster at 2
            # threads, ~5% at 1 (`python -m benchmarks.gemm --shapes`, "wxtpan").
            panels = self.fc3_panels
            cols = rows.reshape(-1, area).t().expand(panels, area, -1)
            weight_panels = weight.reshape(panels, area // panels, area)
            if bias is not None:
                out_t = torch.baddbmm(bias.reshape(panels, area // panels, 1), weight_panels, cols)
            else:
                out_t = torch.bmm(weight_panels, cols)
            # (area, N*C) -> a transposed (N*C, area) view; the residual add that follows
            # writes the sum back in the input's contiguous layout.
            out = out_t.reshape(area, -1).t().reshape(-1, 1, area)
        else:
            # (sets, rows, area) @ (sets, area, area): one matmul per shareset.
            per_set = rows.transpose(0, 1)
            if bias is not None:
                out = torch.baddbmm(
                    bias.reshape(sets, 1, area), per_set, weight.transpose(1, 2)
                )
            else:
                out = torch.bmm(per_set, weight.transpose(1, 2))
            out = out.transpose(0, 1)
        if self.fc3_bn is not None:
            out = self.fc3_bn(out.reshape(-1, sets, h, w))
        if len(self.local_convs) > 0:
            conv_in = x.reshape(-1, sets, h, w)
            out = out.reshape(-1, sets, h, w)
            for branch in self.local_convs:
                out = out + branch(conv_in)
        return out.reshape(n, c, h, w) * gate

    @torch.no_grad()
    def equivalent_fc3(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of one fc3 equal to fc3 + fc3_bn + all local branches (float64)."""
        weight = self.fc3.weight.double()
        bias = None if self.fc3.bias is None else self.fc3.bias.double()
        if self.fc3_bn is not None:
            weight, bias = fold_bn(weight, bias, self.fc3_bn)
        sets, h, w = self.num_sharesets, self.partition_h, self.partition_w
        area = h * w
        if bias is None:
            bias = weight.new_zeros(sets * area)
        if len(self.local_convs) > 0:
            largest = max(self.kernel_sizes)
            kernel = weight.new_zeros(sets, 1, largest, largest)
            conv_bias = weight.new_zeros(sets)
            for k, branch in zip(self.kernel_sizes, self.local_convs):
                assert isinstance(branch, ConvBN)
                kw, kb = branch.fused_weight_bias()
                pad = (largest - k) // 2
                kernel += F.pad(kw.double(), [pad] * 4)
                conv_bias += kb.double()
            # Push an identity through the conv: sample i is the i-th basis vector in every
            # shareset, so output (i, g, o) is entry (o, i) of shareset g's matrix.
            basis = torch.eye(area, dtype=torch.float64, device=weight.device)
            basis = basis.reshape(area, 1, h, w).expand(area, sets, h, w)
            response = F.conv2d(basis, kernel, padding=largest // 2, groups=sets)
            local_weight = response.permute(1, 2, 3, 0).reshape(sets * area, area, 1, 1)
            weight = weight + local_weight
            bias = bias + conv_bias.repeat_interleave(area)
        return weight, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Locality injection: fold fc3_bn and the local branches into fc3. Idempotent."""
        if self.is_reparameterized:
            return
        dtype = self.fc3.weight.dtype
        weight, bias = self.equivalent_fc3()
        self.fc3 = _replace_conv(self.fc3, weight.to(dtype), bias.to(dtype))
        self.fc3_bn = None
        self.local_convs = nn.ModuleList()


class ConvFFN(nn.Module):
    """1x1 conv (C -> hidden) + BN -> GELU -> 1x1 conv (hidden -> C) + BN.

    Once both BNs are folded (:meth:`fuse_batchnorms`), the two 1x1 convs run as GEMMs on the
    pixels as rows of a (N*H*W, C) token matrix, ``chunk_rows`` rows at a time: each chunk's
    (rows x hidden) GELU input then stays in L2 instead of making a round trip through memory,
    and one GEMM covers the whole batch. On the 2-core AVX2 CPU the fused B224 forward got
    ~10% faster at batch 8 and stayed level at batch 1 (benchmarks/RESULTS.md). The result
    is an NHWC-strided view of an NCHW tensor; the residual add that follows (input first)
    writes the sum back in the input's layout.
    """

    chunk_rows: torch.jit.Final[int]

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.ffn_fc1 = ConvBN(channels, hidden_channels, 1)
        self.ffn_fc2 = ConvBN(hidden_channels, channels, 1)
        self.act = nn.GELU()
        self.chunk_rows = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ffn_fc1.bn is None and self.ffn_fc2.bn is None:
            return self._forward_fused(x)
        return self.ffn_fc2(self.act(self.ffn_fc1(x)))

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        b1, b2 = self.ffn_fc1.conv.bias, self.ffn_fc2.conv.bias
        assert b1 is not None and b2 is not None
        w1 = self.ffn_fc1.conv.weight.flatten(1).t()  # (C, hidden)
        w2 = self.ffn_fc2.conv.weight.flatten(1).t()  # (hidden, C)
        tokens = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # the one transposing copy
        if is_exporting():
            # torch.export with a dynamic batch: the row count is symbolic, so no Python loop
            # over it; one GEMM pair, whose memory AOTInductor plans itself.
            out = torch.addmm(b2, self.act(torch.addmm(b1, tokens, w1)), w2)
            return out.reshape(n, h, w, c).permute(0, 3, 1, 2)
        rows = tokens.shape[0]
        if rows <= self.chunk_rows:
            # One chunk. A test on the row count rather than a loop over it, so that an export
            # with a symbolic batch (repmlp.onnx) raises chunk_rows instead of fixing the batch.
            out = torch.addmm(b2, self.act(torch.addmm(b1, tokens, w1)), w2)
            return out.reshape(n, h, w, c).permute(0, 3, 1, 2)
        chunks: List[torch.Tensor] = []
        # max(rows, 1): an empty batch still makes one (empty) chunk, as the other forms do.
        for start in range(0, max(rows, 1), self.chunk_rows):
            hidden = self.act(torch.addmm(b1, tokens[start : start + self.chunk_rows], w1))
            chunks.append(torch.addmm(b2, hidden, w2))
        # cat, not addmm(out=...): out= breaks autograd and torch.export; it copies C, not 4C.
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2)

    @torch.no_grad()
    def fuse_batchnorms(self) -> None:
        self.ffn_fc1.fuse_batchnorms()
        self.ffn_fc2.fuse_batchnorms()


class RepMLPNetUnit(nn.Module):
    """``y = x + RepMLPBlock(BN1(x))``, then ``y + ConvFFN(BN2(y))``."""

    def __init__(
        self,
        channels: int,
        partition_size: Tuple[int, int],
        num_sharesets: int,
        reparam_conv_kernels: Optional[Sequence[int]],
        gp_ratio: int,
        ffn_expand: int,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.repmlp_block = RepMLPBlock(
            channels, partition_size, num_sharesets, reparam_conv_kernels, gp_ratio, deploy
        )
        self.ffn_block = ConvFFN(channels, channels * ffn_expand)
        self.prebn1 = nn.BatchNorm2d(channels)
        self.prebn2: Optional[nn.BatchNorm2d] = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.repmlp_block(self.prebn1(x))
        # x first: the sum takes x's (NCHW) layout even when the FFN returns an NHWC view.
        if self.prebn2 is not None:
            return x + self.ffn_block(self.prebn2(x))
        return x + self.ffn_block(x)

    @torch.no_grad()
    def fuse_batchnorms(self) -> None:
        """Fold the FFN's BNs, then BN2 into the first FFN conv (conv(a*x+b) = (W*a) x + W b)."""
        self.ffn_block.fuse_batchnorms()
        if self.prebn2 is None:
            return
        first = self.ffn_block.ffn_fc1.conv
        assert first.bias is not None
        scale, shift = _bn_affine(self.prebn2)
        w = first.weight.double()  # (hidden, C, 1, 1)
        new_w = w * scale.reshape(1, -1, 1, 1)
        new_b = first.bias.double() + w.flatten(1) @ shift
        self.ffn_block.ffn_fc1.conv = _replace_conv(
            first, new_w.to(first.weight.dtype), new_b.to(first.weight.dtype)
        )
        self.prebn2 = None


def check_out_indices(out_indices: Sequence[int], num_stages: int) -> None:
    """ValueError unless ``out_indices`` names distinct stages of the ``num_stages``, at least one."""
    if len(out_indices) == 0:
        raise ValueError("out_indices must name at least one stage")
    bad = [i for i in out_indices if not 0 <= i < num_stages]
    if bad:
        raise ValueError(f"out_indices {list(out_indices)} must lie in [0, {num_stages})")
    if len(set(out_indices)) != len(out_indices):
        raise ValueError(f"out_indices {list(out_indices)} repeat a stage")


class RepMLPNet(nn.Module):
    """RepMLPNet backbone + classifier (final BN -> global average pool -> linear).

    ``forward(x)`` returns logits, or the pooled embedding when ``num_classes == 0``;
    ``forward_features(x)`` is the unpooled last map and ``forward_head(map, pre_logits=True)``
    the pooled embedding, as in timm.
    ``forward_backbone(x)`` returns one map per entry of ``out_indices``, as mmcls's
    ``RepMLPNet.forward`` does: stage ``i`` before the last is taken after the downsampling
    layer that follows it (so it has the next stage's width and half the stage's resolution),
    the last stage is taken through the final norm (an identity when ``final_norm`` is off).
    ``pre_downsample=True`` takes every stage at its own resolution and width instead, before
    its downsampling (the maps a timm-style feature pyramid uses); it is never the default.
    """

    __jit_unused_properties__ = ["form"]
    out_indices: torch.jit.Final[List[int]]
    pre_downsample: torch.jit.Final[bool]
    img_h: torch.jit.Final[int]
    img_w: torch.jit.Final[int]
    in_chans: torch.jit.Final[int]

    def __init__(
        self,
        config: ArchConfig,
        *,
        deploy: bool = False,
        out_indices: Optional[Sequence[int]] = None,
        final_norm: bool = True,
        pre_downsample: bool = False,
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        num_stages = len(config.channels)
        out_indices = (num_stages - 1,) if out_indices is None else tuple(out_indices)
        check_out_indices(out_indices, num_stages)
        self.out_indices = list(out_indices)
        self.pre_downsample = pre_downsample
        self.final_norm = final_norm
        self.img_h, self.img_w = config.img_size
        self.in_chans = config.in_channels
        self.num_classes = config.num_classes
        ch = config.channels
        self.conv_embedding = ConvBN(
            config.in_channels, ch[0], config.patch_size, stride=config.patch_size, relu=True
        )
        self.stages = nn.ModuleList()
        self.embeds = nn.ModuleList()
        for i, part in enumerate(config.partition_sizes()):
            self.stages.append(
                nn.Sequential(
                    *[
                        RepMLPNetUnit(
                            ch[i],
                            part,
                            config.sharesets[i],
                            config.reparam_conv_kernels,
                            config.gp_ratio,
                            config.ffn_expand,
                            deploy,
                        )
                        for _ in range(config.depths[i])
                    ]
                )
            )
            if i < num_stages - 1:
                self.embeds.append(ConvBN(ch[i], ch[i + 1], 2, stride=2, relu=True))
        self.head_norm = nn.BatchNorm2d(ch[-1]) if final_norm else nn.Identity()
        self.head = nn.Linear(ch[-1], config.num_classes) if config.num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[2] != self.img_h or x.shape[3] != self.img_w:
            raise ValueError(
                "RepMLPNet expects (N, {}, {}, {}) input, got {}".format(
                    self.in_chans, self.img_h, self.img_w, list(x.shape)
                )
            )

    @torch.jit.export
    def forward_backbone(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The maps of the stages in ``out_indices``, in the order of stages (see the class)."""
        self._check_input(x)
        x = self.conv_embedding(x)
        outs: List[torch.Tensor] = []
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if self.pre_downsample and i < last and i in self.out_indices:
                outs.append(x)
            # TorchScript cannot index a ModuleList with a loop variable: find embeds[i].
            for j, embed in enumerate(self.embeds):
                if j == i:
                    x = embed(x)
            if i in self.out_indices and (i == last or not self.pre_downsample):
                outs.append(self.head_norm(x) if i == last else x)
        return outs

    def backbone_outputs(self) -> List[Tuple[str, Tuple[int, int, int], int]]:
        """(name, (C, H, W), stride) of each ``forward_backbone`` map, in its order.

        Names are ``stage{i}`` for out index ``i``; the stride is the input size over the map's.
        """
        cfg = self.config
        last = len(cfg.channels) - 1
        h, w = cfg.img_size
        specs = []
        for i in sorted(self.out_indices):
            level = i if i == last or self.pre_downsample else i + 1
            stride = cfg.patch_size * 2**level
            specs.append((f"stage{i}", (cfg.channels[level], h // stride, w // stride), stride))
        return specs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map through the final norm, unpooled: (N, C_last, H/32, W/32) for
        four stages (timm's meaning of the name)."""
        self._check_input(x)
        x = self.conv_embedding(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            for j, embed in enumerate(self.embeds):
                if j == i:
                    x = embed(x)
        return self.head_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling of :meth:`forward_features`' map, then the classifier;
        ``pre_logits`` stops before it: the (N, C_last) embedding."""
        pooled = x.mean((2, 3))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def fuse_batchnorms(self) -> None:
        """Fold every BN that sits next to a conv (all but BN1 and the final norm). Idempotent."""
        for module in self.modules():
            if isinstance(module, RepMLPNetUnit):
                module.fuse_batchnorms()
        self.conv_embedding.fuse_batchnorms()
        for embed in self.embeds:
            assert isinstance(embed, ConvBN)
            embed.fuse_batchnorms()

    @property
    def form(self) -> str:
        """'training', 'deploy' (locality injected) or 'fused' (every foldable BN folded too)."""
        blocks = [m for m in self.modules() if isinstance(m, RepMLPBlock)]
        if not all(b.is_reparameterized for b in blocks):
            return "training"
        if self.conv_embedding.bn is None:
            return "fused"
        return "deploy"


def resolve_config(
    arch: Any = "B224", *, img_size: Any = None, num_classes: Optional[int] = None, **overrides: Any
) -> ArchConfig:
    """The validated :class:`ArchConfig` that :func:`create_model` builds (same arguments)."""
    changes = dict(overrides)
    if "sharesets_nums" in changes:  # mmcls's name
        changes["sharesets"] = changes.pop("sharesets_nums")
    if arch is None:  # a custom arch given entirely as keyword arguments
        structure = ("channels", "depths", "sharesets")
        arch = {k: changes.pop(k) for k in structure if k in changes}
    cfg = get_variant(arch)
    if img_size is not None:
        cfg = cfg.with_img_size(img_size)
    if num_classes is not None:
        changes["num_classes"] = num_classes
        if cfg.labels is not None and len(cfg.labels) != num_classes and "labels" not in changes:
            changes["labels"] = None
    if changes:
        cfg = cfg.with_changes(changes)
    return cfg


def create_model(
    arch: Any = "B224",
    *,
    img_size: Any = None,
    num_classes: Optional[int] = None,
    deploy: bool = False,
    out_indices: Optional[Sequence[int]] = None,
    final_norm: bool = True,
    pre_downsample: bool = False,
    **overrides: Any,
) -> RepMLPNet:
    """Build a RepMLPNet.

    Args:
        arch: a variant name (``T224``, ``T256``, ``B224``, ``B256``, ``D256``, ``L256``,
            ``digits``, or mmcls's ``b``/``base``; case-insensitive), an :class:`ArchConfig`,
            or a dict with ``channels``, ``depths`` and ``sharesets_nums`` (or ``sharesets``);
            ``None`` takes those three from the keyword arguments.
        img_size: input size, int or (H, W), each divisible by 32; defaults to the variant's.
        num_classes: classifier width (0: the model returns pooled features); defaults to the
            variant's (1000 for ImageNet variants).
        deploy: build the locality-injected structure directly (to load deploy checkpoints).
        out_indices: stages returned by ``forward_backbone`` (mmcls's meaning: a stage before
            the last is taken after its downsampling layer); default the last stage.
        final_norm: keep the BN before pooling (mmcls's ``final_norm``).
        pre_downsample: ``forward_backbone`` takes each stage before its downsampling instead
            (each stage's own width and resolution); off by default, as in mmcls.
        **overrides: any other :class:`ArchConfig` field (``reparam_conv_kernels``,
            ``gp_ratio``, ``labels``, ...).
    """
    cfg = resolve_config(arch, img_size=img_size, num_classes=num_classes, **overrides)
    return RepMLPNet(
        cfg, deploy=deploy, out_indices=out_indices, final_norm=final_norm, pre_downsample=pre_downsample
    )


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Locality injection on every block: the upstream deploy form, in eval mode.

    Works on a copy unless ``inplace``; a no-op on a model already in deploy form.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    for module in model.modules():
        if isinstance(module, RepMLPBlock):
            module.reparameterize()
    return model


def fuse_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The fastest deploy form: locality injection plus every foldable BN folded, eval mode."""
    model = reparameterize_model(model, inplace=inplace)
    for module in model.modules():
        if isinstance(module, RepMLPNet):
            module.fuse_batchnorms()
    return model
