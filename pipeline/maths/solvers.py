"""Samplers: from noise to images by solving EDM's probability-flow ODE (or its SDE).

Every sampler is one function with one signature, as in k-diffusion:

    sample_x(denoiser, x, sigmas, *, label=None, guidance=1.0, generator=None, callback=None,
             **settings)

- `denoiser(y, sigma, label)` is an EDM denoiser D(y; sigma): a `Precond`-wrapped
  network, or an exact one from `pipeline.maths.analytic`.
- `x` is the starting noise at `sigmas[0]` (see `initial_noise`), `sigmas` the
  decreasing noise levels (usually `karras_sigmas`, ending in 0). Keep `sigmas`
  on the CPU: the samplers read them as Python numbers, which on a GPU tensor
  would wait for the device at every step.
- `label` (class indices) with `guidance` w != 1 applies classifier-free guidance,
  D = D(y; sigma) + w (D(y; sigma, label) - D(y; sigma)) (Ho & Salimans 2022), in
  one network call per step: see `guided`.
- `generator` is a list with one torch.Generator per sample: a stochastic sampler
  draws sample k's noise from generator k alone, so a sample does not depend on
  the batch it is in (see `sample_generators`). That costs one random-number
  call per sample per step, small beside a network evaluation.
- `callback(i, sigma, x, denoised)` runs after step i, for progress bars.
- `settings` are the sampler's own keywords, with defaults (EDM's S_churn, restart's
  interval, ...); `network_evaluations` counts the cost of any of them.

Adding a solver means adding one function and one entry in SAMPLERS.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.maths.edm import karras_sigmas

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


# --- noise, one generator per sample --------------------------------------------------


REDRAW = 3
"""Tags the entropy of a sample's further draws: (seed, index, REDRAW, draw). The
tags 1 and 2 seed labels and held-out noise, (seed, index) the first draw."""


def sample_generators(
    seed: int,
    indices: Sequence[int],
    device: torch.device | str = "cpu",
    draws: Sequence[int] | None = None,
) -> list[torch.Generator]:
    """One generator per sample index, seeded from (job seed, index) through numpy's
    SeedSequence, so neighbouring indices get unrelated streams. `draws`: which
    draw of each index (0, the default, is the first; draw d > 0, which replaces a
    rejected image, is seeded from (seed, index, REDRAW, d))."""
    out = []
    for index, draw in zip(indices, draws or [0] * len(indices), strict=True):
        entropy = [seed, int(index)] + ([REDRAW, int(draw)] if draw else [])
        state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
        out.append(torch.Generator(device=device).manual_seed(int(state) & (2**63 - 1)))
    return out


def noise_like(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like `x`, row k drawn from generators[k]."""
    if len(generators) != x.shape[0]:
        raise ValueError(f"need one generator per sample: {len(generators)} for {x.shape[0]}")
    rows = [torch.randn(x.shape[1:], generator=g, device=x.device) for g in generators]
    return torch.stack(rows).to(x.dtype)


def initial_noise(
    shape: Sequence[int],
    sigma_max: float,
    generators: Sequence[torch.Generator],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The sampler's starting point x ~ N(0, sigma_max^2 I), per-sample generators."""
    return noise_like(torch.empty(tuple(shape), device=device), generators) * sigma_max


# --- the samplers -----------------------------------------------------------------------


NO_LABEL = -1
"""The label of a row that is to be denoised unconditionally (`pipeline.maths.unet.UNet`
maps it to its "no label" class)."""


def _denoise(
    denoiser: Denoiser, x: torch.Tensor, sigma: float, label: torch.Tensor | None, guidance: float
) -> torch.Tensor:
    s = x.new_full((x.shape[0],), float(sigma))
    if label is None or guidance == 1.0:
        return denoiser(x, s, label)
    # A denoiser that batches its own network calls (the generation job's
    # fixed-shape calls) applies guidance per call.
    batched = getattr(denoiser, "guided", None)
    if batched is not None:
        return batched(x, s, label, guidance)
    return guided(denoiser, x, s, label, guidance)


def guided(
    denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor, guidance: float
) -> torch.Tensor:
    """Classifier-free guidance in one network call: the batch goes through twice,
    once with its labels and once with NO_LABEL, as one concatenated batch; then
    D = D_uncond + w (D_cond - D_uncond). Same work as two calls, but one launch
    of every layer, which is what small batches and GPUs are bound by."""
    rows = denoiser(
        torch.cat([x, x]),
        torch.cat([sigma, sigma]),
        torch.cat([label, torch.full_like(label, NO_LABEL)]),
    )
    cond, uncond = rows.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, label=None, guidance=1.0, generator=None, callback=None):
    """Euler's method on the probability-flow ODE (EDM Eq. 4); first order, N evaluations."""
    for i in range(len(sigmas) - 1):
        denoised = _denoise(denoiser, x, sigmas[i], label, guidance)
        d = (x - denoised) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * d
        if callback is not None:
            callback(i, sigmas[i], x, denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, label=None, guidance=1.0, generator=None, callback=None):
    """Heun's 2nd-order method (EDM Algorithm 1); the step to sigma = 0 is Euler's,
    so N steps cost 2N - 1 evaluations."""
    for i in range(len(sigmas) - 1):
        x = _heun_step(denoiser, x, sigmas[i], sigmas[i + 1], label, guidance, callback, i)
    return x


