"""Samplers against known answers: exact ODE solutions, the data distribution,
evaluation counts, guidance, and per-sample determinism."""

import pytest
import torch

from pipeline.maths import solvers as S
from pipeline.maths.analytic import GaussianDenoiser, MixtureDenoiser
from pipeline.maths.edm import Precond, karras_sigmas
from pipeline.maths.unet import build
from tests.denoisers import F64, gaussian, mixture
from tests.nets import randomised

DETERMINISTIC = {"euler": 256, "heun": 32, "dpmpp_2m": 32}
STOCHASTIC = {"euler_ancestral": 256, "edm_stochastic": 64}


def start(denoiser, n: int, seed: int) -> torch.Tensor:
    """Exact samples of the noised data at sigma_max, the ODE's starting point."""
    gen = torch.Generator().manual_seed(seed)
    return denoiser.sample(n, gen) + 80.0 * torch.randn(
        n, *denoiser.sample(1).shape[1:], generator=gen, dtype=F64
    )


def run(name, denoiser, x, steps, **kw):
    gens = S.sample_generators(7, range(len(x))) if name in STOCHASTIC else None
    sigmas = karras_sigmas(steps, dtype=F64)
    return S.SAMPLERS[name](denoiser, x, sigmas, generator=gens, **kw)


def assert_moments(samples, mean, cov, n_sigma=5.0):
    """Sample mean within n_sigma standard errors; covariance entries likewise."""
    n = len(samples)
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((samples.mean(0) - mean).abs() < n_sigma * se_mean).all(), (samples.mean(0), mean)
    sd = cov.diagonal().sqrt()
    se_cov = torch.outer(sd, sd) * (2 / n) ** 0.5  # standard error of a covariance entry
    got = torch.cov(samples.T)
    assert ((got - cov).abs() < n_sigma * se_cov + 1e-3).all(), (got, cov)


@pytest.mark.parametrize("name", [*DETERMINISTIC, *STOCHASTIC])
def test_sampler_reproduces_a_gaussian(name):
    g = gaussian()
    steps = {**DETERMINISTIC, **STOCHASTIC}[name]
    samples = run(name, g, start(g, 8000, seed=1), steps)
    assert_moments(samples, g.mean, torch.diag(g.std**2))


@pytest.mark.parametrize("name", [*DETERMINISTIC, *STOCHASTIC])
def test_sampler_reproduces_a_gaussian_mixture(name):
    m = mixture()
    steps = {**DETERMINISTIC, **STOCHASTIC}[name]
    samples = run(name, m, start(m, 8000, seed=2), steps)
    mean, cov = m.mean_and_covariance()
    assert_moments(samples, mean, cov)
    # and the modes keep their weights: each sample nearest its component's mean
    nearest = torch.cdist(samples, m.means).argmin(1)
    share = torch.bincount(nearest, minlength=3).double() / len(samples)
    assert torch.allclose(share, m.weights, atol=0.03), share


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_error_against_the_exact_ode_solution_falls_at_the_solvers_order(name, order):
    # Integrate from sigma_max to sigma_min (not to 0, where the last step is
    # Euler's): doubling the steps divides the error by 2^order.
    g = gaussian()
    y = start(g, 500, seed=3)
    errors = []
    for steps in (32, 64, 128):
        sigmas = karras_sigmas(steps, dtype=F64, append_zero=False)
        out = S.SAMPLERS[name](g, y, sigmas)
        errors.append((out - g.ode_solution(y, 80.0, float(sigmas[-1]))).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    for r in ratios:
        assert 2**order * 0.85 < r < 2**order * 1.2, (errors, ratios)


class Counting:
    """Wraps a denoiser and counts its evaluations (and which labels it saw)."""

    def __init__(self, inner):
        self.inner, self.calls, self.labels = inner, 0, []

    def __call__(self, y, sigma, label=None):
        self.calls += 1
        self.labels.append(label)
        return self.inner(y, sigma, label)


@pytest.mark.parametrize("name", [*DETERMINISTIC, *STOCHASTIC])
def test_evaluation_counts(name):
    g = Counting(gaussian())
    steps_seen = []
    run(name, g, start(gaussian(), 4, seed=4), 10, callback=lambda i, *_: steps_seen.append(i))
    assert g.calls == S.network_evaluations(name, 10)
    assert steps_seen == list(range(10))


class LabelledGaussians:
    """Exact denoiser of a labelled dataset: class k ~ N(mu_k, s^2 I); no label
    means the equal-weight mixture of the classes."""

    def __init__(self):
        self.means = torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=F64)
        self.components = [
            GaussianDenoiser(m, torch.full((2,), 0.3, dtype=F64)) for m in self.means
        ]
        self.mixture = MixtureDenoiser(
            torch.tensor([0.5, 0.5], dtype=F64), self.means, torch.full((2,), 0.3, dtype=F64)
        )

    def __call__(self, y, sigma, label=None):
        if label is None:
            return self.mixture(y, sigma)
        # [3, B, d]: each class's posterior mean, and the mixture's for NO_LABEL rows
        picked = torch.stack([c(y, sigma) for c in self.components] + [self.mixture(y, sigma)])
        return picked[torch.where(label == S.NO_LABEL, 2, label), torch.arange(len(y))]


