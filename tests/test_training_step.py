"""The EMA and the torch-only training step: closed-form averages, accumulation,
the NaN guard, and a resumed run that continues exactly."""

import copy

import pytest
import torch

from pipeline.maths.edm import Precond, edm_loss, training_noise
from pipeline.maths.ema import EMA
from pipeline.maths.train_step import NonFiniteLoss, learning_rate, step_generator, train_step
from pipeline.maths.unet import build
from tests.nets import randomised


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


def setup(seed=0, sgd=False, **net):
    torch.manual_seed(seed)
    denoiser = Precond(randomised(build("tiny", num_classes=10, **net), seed))
    opt = (
        torch.optim.SGD(denoiser.parameters(), lr=0.1)
        if sgd
        else torch.optim.Adam(denoiser.parameters(), lr=1e-3)
    )
    return denoiser, opt, EMA(denoiser, halflife_images=500, rampup_ratio=0.05)


def data(n=16):
    gen = torch.Generator().manual_seed(9)
    return torch.randn(n, 3, 8, 8, generator=gen) * 0.5, torch.randint(0, 10, (n,), generator=gen)


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_micro_batches_give_the_update_of_one_batch():
    x, label = data(16)
    after = []
    for parts in ([slice(0, 16)], [slice(0, 8), slice(8, 16)], [slice(0, 4), slice(4, 16)]):
        denoiser, opt, ema = setup(sgd=True)
        before = flat(denoiser)
        result = train_step(
            denoiser,
            opt,
            ema,
            [(x[p], label[p]) for p in parts],
            images_seen=0,
            base_lr=0.1,
            max_grad_norm=None,
            generator=step_generator(0, 0, 0),
        )
        after.append((flat(denoiser), result.loss))
    assert not torch.equal(after[0][0], before)
    for params, loss in after[1:]:
        assert torch.allclose(params, after[0][0], atol=1e-6) and loss == pytest.approx(after[0][1])
    # and that update is SGD on the mean loss over all 16 images, written out
    denoiser, _, _ = setup(sgd=True)
    sigma, noise = training_noise(x, step_generator(0, 0, 0))
    edm_loss(denoiser, x, label, sigma=sigma, noise=noise).mean().backward()
    expected = torch.cat([(p - 0.1 * p.grad).detach().flatten() for p in denoiser.parameters()])
    assert torch.allclose(after[0][0], expected, atol=1e-6)


def test_gradients_are_clipped_to_the_maximum_norm():
    denoiser, opt, ema = setup(sgd=True)
    before = flat(denoiser)
    result = train_step(
        denoiser,
        opt,
        ema,
        [data()],
        images_seen=10**6,
        base_lr=1.0,
        max_grad_norm=1e-3,
        generator=step_generator(0, 0, 0),
    )
    opt_lr = opt.param_groups[0]["lr"]
    assert result.grad_norm > 1e-2 and opt_lr == 1.0
    assert (flat(denoiser) - before).norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_the_ema_follows_the_optimizer_step():
    denoiser, opt, ema = setup()
    result = train_step(denoiser, opt, ema, [data()], images_seen=0, base_lr=1e-3)
    assert result.ema_beta == 0.0  # at 0 images the average is the new weights
    assert torch.equal(flat(ema.module), flat(denoiser))


def test_each_step_draws_its_own_noise_and_the_same_step_the_same():
    def first(seed, rank, images):
        return torch.randn(4, generator=step_generator(seed, rank, images))

    assert torch.equal(first(0, 0, 64), first(0, 0, 64))
    for other in (first(0, 0, 128), first(0, 1, 64), first(1, 0, 64)):
        assert not torch.equal(first(0, 0, 64), other)


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


def test_a_resumed_run_continues_exactly_dropout_included():
    net = {"dropout": 0.1, "label_dropout": 0.2}
    straight = setup(**net)
    losses = run_steps(*straight, 0, 128)

    first = setup(**net)
    head = run_steps(*first, 0, 64)
    saved = [copy.deepcopy(part.state_dict()) for part in first]
    torch.manual_seed(99)  # whatever the global RNG holds, the steps re-seed it
    resumed = setup(seed=123, **net)  # fresh objects and weights: all come from the save
    for part, state in zip(resumed, saved, strict=True):
        part.load_state_dict(state)
    tail = run_steps(*resumed, 64, 128)

    assert head + tail == losses
    assert torch.equal(flat(straight[0]), flat(resumed[0]))
    assert torch.equal(flat(straight[2].module), flat(resumed[2].module))
