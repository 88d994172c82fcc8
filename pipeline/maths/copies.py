"""Does a generated image copy a training image? Nearest-neighbour search in a
small pixel space, and Carlini's relative distance. Torch and numpy only.

Diffusion models memorise and regenerate training images (Carlini et al. 2023,
"Extracting Training Data from Diffusion Models"; Somepalli et al. 2023). Carlini
et al. call a generated image x^ a copy of its nearest training image x when
l2(x^, x) is small relative to x^'s distances to its n nearest training images
(their Eq. 1, n = 50): the ratio

    copy_ratio(x^) = l2(x^, x_1) / mean(l2(x^, x_1), ..., l2(x^, x_n))

is 0 for an exact copy and close to 1 for an image that sits among the training
images without being near one of them in particular. Being a ratio, it needs no
scale: it reads the same for digits and for photos. The distance alone is kept
beside it.

The space: images averaged down in blocks to at most `SIDE` px, in [-1, 1], each
pixel's RGB values flattened, so the distance is the root of the summed squared
differences. A mirrored copy is a copy too: each generated image is also compared
mirrored, and the nearer of the two distances counts. What this space misses: a
copy shifted by more than a block (the average-down forgives shifts of about half
a block), rotated, rescaled or recoloured; a copy-detection embedding (SSCD,
Somepalli et al.) would find those, and none can be had here.

On the digits (bench/gate.py, bench/results/gate-cpu2.json): real digits held out
from the others have ratios of 0.256 and up (median 0.64); exact and mirrored
copies under 0.003; a digit shifted by 1 of its 8 px about 0.8, like any other
digit; at 64 px, a copy shifted by 2 px (half a 4 px block) has the source as its
nearest image but a ratio of about 0.6, and by 4 px it is lost.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.maths.metrics import block_factor

SIDE = 16
"""Images are compared averaged down to at most about this side."""
NEIGHBOURS = 50
"""n of Carlini's ratio: the nearest training images whose mean distance is its unit."""
CHUNK = 8192
"""Training images per matmul of the search: bounds the memory of a lookup at
about CHUNK x (generated images) floats, whatever the index's size."""


def features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, D] in [-1, 1], averaged down in blocks of
    `block_factor(H, SIDE)` pixels: the space distances are measured in."""
    x = torch.tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    factor = block_factor(x.shape[-1], SIDE)
    if factor > 1:
        x = F.avg_pool2d(x, factor)
    return x.flatten(1).numpy()


def mirrored(images: np.ndarray) -> np.ndarray:
    """The images flipped left to right (uint8 [N, H, W, C])."""
    return np.ascontiguousarray(images[:, :, ::-1])


@dataclasses.dataclass(frozen=True)
class Nearest:
    """Each generated image's nearest training image and how near it is."""

    index: np.ndarray
    """int64 [N]: the row of the nearest training image in the index."""
    distance: np.ndarray
    """float32 [N]: l2 distance to it (mirrored, when that is nearer)."""
    ratio: np.ndarray
    """float32 [N]: Carlini's ratio (module doc): 0 for a copy, near 1 for none."""
    mirror: np.ndarray
    """bool [N]: the image is nearer the training image mirrored."""


def nearest(generated: np.ndarray, index: np.ndarray, neighbours: int = NEIGHBOURS) -> Nearest:
    """Search `index` (float [M, D], training features) for each generated image
    (uint8 [N, H, W, C]) and its mirror: the nearest training image and the ratio
    of the distance to it over the mean distance to the `neighbours` nearest
    (fewer when the index holds fewer)."""
    if len(index) == 0:
        raise ValueError("the index holds no training images")
    n = min(neighbours, len(index))
    plain, flipped = features(generated), features(mirrored(generated))
    dist, rows, mirror = [], [], []
    for g, f in zip(_chunks(plain), _chunks(flipped), strict=True):
        d_plain, i_plain = _smallest(torch.from_numpy(g), index, n)
        d_flip, i_flip = _smallest(torch.from_numpy(f), index, n)
        # Each training image counts once among the n nearest: by its nearer view.
        d_all = torch.cat([d_plain, d_flip], 1)
        i_all = torch.cat([i_plain, i_flip], 1)
        order = d_all.argsort(dim=1, stable=True)
        d_sorted, i_sorted = d_all.gather(1, order), i_all.gather(1, order)
        d_once = [_first_of_each(d, i, n) for d, i in zip(d_sorted, i_sorted, strict=True)]
        dist.append(torch.stack(d_once))
        rows.append(i_sorted[:, 0])
        mirror.append(order[:, 0] >= n)
    d = torch.cat(dist)
    nearest_d = d[:, 0]
    ratio = nearest_d / d.mean(1).clamp_min(1e-12)
    return Nearest(
        torch.cat(rows).numpy(),
        nearest_d.numpy(),
        ratio.numpy(),
        torch.cat(mirror).numpy(),
    )


def _chunks(x: np.ndarray, size: int = 256) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, len(x), size)] or [x[:0]]


def _smallest(query: torch.Tensor, index: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `n` smallest l2 distances from each query row to the index's rows, and
    those rows: ||q||^2 + ||t||^2 - 2 q.t, one chunk of the index at a time."""
    best_d = torch.full((len(query), 0), float("inf"))
    best_i = torch.zeros((len(query), 0), dtype=torch.int64)
    q2 = (query * query).sum(1, keepdim=True)
    for lo in range(0, len(index), CHUNK):
        t = torch.from_numpy(np.asarray(index[lo : lo + CHUNK], dtype=np.float32))
        d2 = q2 + (t * t).sum(1)[None] - 2 * query @ t.T
        d = d2.clamp_min(0).sqrt()
        k = min(n, d.shape[1])
        d_top, i_top = d.topk(k, 1, largest=False, sorted=True)
        best_d = torch.cat([best_d, d_top], 1)
        best_i = torch.cat([best_i, i_top + lo], 1)
        keep = best_d.argsort(dim=1, stable=True)[:, :n]
        best_d, best_i = best_d.gather(1, keep), best_i.gather(1, keep)
    return best_d, best_i


def _first_of_each(d: torch.Tensor, i: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` of distances `d` (sorted) counting each training row of `i` once."""
    seen: set[int] = set()
    out = []
    for dist, row in zip(d.tolist(), i.tolist(), strict=True):
        if row not in seen:
            seen.add(row)
            out.append(dist)
            if len(out) == n:
                break
    return torch.tensor(out)
