"""Post-hoc EMA (EDM2): the width <-> exponent map, the power-function average
against its closed form, and the least-squares reconstruction against known
answers (a stored width comes back exactly, a constant stays constant, a width
between two stored ones lands within the bound its residual gives)."""

import math

import numpy as np
import pytest
import torch

from pipeline.maths.phema import (
    MAX_STD,
    STDS,
    PostHocEMA,
    PowerEMA,
    exp_to_std,
    profile_inner_product,
    reconstruct,
    snapshot_tensors,
    solve_coefficients,
    split_snapshot,
    std_to_exp,
)


class Vector(torch.nn.Module):
    """One float64 parameter vector and an integer buffer: a model whose weights
    a test sets step by step."""

    def __init__(self, size: int = 4):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(size, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def set(self, values: torch.Tensor) -> "Vector":
        with torch.no_grad():
            self.weight.copy_(values)
            self.count += 1
        return self


def power_weights(times: list[int], gamma: float) -> np.ndarray:
    """The weight of each step's model in the power-function average after the
    last step: the integral of p_T over the step, (t_i^(g+1) - t_(i-1)^(g+1)) / T^(g+1)."""
    t = np.array([0, *times], dtype=np.float64) / times[-1]
    return np.diff(t ** (gamma + 1))


def test_std_and_exponent_are_inverse_and_match_the_closed_form():
    # gamma = 1: sqrt(2 / (3^2 * 4)) = sqrt(1/18); gamma = 7: sqrt(8 / (81 * 10)).
    assert exp_to_std(1.0) == pytest.approx(math.sqrt(1 / 18), rel=1e-15)
    assert exp_to_std(7.0) == pytest.approx(math.sqrt(8 / 810), rel=1e-15)
    for std in (0.01, 0.05, 0.075, 0.10, 0.2, 0.28):
        assert exp_to_std(std_to_exp(std)) == pytest.approx(std, rel=1e-12)
    for gamma in (0.5, 1.0, 6.94, 16.97, 100.0):
        assert std_to_exp(exp_to_std(gamma)) == pytest.approx(gamma, rel=1e-9)
    # EDM2's two profiles (Sec. 3.1: gamma = 16.97 and 6.94).
    assert [round(std_to_exp(s), 2) for s in STDS] == [16.97, 6.94]


def test_power_ema_is_the_power_function_average_of_the_steps():
    generator = torch.Generator().manual_seed(0)
    model = Vector()
    ema = PowerEMA(model, std=0.10)
    batches = [3, 5, 8, 2, 7, 4, 6, 5, 9, 1, 4, 6]  # uneven: the weights still telescope
    seen, times, weights = 0, [], []
    for batch in batches:
        values = torch.randn(4, dtype=torch.float64, generator=generator)
        beta = ema.update(model.set(values), seen, batch)
        if seen == 0:
            assert beta == 0.0  # the average starts as the first model
        seen += batch
        times.append(seen)
        weights.append(values)
    expected = (torch.tensor(power_weights(times, ema.gamma)) @ torch.stack(weights)).double()
    torch.testing.assert_close(ema.module.weight, expected, rtol=0, atol=1e-12)
    assert ema.module.count == len(batches)  # buffers are copied, not averaged


def test_post_hoc_ema_updates_every_profile_and_round_trips_its_state():
    model = Vector()
    phema = PostHocEMA(model)
    assert phema.stds == STDS
    for seen in range(0, 40, 4):
        beta = phema.update(model.set(torch.full((4,), seen / 4.0)), seen, 4)
        assert beta == phema.profiles[0].beta(seen, 4)
    wide, narrow = (p.module.weight for p in phema.profiles)
    assert not torch.equal(wide, narrow)
    state = phema.state_dict()
    assert sorted(state) == ["0.050/count", "0.050/weight", "0.100/count", "0.100/weight"]
    again = PostHocEMA(Vector())
    again.load_state_dict(state)
    assert torch.equal(again.profiles[1].module.weight, narrow)
    stored = split_snapshot(snapshot_tensors({p.std: p.module for p in phema.profiles}))
    assert sorted(stored) == list(STDS)
    assert torch.equal(stored[0.05]["weight"], wide)


def snapshots_of(trajectory, batch: int, steps: int, every: int):
    """Run EDM2's two profiles over `trajectory(t)` (the model after t images);
    a snapshot of both every `every` steps. Returns them and the step ends."""
    model = Vector()
    phema = PostHocEMA(model)
    snapshots, times = [], []
    for step in range(steps):
        seen = step * batch
        times.append(seen + batch)
        phema.update(model.set(trajectory(seen + batch)), seen, batch)
        if (step + 1) % every == 0:
            for p in phema.profiles:  # copies: the averages move on
                state = {k: v.clone() for k, v in p.module.state_dict().items()}
                snapshots.append((seen + batch, p.std, state))
    return snapshots, times


def test_a_stored_average_comes_back_exactly():
    images = [1000, 1000, 2000, 2000, 3000, 3000, 4000, 4000]
    stds = [0.05, 0.10] * 4
    for k in range(len(images)):
        x = solve_coefficients(images, stds, images[k], stds[k])
        np.testing.assert_allclose(x, np.eye(len(images))[k], rtol=0, atol=1e-9)

    snapshots, _ = snapshots_of(lambda t: torch.sin(t * torch.arange(1.0, 5.0) / 50), 8, 40, 10)
    for images, std, state in snapshots[2:]:
        out = reconstruct(snapshots, std, images)
        torch.testing.assert_close(out["weight"], state["weight"], rtol=0, atol=1e-12)
        assert out["count"] == images // 8  # integer buffers: the latest snapshot's


def test_a_constant_parameter_stays_constant():
    level = torch.tensor([0.3, -1.7, 1e3, 5e-5], dtype=torch.float64)
    snapshots, _ = snapshots_of(lambda t: level, 8, 40, 10)
    for out_std, out_images in ((0.075, None), (0.2, 240), (0.02, 320)):
        out = reconstruct(snapshots, out_std, out_images)
        x = solve_coefficients(
            [s[0] for s in snapshots if s[0] <= (out_images or 320)],
            [s[1] for s in snapshots if s[0] <= (out_images or 320)],
            out_images or 320,
            out_std,
        )
        assert abs(x.sum() - 1) < 1e-14
        assert x.min() < 0  # not a plain average: the sum keeps the constant
        torch.testing.assert_close(out["weight"], level, rtol=1e-14, atol=0)


def test_a_width_between_stored_ones_is_the_power_average_of_a_linear_trajectory():
    # The weights move linearly with images: theta(t) = a + c t, set after each step.
    a = torch.tensor([0.5, -2.0, 0.0, 3.0], dtype=torch.float64)
    c = torch.tensor([1e-3, -4e-3, 2e-3, 0.0], dtype=torch.float64)
    batch, steps, every, target = 8, 400, 50, 0.075
    snapshots, times = snapshots_of(lambda t: a + c * t, batch, steps, every)
    out = reconstruct(snapshots, target)
    exact = a + c * float(power_weights(times, std_to_exp(target)) @ np.array(times, np.float64))

    # The error is c <r, theta~> for the residual profile r = sum x_i p_i - p_out,
    # theta~(tau) the step function of the images at each step's end. Since
    # <r, 1> = sum x_i - 1 = 0, Cauchy-Schwarz bounds it by
    # |c| |r| |theta~ - T/2| <= |c| |r| (sqrt(T^3 / 12) + batch sqrt(T)).
    t = np.array([s[0] for s in snapshots], np.float64)
    s = np.array([s[1] for s in snapshots])
    x = solve_coefficients(t, s, times[-1], target)
    gram = profile_inner_product(t[:, None], s[:, None], t[None, :], s[None, :])
    b = profile_inner_product(t, s, times[-1], target)
    r2 = x @ gram @ x - 2 * x @ b + profile_inner_product(times[-1], target, times[-1], target)
    big_t = times[-1]
    bound = c.abs() * math.sqrt(r2) * (math.sqrt(big_t**3 / 12) + batch * math.sqrt(big_t))
    assert torch.all((out["weight"] - exact).abs() <= bound + 1e-12)
    # The bound is tight enough to mean something: a fifth of the stored widths' gap.
    gap = (snapshots[-2][2]["weight"] - snapshots[-1][2]["weight"]).abs()
    assert torch.all(bound <= gap / 5)
    # But it is about 56x the error itself, which is under a hundredth of the gap
    # (0.26% here). The plain average of the two stored widths misses by 1.6%: a
    # reconstruction no better than that fails.
    assert torch.all((out["weight"] - exact).abs() <= gap / 100 + 1e-12)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (([1000, 2000], [0.05], 2000, 0.1), "in_images, in_stds"),
        (([1000, 0], [0.05, 0.1], 1000, 0.1), "in_images"),
        (([], [], 1000, 0.1), "in_images"),
        (([1000, 2000], [0.05, 0.3], 2000, 0.1), "in_stds"),
        (([1000, 2000], [0.05, 0.1], 2000, MAX_STD), "out_std"),
        (([1000, 2000], [0.05, 0.1], 2000, 0.0), "out_std"),
        (([1000, 2000], [0.05, 0.1], 3000, 0.1), "out_images"),
        (([1000, 1000], [0.05, 0.05], 1000, 0.1), "the same average is given twice"),
    ],
)
def test_bad_inputs_are_named(arguments, named):
    with pytest.raises(ValueError, match=named):
        solve_coefficients(*arguments)


def test_bad_reconstructions_and_profiles_are_named():
    state = {"weight": torch.zeros(2)}
    with pytest.raises(ValueError, match="snapshots"):
        reconstruct([], 0.1)
    with pytest.raises(ValueError, match="out_images"):
        reconstruct([(1000, 0.05, state)], 0.1, out_images=500)
    with pytest.raises(ValueError, match="snapshots"):
        reconstruct([(1000, 0.05, state), (1000, 0.1, {"bias": torch.zeros(2)})], 0.1)
    with pytest.raises(ValueError, match="std"):
        PowerEMA(Vector(), std=0.5)
    with pytest.raises(ValueError, match="stds"):
        PostHocEMA(Vector(), stds=(0.05, 0.0501))
    with pytest.raises(ValueError, match="snapshot: key 'weight'"):
        split_snapshot(state)
