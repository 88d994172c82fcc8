"""EDM: the preconditioned denoiser, its loss and its noise schedule.

Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based
Generative Models" (NeurIPS 2022), hereafter EDM. Data x is noised as
y = x + sigma * n with n ~ N(0, I) (Eq. 2's forward process with s(t) = 1), and a
raw network F is wrapped as the denoiser (Eq. 7)

    D(y; sigma) = c_skip(sigma) y + c_out(sigma) F(c_in(sigma) y; c_noise(sigma))

with the coefficients of Table 1, chosen so that F's input and its training
target both have unit variance at every sigma when the data has standard
deviation `sigma_data`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

SIGMA_DATA = 0.5
"""Standard deviation of the data (images in [-1, 1]), EDM's default."""
P_MEAN, P_STD = -1.2, 1.2
"""Training noise levels: ln(sigma) ~ N(P_mean, P_std^2) (Table 1)."""
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
"""Sampling noise levels and the schedule's curvature (Table 1)."""


def c_skip(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    return 1 / (sigma**2 + sigma_data**2).sqrt()


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log() / 4


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """lambda(sigma) = 1 / c_out(sigma)^2 (Eq. 8 and Table 1): every sigma
    contributes with unit weight to the loss of F."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def add_noise(x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """y = x + sigma * n: the one noising formula (EDM Eq. 2 with s(t) = 1)."""
    return x + _per_sample(sigma, x) * noise


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`sigma` shaped [B, 1, ..., 1] to broadcast over a batch `x` of shape [B, ...]."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class Precond(nn.Module):
    """EDM's preconditioned denoiser D(y; sigma, label) around a raw network F.

    F is called as `net(c_in * y, c_noise, label)` and knows nothing of noise
    schedules. The combination is computed in float32 whatever precision F ran in.
    """

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(
        self, y: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        y = y.float()
        sigma = _per_sample(sigma, y).expand(y.shape[0], *([1] * (y.ndim - 1)))
        f = self.net(c_in(sigma, self.sigma_data) * y, c_noise(sigma).flatten(), label)
        return c_skip(sigma, self.sigma_data) * y + c_out(sigma, self.sigma_data) * f.float()


def edm_loss(
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    x: torch.Tensor,
    label: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """EDM's training loss (Eq. 8 with Table 1's choices), one value per sample.

    Draws ln(sigma) ~ N(p_mean, p_std^2) and n ~ N(0, I) (unless `sigma` and
    `noise` are given, see `training_noise`), and returns lambda(sigma) * mean over
    pixels of (D(x + sigma n; sigma) - x)^2. The mean (not EDM's sum) over pixels
    makes the loss of an untrained network about 1.
    """
    if sigma is None or noise is None:
        sigma, noise = training_noise(x, generator, p_mean, p_std)
    denoised = denoiser(add_noise(x, sigma, noise), sigma, label)
    error = (denoised.float() - x.float()) ** 2
    return loss_weight(sigma, sigma_data) * error.flatten(1).mean(1)


def training_noise(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sigma, ln(sigma) ~ N(p_mean, p_std^2), and noise n ~ N(0, I) for
    a batch shaped like `x`."""
    rnd = torch.randn(x.shape[0], generator=generator, device=x.device)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (rnd * p_std + p_mean).exp(), noise


def seeded_training_noise(
    seeds: Sequence[int] | np.ndarray,
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`training_noise` for a batch of `shape` ([N, C, H, W]) whose image i draws its
    sigma and noise from its own seed `seeds[i]`: an image's draw is the same in
    any batch, on any worker. One generator, re-seeded per image, fills one row
    per image (ln sigma first, then n), about 15 us per image on a CPU."""
    count, *image = shape
    assert len(seeds) == count, (len(seeds), count)
    draws = seeded_normal(seeds, 1 + math.prod(image), device)
    sigma = (draws[:, 0] * p_std + p_mean).exp()
    return sigma, draws[:, 1:].reshape(count, *image)


def seeded_normal(
    seeds: Sequence[int] | np.ndarray, size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normal draws [len(seeds), size], row i from its own seed `seeds[i]`:
    a row is the same in any batch, on any worker. One generator, re-seeded per
    row."""
    draws = torch.empty(len(seeds), size, device=device)
    generator = torch.Generator(device=device)
    for row, seed in zip(draws, np.asarray(seeds).tolist(), strict=True):
        generator.manual_seed(seed)
        torch.randn(size, generator=generator, device=device, out=row)
    return draws


def karras_sigmas(
    steps: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    append_zero: bool = True,
) -> torch.Tensor:
    """EDM's sampling schedule (Eq. 5): `steps` noise levels from sigma_max down to
    sigma_min, evenly spaced in sigma^(1/rho), followed by 0 (so `steps` solver
    steps) unless `append_zero` is False."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    if steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)
