"""Small distributions whose optimal denoisers are exact, for the tests of the loss
and of the samplers: what a perfectly trained network would return."""

import torch

from pipeline.maths.analytic import GaussianDenoiser, MixtureDenoiser

F64 = torch.float64


def gaussian() -> GaussianDenoiser:
    """A 4-dimensional Gaussian with a diagonal covariance."""
    mean = torch.tensor([0.3, -0.5, 1.0, 0.0], dtype=F64)
    return GaussianDenoiser(mean, torch.tensor([0.5, 0.2, 1.0, 0.7], dtype=F64))


def mixture() -> MixtureDenoiser:
    """Three unequal, isotropic Gaussians in 2 dimensions."""
    means = torch.tensor([[-1.0, 0.5], [1.0, 0.0], [0.0, -1.2]], dtype=F64)
    return MixtureDenoiser(
        torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, torch.tensor([0.3, 0.2, 0.4], dtype=F64)
    )
