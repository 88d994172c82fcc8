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
STOCHASTIC = {"euler_ancestral": 256, "edm_stochastic": 64, "dpmpp_2m_sde": 64, "restart": 32}


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


@pytest.mark.parametrize(
    "name, order, settings",
    [
        ("euler", 1, {}),
        ("heun", 2, {}),
        ("dpmpp_2m", 2, {}),
        # eta = 0 leaves the SDE solver's ODE part, of order 2 with either correction
        ("dpmpp_2m_sde", 2, {"eta": 0.0, "solver_type": "midpoint"}),
        ("dpmpp_2m_sde", 2, {"eta": 0.0, "solver_type": "heun"}),
    ],
)
def test_error_against_the_exact_ode_solution_falls_at_the_solvers_order(name, order, settings):
    # Integrate from sigma_max to sigma_min (not to 0, where the last step is
    # Euler's): doubling the steps divides the error by 2^order.
    g = gaussian()
    y = start(g, 500, seed=3)
    errors = []
    for steps in (32, 64, 128):
        sigmas = karras_sigmas(steps, dtype=F64, append_zero=False)
        gens = S.sample_generators(0, range(len(y)))
        out = S.SAMPLERS[name](g, y, sigmas, generator=gens, **settings)
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


@pytest.mark.parametrize("name", S.SAMPLERS)
@pytest.mark.parametrize("steps", [2, 5, 12])
def test_network_evaluations_counts_every_call(name, steps):
    g = Counting(gaussian())
    run(name, g, start(gaussian(), 2, seed=4), steps)
    assert g.calls == S.network_evaluations(name, steps)


@pytest.mark.parametrize(
    "settings",
    [
        {"restart_k": 0},
        {"restart_k": 1, "restart_steps": 1},
        {"restart_k": 3, "restart_steps": 5, "restart_tmin": 0.5, "restart_tmax": 2.0},
    ],
)
def test_network_evaluations_counts_restarts(settings):
    g = Counting(gaussian())
    run("restart", g, start(gaussian(), 2, seed=4), 9, **settings)
    assert g.calls == S.network_evaluations("restart", 9, **settings)
    # the main path's Heun steps, and 2 evaluations per restart step
    k, steps = settings["restart_k"], settings.get("restart_steps", 3)
    assert g.calls == 2 * 9 - 1 + 2 * k * steps


def test_network_evaluations_rejects_unknown_samplers_and_settings():
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        S.network_evaluations("ddim", 10)
    with pytest.raises(ValueError, match="heun has no setting restart_k"):
        S.network_evaluations("heun", 10, restart_k=2)


def test_restart_without_restarts_is_heun_bit_for_bit():
    g = gaussian()
    x = start(g, 64, seed=8)
    sigmas = karras_sigmas(12, dtype=F64)
    gens = S.sample_generators(3, range(len(x)))
    restart = S.sample_restart(g, x, sigmas, generator=gens, restart_k=0)
    assert torch.equal(restart, S.sample_heun(g, x, sigmas))
    # and with restarts it is not (the check above is not vacuous)
    assert not torch.equal(S.sample_restart(g, x, sigmas, generator=gens), restart)


def test_restart_goes_up_to_tmax_and_back_down_to_the_schedules_level():
    # Restart at the schedule's level nearest restart_tmin: after the main step that
    # reaches it, the denoiser sees t_max first, then Karras levels down to t_min
    # (not evaluated: the main path's next step starts there).
    seen = []

    def denoiser(y, sigma, label=None):
        seen.append(float(sigma[0]))
        return gaussian()(y, sigma)

    sigmas = karras_sigmas(8, dtype=F64)
    settings = {"restart_tmin": 0.05, "restart_tmax": 0.4, "restart_steps": 2, "restart_k": 1}
    run("restart", denoiser, start(gaussian(), 2, seed=4), 8, **settings)
    t_min = float(sigmas[6])  # 0.0352, the nearest to 0.05
    middle = float(karras_sigmas(3, t_min, 0.4, dtype=F64)[1])
    # the main path's Heun step into level 6 evaluates at 5 and 6; then the restart
    heun = [float(sigmas[5]), t_min]
    restart = [0.4, middle, middle, t_min]
    assert seen[2 * 5 : 2 * 5 + 6] == pytest.approx(heun + restart, rel=1e-12)


