"""Network presets, as functions: `small()` is a UNetConfig; override any field."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from pipeline.model.unet import UNet, UNetConfig


def tiny(**overrides) -> UNetConfig:
    """8x8 images, well under 1M parameters: CPU tests and the digits quickstart."""
    return _with(
        UNetConfig(
            resolution=8,
            channels=24,
            channel_mult=(1, 2),
            blocks=1,
            attention=(4,),
            head_channels=48,
            dropout=0.0,
        ),
        overrides,
    )


def small(**overrides) -> UNetConfig:
    """32x32, about the size of DDPM's CIFAR-10 network (~36M parameters)."""
    return _with(
        UNetConfig(
            resolution=32,
            channels=128,
            channel_mult=(1, 2, 2, 2),
            blocks=2,
            attention=(16,),
            dropout=0.1,
        ),
        overrides,
    )


def base(**overrides) -> UNetConfig:
    """32x32, the size of EDM's DDPM++ CIFAR-10 network (~56M parameters)."""
    return _with(
        UNetConfig(
            resolution=32,
            channels=128,
            channel_mult=(2, 2, 2),
            blocks=4,
            attention=(16,),
            dropout=0.13,
        ),
        overrides,
    )


def base64(**overrides) -> UNetConfig:
    """64x64, EDM's DDPM++ layout for FFHQ/AFHQ-64 (~62M parameters)."""
    return _with(
        UNetConfig(
            resolution=64,
            channels=128,
            channel_mult=(1, 2, 2, 2),
            blocks=4,
            attention=(16,),
            dropout=0.05,
        ),
        overrides,
    )


PRESETS: dict[str, Callable[..., UNetConfig]] = {
    "tiny": tiny,
    "small": small,
    "base": base,
    "base64": base64,
}


def build(preset: str, **overrides) -> UNet:
    """The UNet of a named preset, with fields overridden (e.g. num_classes=10)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    return UNet(PRESETS[preset](**overrides))


def _with(cfg: UNetConfig, overrides: dict) -> UNetConfig:
    return dataclasses.replace(cfg, **overrides)
