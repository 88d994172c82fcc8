"""One training step, torch only: loss -> backward -> clip -> optimizer -> EMA.

The Ray trainer calls this once per global batch; it runs the same in a test
with no Ray at all. Progress is counted in images seen: the learning-rate
ramp-up and the EMA are functions of it, so a resumed run continues the same
curves, and each step's noise comes from a generator seeded by
(seed, rank, images_seen), so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.maths.edm import edm_loss, training_noise
from pipeline.maths.ema import EMA


class NonFiniteLoss(FloatingPointError):
    """The loss (or the gradient norm) was NaN or infinite; nothing was updated."""


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean EDM loss over the step's images."""
    grad_norm: float
    """Gradient norm before clipping."""
    learning_rate: float
    ema_beta: float | None
    """Weight the EMA kept (None without an EMA)."""


def learning_rate(images_seen: int, base: float, rampup_images: int) -> float:
    """EDM's linear ramp-up: base * min(images_seen / rampup_images, 1)."""
    if rampup_images <= 0:
        return base
    return base * min(images_seen / rampup_images, 1.0)


def step_generator(
    seed: int, rank: int, images_seen: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The generator for one step's noise, a function of (seed, rank, images_seen)."""
    state = np.random.SeedSequence([seed, rank, images_seen]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & (2**63 - 1))


def train_step(
    denoiser: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    *,
    images_seen: int,
    base_lr: float,
    lr_rampup_images: int = 0,
    max_grad_norm: float | None = 1.0,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    ema_model: nn.Module | None = None,
) -> StepResult:
    """One optimizer step over `batches`: micro-batches accumulated into one
    gradient, the same update as one batch of all their images (every image's
    sigma and noise are drawn up front, in the same order either way).

    `denoiser` is what the loss calls (a `Precond`, possibly wrapped by DDP, whose
    gradients are then all-reduced once, after the last micro-batch); `ema_model`
    is the unwrapped module the EMA averages (default: `denoiser`; no EMA: None).
    `images_seen` counts images before this step. `generator` (see
    `step_generator`) drives all of the step's randomness, dropout included, so
    the step is reproducible. Raises NonFiniteLoss, with no parameter changed,
    when the loss or gradient is NaN or infinite.
    """
    lr = learning_rate(images_seen, base_lr, lr_rampup_images)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    device = batches[0][0].device
    total = sum(x.shape[0] for x, _ in batches)
    everything = torch.cat([x for x, _ in batches])
    sigma, noise = training_noise(everything, generator)
    dropout_seed = int(torch.randint(2**62, (1,), generator=generator, device=device))
    loss_sum = torch.zeros((), device=device)
    start = 0
    no_sync = getattr(denoiser, "no_sync", None)  # DistributedDataParallel's
    with _seeded_global_rng(dropout_seed, device):
        for i, (x, label) in enumerate(batches):
            part = slice(start, start + x.shape[0])
            start += x.shape[0]
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with _autocast(device, autocast_dtype):
                    loss = edm_loss(denoiser, x, label, sigma=sigma[part], noise=noise[part])
                    loss = loss.sum()
                (loss / total).backward()
            loss_sum += loss.detach()
    params = [p for p in denoiser.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    mean_loss, grad_norm = (loss_sum / total).item(), norm.item()
    if not (np.isfinite(mean_loss) and np.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss {mean_loss}, gradient norm {grad_norm}")
    optimizer.step()
    beta = None
    if ema is not None:
        beta = ema.update(ema_model if ema_model is not None else denoiser, images_seen, total)
    return StepResult(mean_loss, grad_norm, lr, beta)


def _autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Dropout and label dropout draw from torch's global generators: seed them
    for the step, and leave the caller's state as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