def test_bad_sampler_settings_name_the_setting():
    g, x = gaussian(), start(gaussian(), 2, seed=4)
    with pytest.raises(ValueError, match="solver_type must be 'midpoint' or 'heun', got 'rk4'"):
        run("dpmpp_2m_sde", g, x, 4, solver_type="rk4")
    with pytest.raises(ValueError, match="restart_tmax must lie above .* got restart_tmax=0.01"):
        run("restart", g, x, 8, restart_tmax=0.01)
    with pytest.raises(ValueError, match="restart_k must be at least 0, got -1"):
        run("restart", g, x, 8, restart_k=-1)
    with pytest.raises(ValueError, match="restart_steps must be at least 1, got 0"):
        run("restart", g, x, 8, restart_steps=0)
    with pytest.raises(ValueError, match="dpmpp_2m_sde is stochastic"):
        S.sample_dpmpp_2m_sde(g, x, karras_sigmas(4, dtype=F64))


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


@pytest.mark.parametrize(
    "name, settings",
    [
        ("heun", {}),
        ("euler_ancestral", {}),
        ("edm_stochastic", {}),
        ("dpmpp_2m_sde", {}),
        # one restart of one step draws the restart noise at a third of the cost
        ("restart", {"restart_k": 1, "restart_steps": 1}),
    ],
)
def test_a_samples_result_does_not_depend_on_its_batch(name, settings):
    # Seeds 0..63 in one batch of 64 and in batches of 8, through the tiny UNet
    # (with labels and guidance): bit-identical on the CPU.
    denoiser = Precond(randomised(build("tiny", num_classes=10, label_dropout=0.1)).eval())
    sigmas = karras_sigmas(6)
    labels = torch.arange(64) % 10

    def sample(indices):
        gens = S.sample_generators(1234, indices)
        x = S.initial_noise((len(indices), 3, 8, 8), 80.0, gens)
        return S.SAMPLERS[name](
            denoiser,
            x,
            sigmas,
            label=labels[list(indices)],
            guidance=2.0,
            generator=gens,
            **settings,
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


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpmpp_2m_sde_matches_the_papers_update_step_by_step(eta):
    # DPM-Solver++(2M) SDE (Lu et al. 2022; k-diffusion's midpoint form) in lambda =
    # -log(sigma): x_i = (sigma_i / sigma_{i-1}) e^{-eta h} x_{i-1} + (1 - e^{-(1+eta)h}) D
    # + (1 - e^{-(1+eta)h}) (D - D_prev) / (2r) + sigma_i sqrt(1 - e^{-2 eta h}) n.
    # With eta = 0 it is sample_dpmpp_2m.
    g = gaussian()
    x = start(g, 16, seed=6)
    sigmas = karras_sigmas(5, dtype=F64, append_zero=False)
    lam = -sigmas.log()
    gens = S.sample_generators(9, range(len(x)))
    y, previous = x.clone(), None
    for i in range(1, len(sigmas)):
        d = g(y, sigmas[i - 1])
        h = lam[i] - lam[i - 1]
        pull = -torch.expm1(-(1 + eta) * h)
        y = sigmas[i] / sigmas[i - 1] * torch.exp(-eta * h) * y + pull * d
        if previous is not None:
            r = (lam[i - 1] - lam[i - 2]) / h
            y = y + pull * (d - previous) / (2 * r)
        if eta:
            y = y + S.noise_like(y, gens) * sigmas[i] * (-torch.expm1(-2 * eta * h)).sqrt()
        previous = d
    gens = S.sample_generators(9, range(len(x)))
    got = S.sample_dpmpp_2m_sde(g, x, sigmas, generator=gens, eta=eta)
    assert torch.allclose(got, y, atol=1e-12)
    if eta == 0.0:
        assert torch.allclose(S.sample_dpmpp_2m(g, x, sigmas), got, atol=1e-12)