def test_classifier_free_guidance():
    d = LabelledGaussians()
    y = start(d.mixture, 4000, seed=5)
    label = torch.ones(len(y), dtype=torch.long)
    sigmas = karras_sigmas(32, dtype=F64)
    conditional = S.sample_heun(d, y, sigmas, label=label)
    assert_moments(conditional, d.means[1], torch.eye(2, dtype=F64) * 0.09)
    # guidance 0 is the unconditional model; guidance 1 the conditional one
    assert torch.equal(
        S.sample_heun(d, y, sigmas, label=label, guidance=0.0), S.sample_heun(d, y, sigmas)
    )
    counted = Counting(d)
    guided = S.sample_heun(counted, y, sigmas, label=label, guidance=3.0)
    # one network call per evaluation, each with every image twice: with its label
    # and with NO_LABEL
    assert counted.calls == S.network_evaluations("heun", 32)
    for seen in counted.labels:
        assert torch.equal(seen, torch.cat([label, torch.full_like(label, S.NO_LABEL)]))
    # stronger guidance pushes samples further from the other class
    assert guided[:, 0].mean() > conditional[:, 0].mean() + 0.05


@pytest.mark.parametrize("name", ["heun", "euler_ancestral", "edm_stochastic"])
def test_a_samples_result_does_not_depend_on_its_batch(name):
    # Seeds 0..63 in one batch of 64 and in batches of 8, through the tiny UNet
    # (with labels and guidance): bit-identical on the CPU.
    denoiser = Precond(randomised(build("tiny", num_classes=10, label_dropout=0.1)).eval())
    sigmas = karras_sigmas(6)
    labels = torch.arange(64) % 10

    def sample(indices):
        gens = S.sample_generators(1234, indices)
        x = S.initial_noise((len(indices), 3, 8, 8), 80.0, gens)
        return S.SAMPLERS[name](
            denoiser, x, sigmas, label=labels[list(indices)], guidance=2.0, generator=gens
        )

    whole = sample(range(64))
    parts = torch.cat([sample(range(i, i + 8)) for i in range(0, 64, 8)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole[0], whole[1])


def test_per_sample_generators_are_independent_of_the_batch_and_distinct():
    a = S.sample_generators(5, [0, 1, 2])
    b = S.sample_generators(5, [2])
    x = torch.empty(3, 4)
    assert torch.equal(S.noise_like(x, a)[2], S.noise_like(torch.empty(1, 4), b)[0])
    rows = S.noise_like(torch.empty(3, 1000), S.sample_generators(5, [0, 1, 2]))
    assert torch.corrcoef(rows).fill_diagonal_(0).abs().max() < 0.15
    with pytest.raises(ValueError, match="one generator per sample"):
        S.noise_like(torch.empty(2, 4), a)


def test_dpmpp_2m_matches_the_papers_update_step_by_step():
    # DPM-Solver++(2M) in its own variables (Lu et al. 2022, Alg. 2): lambda =
    # -log(sigma), h_i = lambda_i - lambda_{i-1}, r = h_{i-1} / h_i, and
    # x_i = (sigma_i / sigma_{i-1}) x_{i-1} - (e^{-h_i} - 1) D_hat.
    g = gaussian()
    x = start(g, 16, seed=6)
    sigmas = karras_sigmas(5, dtype=F64, append_zero=False)
    lam = -sigmas.log()
    y, previous = x.clone(), None
    for i in range(1, len(sigmas)):
        d = g(y, sigmas[i - 1])
        h = lam[i] - lam[i - 1]
        if previous is None:
            d_hat = d
        else:
            r = (lam[i - 1] - lam[i - 2]) / h
            d_hat = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * previous
        y = sigmas[i] / sigmas[i - 1] * y - torch.expm1(-h) * d_hat
        previous = d
    assert torch.allclose(S.sample_dpmpp_2m(g, x, sigmas), y, atol=1e-12)
