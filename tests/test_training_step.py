"""The EMA and the torch-only training step: closed-form averages, accumulation,
the NaN guard, and a resumed run that continues exactly."""

import copy

import pytest
import torch

from pipeline.diffusion import Precond, add_noise, loss_weight
from pipeline.diffusion.step import (
    NonFiniteLoss,
    learning_rate,
    step_generator,
    train_step,
)
from pipeline.ema import EMA
from pipeline.model import build


def test_ema_half_life_is_counted_in_images():
    start, target = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    ema = EMA(start, halflife_images=1000, rampup_ratio=None)
    with torch.no_grad():
        for p in target.parameters():
            p.fill_(1.0)
    expected = [0.5 * p + 0.5 for p in start.parameters()]
    for seen in range(0, 1000, 40):  # 1000 images in batches of 40: one half-life
        ema.update(target, seen, 40)
    for got, want in zip(ema.module.parameters(), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_ema_ramp_up_starts_from_the_current_weights():
    ema = EMA(torch.nn.Linear(2, 2), halflife_images=10_000, rampup_ratio=0.05)
    assert ema.beta(0, 64) == 0.0  # the first update copies the weights
    assert ema.beta(1_000, 64) == pytest.approx(0.5 ** (64 / 50))  # half-life 5% of images
    assert ema.beta(10**9, 64) == pytest.approx(0.5 ** (64 / 10_000))
    other = EMA(torch.nn.Linear(2, 2))
    other.load_state_dict(ema.state_dict())
    assert all(
        torch.equal(a, b)
        for a, b in zip(other.module.parameters(), ema.module.parameters(), strict=True)
    )


def test_learning_rate_ramps_up_linearly_in_images():
    assert learning_rate(0, 1e-3, 1000) == 0.0
    assert learning_rate(250, 1e-3, 1000) == pytest.approx(2.5e-4)
    assert learning_rate(5000, 1e-3, 1000) == 1e-3
    assert learning_rate(0, 1e-3, 0) == 1e-3


def setup(seed=0):
    torch.manual_seed(seed)
    denoiser = Precond(build("tiny", num_classes=10))
    opt = torch.optim.Adam(denoiser.parameters(), lr=1e-3)
    return denoiser, opt, EMA(denoiser, halflife_images=500, rampup_ratio=0.05)


def data(n=16):
    gen = torch.Generator().manual_seed(9)
    return torch.randn(n, 3, 8, 8, generator=gen) * 0.5, torch.randint(0, 10, (n,), generator=gen)


def test_micro_batches_accumulate_to_the_gradient_of_one_batch():
    x, label = data(16)
    noise, sigma = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)), 0.7
    grads = []
    for parts in ([slice(0, 16)], [slice(0, 8), slice(8, 16)]):
        denoiser, _, _ = setup()
        for part in parts:  # the same noise for every image either way
            y = add_noise(x[part], torch.tensor(sigma), noise[part])
            error = (denoiser(y, torch.tensor(sigma), label[part]) - x[part]) ** 2
            (loss_weight(torch.tensor(sigma)) * error.flatten(1).mean(1)).sum().div(16).backward()
        grads.append(torch.cat([p.grad.flatten() for p in denoiser.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-7)
    # and train_step runs a list of micro-batches as one update
    denoiser, opt, ema = setup()
    result = train_step(
        denoiser,
        opt,
        ema,
        [(x[:8], label[:8]), (x[8:], label[8:])],
        images_seen=0,
        base_lr=1e-3,
        generator=step_generator(0, 0, 0),
    )
    assert result.learning_rate == 1e-3 and result.ema_beta == 0.0 and result.loss > 0


def test_a_non_finite_loss_stops_the_step_and_changes_nothing():
    denoiser, opt, ema = setup()
    x, label = data()
    train_step(denoiser, opt, ema, [(x, label)], images_seen=0, base_lr=1e-3)
    before = copy.deepcopy(denoiser.state_dict()), copy.deepcopy(ema.state_dict())
    x[3, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match="loss nan"):
        train_step(denoiser, opt, ema, [(x, label)], images_seen=16, base_lr=1e-3)
    for saved, now in zip(before, (denoiser.state_dict(), ema.state_dict()), strict=True):
        assert all(torch.equal(saved[k], now[k]) for k in saved)


def run_steps(denoiser, opt, ema, start, stop, batch=16):
    x, label = data(batch)
    losses = []
    for images in range(start, stop, batch):
        gen = step_generator(seed=3, rank=0, images_seen=images)
        result = train_step(
            denoiser,
            opt,
            ema,
            [(x, label)],
            images_seen=images,
            base_lr=2e-3,
            lr_rampup_images=64,
            generator=gen,
        )
        losses.append(result.loss)
    return losses


def test_a_resumed_run_continues_exactly():
    straight = setup()
    losses = run_steps(*straight, 0, 128)

    first = setup()
    head = run_steps(*first, 0, 64)
    saved = [copy.deepcopy(part.state_dict()) for part in first]
    resumed = setup(seed=123)  # fresh objects, other initial weights: all come from the save
    for part, state in zip(resumed, saved, strict=True):
        part.load_state_dict(state)
    tail = run_steps(*resumed, 64, 128)

    assert head + tail == losses
    for a, b in zip(straight[0].parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight[2].module.parameters(), resumed[2].module.parameters(), strict=True):
        assert torch.equal(a, b)
