"""Exponential moving average of the weights, as EDM keeps it.

The half-life is counted in training images, not steps, so it does not change
with the batch size: after `halflife_images` images the old average has weight
1/2. Early in training the half-life ramps up as a fraction of the images seen
so far (EDM's `ema_rampup_ratio`), so the average is not dominated by the random
initialisation. Sampling uses the averaged network, `ema.module`.
"""

from __future__ import annotations

import copy
from typing import Generic, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


class EMA(Generic[M]):
    """An averaged copy of a model, updated after each optimizer step."""

    def __init__(
        self, model: M, halflife_images: float = 500_000, rampup_ratio: float | None = 0.05
    ):
        if halflife_images <= 0:
            raise ValueError(f"halflife_images must be positive, got {halflife_images}")
        self.halflife_images = halflife_images
        self.rampup_ratio = rampup_ratio
        self.module: M = copy.deepcopy(model).eval().requires_grad_(False)

    def beta(self, images_seen: int, batch_images: int) -> float:
        """Weight kept by the average over a batch of `batch_images`, taken after
        `images_seen` images: 0.5 ** (batch / half-life)."""
        halflife = self.halflife_images
        if self.rampup_ratio is not None:
            halflife = min(halflife, images_seen * self.rampup_ratio)
        return 0.5 ** (batch_images / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, batch_images: int) -> float:
        """Fold the model's current weights in; returns the beta used."""
        beta = self.beta(images_seen, batch_images)
        for averaged, current in zip(self.module.parameters(), model.parameters(), strict=True):
            averaged.lerp_(current.detach().to(averaged.dtype), 1 - beta)
        for buffer, value in zip(self.module.buffers(), model.buffers(), strict=True):
            buffer.copy_(value)
        return beta

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
