"""Latent diffusion's maths (pipeline/maths/latents.py) against known answers."""

from __future__ import annotations

import pytest
import torch

from pipeline.maths.latents import ChannelMoments, LatentStats, draw_latents


def posteriors(n: int, channels: int = 4, side: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shift = torch.tensor([5.8, 3.2, 0.1, -2.2][:channels]).reshape(1, channels, 1, 1)
    mean = torch.randn(n, channels, side, side, generator=g) * 3 + shift
    std = torch.rand(n, channels, side, side, generator=g) * 2 + 0.1
    return mean, std


def test_the_statistics_of_a_two_point_mixture_are_its_closed_form():
    # Half the images' posteriors are N(a, s^2) everywhere, half N(b, s^2): the drawn
    # latents have mean (a + b) / 2 and variance ((a - b) / 2)^2 + s^2 per channel.
    a = torch.tensor([1.0, -4.0, 0.0], dtype=torch.float64)
    b, s = torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64), 0.75
    mean = torch.cat(
        [a.reshape(1, 3, 1, 1).expand(5, 3, 4, 4), b.reshape(1, 3, 1, 1).expand(5, 3, 4, 4)]
    )
    moments = ChannelMoments(3)
    moments.add(mean, torch.full_like(mean, s))
    stats = moments.stats()
    assert stats.raw_mean == pytest.approx(((a + b) / 2).tolist(), abs=1e-12)
    expected = (((a - b) / 2) ** 2 + s**2).sqrt()
    assert stats.raw_std == pytest.approx(expected.tolist(), abs=1e-12)
    assert moments.values == 10 * 16


def test_normalised_draws_have_mean_zero_and_the_final_std_per_channel():
    mean, std = posteriors(400)
    moments = ChannelMoments(4)
    moments.add(mean, std)
    stats = moments.stats()
    x = stats.normalise(draw_latents(mean, std, list(range(400))))
    per_channel = x.transpose(0, 1).reshape(4, -1)
    # 25,600 draws per channel: the sample mean's error is about 0.5 / 160.
    assert per_channel.mean(dim=1).abs().max() < 0.02
    assert (per_channel.std(dim=1) - 0.5).abs().max() < 0.01
    # Without the posteriors' std, the draws would be 1/sqrt(1 + E[std^2]/Var(mean))
    # too narrow: the statistics must count it.
    narrow = stats.normalise(mean).transpose(0, 1).reshape(4, -1).std(dim=1)
    assert (narrow < 0.49).all(), narrow


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normalise_and_denormalise_are_inverses(dtype):
    stats = LatentStats((5.81, 3.25, 0.12, -2.15), (4.17, 4.62, 3.71, 3.28))
    z = posteriors(3, seed=1)[0].to(dtype)
    back = stats.denormalise(stats.normalise(z))
    assert back.dtype == dtype
    torch.testing.assert_close(back, z, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
    # The affine map is the stated one: each channel's raw mean goes to 0, one raw
    # standard deviation from it to +-0.5.
    point = torch.tensor([5.81, 3.25 + 4.62, 0.12 - 3.71, -2.15], dtype=dtype)
    assert stats.normalise(point.reshape(1, 4, 1, 1)).flatten().tolist() == pytest.approx(
        [0.0, 0.5, -0.5, 0.0], abs=1e-6
    )


@pytest.mark.parametrize("cut", [1, 7, 13])
def test_moments_kept_by_several_tasks_merge_to_those_of_one_pass(cut):
    mean, std = posteriors(20, channels=3, seed=2)
    whole, first, rest = ChannelMoments(3), ChannelMoments(3), ChannelMoments(3)
    whole.add(mean, std)
    first.add(mean[:cut], std[:cut])
    rest.add(mean[cut:], std[cut:])
    merged = rest.merge(first)
    assert merged.values == whole.values
    assert merged.stats().raw_mean == pytest.approx(whole.stats().raw_mean, rel=1e-12)
    assert merged.stats().raw_std == pytest.approx(whole.stats().raw_std, rel=1e-12)


def test_each_images_draw_comes_from_its_seed_whatever_batch_it_is_in():
    mean, std = posteriors(6)
    seeds = [11, 12, 13, 14, 15, 16]
    z = draw_latents(mean, std, seeds)
    assert torch.equal(z, draw_latents(mean, std, seeds))
    # Images 4 and 1 alone, in another order: the same draws.
    alone = draw_latents(mean[[4, 1]], std[[4, 1]], [15, 12])
    assert torch.equal(alone, z[[4, 1]])
    # Another seed, another draw; a zero std, the mean itself.
    assert not torch.equal(draw_latents(mean, std, [s + 100 for s in seeds]), z)
    assert torch.equal(draw_latents(mean, torch.zeros_like(std), seeds), mean)
    # The draw is from N(mean, std^2): standardised, it is a standard normal.
    e = (z - mean) / std
    assert abs(e.mean().item()) < 0.05 and abs(e.std().item() - 1) < 0.05


def test_statistics_of_nothing_or_of_a_constant_channel_are_refused():
    with pytest.raises(ValueError, match="no latents counted"):
        ChannelMoments(4).stats()
    mean, std = posteriors(2, channels=2)
    mean[:, 1], std[:, 1] = 3.0, 0.0
    moments = ChannelMoments(2)
    moments.add(mean, std)
    with pytest.raises(ValueError, match="does not vary"):
        moments.stats()
