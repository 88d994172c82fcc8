"""The denoising network: a UNet and its presets. Imports torch only."""

from pipeline.model.presets import PRESETS, build
from pipeline.model.unet import UNet, UNetConfig

__all__ = ["PRESETS", "UNet", "UNetConfig", "build"]
