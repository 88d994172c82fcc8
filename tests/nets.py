"""Networks for tests."""

import torch

from pipeline.maths.unet import UNet


def randomised(net: UNet, seed: int = 1) -> UNet:
    """The net with its zero-initialised layers given small random weights, so its
    output and every gradient depend on every parameter."""
    torch.manual_seed(seed)
    for p in net.parameters():
        if not p.detach().abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    return net
