"""The denoising network: a UNet, its architecture and the templates it is made
from. `architecture` needs no torch (configs use it); the network imports torch,
on first use of `UNet` or `build`."""

from pipeline.model.architecture import TEMPLATES, UNetConfig, architecture

__all__ = ["TEMPLATES", "UNet", "UNetConfig", "architecture", "build"]


def __getattr__(name: str):
    if name in ("UNet", "build"):
        from pipeline.model import unet

        return getattr(unet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
