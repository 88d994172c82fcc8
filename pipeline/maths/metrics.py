"""Sample-quality metrics that need no downloaded weights. numpy only.

Every metric takes two sets of feature vectors, one per row: an [N, ...] array
is flattened to [N, D], so images in [-1, 1] can be compared pixel by pixel, and
Inception features (`pipeline.maths.inception`) turn the Frechet distance into FID and
the kernel distance into KID. Everything is computed in float64.
"""

from __future__ import annotations

import numpy as np


def block_factor(side: int, max_side: int) -> int:
    """The block size that averages images of `side` px down to about `max_side`:
    the largest divisor of `side` not above side // max_side (1 for small images)."""
    factor = max(1, side // max_side)
    while side % factor:
        factor -= 1
    return factor


def feature_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of the rows of `x`: the Gaussian
    that the Frechet distance fits. Store these once per reference dataset."""
    x = _rows(x, "x", at_least=2)
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance_from_stats(
    mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """Frechet (Wasserstein-2) distance squared between N(mu_a, S_a) and N(mu_b, S_b):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), the formula of
    FID (Heusel et al. 2017; Dowson & Landau 1982)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    d = mu_a.shape[0]
    for name, value, shape in [
        ("mu_a", mu_a, (d,)),
        ("mu_b", mu_b, (d,)),
        ("cov_a", cov_a, (d, d)),
        ("cov_b", cov_b, (d, d)),
    ]:
        if value.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {value.shape}")
    root_a = _sqrtm_psd(cov_a)
    # S_a^1/2 S_b S_a^1/2 is symmetric PSD, so the trace of its root is the sum of
    # the roots of its eigenvalues (no general matrix square root needed).
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two sets of feature vectors
    (rows): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), the
    formula of FID (Heusel et al. 2017), here on any features, e.g. pixels."""
    a, b = _pair(a, b, at_least=2)
    if min(len(a), len(b)) < a.shape[1]:
        return _frechet_distance_of_rows(a, b)
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))


def _frechet_distance_of_rows(a: np.ndarray, b: np.ndarray) -> float:
    """`frechet_distance` from the rows themselves, for fewer rows than features
    (1,000 images of 32x32x3 pixels): with centred rows X and S = X^T X / (n - 1),
    the nonzero eigenvalues of S_a^1/2 S_b S_a^1/2 are those of S_a S_b, the squares
    of the singular values of X_a X_b^T / sqrt((n_a - 1)(n_b - 1)); the trace of its
    root is their sum. No D x D matrix is formed: an n_a x n_b one instead."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    xa, xb = a - mu_a, b - mu_b
    na, nb = len(a) - 1, len(b) - 1
    trace_root = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    means = ((mu_a - mu_b) ** 2).sum()
    return float(means + (xa * xa).sum() / na + (xb * xb).sum() / nb - 2 * trace_root)


def unit_directions(dim: int, projections: int, seed: int = 0) -> np.ndarray:
    """`projections` directions [P, dim] uniform on the unit sphere (normalised
    Gaussians), from a generator seeded with `seed`."""
    theta = np.random.default_rng(seed).standard_normal((projections, dim))
    return theta / np.linalg.norm(theta, axis=1, keepdims=True)


def sliced_wasserstein(
    a: np.ndarray, b: np.ndarray, *, projections: int = 512, seed: int = 0
) -> float:
    """Sliced Wasserstein-2 distance (Rabin et al. 2011; Bonneel et al. 2015):
    SW_2(a, b) = (E_theta W_2^2(theta.a, theta.b))^1/2, theta uniform on the sphere.

    Estimator: `projections` seeded directions (`unit_directions`); per direction
    the 1-D W_2^2 = int_0^1 (Q_a(t) - Q_b(t))^2 dt between the empirical quantile
    functions of the projected sets, evaluated on the n = max(len(a), len(b))
    midpoints t_i = (i + 1/2) / n (exact for equal sizes: sorted values matched in
    order; for unequal sizes a midpoint rule that converges as n grows); then the
    root of the mean over directions. Memory: N x projections.
    """
    if projections < 1:
        raise ValueError(f"projections: must be at least 1, got {projections}")
    a, b = _pair(a, b, at_least=1)
    theta = unit_directions(a.shape[1], projections, seed)
    n = max(len(a), len(b))
    qa, qb = _quantiles(a @ theta.T, n), _quantiles(b @ theta.T, n)
    return float(np.sqrt(((qa - qb) ** 2).mean()))


def _quantiles(projected: np.ndarray, n: int) -> np.ndarray:
    """Empirical quantile functions of the columns of `projected` [m, P] at the n
    midpoints t_i = (i + 1/2) / n: Q(t) = x_(ceil(t m)), the sorted value of rank
    ceil(t m) (1-based); where t m is an integer j, the CDF jumps there and Q(t)
    is the mean of x_(j) and x_(j+1), so that reflecting the data (theta -> -theta)
    leaves W_2 unchanged. Ranks are computed in integers (no rounding)."""
    m = len(projected)
    num, den = (2 * np.arange(n) + 1) * m, 2 * n  # t_i m = num / den
    upper = num // den  # 0-based index of x_(ceil(t m)) where t m is not an integer
    x = np.sort(projected, axis=0)
    q = x[upper]
    jump = num % den == 0  # never for equal sizes: t_i m = i + 1/2
    q[jump] = (x[upper[jump] - 1] + x[upper[jump]]) / 2
    return q


