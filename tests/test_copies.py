"""The copy search (`pipeline.maths.copies`) against brute force, and on planted copies."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.maths import copies


def _brute_force(generated: np.ndarray, train: np.ndarray, n: int) -> tuple:
    """Every distance by numpy, each training image by its nearer view."""
    t = copies.features(train).astype(np.float64)
    out_i, out_d, out_r = [], [], []
    for g in generated:
        views = [copies.features(g[None]), copies.features(copies.mirrored(g[None]))]
        d = np.min([np.sqrt(((t - v.astype(np.float64)) ** 2).sum(1)) for v in views], axis=0)
        order = np.argsort(d, kind="stable")
        out_i.append(order[0])
        out_d.append(d[order[0]])
        out_r.append(d[order[0]] / d[order[:n]].mean())
    return np.array(out_i), np.array(out_d), np.array(out_r)


@pytest.mark.parametrize("side", [8, 64])
def test_nearest_and_ratio_are_brute_forces_across_index_chunks(monkeypatch, side):
    rng = np.random.default_rng(side)
    train = rng.integers(0, 256, (300, side, side, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (40, side, side, 3), dtype=np.uint8)
    monkeypatch.setattr(copies, "CHUNK", 64)  # several chunks of the index
    found = copies.nearest(generated, copies.features(train), neighbours=10)
    rows, dist, ratio = _brute_force(generated, train, 10)
    np.testing.assert_array_equal(found.index, rows)
    np.testing.assert_allclose(found.distance, dist, rtol=1e-4)
    np.testing.assert_allclose(found.ratio, ratio, rtol=1e-4)


def test_planted_and_mirrored_training_images_are_found_with_their_rows():
    rng = np.random.default_rng(0)
    # Smooth images, as real ones are: random blobs, upsampled 8x.
    small = rng.integers(0, 256, (500, 8, 8, 3), dtype=np.uint8)
    train = small.repeat(8, 1).repeat(8, 2)
    fresh = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)
    planted = [3, 77, 401]
    generated = np.concatenate([fresh, train[planted], copies.mirrored(train[[10]])])
    found = copies.nearest(generated, copies.features(train))
    np.testing.assert_array_equal(found.index[20:], [3, 77, 401, 10])
    assert found.ratio[20:].max() < 1e-2
    np.testing.assert_array_equal(found.mirror[20:], [False, False, False, True])
    # A view (negative strides) is searched as its copy is.
    view = copies.nearest(train[[10]][:, :, ::-1], copies.features(train))
    assert view.index.tolist() == [10] and view.mirror.tolist() == [True]
    assert found.ratio[:20].min() > 0.5, found.ratio[:20]


def test_an_index_with_fewer_images_than_neighbours_uses_them_all():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    found = copies.nearest(generated, copies.features(train))
    _, _, ratio = _brute_force(generated, train, 5)
    np.testing.assert_allclose(found.ratio, ratio, rtol=1e-4)
    with pytest.raises(ValueError, match="no training images"):
        copies.nearest(generated, copies.features(train)[:0])
