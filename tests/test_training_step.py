"""The EMA and the torch-only training step: closed-form averages, accumulation,
per-image randomness (noise and label dropout that follow an image's seed, not
its batch), the NaN guard (a step skipped on the device, reported at the next
read), no host read inside a step, and a resumed run that continues exactly."""

import copy
import importlib
import math

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.maths.counter import seed63
from pipeline.maths.edm import Precond, edm_loss, seeded_training_noise
from pipeline.maths.ema import EMA
from pipeline.maths.train_step import (
    NonFiniteLoss,
    StepLog,
    Steps,
    fused_adam,
    keep_fused,
    learning_rate,
    train_step,
)
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


def test_the_foreach_ema_is_the_per_parameter_lerp_bit_for_bit():
    torch.manual_seed(0)
    model = build("tiny", num_classes=10)
    ema = EMA(randomised(build("tiny", num_classes=10), 3), halflife_images=300)
    expected = [p.detach().clone() for p in ema.module.parameters()]
    for seen in (0, 64, 640, 6400):  # betas from 0 (weights copied) to 0.86
        beta = ema.beta(seen, 64)
        for i, p in enumerate(model.parameters()):
            expected[i].lerp_(p.detach(), 1 - beta)  # the update as it was written before
        where = torch.tensor(True) if seen % 128 else None  # masked and not: the same
        assert ema.update(model, seen, 64, where=where) == beta
        assert all(
            torch.equal(a, b) for a, b in zip(ema.module.parameters(), expected, strict=True)
        )
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    # A masked-off update changes nothing, buffers included.
    before = copy.deepcopy(ema.state_dict()), [b.clone() for b in ema.module.buffers()]
    for b in model.buffers():
        b.add_(1.0)
    ema.update(model, 10_000, 64, where=torch.tensor(False))
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in before[0].items())
    assert all(torch.equal(a, b) for a, b in zip(before[1], ema.module.buffers(), strict=True))
    ema.update(model, 10_000, 64, where=torch.tensor(True))
    assert all(
        torch.equal(a, b) for a, b in zip(model.buffers(), ema.module.buffers(), strict=True)
    )


def setup(seed=0, sgd=False, **net):
    torch.manual_seed(seed)
    denoiser = Precond(randomised(build("tiny", num_classes=10, **net), seed))
    opt = (
        torch.optim.SGD(denoiser.parameters(), lr=0.1)
        if sgd
        else fused_adam(denoiser.parameters(), lr=1e-3)
    )
    return denoiser, opt, EMA(denoiser, halflife_images=500, rampup_ratio=0.05)


def data(n=16):
    gen = torch.Generator().manual_seed(9)
    return torch.randn(n, 3, 8, 8, generator=gen) * 0.5, torch.randint(0, 10, (n,), generator=gen)


def seeds(start, count=16, seed=0):
    """Per-image seeds of `count` images from position `start` on."""
    return seed63(seed, np.arange(start, start + count))


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
            seeds=seeds(0),
        )
        after.append((flat(denoiser), float(result.loss)))
    assert not torch.equal(after[0][0], before)
    for params, loss in after[1:]:
        assert torch.allclose(params, after[0][0], atol=1e-6) and loss == pytest.approx(after[0][1])
    # and that update is SGD on the mean loss over all 16 images, written out
    denoiser, _, _ = setup(sgd=True)
    sigma, noise = seeded_training_noise(seeds(0), x.shape)
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
        seeds=seeds(0),
    )
    opt_lr = opt.param_groups[0]["lr"]
    assert float(result.grad_norm) > 1e-2 and opt_lr == 1.0
    assert (flat(denoiser) - before).norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_the_ema_follows_the_optimizer_step():
    denoiser, opt, ema = setup()
    result = train_step(denoiser, opt, ema, [data()], images_seen=0, base_lr=1e-3)
    assert result.ema_beta == 0.0  # at 0 images the average is the new weights
    assert torch.equal(flat(ema.module), flat(denoiser))


def test_each_image_draws_its_noise_from_its_seed_whatever_batch_it_is_in():
    sigma, noise = seeded_training_noise(seeds(0, 8), (8, 3, 4, 4))
    # The same images in another batch (a worker's half, other neighbours) draw the same.
    for part in (slice(0, 4), slice(4, 8), slice(2, 3)):
        s, n = seeded_training_noise(seeds(0, 8)[part], (len(seeds(0, 8)[part]), 3, 4, 4))
        assert torch.equal(s, sigma[part]) and torch.equal(n, noise[part])
    assert len(set(sigma.tolist())) == 8  # and different images draw differently
    again_elsewhere = seeded_training_noise(seeds(8, 8), (8, 3, 4, 4))[1]
    assert not torch.equal(again_elsewhere, noise)
    # ln(sigma) ~ N(-1.2, 1.2^2) and n ~ N(0, I): over 4,000 images, within 5 standard errors.
    sigma, noise = seeded_training_noise(seeds(0, 4000), (4000, 3, 2, 2))
    log = sigma.log()
    assert abs(log.mean() + 1.2) < 5 * 1.2 / 4000**0.5 and abs(log.std() - 1.2) < 0.07
    assert abs(noise.mean()) < 5 / 16000**0.5 and abs(noise.std() - 1) < 0.03


