"""Metrics against closed forms."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.maths.inception import InceptionFeatures, fid_kid
from pipeline.maths.metrics import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    precision_recall,
    sliced_wasserstein,
    unit_directions,
)


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


def _commuting_gaussians(d=6):
    """Two Gaussians whose covariances share eigenvectors (a random rotation q), so
    (S1^1/2 S2 S1^1/2)^1/2 = q diag(sqrt(l1 l2)) q^T and the Frechet distance is
    |mu1 - mu2|^2 + sum (sqrt(l1) - sqrt(l2))^2."""
    q, _ = np.linalg.qr(np.random.default_rng(10).normal(size=(d, d)))
    l1 = np.array([2.0, 1.5, 1.0, 0.5, 0.25, 1.0])
    l2 = np.array([1.0, 1.0, 0.5, 1.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(d), np.array([0.5, 0.0, -0.5, 0.0, 0.25, 0.0])
    analytic = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(l1) - np.sqrt(l2)) ** 2).sum()
    return (mu1, (q * l1) @ q.T), (mu2, (q * l2) @ q.T), analytic


def test_frechet_distance_with_fewer_rows_than_features_is_the_covariance_formula():
    # Fewer rows than features take the rows' own route (no D x D matrices): the
    # same number as the formula on the fitted means and covariances, to the
    # latter's precision (the roots of a rank-deficient covariance's zero
    # eigenvalues, about sqrt(eps) each).
    rng = np.random.default_rng(3)
    for na, nb, d in [(40, 30, 64), (30, 60, 61), (70, 20, 71)]:
        a = rng.standard_normal((na, d)) @ rng.standard_normal((d, d)) * 0.3
        b = rng.standard_normal((nb, d)) + rng.standard_normal(d)
        via_stats = frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))
        assert frechet_distance(a, b) == pytest.approx(via_stats, rel=1e-7)
        assert frechet_distance(b, a) == pytest.approx(via_stats, rel=1e-7)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_frechet_distance_of_correlated_gaussians_matches_the_analytic_value():
    (mu1, s1), (mu2, s2), analytic = _commuting_gaussians()
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(analytic, abs=1e-9)
    assert frechet_distance_from_stats(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)

    rng = np.random.default_rng(11)
    # samples: 20k each. Over 200 seeds the estimate has mean analytic - 0.002 and
    # standard deviation 0.020 (mostly 2 (mu1 - mu2).e, e ~ N(0, (S1 + S2) / n):
    # 2 sqrt((mu1 - mu2)^T (S1 + S2) (mu1 - mu2) / n) = 0.016), so 0.08 is 4 sigma.
    a = rng.multivariate_normal(mu1, s1, size=20_000)
    b = rng.multivariate_normal(mu2, s2, size=20_000)
    assert frechet_distance(a, b) == pytest.approx(analytic, abs=0.08)

    # samples whitened to exactly these means and covariances: no sampling error
    def exact(mu, s, n=300):
        z = rng.normal(size=(n, len(mu)))
        z -= z.mean(0)
        z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
        return mu + z @ np.linalg.cholesky(s).T

    a, b = exact(mu1, s1), exact(mu2, s2)
    mu, cov = feature_stats(a)
    np.testing.assert_allclose(mu, mu1, atol=1e-12)
    np.testing.assert_allclose(cov, s1, atol=1e-12)
    assert frechet_distance(a, b) == pytest.approx(analytic, abs=1e-9)


def test_identical_sets_score_perfectly_on_every_metric():
    x = np.random.default_rng(2).normal(size=(1000, 8))
    assert abs(frechet_distance(x, x)) < 1e-9
    assert sliced_wasserstein(x, x) == 0.0
    assert precision_recall(x, x) == (1.0, 1.0)
    # KID of x with itself is unbiased but for the overlap of its two subsets: a
    # point in both adds -2 k(x, x) / m^2 to the cross term, about -2 E k(x, x) / N
    # = -2 * 10 / 1000 in all (E k(x, x) = E (|x|^2 / 8 + 1)^3 is about 10 here);
    # a shift by 0.5 in every coordinate scores about 1.
    kid_same, _ = kernel_inception_distance(x, x, subsets=10, subset_size=500)
    kid_shift, _ = kernel_inception_distance(x, x + 0.5, subsets=10, subset_size=500)
    assert kid_shift > 0.5
    assert abs(kid_same) < 0.05 * kid_shift


def test_a_shifted_set_scores_worse_than_a_sample_of_the_same_distribution():
    rng = np.random.default_rng(3)
    real, same, shifted = (rng.normal(size=(1000, 8)) for _ in range(3))
    shifted += 0.5
    assert frechet_distance(real, shifted) > 10 * frechet_distance(real, same)
    assert sliced_wasserstein(real, shifted) > 5 * sliced_wasserstein(real, same)
    assert precision_recall(real, shifted)[0] < precision_recall(real, same)[0] - 0.05
    kid = {
        name: kernel_inception_distance(real, x, subsets=10, subset_size=500)[0]
        for name, x in [("same", same), ("shifted", shifted)]
    }
    assert kid["shifted"] > 0.5 and abs(kid["same"]) < 0.01 * kid["shifted"]


def test_sliced_wasserstein_of_a_shift_is_the_rms_of_its_projections():
    # W2 between a 1-D set and its translate by c is |c|; here c = v.theta
    rng = np.random.default_rng(4)
    x, v = rng.normal(size=(500, 5)), np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    theta = unit_directions(5, 256, seed=7)
    np.testing.assert_allclose(np.linalg.norm(theta, axis=1), 1.0, rtol=1e-12)
    expected = np.sqrt(((theta @ v) ** 2).mean())
    assert sliced_wasserstein(x, x + v, projections=256, seed=7) == pytest.approx(
        expected, rel=1e-9
    )
    # unequal sizes: every point twice is the same empirical distribution
    twice = np.concatenate([x, x])
    assert sliced_wasserstein(x, twice, projections=256, seed=7) == 0.0
    assert sliced_wasserstein(twice + v, x, projections=256, seed=7) == pytest.approx(
        expected, rel=1e-9
    )


def test_sliced_wasserstein_compares_quantile_functions_on_midpoints():
    # 1-D, sizes 2 and 3: grid t = 1/6, 1/2, 5/6. Q_b = 0, 1, 2; Q_a = 0, 1/2, 1
    # (Q_a(1/2) is where its CDF jumps: the mean of both sides), so
    # W2^2 = (0 + 1/4 + 1) / 3 = 5/12 for either sign of the direction (the exact
    # W2^2 of these empirical measures is 1/2: the midpoint rule has n = 3 points).
    a, b = np.array([[0.0], [1.0]]), np.array([[2.0], [0.0], [1.0]])
    assert sliced_wasserstein(a, b, projections=9) == pytest.approx(np.sqrt(5 / 12), rel=1e-12)
    assert sliced_wasserstein(-a, -b, projections=9) == pytest.approx(np.sqrt(5 / 12), rel=1e-12)
    # per direction, reflection maps Q(t) to -Q(1 - t) and the grid onto itself
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=(30, 3)), rng.exponential(size=(45, 3))
    assert sliced_wasserstein(-a, -b) == pytest.approx(sliced_wasserstein(a, b), rel=1e-9)


def test_sliced_wasserstein_of_isotropic_gaussians_is_the_shift_over_root_d():
    # E_theta (v.theta)^2 = |v|^2 / D for theta uniform on the sphere. The estimate's
    # relative spread: (v.theta)^2 / |v|^2 ~ Beta(1/2, 3/2) in D = 4 has std equal to
    # its mean, so 4096 directions give 1.6% on SW^2 (0.8% on SW); the samples add
    # about 2 (mean_b - mean_a).v / |v|^2, 0.6% on SW. 4% is about 4 sigma.
    rng = np.random.default_rng(5)
    v = np.array([4.0, -4.0, 4.0, 4.0])
    a, b = rng.normal(size=(1000, 4)), rng.normal(size=(1500, 4)) + v
    got = sliced_wasserstein(a, b, projections=4096)
    assert got == pytest.approx(np.linalg.norm(v) / 2, rel=0.04)


def test_precision_and_recall_of_disjoint_and_nested_sets():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(500, 8))
    assert precision_recall(real, rng.normal(size=(400, 8)) + 100) == (0.0, 0.0)
    # fakes that are real points lie in their own real balls
    assert precision_recall(real, real[::3])[0] == 1.0
    # by hand, 1-D, k = 1: real radii 1, 1, 2, 2; fake radii 3, 3. Fake 2 is on
    # the boundary of real 1's ball (inside, as in the paper's code), fake 5 in no
    # ball; reals 0 and 1 are within 3 of fake 2, reals 10 and 12 in no fake ball.
    assert precision_recall([[0.0], [1.0], [10.0], [12.0]], [[2.0], [5.0]], k=1) == (0.5, 0.5)
    # batching changes nothing
    fake = rng.normal(size=(300, 8)) + 0.5
    assert precision_recall(real, fake, batch=7) == precision_recall(real, fake)
    with pytest.raises(ValueError, match="k: must be in"):
        precision_recall(real, real[:3], k=3)


def test_precision_and_recall_of_a_fake_set_that_covers_one_of_two_clusters():
    rng = np.random.default_rng(7)
    far = np.array([20.0, 0.0])
    one, two = rng.normal(size=(1000, 2)) - far, rng.normal(size=(1000, 2)) + far
    real = np.concatenate([one, two])
    # fakes = the real points of cluster one: their k-NN balls are the real ones
    # there, so each of those real points is the centre of a fake ball.
    assert precision_recall(real, one) == (1.0, 0.5)
    # a fresh sample of cluster one: k-NN balls cover a sample of the same 2-D
    # distribution up to its tails (0.98 +- 0.007 with k = 3 over 20 seeds)
    precision, recall = precision_recall(real, rng.normal(size=(1000, 2)) - far)
    assert precision > 0.95
    assert recall == pytest.approx(0.5, abs=0.03)


def _mmd2_unbiased_brute_force(x, y):
    """sum_{i != j} k(x_i, x_j) / (m (m - 1)) + the same for y - 2 mean k(x_i, y_j)."""
    d = x.shape[1]

    def k(p, q):
        return (sum(pi * qi for pi, qi in zip(p, q, strict=True)) / d + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2 * xy / m**2


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 3)) + 0.3
    # one subset of the full size: a permutation of each set, which MMD ignores
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=12)
    assert mean == pytest.approx(_mmd2_unbiased_brute_force(x, y), rel=1e-10)
    assert std == 0.0
    # subset_size is capped at the smaller set: 12 of y's 12, 12 of x's 40
    mean, _ = kernel_inception_distance(rng.normal(size=(40, 3)), y, subsets=3)
    assert np.isfinite(mean)


class _TinyDetector(torch.nn.Module):
    """The call interface of inception-2015-12-05.pt: uint8 [N, 3, H, W] in, and
    features [N, 5] out (a fixed linear map of 2 x 2 average-pooled pixels)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        f = F.adaptive_avg_pool2d(x.float(), 2).flatten(1) @ self.w
        return f if return_features else f.softmax(1)


