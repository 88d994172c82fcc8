"""EDM's loss and preconditioning against closed forms, with exact optimal denoisers."""

import numpy as np
import pytest
import torch

from pipeline.maths import edm
from pipeline.maths.analytic import GaussianDenoiser
from pipeline.maths.edm import Precond, edm_loss, karras_sigmas
from pipeline.maths.unet import build
from tests.denoisers import F64, gaussian, mixture


def mc_mean(values: torch.Tensor) -> tuple[float, float]:
    """Monte Carlo mean and its standard error."""
    return values.mean().item(), (values.std() / len(values) ** 0.5).item()


@pytest.mark.parametrize("sigma", [0.01, 0.3, 1.0, 5.0, 40.0])
def test_loss_of_the_optimal_denoiser_at_a_noise_level_is_the_posterior_variance(sigma):
    # With P_std = 0 the loss sits at sigma = exp(P_mean); for a Gaussian it is
    # lambda(sigma) s^2 sigma^2 / (s^2 + sigma^2), averaged over dimensions.
    gen = torch.Generator().manual_seed(0)
    g = gaussian()
    x = g.sample(200_000, gen)
    loss = edm_loss(g, x, generator=gen, p_mean=float(np.log(sigma)), p_std=0.0)
    value, error = mc_mean(loss)
    expected = g.loss_per_dim(torch.tensor(sigma, dtype=F64), edm.SIGMA_DATA).item()
    assert abs(value - expected) < 4 * error + 1e-9, (value, expected, error)


def test_loss_of_the_optimal_denoiser_over_training_noise_levels():
    # E over ln(sigma) ~ N(P_mean, P_std^2), by 80-point Gauss-Hermite quadrature.
    gen = torch.Generator().manual_seed(1)
    g = gaussian()
    loss = edm_loss(g, g.sample(400_000, gen), generator=gen)
    value, error = mc_mean(loss)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    sigmas = torch.tensor(np.exp(edm.P_MEAN + edm.P_STD * nodes), dtype=F64)
    per_sigma = torch.stack([g.loss_per_dim(s, edm.SIGMA_DATA) for s in sigmas])
    expected = float((per_sigma.numpy() * weights).sum() / np.sqrt(2 * np.pi))
    assert abs(value - expected) < 4 * error, (value, expected, error)


def test_data_at_sigma_data_gives_the_optimal_denoiser_unit_loss_at_every_sigma():
    g = GaussianDenoiser(torch.zeros(3, dtype=F64), torch.full((3,), edm.SIGMA_DATA, dtype=F64))
    for sigma in karras_sigmas(10, dtype=F64, append_zero=False):
        assert g.loss_per_dim(sigma, edm.SIGMA_DATA).item() == pytest.approx(1.0)


def test_mixture_denoiser_is_the_posterior_mean():
    m = mixture()
    gen = torch.Generator().manual_seed(2)
    x = m.sample(300_000, gen)
    sigma = torch.full((len(x),), 0.4, dtype=F64)
    y = x + 0.4 * torch.randn(x.shape, generator=gen, dtype=F64)
    best = ((m(y, sigma) - x) ** 2).sum(1).mean()
    # Any other function of y does worse: shifted, shrunk, or the Gaussian with
    # the mixture's mean and covariance.
    mean, cov = m.mean_and_covariance()
    moment_matched = GaussianDenoiser(mean, cov.diagonal().sqrt())
    for other in (m(y, sigma) + 0.05, m(y, sigma) * 0.95, moment_matched(y, sigma)):
        assert ((other - x) ** 2).sum(1).mean() > best
    # Far from the other modes, D* is that component's Gaussian posterior mean.
    near = torch.tensor([[-1.1, 0.6]], dtype=F64)
    expected = m.means[0] + 0.3**2 / (0.3**2 + 0.1**2) * (near - m.means[0])
    assert torch.allclose(m(near, torch.tensor([0.1], dtype=F64)), expected, atol=1e-9)


def test_preconditioning_gives_unit_variance_inputs_and_targets():
    # EDM's point (Appendix B.6): with data of std sigma_data, the network's input
    # c_in * y and its training target (x - c_skip y) / c_out have unit variance
    # at every sigma.
    gen = torch.Generator().manual_seed(3)
    x = edm.SIGMA_DATA * torch.randn(200_000, generator=gen, dtype=F64)
    for sigma in (0.002, 0.05, 0.5, 2.0, 80.0):
        y = x + sigma * torch.randn(x.shape, generator=gen, dtype=F64)
        s = torch.tensor(sigma, dtype=F64)
        assert (edm.c_in(s) * y).var().item() == pytest.approx(1.0, rel=0.02)
        target = (x - edm.c_skip(s) * y) / edm.c_out(s)
        assert target.var().item() == pytest.approx(1.0, rel=0.02)


def test_an_untrained_network_starts_at_unit_loss_at_every_sigma():
    # The UNet's output layer starts at zero, so D = c_skip y and the weighted
    # loss is the target's variance: 1 at every sigma, for data of std sigma_data.
    torch.manual_seed(4)
    denoiser = Precond(build("tiny"))
    x = edm.SIGMA_DATA * torch.randn(512, 3, 8, 8)
    for sigma in (0.01, 0.3, 3.0, 60.0):
        loss = edm_loss(denoiser, x, p_mean=float(np.log(sigma)), p_std=0.0)
        assert loss.mean().item() == pytest.approx(1.0, rel=0.03), sigma


def test_karras_schedule_matches_eq5():
    sigmas = karras_sigmas(18, dtype=F64)
    assert len(sigmas) == 19 and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[17].item() == pytest.approx(0.002)
    i = torch.arange(18, dtype=F64)
    eq5 = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(sigmas[:-1], eq5)
    assert (sigmas[1:] < sigmas[:-1]).all()


class Recorder(torch.nn.Module):
    """A stand-in network that records what Precond gives it and returns `out`."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, c_noise, label):
        self.x, self.c_noise, self.label = x, c_noise, label
        return self.out


def test_precond_feeds_the_network_c_in_y_and_c_noise_and_combines_its_output():
    gen = torch.Generator().manual_seed(5)
    x = edm.SIGMA_DATA * torch.randn(4096, 3, 4, 4, generator=gen)
    f = torch.randn(x.shape, generator=gen)
    label = torch.arange(4096) % 10
    for value in (0.02, 0.5, 20.0):
        sigma = torch.full((4096,), value)
        y = x + value * torch.randn(x.shape, generator=gen)
        net = Recorder(f)
        d = Precond(net)(y, sigma, label)
        assert net.x.std().item() == pytest.approx(1.0, rel=0.03)  # unit-variance input
        assert torch.allclose(net.c_noise, torch.full((4096,), np.log(value) / 4))
        assert net.label is label
        s = torch.tensor(value)
        assert torch.allclose(d, edm.c_skip(s) * y + edm.c_out(s) * f, atol=1e-5)
