"""The shape of a UNet, and the templates it is made from. No torch here: configs
check architectures without importing it.

A template fixes the width and depth of a network: base channels, a channel
multiplier per level (each level after the first halves the side), residual
blocks per level, and the levels whose blocks add self-attention (level 0 is the
full resolution). Attention is given by level, not by pixel side, so a template
works at any resolution: the resolution comes from the data, and any side in
MIN_SIDE..MAX_SIDE that the template can halve `levels - 1` times is allowed.

`architecture(template, resolution, ...)` resolves a template (plus overrides)
into a `UNetConfig`: the complete, explicit shape. That is what checkpoints and
registered model cards record, so that every later user of the weights (sampling,
evaluation, a warm start) rebuilds exactly the trained network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

MIN_SIDE, MAX_SIDE = 8, 512
"""Image sides a network can be built for."""


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Shape of the network: everything needed to rebuild it."""

    resolution: int = 32
    """Side of the (square) images, in pixels."""
    in_channels: int = 3
    """Channels of the input images."""
    out_channels: int = 3
    """Channels of the output."""
    channels: int = 128
    """Channels at the first level; level l has channels * channel_mult[l]."""
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    """Channel multiplier per level; each level after the first halves the side."""
    blocks: int = 2
    """Residual blocks per level in the encoder (the decoder has one more)."""
    attention: tuple[int, ...] = (1,)
    """Levels whose blocks add self-attention (0: full resolution; level l works at
    resolution / 2^l). The bottleneck always has one attention block."""
    head_channels: int = 64
    """Channels per attention head."""
    dropout: float = 0.1
    """Dropout before each block's second convolution (training only)."""
    num_classes: int = 0
    """Classes for conditioning; 0 for an unconditional network."""
    label_dropout: float = 0.0
    """Training probability of replacing a label by "no label", which teaches the
    unconditional model that classifier-free guidance needs. The training step
    draws it per image (`train_step`); the network only records it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention", tuple(self.attention))
        levels = len(self.channel_mult)
        for name in ("in_channels", "out_channels", "channels", "blocks", "head_channels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if not levels or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult: must be positive integers, got {self.channel_mult}")
        if any(not 0 <= level < levels for level in self.attention):
            raise ValueError(
                f"attention: levels must lie in 0..{levels - 1} (one per channel_mult entry), "
                f"got {self.attention}"
            )
        if self.num_classes < 0:
            raise ValueError(f"num_classes: must be >= 0, got {self.num_classes}")
        for name in ("dropout", "label_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.channels % 2:
            raise ValueError(
                f"channels: must be even (the noise embedding is half cosines, half sines), "
                f"got {self.channels}"
            )
        normed, attended = feature_widths(self)
        for width in sorted(normed):
            if norm_groups(width) < 1 or width % norm_groups(width):
                raise ValueError(
                    f"channels: every feature map must split into GroupNorm's groups "
                    f"(multiples of 4 channels below 128 do, of 32 from 128 on), but one has "
                    f"{width} (channels x channel_mult, or two of them joined by a skip "
                    f"connection), got {self.channels}"
                )
        for width in sorted(attended):
            if width % attention_heads(width, self.head_channels):
                raise ValueError(
                    f"head_channels: the {width} channels of an attention layer do not split "
                    f"into {attention_heads(width, self.head_channels)} equal heads, "
                    f"got {self.head_channels}"
                )
        if not takes(self.channel_mult, self.resolution):
            raise ResolutionError(self.channel_mult, self.resolution)

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def side(self, level: int) -> int:
        """Side of the feature maps at `level`."""
        return self.resolution // 2**level

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (tuples become lists)."""
        plain = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in plain.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UNetConfig:
        """The config recorded by `to_dict`; unknown or missing keys are errors
        that name them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data))
        if unknown or missing:
            raise ValueError(
                f"not a complete UNet architecture: unknown {unknown or 'none'}, "
                f"missing {missing or 'none'}"
            )
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**values)

    def differences(self, other: UNetConfig, ignore: tuple[str, ...] = ()) -> list[str]:
        """`field (mine vs other's)` for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{k} ({mine[k]} vs {theirs[k]})"
            for k in mine
            if k not in ignore and mine[k] != theirs[k]
        ]