def _expected_features(images_nchw, w):
    n, c, h, wd = images_nchw.shape
    pooled = images_nchw.reshape(n, c, 2, h // 2, 2, wd // 2).mean((3, 5)).reshape(n, -1)
    return pooled @ w


# torch deprecates TorchScript; the published detector is TorchScript all the same
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")
def test_inception_features_from_a_local_torchscript_file(tmp_path):
    rng = np.random.default_rng(9)
    w = rng.normal(size=(12, 5))
    path = tmp_path / "detector.pt"
    torch.jit.save(torch.jit.script(_TinyDetector(torch.tensor(w, dtype=torch.float32))), path)
    detector = InceptionFeatures(path)

    rgb = rng.integers(0, 256, size=(10, 3, 6, 8), dtype=np.uint8)
    expected = _expected_features(rgb.astype(np.float64), w)
    np.testing.assert_allclose(detector.features(rgb, batch=3), expected, rtol=1e-5, atol=1e-3)
    nhwc = np.ascontiguousarray(rgb.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(detector.features(nhwc), expected, rtol=1e-5, atol=1e-3)
    # grayscale [N, H, W, 1] and [N, H, W]: the channel repeated three times
    gray = rng.integers(0, 256, size=(7, 6, 8, 1), dtype=np.uint8)
    expected = _expected_features(np.repeat(gray.transpose(0, 3, 1, 2), 3, 1).astype(float), w)
    np.testing.assert_allclose(detector.features(gray), expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(detector.features(gray[..., 0]), expected, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="images: must be uint8"):
        detector.features(rgb.astype(np.float32))

    real = detector.features(rng.integers(0, 256, size=(40, 3, 6, 8), dtype=np.uint8))
    fake = detector.features(rng.integers(0, 200, size=(30, 3, 6, 8), dtype=np.uint8))
    kid, kid_std = kernel_inception_distance(real, fake)
    assert fid_kid(real, fake) == {
        "fid": frechet_distance(real, fake),
        "kid": kid,
        "kid_std": kid_std,
    }


def test_inception_features_refuse_a_missing_or_unreadable_file(tmp_path):
    missing = tmp_path / "no-such-inception.pt"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        InceptionFeatures(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a TorchScript archive")
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        InceptionFeatures(garbage)