def precision_recall(
    real: np.ndarray, fake: np.ndarray, *, k: int = 3, batch: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the support of each
    set is the union of balls around its points, each with radius the distance to
    its k-th nearest other point of the same set. Precision is the share of fake
    points inside the real support, recall the share of real points inside the fake
    support (a point on a ball's boundary counts as inside, as in the paper's code).

    Distances are computed `batch` rows at a time: memory is batch x N, not N^2 x D.
    """
    real, fake = _pair(real, fake, at_least=1, names=("real", "fake"))
    for name, x in [("real", real), ("fake", fake)]:
        if not 1 <= k < len(x):
            raise ValueError(f"k: must be in [1, len({name}) - 1] = [1, {len(x) - 1}], got {k}")
    if batch < 1:
        raise ValueError(f"batch: must be at least 1, got {batch}")
    r_real, r_fake = _kth_neighbour_sq(real, k, batch), _kth_neighbour_sq(fake, k, batch)
    precision = _inside_any_ball(fake, real, r_real, batch).mean()
    recall = _inside_any_ball(real, fake, r_fake, batch).mean()
    return float(precision), float(recall)


def _sq_dists(x: np.ndarray, y: np.ndarray, sq_x: np.ndarray, sq_y: np.ndarray) -> np.ndarray:
    """|x_i - y_j|^2 = |x_i|^2 + |y_j|^2 - 2 x_i.y_j, one matrix product."""
    return np.maximum(sq_x[:, None] + sq_y[None, :] - 2 * x @ y.T, 0)


def _kth_neighbour_sq(x: np.ndarray, k: int, batch: int) -> np.ndarray:
    """Squared distance from each row of x to its k-th nearest other row."""
    sq = (x * x).sum(1)
    out = np.empty(len(x))
    for start in range(0, len(x), batch):
        d2 = _sq_dists(x[start : start + batch], x, sq[start : start + batch], sq)
        rows = np.arange(len(d2))
        d2[rows, start + rows] = np.inf  # a point is not its own neighbour
        out[start : start + len(d2)] = np.partition(d2, k - 1, axis=1)[:, k - 1]
    return out


def _inside_any_ball(
    points: np.ndarray, centres: np.ndarray, radii_sq: np.ndarray, batch: int
) -> np.ndarray:
    """Whether each point lies in at least one ball |p - c_j|^2 <= r_j^2."""
    sq_p, sq_c = (points * points).sum(1), (centres * centres).sum(1)
    out = np.empty(len(points), dtype=bool)
    for start in range(0, len(points), batch):
        stop = start + batch
        d2 = _sq_dists(points[start:stop], centres, sq_p[start:stop], sq_c)
        out[start:stop] = (d2 <= radii_sq[None, :]).any(1)
    return out


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased estimator of
    MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,

        MMD_u^2 = sum_{i != j} [k(a_i, a_j) + k(b_i, b_j)] / (m (m - 1))
                  - 2 sum_{i, j} k(a_i, b_j) / m^2,

    on `subsets` pairs of random subsets of m = min(subset_size, len(a), len(b))
    rows each (drawn without replacement from a generator seeded with `seed`).
    Returns (mean, standard deviation) over subsets. Unbiased, so it can be
    slightly negative for sets from the same distribution.
    """
    a, b = _pair(a, b, at_least=2)
    if subsets < 1:
        raise ValueError(f"subsets: must be at least 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size: must be at least 2, got {subset_size}")
    m, d = min(subset_size, len(a), len(b)), a.shape[1]
    rng = np.random.default_rng(seed)
    mmd = np.empty(subsets)
    for s in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = _cubic_kernel(x, x, d), _cubic_kernel(y, y, d), _cubic_kernel(x, y, d)
        within = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
        mmd[s] = within / (m * (m - 1)) - 2 * k_xy.sum() / m**2
    return float(mmd.mean()), float(mmd.std())


def _cubic_kernel(x: np.ndarray, y: np.ndarray, d: int) -> np.ndarray:
    """k(x_i, y_j) = (x_i.y_j / d + 1)^3, in place (cubing by products is the
    costly step for small d)."""
    k = x @ y.T
    k /= d
    k += 1
    cube = k * k
    cube *= k
    return cube


def _rows(x: np.ndarray, name: str, at_least: int) -> np.ndarray:
    """x as float64 rows [N, D]; `name` is for the error message."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0 or len(x) < at_least:
        raise ValueError(f"{name}: need at least {at_least} rows, got shape {x.shape}")
    return x.reshape(len(x), -1)


def _pair(
    a: np.ndarray, b: np.ndarray, at_least: int, names: tuple[str, str] = ("a", "b")
) -> tuple[np.ndarray, np.ndarray]:
    """Both sets as float64 rows of the same dimension."""
    a, b = _rows(a, names[0], at_least), _rows(b, names[1], at_least)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]}: feature dimensions differ ({a.shape[1]} != {b.shape[1]})"
        )
    return a, b


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
