"""The autoencoder's losses (pipeline/maths/autoencoder_loss.py) against known answers."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.maths.autoencoder_loss import (
    autoencoder_loss,
    hinge_discriminator_loss,
    kl_to_standard_normal,
    psnr,
)


def test_the_kl_of_the_standard_normal_is_zero_and_of_a_shifted_one_its_closed_form():
    zeros = torch.zeros(2, 4, 3, 3)
    assert kl_to_standard_normal(zeros, zeros).tolist() == [0.0, 0.0]
    # N(1, 4) per element: 0.5 * (1 + 4 - 1 - ln 4), over 36 elements.
    mean, logvar = torch.ones(1, 4, 3, 3), torch.full((1, 4, 3, 3), math.log(4.0))
    expected = 36 * 0.5 * (1 + 4 - 1 - math.log(4))
    assert kl_to_standard_normal(mean, logvar).item() == pytest.approx(expected, rel=1e-6)


def test_the_kl_matches_a_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.tensor([[0.7]]), torch.tensor([[math.log(0.3)]])
    z = mean + (0.5 * logvar).exp() * torch.randn(400_000, 1, generator=g)
    log_q = -0.5 * ((z - mean).square() / logvar.exp() + logvar + math.log(2 * math.pi))
    log_p = -0.5 * (z.square() + math.log(2 * math.pi))
    estimate = (log_q - log_p).mean().item()
    assert kl_to_standard_normal(mean, logvar).item() == pytest.approx(estimate, abs=0.01)


def test_the_loss_is_l1_plus_the_weighted_kl_per_pixel():
    x = torch.zeros(2, 3, 4, 4)
    reconstruction = torch.full_like(x, 0.25)
    mean, logvar = torch.ones(2, 2, 1, 1), torch.zeros(2, 2, 1, 1)  # KL 0.5 * 2 = 1 per image
    assert autoencoder_loss(x, reconstruction, mean, logvar, 0.0).item() == pytest.approx(0.25)
    assert autoencoder_loss(x, reconstruction, mean, logvar, 4.8).item() == pytest.approx(
        0.25 + 4.8 * 1 / 48
    )


def test_the_hinge_loss_is_zero_only_beyond_the_margins():
    assert hinge_discriminator_loss(torch.tensor([1.5]), torch.tensor([-2.0])).item() == 0
    assert hinge_discriminator_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == 1


def test_psnr_of_a_known_error():
    x = torch.zeros(1, 3, 8, 8)
    # MSE 0.01 over a range of 2: 10 log10(4 / 0.01) = 26.02 dB.
    assert psnr(x, x + 0.1).item() == pytest.approx(10 * math.log10(400), rel=1e-5)
    assert psnr(x, x + 0.1, peak_to_peak=1.0).item() == pytest.approx(20.0, rel=1e-5)
