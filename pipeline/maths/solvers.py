"""Samplers: from noise to images by solving EDM's probability-flow ODE (or its SDE).

Every sampler is one function with one signature, as in k-diffusion:

    sample_x(denoiser, x, sigmas, *, label=None, guidance=1.0, generator=None, callback=None)

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

Adding a solver means adding one function and one entry in SAMPLERS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


# --- noise, one generator per sample --------------------------------------------------


def sample_generators(
    seed: int, indices: Sequence[int], device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per sample index, seeded from (job seed, index) through numpy's
    SeedSequence, so neighbouring indices get unrelated streams."""
    out = []
    for index in indices:
        state = np.random.SeedSequence([seed, int(index)]).generate_state(1, np.uint64)[0]
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
}
"""Samplers by the name configs use."""


def network_evaluations(sampler: str, steps: int) -> int:
    """Network evaluations (NFE) a sampler makes for `steps` steps ending at sigma = 0,
    before classifier-free guidance doubles them."""
    return 2 * steps - 1 if sampler in ("heun", "edm_stochastic") else steps
