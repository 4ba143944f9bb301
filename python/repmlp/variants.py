"""The RepMLPNet variant table and preprocessing defaults: the one place these facts live.

Everything else (the model factory, the artifact builder, the artifact's manifest and, through
the artifact, the C++ runtime) reads them from here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "PREPROCESSING_OPTIONS",
    "RESIZE_MODES",
    "ArchConfig",
    "Preprocessing",
    "VARIANTS",
    "ALIASES",
    "DEFAULT_ARCH",
    "list_variants",
    "canonical_name",
    "get_variant",
    "to_2tuple",
]

IMAGENET_MEAN: Tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: Tuple[float, float, float] = (58.395, 57.12, 57.375)
RESIZE_MODES = ("short_side", "exact")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def to_2tuple(value: Any, name: str = "value") -> Tuple[int, int]:
    """Turn an int or a pair of ints into an (H, W) tuple, rejecting anything else."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or (H, W), got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or (H, W), got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Preprocessing:
    """How a raw RGB uint8 image becomes the model input.

    ``resize_mode`` is ``"short_side"`` (scale so the short side equals ``resize[0]``, keeping
    the aspect ratio, torchvision rule) or ``"exact"`` (resize to ``resize`` = (H, W), aspect
    not kept). Then a center crop to ``crop`` (H, W), then ``(x - mean) / std`` on 0..255 values.
    """

    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    resize_mode: str = "short_side"
    resize: Tuple[int, int] = (224, 224)
    crop: Tuple[int, int] = (224, 224)
    interpolation: str = "bilinear"
    # On: both upstream evaluation pipelines resize PIL images (torchvision transforms in the
    # official repo, backend='pillow' in mmcls), and PIL filters when it downscales. Without it,
    # a 500x375 random-noise image resized to 256 differs from PIL's by 18 grey levels on
    # average (less on smooth photos); with it, by under one (PIL rounds to uint8).
    antialias: bool = True

    def validate(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if (
            len(self.mean) != 3
            or len(self.std) != 3
            or not all(math.isfinite(v) for v in (*self.mean, *self.std))
            or min(self.std) <= 0
        ):
            raise ValueError(f"mean and std need 3 finite values, std > 0; got {self.mean}, {self.std}")
        if min(self.resize) < 1 or min(self.crop) < 1:
            raise ValueError(f"resize and crop must be positive, got {self.resize}, {self.crop}")
        if self.resize_mode == "exact" and (
            self.crop[0] > self.resize[0] or self.crop[1] > self.resize[1]
        ):
            raise ValueError(f"crop {self.crop} is larger than the resize {self.resize}")
        if self.resize_mode == "short_side" and self.resize[0] != self.resize[1]:
            raise ValueError(
                f"short_side resizing takes one size (the short side), got {self.resize[0]}x{self.resize[1]}"
            )
        if self.resize_mode == "short_side" and self.resize[0] < max(self.crop):
            raise ValueError(f"short side {self.resize[0]} is smaller than the crop {self.crop}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def with_changes(self, changes: Mapping[str, Any]) -> "Preprocessing":
        """A validated copy with the given :data:`PREPROCESSING_OPTIONS` replaced (None: keep);
        lists become tuples and an int ``resize`` means (N, N). ValueError names bad values."""
        unknown = set(changes) - set(PREPROCESSING_OPTIONS)
        if unknown:
            raise ValueError(f"unknown preprocessing option(s) {sorted(unknown)}; valid: {sorted(PREPROCESSING_OPTIONS)}")
        values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in changes.items() if v is not None}
        if _is_int(values.get("resize")):
            values["resize"] = (values["resize"], values["resize"])
        new = replace(self, **values)
        new.validate()
        return new


# What a caller may change; the crop is always the model's input size.
PREPROCESSING_OPTIONS: Tuple[str, ...] = tuple(f for f in Preprocessing.__dataclass_fields__ if f != "crop")


def official_preprocessing(img_size: Tuple[int, int]) -> Preprocessing:
    """Official repo: short side resized to the input size, center crop (crop ratio 1.0).

    For a non-square input the short side goes to the larger of H and W, so any image covers
    the crop.
    """
    short = max(img_size)
    return Preprocessing(resize_mode="short_side", resize=(short, short), crop=img_size)


@dataclass(frozen=True)
class ArchConfig:
    """One RepMLPNet architecture (four stages in every published variant)."""

    channels: Tuple[int, ...]
    depths: Tuple[int, ...]
    sharesets: Tuple[int, ...]
    img_size: Tuple[int, int] = (224, 224)
    reparam_conv_kernels: Optional[Tuple[int, ...]] = (1, 3)
    gp_ratio: int = 4
    ffn_expand: int = 4
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 1000
    labels: Optional[Tuple[str, ...]] = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def validate(self) -> None:
        n = len(self.channels)
        if n < 1 or len(self.depths) != n or len(self.sharesets) != n:
            raise ValueError(
                "channels, depths and sharesets must have the same non-zero length, got "
                f"{len(self.channels)}, {len(self.depths)}, {len(self.sharesets)}"
            )
        for name, values in (
            ("channels", self.channels),
            ("depths", self.depths),
            ("sharesets", self.sharesets),
        ):
            if not all(_is_int(v) and v > 0 for v in values):
                raise ValueError(f"{name} must be positive ints, got {list(values)}")
        for name in ("gp_ratio", "ffn_expand", "patch_size", "in_channels"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not _is_int(self.num_classes) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        for i, (c, s) in enumerate(zip(self.channels, self.sharesets)):
            if c % s:
                raise ValueError(f"stage {i}: {c} channels are not divisible by {s} sharesets")
            if c // self.gp_ratio < 1:
                raise ValueError(f"stage {i}: {c} channels leave no GlobalPerceptron width at ratio {self.gp_ratio}")
        if self.reparam_conv_kernels is not None:
            ks = self.reparam_conv_kernels
            if not isinstance(ks, (tuple, list)) or len(ks) == 0 or not all(_is_int(k) and k > 0 and k % 2 == 1 for k in ks):
                raise ValueError(f"reparam_conv_kernels must be odd positive ints or None, got {ks}")
            if len(set(ks)) != len(ks):
                raise ValueError(f"reparam_conv_kernels has duplicates: {ks}")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels given for {self.num_classes} classes")
        h, w = self.img_size
        stride = self.input_stride
        if h < stride or w < stride or h % stride or w % stride:
            raise ValueError(
                f"input size must be divisible by {stride} (patch {self.patch_size} x "
                f"{2 ** (n - 1)} for {n} stages) and at least that big, got {h}x{w}"
            )
        self.preprocessing.validate()
        if tuple(self.preprocessing.crop) != tuple(self.img_size):
            raise ValueError(
                f"preprocessing crop {self.preprocessing.crop} must equal the input size {self.img_size}"
            )

    @property
    def input_stride(self) -> int:
        """What H and W must be multiples of: the patch, then a 2x downsampling per later stage."""
        return self.patch_size * 2 ** (len(self.channels) - 1)

    def class_labels(self) -> Tuple[str, ...]:
        """The labels, or the class indices as text when the variant names none."""
        return self.labels if self.labels is not None else tuple(str(i) for i in range(self.num_classes))

    def partition_sizes(self) -> Tuple[Tuple[int, int], ...]:
        """Every stage's partition is its whole feature map."""
        h, w = self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size
        return tuple((h >> i, w >> i) for i in range(len(self.channels)))

    def with_img_size(self, img_size: Any) -> "ArchConfig":
        """A copy at another input size; the preprocessing follows the same rule as before."""
        size = to_2tuple(img_size, "img_size")
        pre = self.preprocessing
        if pre.resize_mode == "short_side" and tuple(pre.resize) == (max(self.img_size),) * 2:
            pre = official_preprocessing(size)
        else:
            # Keep the resize/crop ratio of the original pipeline.
            rh = round(pre.resize[0] * size[0] / self.img_size[0])
            rw = round(pre.resize[1] * size[1] / self.img_size[1])
            pre = replace(pre, resize=(rh, rw) if pre.resize_mode == "exact" else (max(rh, rw),) * 2, crop=size)
        return replace(self, img_size=size, preprocessing=pre)

    def with_changes(self, changes: Mapping[str, Any]) -> "ArchConfig":
        """A validated copy with fields replaced; user values (lists, ints) are normalized."""
        changes = dict(changes)
        known = set(ArchConfig.__dataclass_fields__)
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; valid: {sorted(known)}")
        cfg = self.with_img_size(changes.pop("img_size")) if "img_size" in changes else self
        new = replace(cfg, **_normalize_fields(changes))
        new.validate()
        return new

    def architecture_dict(self) -> Dict[str, Any]:
        """The network's structure only: labels and preprocessing have their own places."""
        d = asdict(self)
        del d["labels"], d["preprocessing"]
        return d


def _official(channels, depths, sharesets, size: int) -> ArchConfig:
    img = (size, size)
    return ArchConfig(
        channels=channels,
        depths=depths,
        sharesets=sharesets,
        img_size=img,
        preprocessing=official_preprocessing(img),
    )


_T = ((64, 128, 256, 512), (2, 2, 6, 2), (1, 4, 16, 128))
_B = ((96, 192, 384, 768), (2, 2, 12, 2), (1, 4, 32, 128))

# The official table. B224 and B256 use the mmcls test pipelines (the model-zoo accuracies were
# measured with them); the others use the official repo's pipeline.
VARIANTS: Dict[str, ArchConfig] = {
    "T224": _official(*_T, 224),
    "T256": _official(*_T, 256),
    "B224": replace(
        _official(*_B, 224),
        preprocessing=Preprocessing(resize_mode="exact", resize=(256, 256), crop=(224, 224)),
    ),
    "B256": replace(
        _official(*_B, 256),
        preprocessing=Preprocessing(resize_mode="short_side", resize=(292, 292), crop=(256, 256)),
    ),
    "D256": _official((80, 160, 320, 640), (2, 2, 18, 2), (1, 4, 16, 128), 256),
    "L256": _official((96, 192, 384, 768), (2, 2, 18, 2), (1, 4, 32, 256), 256),
    # A small model trained on scikit-learn's 8x8 digits (examples/digits); the embedded default.
    "digits": ArchConfig(
        channels=(16, 32, 64, 128),
        depths=(1, 1, 2, 1),
        sharesets=(1, 2, 4, 8),
        img_size=(32, 32),
        num_classes=10,
        labels=tuple(str(i) for i in range(10)),
        preprocessing=Preprocessing(
            mean=(127.5, 127.5, 127.5),
            std=(127.5, 127.5, 127.5),
            resize_mode="exact",
            resize=(32, 32),
            crop=(32, 32),
            antialias=False,  # 8x8 digits are only ever upscaled; trained this way
        ),
    ),
}

# mmcls's own arch names ("b"/"base" is the only one its arch_zoo has).
ALIASES: Dict[str, str] = {"b": "B224", "base": "B224"}

DEFAULT_ARCH = "digits"


def list_variants() -> Tuple[str, ...]:
    return tuple(VARIANTS) + tuple(ALIASES)


def canonical_name(name: str) -> Optional[str]:
    """The variant table's spelling of a name (case-insensitive, mmcls aliases), None if unknown."""
    if name in VARIANTS:
        return name
    lowered = name.lower()
    if lowered in ALIASES:
        return ALIASES[lowered]
    for key in VARIANTS:
        if key.lower() == lowered:
            return key
    return None


def get_variant(arch: Any) -> ArchConfig:
    """Resolve a variant name (case-insensitive, mmcls aliases included) or a custom arch dict.

    A custom dict needs ``channels``, ``depths`` and ``sharesets_nums`` (mmcls) or ``sharesets``;
    any other :class:`ArchConfig` field may be given too.
    """
    if isinstance(arch, ArchConfig):
        cfg = arch
    elif isinstance(arch, str):
        name = canonical_name(arch)
        if name is None:
            raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(list_variants())} or a dict")
        cfg = VARIANTS[name]
    elif isinstance(arch, Mapping):
        fields = dict(arch)
        if "sharesets_nums" in fields:
            fields["sharesets"] = fields.pop("sharesets_nums")
        required = {"channels", "depths", "sharesets"}
        missing = required - set(fields)
        if missing:
            raise ValueError(
                f"custom arch needs keys channels, depths, sharesets_nums; missing {sorted(missing)}"
            )
        known = set(ArchConfig.__dataclass_fields__)
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"custom arch has unknown keys {sorted(unknown)}; valid: {sorted(known)}")
        cfg = _from_fields(fields)
    else:
        raise ValueError(f"arch must be a name or a dict, got {type(arch).__name__}")
    cfg.validate()
    return cfg


def _normalize_fields(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """Loose user values (lists, ints) as ArchConfig's types, for the keys present."""
    out = dict(fields)
    for key in ("channels", "depths", "sharesets", "reparam_conv_kernels"):
        if key not in out or (key == "reparam_conv_kernels" and out[key] is None):
            continue  # absent, or no local conv branches
        if not isinstance(out[key], (list, tuple)):
            raise ValueError(f"{key} must be a list of ints, got {out[key]!r}")
        out[key] = tuple(out[key])
    if out.get("labels") is not None:
        out["labels"] = tuple(str(x) for x in out["labels"])
    return out


def _from_fields(fields: Dict[str, Any]) -> ArchConfig:
    """Build an ArchConfig from loose user values (lists, ints), normalizing types."""
    out = _normalize_fields(fields)
    img = to_2tuple(out.get("img_size", 224), "img_size")
    out["img_size"] = img
    pre = out.get("preprocessing")
    if pre is None:
        out["preprocessing"] = official_preprocessing(img)
    elif isinstance(pre, Mapping):
        p = dict(pre)
        for key in ("mean", "std", "resize", "crop"):
            if key in p:
                p[key] = tuple(p[key])
        out["preprocessing"] = Preprocessing(**p)
    return ArchConfig(**out)
