"""Latent diffusion's maths, as EDM2 does it (`training/encoders.py`).

An autoencoder maps an image to a diagonal Gaussian over latents, N(mean, std^2).
A latent dataset stores both, not one draw: each time a position is trained on,
its latent is drawn afresh, z = mean + std * e, with e from the position's own
seed (so the draw is the same in any batch, on any worker, and on a resume).
The network sees z normalised per channel by statistics measured on the whole
dataset, x = (z - raw_mean) * final_std / raw_std, so that every channel has the
standard deviation the preconditioning assumes (sigma_data, 0.5), whatever the
autoencoder's own scale: no constant like SD's 0.18215 is assumed.

The statistics are those of the latents the network will see, the drawn ones:
per channel, E[z] is the mean of `mean` and E[z^2] the mean of mean^2 + std^2,
over samples and positions. Torch only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.maths.edm import SIGMA_DATA, seeded_normal


@dataclasses.dataclass(frozen=True)
class LatentStats:
    """Per-channel statistics of a dataset's latents, and the standard deviation
    they are normalised to."""

    raw_mean: tuple[float, ...]
    """E[z] per channel, over samples, positions and draws."""
    raw_std: tuple[float, ...]
    """The standard deviation of z per channel, likewise."""
    final_std: float = SIGMA_DATA
    """What each channel's standard deviation becomes (EDM2: 0.5, sigma_data)."""

    def __post_init__(self) -> None:
        assert len(self.raw_mean) == len(self.raw_std), (self.raw_mean, self.raw_std)
        assert all(s > 0 and math.isfinite(s) for s in self.raw_std), self.raw_std
        assert all(math.isfinite(m) for m in self.raw_mean), self.raw_mean

    @property
    def channels(self) -> int:
        return len(self.raw_mean)

    def _affine(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scale, bias [C, 1, 1] on `like`'s device and dtype: x = z * scale + bias."""
        mean = torch.tensor(self.raw_mean, dtype=torch.float64)
        scale = self.final_std / torch.tensor(self.raw_std, dtype=torch.float64)
        bias = -mean * scale
        shape = (self.channels, 1, 1)
        return (
            scale.reshape(shape).to(like.device, like.dtype),
            bias.reshape(shape).to(like.device, like.dtype),
        )

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, H, W] to what the network sees: each channel centred, with
        standard deviation `final_std`."""
        scale, bias = self._affine(z)
        return z * scale + bias

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalise`: what the autoencoder decodes."""
        scale, bias = self._affine(x)
        return (x - bias) / scale


def draw_latents(
    mean: torch.Tensor, std: torch.Tensor, seeds: Sequence[int] | np.ndarray
) -> torch.Tensor:
    """z = mean + std * e for a batch [N, C, H, W] of posteriors, e from image i's
    own seed `seeds[i]`: an image's draw does not depend on its batch."""
    assert mean.shape == std.shape and len(seeds) == mean.shape[0], (mean.shape, len(seeds))
    e = seeded_normal(seeds, math.prod(mean.shape[1:]), mean.device)
    return mean + std * e.reshape(mean.shape).to(mean.dtype)


@dataclasses.dataclass
class ChannelMoments:
    """Running per-channel sums over posteriors N(mean, std^2), in float64, that
    several tasks can each keep and `merge`: the `LatentStats` of all they saw."""

    channels: int
    values: int = 0
    """Latent elements per channel seen (samples x positions)."""
    first: np.ndarray = dataclasses.field(init=False)
    """Per channel, the sum of `mean`."""
    second: np.ndarray = dataclasses.field(init=False)
    """Per channel, the sum of mean^2 + std^2, E[z^2] of each element's draw."""

    def __post_init__(self) -> None:
        self.first = np.zeros(self.channels)
        self.second = np.zeros(self.channels)

    def add(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Count a batch of posteriors [N, C, H, W]."""
        assert mean.shape == std.shape and mean.shape[1] == self.channels, mean.shape
        m, s = mean.double(), std.double()
        self.values += mean.shape[0] * math.prod(mean.shape[2:])
        self.first += m.sum(dim=(0, 2, 3)).cpu().numpy()
        self.second += (m.square() + s.square()).sum(dim=(0, 2, 3)).cpu().numpy()

    def to_dict(self) -> dict:
        """Plain data for JSON (floats round-trip exactly)."""
        return {"values": self.values, "first": self.first.tolist(), "second": self.second.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> ChannelMoments:
        moments = cls(len(data["first"]), int(data["values"]))
        moments.first = np.array(data["first"], dtype=np.float64)
        moments.second = np.array(data["second"], dtype=np.float64)
        return moments

    def merge(self, other: ChannelMoments) -> ChannelMoments:
        """The moments of what `self` and `other` saw together."""
        assert other.channels == self.channels, (other.channels, self.channels)
        both = ChannelMoments(self.channels, self.values + other.values)
        both.first = self.first + other.first
        both.second = self.second + other.second
        return both

    def stats(self, final_std: float = SIGMA_DATA) -> LatentStats:
        """The per-channel mean and standard deviation of the drawn latents."""
        if self.values == 0:
            raise ValueError("no latents counted: the statistics of nothing are undefined")
        mean = self.first / self.values
        # E[z^2] - E[z]^2 in float64: the latents' mean is of the order of their
        # standard deviation (EDM2's SD VAE: 5.8 and 4.2), so nothing cancels.
        var = np.maximum(self.second / self.values - mean**2, 0.0)
        if not (var > 0).all():
            raise ValueError(f"a latent channel does not vary: variances {var.tolist()}")
        return LatentStats(tuple(mean.tolist()), tuple(np.sqrt(var).tolist()), final_std=final_std)
