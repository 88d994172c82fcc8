"""Exact optimal denoisers for data whose distribution is known in closed form.

For data x ~ p and y = x + sigma n, the denoiser that minimises the EDM loss is
the posterior mean D*(y; sigma) = E[x | y] (EDM Eq. 3 and Appendix B.3). For a
Gaussian, and for a mixture of Gaussians, it has a closed form; wrapped with the
same call signature as a network denoiser, it lets the loss and every sampler be
checked against known answers, on any device, with no training.
"""

from __future__ import annotations

import math

import torch


class GaussianDenoiser:
    """D* for x ~ N(mu, diag(s^2)): E[x | y] = mu + s^2 / (s^2 + sigma^2) (y - mu)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std

    def __call__(
        self, y: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        sigma = _column(sigma, y)
        return self.mean + self.std**2 / (self.std**2 + sigma**2) * (y - self.mean)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn((n, *self.mean.shape), generator=generator, dtype=self.mean.dtype)
        return self.mean + self.std * z

    def ode_solution(self, y: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The probability-flow ODE dy/dsigma = (y - D*(y; sigma)) / sigma (EDM Eq. 4)
        keeps (y - mu) / sqrt(s^2 + sigma^2) constant: its exact solution."""
        var = self.std**2
        return self.mean + (y - self.mean) * ((var + sigma_to**2) / (var + sigma_from**2)).sqrt()

    def loss_per_dim(self, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
        """EDM loss of D* at noise level sigma, per dimension (averaged over them):
        lambda(sigma) times the posterior variance s^2 sigma^2 / (s^2 + sigma^2)."""
        var = self.std.flatten() ** 2
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        return weight * (var * sigma**2 / (var + sigma**2)).mean()


class MixtureDenoiser:
    """D* for x ~ sum_k pi_k N(mu_k, s_k^2 I): the components' posterior means,
    weighted by each component's responsibility for y."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor):
        self.weights, self.means, self.stds = weights, means, stds  # [K], [K, *shape], [K]

    def __call__(
        self, y: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        sigma = _column(sigma, y).flatten()[:, None]  # [B, 1]
        flat = y.flatten(1)[:, None, :]  # [B, 1, d]
        mu = self.means.flatten(1)[None]  # [1, K, d]
        var = self.stds[None, :] ** 2 + sigma**2  # [B, K]
        d = flat.shape[-1]
        log_p = (
            self.weights.log()[None]
            - 0.5 * ((flat - mu) ** 2).sum(-1) / var
            - 0.5 * d * (2 * math.pi * var).log()
        )
        resp = log_p.softmax(dim=1)  # [B, K]
        shrink = (self.stds[None, :] ** 2 / var)[..., None]  # [B, K, 1]
        posterior = mu + shrink * (flat - mu)  # [B, K, d]
        return (resp[..., None] * posterior).sum(1).reshape(y.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.means.shape[1:]), generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.stds[k].reshape(-1, *([1] * (z.ndim - 1))) * z

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's mean and covariance (over flattened dimensions)."""
        mu = self.means.flatten(1)
        d = mu.shape[1]
        mean = (self.weights[:, None] * mu).sum(0)
        second = sum(
            w * (torch.outer(m, m) + s**2 * torch.eye(d, dtype=mu.dtype))
            for w, m, s in zip(self.weights, mu, self.stds, strict=True)
        )
        return mean, second - torch.outer(mean, mean)


def _column(sigma: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=y.dtype, device=y.device)
    return sigma.reshape(-1, *([1] * (y.ndim - 1)))