def norm_groups(channels: int) -> int:
    """GroupNorm's groups over `channels` feature maps: 32, fewer when narrow."""
    return min(32, channels // 4)


def attention_heads(channels: int, head_channels: int) -> int:
    """Heads of an attention layer over `channels`: about `head_channels` each."""
    return max(1, channels // head_channels)


def feature_widths(cfg: UNetConfig) -> tuple[set[int], set[int]]:
    """(the channel counts that the UNet's GroupNorms see, those its attention layers
    see): the channel bookkeeping of `unet.UNet.__init__`, without building it."""
    normed: set[int] = set()
    attended: set[int] = set()
    skips, ch = [cfg.channels], cfg.channels
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.blocks):
            normed |= {ch, cfg.channels * mult}
            ch = cfg.channels * mult
            attended |= {ch} if level in cfg.attention else set()
            skips.append(ch)
        if level < len(cfg.channel_mult) - 1:
            skips.append(ch)
    attended.add(ch)  # the bottleneck
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for _ in range(cfg.blocks + 1):
            normed |= {ch + skips.pop(), cfg.channels * mult}
            ch = cfg.channels * mult
            attended |= {ch} if level in cfg.attention else set()
    return normed | attended | {ch}, attended


def takes(channel_mult: tuple[int, ...], resolution: int) -> bool:
    """Whether a network with these levels can be built for images of `resolution` px."""
    step = 2 ** (len(channel_mult) - 1)
    return MIN_SIDE <= resolution <= MAX_SIDE and resolution % step == 0


class ResolutionError(ValueError):
    """A network with these levels cannot take images of this side."""

    def __init__(self, channel_mult: tuple[int, ...], resolution: int):
        levels = len(channel_mult)
        step = 2 ** (levels - 1)
        times = {0: "never", 1: "once", 2: "twice"}.get(levels - 1, f"{levels - 1} times")
        self.allowed = (
            f"{max(MIN_SIDE, step)} to {MAX_SIDE} px and a multiple of {step} (channel_mult "
            f"{','.join(map(str, channel_mult))} halves the side {times})"
        )
        super().__init__(f"resolution: must be {self.allowed}, got {resolution}")


# --- templates ----------------------------------------------------------------------


def tiny() -> dict[str, Any]:
    """Two levels, 24 and 48 channels: well under 1M parameters. CPU tests and the
    digits quickstart (0.43M at 8x8, attention at 4x4)."""
    return dict(
        channels=24, channel_mult=(1, 2), blocks=1, attention=(1,), head_channels=48, dropout=0.0
    )


def small() -> dict[str, Any]:
    """DDPM's CIFAR-10 layout (Ho et al. 2020): 35.7M-38M parameters, attention at
    half the side (16x16 at 32x32)."""
    return dict(channels=128, channel_mult=(1, 2, 2, 2), blocks=2, attention=(1,), dropout=0.1)


def base() -> dict[str, Any]:
    """EDM's DDPM++ CIFAR-10 layout: three levels of 256 channels, four blocks each,
    ~56M parameters, attention at half the side."""
    return dict(channels=128, channel_mult=(2, 2, 2), blocks=4, attention=(1,), dropout=0.13)


def base64() -> dict[str, Any]:
    """EDM's DDPM++ layout for FFHQ/AFHQ 64x64: four levels, four blocks each,
    ~62M parameters, attention at a quarter of the side (16x16 at 64x64)."""
    return dict(channels=128, channel_mult=(1, 2, 2, 2), blocks=4, attention=(2,), dropout=0.05)


TEMPLATES = {"tiny": tiny, "small": small, "base": base, "base64": base64}
"""Architecture templates by name; each gives the UNetConfig fields it fixes."""

NATIVE_RESOLUTION = {"tiny": 8, "small": 32, "base": 32, "base64": 64}
"""The resolution each template was designed for (its default when none is given)."""

OVERRIDABLE = ("channels", "channel_mult", "blocks", "attention", "head_channels", "dropout")
"""Fields of a template that a config may override."""


def architecture(template: str, resolution: int | None = None, **overrides: Any) -> UNetConfig:
    """The complete shape: `template`'s fields, then `overrides` (any UNetConfig
    field, e.g. num_classes or channels), at `resolution` (default: the template's
    own). Raises ValueError naming the template and what is allowed."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; templates: {', '.join(TEMPLATES)}")
    fields = {**TEMPLATES[template](), **overrides}
    fields["resolution"] = NATIVE_RESOLUTION[template] if resolution is None else resolution
    try:
        return UNetConfig(**fields)
    except ResolutionError:
        raise
    except (ValueError, TypeError) as e:  # TypeError: a misspelled override
        raise ValueError(f"template {template}: {e}") from None