def _heun_step(denoiser, x, sigma, sigma_next, label, guidance, callback, i):
    denoised = _denoise(denoiser, x, sigma, label, guidance)
    d = (x - denoised) / sigma
    x_next = x + (sigma_next - sigma) * d
    if sigma_next > 0:
        denoised_next = _denoise(denoiser, x_next, sigma_next, label, guidance)
        d_next = (x_next - denoised_next) / sigma_next
        x_next = x + (sigma_next - sigma) * (d + d_next) / 2
    if callback is not None:
        callback(i, sigma, x_next, denoised)
    return x_next


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser, x, sigmas, *, label=None, guidance=1.0, generator=None, callback=None
):
    """DPM-Solver++(2M): 2nd-order multistep in log-sigma, data prediction
    (Lu et al. 2022, "DPM-Solver++", Algorithm 2); N evaluations."""
    previous = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, sigma, label, guidance)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)  # step in lambda = -log(sigma)
            estimate = denoised
            if previous is not None:
                r = math.log(sigmas[i - 1] / sigma) / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
            x = (sigma_next / sigma) * x - math.expm1(-h) * estimate
        previous = denoised
        if callback is not None:
            callback(i, sigma, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser, x, sigmas, *, label=None, guidance=1.0, generator=None, callback=None
):
    """Euler-ancestral: each step goes down to sigma_down with Euler, then adds fresh
    noise up to the next level (Ho et al. 2020's ancestral sampling in EDM's
    parametrisation, as k-diffusion's sample_euler_ancestral with eta = 1)."""
    generator = _need_generators(generator, x, "euler_ancestral")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _denoise(denoiser, x, sigma, label, guidance)
        sigma_up = min(sigma_next, math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = x + (sigma_down - sigma) * (x - denoised) / sigma
        if sigma_next > 0:
            x = x + noise_like(x, generator) * sigma_up
        if callback is not None:
            callback(i, sigma, x, denoised)
    return x


@torch.no_grad()
def sample_edm_stochastic(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    label: torch.Tensor | None = None,
    guidance: float = 1.0,
    generator: Sequence[torch.Generator] | None = None,
    callback: Callable[..., None] | None = None,
    s_churn: float = 40.0,
    s_tmin: float = 0.05,
    s_tmax: float = 50.0,
    s_noise: float = 1.003,
) -> torch.Tensor:
    """EDM's stochastic sampler (Algorithm 2): at each level in [s_tmin, s_tmax] raise
    sigma by a factor 1 + gamma with fresh noise ("churn"), then take a Heun step.
    Defaults are EDM's ImageNet-64 settings."""
    generators = _need_generators(generator, x, "edm_stochastic")
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + noise_like(x, generators) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
        x = _heun_step(denoiser, x, sigma_hat, sigma_next, label, guidance, callback, i)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    label: torch.Tensor | None = None,
    guidance: float = 1.0,
    generator: Sequence[torch.Generator] | None = None,
    callback: Callable[..., None] | None = None,
    eta: float = 0.5,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: 2nd-order multistep on the data-prediction SDE (Lu et al.
    2022, "DPM-Solver++", its SDE variant; as k-diffusion's sample_dpmpp_2m_sde); N
    evaluations.

    With h = lambda_next - lambda (lambda = -log sigma), each step decays x by
    (sigma_next / sigma) e^{-eta h}, moves toward D by 1 - e^{-(1 + eta) h}, corrects
    with the previous D ("midpoint" or "heun"), and adds fresh noise of standard
    deviation sigma_next sqrt(1 - e^{-2 eta h}) s_noise. eta = 0 is the ODE solver
    (with "midpoint", exactly sample_dpmpp_2m); eta = 1 the reverse SDE (k-diffusion's
    default). The default eta = 0.5 is half the SDE's noise; at 25 steps it is the
    project's default sampler, chosen by bench/quality.py's study. k-diffusion
    draws the noise from a Brownian tree; fresh per-sample Gaussians per step have
    the same law for this discretisation and keep samples independent of their batch."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    generators = _need_generators(generator, x, "dpmpp_2m_sde")
    previous, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _denoise(denoiser, x, sigma, label, guidance)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            pull = -math.expm1(-h - eta * h)  # 1 - e^{-(1 + eta) h}
            x = (sigma_next / sigma) * math.exp(-eta * h) * x + pull * denoised
            if previous is not None:
                assert h_last is not None
                slope = (denoised - previous) * (h / h_last)  # (D - D_prev) / r
                if solver_type == "heun":
                    x = x + (pull / (-h - eta * h) + 1) * slope
                else:
                    x = x + 0.5 * pull * slope
            if eta:
                spread = sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
                x = x + noise_like(x, generators) * spread
            h_last = h
        previous = denoised
        if callback is not None:
            callback(i, sigma, x, denoised)
    return x


@torch.no_grad()
def sample_restart(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    label: torch.Tensor | None = None,
    guidance: float = 1.0,
    generator: Sequence[torch.Generator] | None = None,
    callback: Callable[..., None] | None = None,
    restart_tmin: float = 0.06,
    restart_tmax: float = 0.30,
    restart_k: int = 2,
    restart_steps: int = 3,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative
    Processes", Algorithm 1, EDM's parametrisation): Heun over `sigmas`, and where
    the path reaches t_min (the level of `sigmas` nearest `restart_tmin`), restart_k
    times: noise back up to t_max, x + s_noise sqrt(t_max^2 - t_min^2) n, then
    `restart_steps` Heun steps down to t_min on Karras levels (rho = 7).

    The noise of the jump up contracts the errors the ODE steps accumulated, as in
    a stochastic sampler, while the steps stay ODE steps. Each restart costs
    2 restart_steps evaluations (see network_evaluations); `callback` sees the main
    path's steps only."""
    generators = _need_generators(generator, x, "restart")
    if restart_k < 0:
        raise ValueError(f"restart_k must be at least 0, got {restart_k}")
    where, levels = -1, list[float]()  # where = -1: no restart when restart_k = 0
    if restart_k > 0:
        where, levels = _restart_levels(sigmas, restart_tmin, restart_tmax, restart_steps)
    for i in range(len(sigmas) - 1):
        x = _heun_step(denoiser, x, sigmas[i], sigmas[i + 1], label, guidance, callback, i)
        if i + 1 != where:
            continue
        for _ in range(restart_k):
            # Algorithm 1's forward jump, t_min -> t_max in one exact draw
            up = s_noise * math.sqrt(levels[0] ** 2 - levels[-1] ** 2)
            x = x + noise_like(x, generators) * up
            for j in range(restart_steps):
                x = _heun_step(denoiser, x, levels[j], levels[j + 1], label, guidance, None, j)
    return x


def _restart_levels(
    sigmas: torch.Tensor, tmin: float, tmax: float, steps: int
) -> tuple[int, list[float]]:
    """Where restart happens (the index in `sigmas` of the positive level, after the
    first, nearest `tmin`) and its levels from t_max down to that level."""
    if steps < 1:
        raise ValueError(f"restart_steps must be at least 1, got {steps}")
    positive = [float(s) for s in sigmas[1:] if s > 0]
    if not positive:
        raise ValueError("restart needs a schedule with a positive level after the first")
    where = 1 + min(range(len(positive)), key=lambda k: abs(positive[k] - tmin))
    t_min = positive[where - 1]
    if not t_min < tmax:
        raise ValueError(
            f"restart_tmax must lie above the schedule's level nearest restart_tmin "
            f"({t_min:.4g} for restart_tmin={tmin}), got restart_tmax={tmax}"
        )
    levels = karras_sigmas(steps + 1, t_min, tmax, append_zero=False, dtype=torch.float64)
    return where, [*levels[:-1].tolist(), t_min]  # end exactly on the schedule's level


def _need_generators(
    generator: Sequence[torch.Generator] | None, x: torch.Tensor, name: str
) -> Sequence[torch.Generator]:
    if generator is None or len(generator) != x.shape[0]:
        raise ValueError(f"{name} is stochastic: pass one generator per sample (generator=[...])")
    return generator


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler_ancestral": sample_euler_ancestral,
    "edm_stochastic": sample_edm_stochastic,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "restart": sample_restart,
}
"""Samplers by the name configs use."""


def network_evaluations(sampler: str, steps: int, **settings: Any) -> int:
    """Network evaluations (NFE) a sampler makes for `steps` steps ending at sigma = 0,
    before classifier-free guidance doubles them. `settings` are the sampler's own
    (defaults otherwise): restart adds 2 restart_steps per restart, restart_k times."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; one of {', '.join(SAMPLERS)}")
    parameters = inspect.signature(SAMPLERS[sampler]).parameters
    unknown = sorted(settings.keys() - parameters.keys())
    if unknown:
        raise ValueError(f"{sampler} has no setting {', '.join(unknown)}")
    if sampler in ("euler", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde"):
        return steps
    heun = 2 * steps - 1  # the step to sigma = 0 is Euler's
    if sampler == "restart":
        k = settings.get("restart_k", parameters["restart_k"].default)
        restart_steps = settings.get("restart_steps", parameters["restart_steps"].default)
        return heun + 2 * k * restart_steps
    return heun
