"""Networks for tests."""

from typing import Any

import torch

from pipeline.config.records import CheckpointState, DatasetRef
from pipeline.maths.unet import UNet


def checkpoint_state(net: UNet, **changes: Any) -> CheckpointState:
    """The state of a checkpoint of `net` (tiny template, no hflip) at 0 images."""
    fields: dict[str, Any] = dict(
        images_seen=0,
        step=0,
        run_id="r",
        model=net.cfg,
        config={"model": {"template": "tiny"}, "hflip": False},
        dataset=DatasetRef("/d/manifest.json", "0" * 64, 1610),
        seed=0,
    )
    return CheckpointState(**{**fields, **changes})


def randomised(net: UNet, seed: int = 1) -> UNet:
    """The net with its zero-initialised layers given small random weights, so its
    output and every gradient depend on every parameter."""
    torch.manual_seed(seed)
    for p in net.parameters():
        if not p.detach().abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    return net


def tiny_autoencoder(seed: int = 0, levels: int = 4, latent_channels: int = 4):
    """An AutoencoderKL of SD's shape (f = 2^(levels-1)), 8 to 16 channels wide."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8, *(16,) * (levels - 1)),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
    )
