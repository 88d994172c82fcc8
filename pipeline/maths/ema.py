"""Exponential moving average of the weights, as EDM keeps it.

The half-life is counted in training images, not steps, so it does not change
with the batch size: after `halflife_images` images the old average has weight
1/2. Early in training the half-life ramps up as a fraction of the images seen
so far (EDM's `ema_rampup_ratio`), so the average is not dominated by the random
initialisation. Sampling uses the averaged network, `ema.module`.

An update is one `torch._foreach_lerp_` call over all parameters, its weight a
Python float computed from images seen, so it never waits for the device; a
step that the training step skipped (a non-finite loss) masks it on the device.
Another averaging profile (EDM2's power function, say) is a subclass that
overrides `beta`, or a list of averages folded with their own weights (`fold`).
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

    def update(
        self,
        model: nn.Module,
        images_seen: int,
        batch_images: int,
        where: torch.Tensor | None = None,
    ) -> float:
        """Fold the model's current weights in; returns the beta used. With `where`
        (a 0-dim bool tensor, on the device) the update happens only where it is
        true: a skipped step leaves the average as it was, without a host read."""
        beta = self.beta(images_seen, batch_images)
        self.fold(model, 1 - beta, where)
        return beta

    @torch.no_grad()
    def fold(self, model: nn.Module, weight: float, where: torch.Tensor | None = None) -> None:
        """average += weight * (model - average) for every parameter; buffers are
        copied. Nothing changes where `where` is false."""
        averaged: list[torch.Tensor] = list(self.module.parameters())
        current: list[torch.Tensor] = list(model.parameters())
        if len(averaged) != len(current):
            raise ValueError(
                f"the model has {len(current)} parameters, its average {len(averaged)}"
            )
        current = [c.detach().to(a.dtype) for a, c in zip(averaged, current, strict=True)]
        if where is None:
            torch._foreach_lerp_(averaged, current, weight)
        else:
            # lerp by 0 leaves the average as it is, bit for bit (a + 0 * (c - a)).
            # One 0-dim weight per tensor: a tensor given as foreach's single
            # (Scalar) weight would be read on the host, waiting for the device.
            # (CUDA's foreach then lerps tensor by tensor, as the loop it replaced.)
            masked = torch.where(where, weight, 0.0).to(averaged[0].dtype)
            torch._foreach_lerp_(averaged, current, [masked] * len(averaged))
        buffers: list[torch.Tensor] = list(self.module.buffers())
        values: list[torch.Tensor] = list(model.buffers())
        if where is not None:
            values = [torch.where(where, v, b) for b, v in zip(buffers, values, strict=True)]
        if buffers:
            torch._foreach_copy_(buffers, values)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
