"""The tiny UNet learns the 8x8 digits on the CPU: the loss falls, and its Heun
samples are far closer to held-out digits than noise is, and about as close as
real training digits are (pixel-space Frechet distance)."""

import numpy as np
import pytest
import torch

from pipeline.data.digits import load_digits
from pipeline.maths import solvers as S
from pipeline.maths.counter import seed63
from pipeline.maths.edm import Precond, karras_sigmas
from pipeline.maths.ema import EMA
from pipeline.maths.metrics import frechet_distance
from pipeline.maths.train_step import train_step
from pipeline.maths.unet import build

pytestmark = pytest.mark.slow


@pytest.mark.trial
def test_tiny_unet_learns_the_digits():
    images, labels = load_digits()
    x = (torch.tensor(images, dtype=torch.float32) / 127.5 - 1)[:, None].repeat(1, 3, 1, 1)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    held_out, train = order[:400], order[400:]

    torch.manual_seed(0)
    denoiser = Precond(build("tiny", num_classes=10, label_dropout=0.1))
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=2e-3)
    ema = EMA(denoiser, halflife_images=20_000)
    pick = torch.Generator().manual_seed(1)
    losses = []
    for step in range(600):
        batch = train[torch.randint(0, len(train), (64,), generator=pick)]
        result = train_step(
            denoiser,
            optimizer,
            ema,
            [(x[batch], y[batch])],
            images_seen=64 * step,
            base_lr=2e-3,
            lr_rampup_images=10_000,
            seeds=seed63(0, np.arange(64 * step, 64 * (step + 1))),
            dropout_seed=step,
            label_dropout=0.1,
        )
        losses.append(result.loss)
    first, last = np.mean(losses[:100]), np.mean(losses[-100:])

    gens = S.sample_generators(0, range(len(held_out)))
    noise = S.initial_noise((len(held_out), 3, 8, 8), 80.0, gens)
    samples = S.sample_heun(ema.module.eval(), noise, karras_sigmas(18), label=y[held_out])
    pixels = samples.clamp(-1, 1)[:, 0].flatten(1).numpy()
    reference = x[held_out][:, 0].flatten(1).numpy()
    fd_samples = frechet_distance(pixels, reference)
    fd_noise = frechet_distance(
        np.clip(np.random.default_rng(5).normal(size=pixels.shape), -1, 1), reference
    )
    fd_train = frechet_distance(x[train[:400]][:, 0].flatten(1).numpy(), reference)
    print(
        f"\nloss {first:.3f} -> {last:.3f}; pixel FD to held-out digits: "
        f"samples {fd_samples:.2f}, noise {fd_noise:.2f}, training digits {fd_train:.2f}"
    )
    assert last < 0.4 * first
    assert fd_samples < 0.1 * fd_noise
    # Near the data, not merely away from noise: within 2.5x the FD of real training
    # digits to the held-out ones (measured: 1.11 against 0.66).
    assert fd_samples < 2.5 * fd_train