def test_label_dropout_drops_each_images_label_by_its_seed():
    class Labels(torch.nn.Module):
        """A denoiser that records the labels it is called with."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def forward(self, y, sigma, label):
            self.seen.append(label.clone())
            return y * self.w

    def labels_seen(image_seeds, parts, rate=0.3):
        net = Labels()
        x, label = torch.zeros(len(image_seeds), 3, 2, 2), torch.arange(len(image_seeds))
        batches = [(x[p], label[p]) for p in parts]
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        step = {"images_seen": 0, "base_lr": 0.1, "seeds": image_seeds, "label_dropout": rate}
        train_step(net, opt, None, batches, **step)
        return torch.cat(net.seen)

    all_at_once = labels_seen(seeds(0, 2000), [slice(0, 2000)])
    dropped = all_at_once < 0
    assert 0.3 - 5 * 0.0103 < dropped.float().mean() < 0.3 + 5 * 0.0103  # 5 standard errors
    kept = ~dropped
    assert torch.equal(all_at_once[kept], torch.arange(2000)[kept])  # the rest keep theirs
    # The same images in micro-batches, or half of them alone, drop the same labels.
    split = labels_seen(seeds(0, 2000), [slice(0, 700), slice(700, 2000)])
    assert torch.equal(split, all_at_once)
    half = labels_seen(seeds(1000, 1000), [slice(0, 1000)])
    assert torch.equal(half < 0, dropped[1000:])
    assert not (labels_seen(seeds(0, 2000), [slice(0, 2000)], rate=0.0) < 0).any()


def everything(denoiser, opt, ema):
    """Every tensor of the weights, the average and the optimizer state, copied."""
    state = opt.state_dict()["state"]
    moments = {f"opt.{i}.{k}": v for i, s in state.items() for k, v in s.items()}
    tensors = {**denoiser.state_dict(), **{f"ema.{k}": v for k, v in ema.state_dict().items()}}
    return copy.deepcopy({**tensors, **moments})


@pytest.mark.parametrize("sgd", [False, True], ids=["fused-adam", "sgd-momentum"])
def test_a_non_finite_step_changes_nothing_and_the_next_read_names_it(sgd):
    denoiser, opt, ema = setup(sgd=sgd)
    if sgd:  # an optimizer without found_inf: the step reads `finite` on the host
        opt = torch.optim.SGD(denoiser.parameters(), lr=0.1, momentum=0.9)
    x, label = data()
    steps = StepLog()
    for seen in (0, 16):
        steps.add(seen, train_step(denoiser, opt, ema, [(x, label)], images_seen=seen, base_lr=1))
    before = everything(denoiser, opt, ema)
    assert steps.read().non_finite is None and len(before) > 2 * len(ema.state_dict())
    poisoned = x.clone()
    poisoned[3, 0, 0, 0] = float("nan")
    result = train_step(denoiser, opt, ema, [(poisoned, label)], images_seen=32, base_lr=1)
    assert not result.finite and math.isnan(result.loss) and math.isnan(result.grad_norm)
    now = everything(denoiser, opt, ema)
    assert now.keys() == before.keys()
    assert all(torch.equal(before[k], now[k]) for k in before), "the step changed something"
    steps.add(32, result)
    steps.add(48, train_step(denoiser, opt, ema, [(x, label)], images_seen=48, base_lr=1))
    read = steps.read()
    assert read.count == 4 and read.non_finite is not None and read.non_finite[0] == 32
    with pytest.raises(NonFiniteLoss, match="^loss nan, gradient norm nan$") as e:
        read.check()
    assert e.value.images_seen == 32


class HostReads(TorchDispatchMode):
    """Records, at torch's dispatcher, each operator that needs a device tensor's
    values on the host (on a GPU: a transfer the host waits for). Those torch tags
    as such: a scalar read (`item()`, `float()`, `bool()`, `==` of whole tensors)
    and an output whose shape depends on the values (`masked_select`, `nonzero`,
    boolean indexing); and a copy from a device to the CPU (`.cpu()`, `.to("cpu")`,
    `numpy()`, `tolist()`), which the dispatcher sees only where the tensors are
    not on the CPU already: hence the meta-device run below."""

    TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        to_host = str(kwargs.get("device", "")) == "cpu" or "cpu" in devices
        if any(tag in func.tags for tag in self.TAGS) or (devices - {"cpu"} and to_host):
            self.seen.append(f"{func}({', '.join(sorted(devices))})")
        return func(*args, **kwargs)


def test_a_step_reads_nothing_back_to_the_host():
    """The seeded step (the trainer's) on the CPU, a non-finite batch included:
    no scalar read, no value-dependent shape."""
    denoiser, opt, ema = setup(dropout=0.1)
    x, label = data()
    parts = [(x[:8], label[:8]), (x[8:], label[8:])]
    train_step(denoiser, opt, ema, parts, images_seen=0, base_lr=1e-3)  # the optimizer state
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = float("inf")
    with HostReads() as reads:
        for seen, batch in [(16, parts), (32, [(poisoned, label)])]:
            train_step(
                denoiser,
                opt,
                ema,
                batch,
                images_seen=seen,
                base_lr=1e-3,
                seeds=seeds(seen, len(torch.cat([x for x, _ in batch]))),
                dropout_seed=seen,
                label_dropout=0.2,
            )
    assert reads.seen == []


def test_a_step_runs_on_a_device_without_values(monkeypatch):
    """The step on the meta device, where tensors have shapes and no values: a
    copy to the host is a dispatched operator there, and fails; so does anything
    that reads a value, or mixes in a tensor made on the host (`torch.tensor([t])`).
    Its draws come from the global generator (a device generator needs a real
    device), the rest of the step is the seeded one's."""
    # Fused Adam's kernel has a meta implementation; only its device check refuses.
    monkeypatch.setattr(
        importlib.import_module("torch.optim.adam"),
        "_device_dtype_check_for_fused",
        lambda *a, **k: None,
    )
    denoiser, _, _ = setup(dropout=0.1)
    denoiser.to("meta")
    opt = fused_adam(denoiser.parameters(), lr=1e-3)
    ema = EMA(denoiser, halflife_images=500, rampup_ratio=0.05)
    x, label = (t.to("meta") for t in data())
    parts = [(x[:8], label[:8]), (x[8:], label[8:])]
    with HostReads() as reads:
        for seen in (0, 16):
            result = train_step(
                denoiser, opt, ema, parts, images_seen=seen, base_lr=1e-3, label_dropout=0.2
            )
    assert reads.seen == []
    assert result.loss.device.type == "meta"


@pytest.mark.parametrize(
    ("read", "seen_on_cpu"),
    [
        (lambda t: t.sum().item(), True),
        (lambda t: bool(t.sum() > 0), True),
        (lambda t: t.masked_select(t > 0), True),
        (lambda t: t[t > 0], True),
        (lambda t: torch.tensor([t.sum()]), False),
        (lambda t: t.to("cpu"), False),
        (lambda t: t.cpu(), False),
        (lambda t: t.tolist(), False),
    ],
)
def test_the_checks_see_each_kind_of_host_read(read, seen_on_cpu):
    """What the two tests above look for is seen: every kind on the meta device
    (recorded, or failing before the dispatcher), the tagged operators on the CPU
    too."""
    with HostReads() as reads:
        try:
            read(torch.ones(4, device="meta"))
        except (NotImplementedError, RuntimeError) as e:
            reads.seen.append(f"failed: {e}")
    assert reads.seen
    with HostReads() as reads:
        read(torch.ones(4))
    assert bool(reads.seen) == seen_on_cpu


def test_keep_fused_restores_the_fused_kernel_after_an_earlier_checkpoint():
    denoiser, opt, ema = setup()
    train_step(denoiser, opt, ema, [data()], images_seen=0, base_lr=1e-3)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        group["fused"] = None  # as an earlier version saved it
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["fused"] is None  # the saved settings win
    keep_fused(opt)
    assert all(group["fused"] for group in opt.param_groups)
    assert all(
        torch.equal(opt.state_dict()["state"][0][k], v) for k, v in saved["state"][0].items()
    )
    poisoned = data()[0]
    poisoned[0] = float("nan")
    with HostReads() as reads:
        result = train_step(denoiser, opt, ema, [(poisoned, None)], images_seen=16, base_lr=1e-3)
    assert reads.seen == [] and not result.finite


def test_steps_of_data_parallel_ranks_add_up_and_name_the_earliest_non_finite():
    one = Steps(4, 2.0, 0.5, (96, math.nan, math.inf))
    other = Steps(4, 2.4, 0.5, (64, math.inf, 0.7))
    for steps in (one, other, Steps(3, 1.5, 0.25)):
        again = Steps.from_tensor(steps.to_tensor(torch.device("cpu")))
        assert again.count == steps.count and again.loss_sum == steps.loss_sum
        assert str(again.non_finite) == str(steps.non_finite)  # nan != nan
    both = Steps.over_ranks([Steps(4, 2.0, 0.5), other])
    assert (both.count, both.mean_loss, both.grad_norm) == (8, 0.55, 0.5)
    assert both.non_finite == (64, math.inf, 0.7)
    assert Steps.over_ranks([one, other]).non_finite == (64, math.inf, 0.7)
    assert Steps.over_ranks([Steps(4, 2.0, 0.5), Steps(4, 2.4, 0.5)]).non_finite is None


def run_steps(denoiser, opt, ema, start, stop, batch=16):
    x, label = data(batch)
    losses = []
    for images in range(start, stop, batch):
        result = train_step(
            denoiser,
            opt,
            ema,
            [(x, label)],
            images_seen=images,
            base_lr=2e-3,
            lr_rampup_images=64,
            seeds=seeds(images, batch, seed=3),
            dropout_seed=images,
            label_dropout=0.2,
        )
        losses.append(float(result.loss))
    return losses


def test_a_resumed_run_continues_exactly_dropout_included():
    net = {"dropout": 0.1}
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
