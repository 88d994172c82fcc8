"""The network's config: a template, and overrides of its width and depth."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from pipeline.config.core import Checked, ConfigError, show
from pipeline.maths.architecture import (
    MAX_SIDE,
    MIN_SIDE,
    OVERRIDABLE,
    TEMPLATES,
    ResolutionError,
    UNetConfig,
    architecture,
)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Checked):
    """The UNet: a template (its width and depth), overrides of them. The resolution
    comes from the data, the classes from its labels."""

    SECTION: ClassVar[str] = "model"

    template: str = "tiny"
    """Architecture template: tiny (0.43M parameters at 8x8; CPU), small (DDPM's
    CIFAR-10 layout, ~38M), base (EDM's DDPM++, ~57M) or base64 (EDM's 64x64
    layout, ~63M). The fields below override its choices."""
    channels: int | None = None
    """Channels at the first level; default: the template's (tiny 24, others 128)."""
    channel_mult: tuple[int, ...] | None = None
    """Channel multiplier per level, e.g. 1,2,2; each level after the first halves
    the side, so the image side must divide by 2^(levels-1). Default: the template's."""
    blocks: int | None = None
    """Residual blocks per level; default: the template's."""
    attention: tuple[int, ...] | None = None
    """Levels with self-attention (0: full resolution, 1: half the side...), e.g.
    1,2; empty for none besides the bottleneck's. Default: the template's. Its cost
    grows with the square of a level's pixels: for large images, use deeper levels
    (and more of them, in channel_mult)."""
    head_channels: int | None = None
    """Channels per attention head; default: the template's."""
    dropout: float | None = None
    """Dropout in the residual blocks while training; default: the template's."""

    def __post_init__(self) -> None:
        self.check(self.template in TEMPLATES, "template", f"must be one of {', '.join(TEMPLATES)}")
        for name in ("channels", "blocks", "head_channels"):
            value = getattr(self, name)
            self.check(value is None or value > 0, name, "must be a positive integer")
        # Bounds far beyond EDM2's widest network (448 channels, 3 blocks, x4).
        self.at_most(4096, "channels", "head_channels")
        self.at_most(64, "blocks")
        self.check(
            self.channel_mult is None
            or (len(self.channel_mult) > 0 and min(self.channel_mult) > 0),
            "channel_mult",
            "must be positive integers, one per level",
        )
        self.at_most(64, "channel_mult")
        levels = len(self.channel_mult or TEMPLATES[self.template]()["channel_mult"])
        self.check(
            2 ** (levels - 1) <= MAX_SIDE,
            "channel_mult",
            f"must have at most {MAX_SIDE.bit_length()} levels (images are at most {MAX_SIDE} px)",
        )
        self.check(
            self.attention is None or all(a >= 0 for a in self.attention),
            "attention",
            "must be levels (integers >= 0)",
        )
        self.check(self.dropout is None or 0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        # The overrides must make a network at some resolution (the data's is
        # checked when it is known).
        try:
            architecture(self.template, max(MIN_SIDE, 2 ** (levels - 1)), **self.overrides())
        except ValueError as e:
            raise self._blame(e) from None

    def _blame(self, error: ValueError) -> ConfigError:
        """An error of the architecture, addressed to the field given here that
        caused it: the field itself, or the override that the template's own value
        of it does not fit (its attention levels, say, after fewer channel_mult)."""
        name, _, detail = str(error).removeprefix(f"template {self.template}: ").partition(": ")
        suspects = {
            "channels": ("channels", "channel_mult"),
            "head_channels": ("head_channels", "channels", "channel_mult"),
            "attention": ("attention", "channel_mult"),
        }.get(name, (name,))
        given = [f for f in suspects if getattr(self, f, None) is not None]
        if not given:
            return ConfigError(f"{self.SECTION}: {error}")
        if given[0] == name:
            return ConfigError(f"{self.SECTION}.{name}: {detail}")
        return ConfigError(
            f"{self.SECTION}.{given[0]}: {show(getattr(self, given[0]))} does not fit the "
            f"{self.template} template's {name}: {detail}"
        )

    def overrides(self) -> dict[str, Any]:
        """The fields given, by UNetConfig name."""
        return {k: getattr(self, k) for k in OVERRIDABLE if getattr(self, k) is not None}

    def resolve(
        self,
        resolution: int,
        num_classes: int = 0,
        label_dropout: float = 0.0,
        field: str = "model",
        source: str = "",
        image_channels: int = 3,
    ) -> UNetConfig:
        """The complete architecture for images of `resolution` px and
        `image_channels` channels (a latent dataset's latent channels); a
        ConfigError naming `field` (and the `source` of the resolution) and what is
        allowed when the network cannot take them."""
        try:
            return architecture(
                self.template,
                resolution,
                **self.overrides(),
                in_channels=image_channels,
                out_channels=image_channels,
                num_classes=num_classes,
                label_dropout=label_dropout if num_classes else 0.0,
            )
        except ResolutionError as e:
            raise ConfigError(
                f"{field}: the {self.template} template takes images of {e.allowed}, "
                f"got {source}{resolution}"
            ) from None
        except ValueError as e:
            raise ConfigError(f"{field}: {e}") from None
