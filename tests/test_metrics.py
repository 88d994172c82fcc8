"""Metrics against closed forms."""

import numpy as np
import pytest

from pipeline.metrics import frechet_distance


def test_frechet_distance_of_two_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    # diagonal covariances: FD = |mu_a - mu_b|^2 + sum (s_a - s_b)^2
    mu_a, mu_b = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    s_a, s_b = np.array([1.0, 0.5, 2.0]), np.array([0.5, 0.5, 1.0])
    a = mu_a + s_a * rng.normal(size=(200_000, 3))
    b = mu_b + s_b * rng.normal(size=(200_000, 3))
    expected = ((mu_a - mu_b) ** 2).sum() + ((s_a - s_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.01)
    # correlated: rotate both by the same rotation; the distance does not change
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    assert frechet_distance(a @ q, b @ q) == pytest.approx(frechet_distance(a, b), rel=1e-6)


def test_identical_sets_are_at_distance_zero_and_shifts_cost_their_square():
    x = np.random.default_rng(1).normal(size=(5000, 16))
    assert abs(frechet_distance(x, x)) < 1e-8
    assert frechet_distance(x, x + 0.5) == pytest.approx(16 * 0.25, rel=1e-6)
