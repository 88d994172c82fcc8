"""The order of the training stream: which sample sits at each global position.

A pure function of the `StreamPlan` (the run's seed, the dataset version, its
train shards' names, sizes and digests, the global batch and the shuffle
window) and of the position P: nothing is read, nothing depends on the number
of workers, on Ray Data's executor or on a restart. Step s trains on positions
[s*B, (s+1)*B) for a global batch of B; pass k = P // N over the N train images
holds the positions [k*N, (k+1)*N), and index i = P % N within it.

Each pass is a permutation of the train split, made in three levels of
counter-based randomness (`maths.counter`), all keyed by (seed, dataset
version, pass):

1. **Shards.** The non-empty shards are permuted and laid end to end, each
   with its own samples permuted: a sequence Q of the N samples.
2. **Windows.** Q is cut into windows of M images (the last one shorter); a
   window holds the pass indices [w*M, (w+1)*M), so training mixes M images at
   a time: what reading a window costs, and what a worker holds.
3. **Lanes.** Inside a window, position P goes to lane P % B of its step. Each
   lane takes a contiguous piece of the window's Q and its own permutation of
   that piece. So every global batch holds one image from each of B pieces of
   the window, and the lanes of any contiguous range (a worker's) read one
   contiguous part of Q: about one shard's worth, not all of the window.

A worker r of W takes the lanes [r*B/W, (r+1)*B/W) of every step: the same
global batch for any W that divides B, and per window one contiguous part of
Q of M/W images, so each shard is read by about one worker per pass (by
1 + S*W/M read units, for shards of S images). `positions(rank, world, ...)`
lists what a worker trains on, `samples` and `flips` what sits there; a
position's noise and label dropout come from its `noise_seeds`.

Memory: a worker's read unit (one window) holds at most M/W images, and its
reader keeps only the encoded samples it needs (see `data.stream`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from pipeline.config.records import StreamPlan
from pipeline.maths.counter import (
    MASK52,
    Permutation,
    hash64,
    hash_int,
    key_of,
    permute,
    seed63,
)

# What each hash is of: the last word of its coordinates.
_SHARDS, _SAMPLES, _LANE, _FLIP, _NOISE, _DROPOUT, _LATENT = range(7)


@dataclasses.dataclass(frozen=True)
class Unit:
    """What one worker reads of one window: its positions in [lo, hi)."""

    window: int
    """The window's number from the start of the run (pass * windows per pass + w)."""
    lo: int
    hi: int


class Order:
    """The training stream of a `StreamPlan` (see the module doc)."""

    def __init__(self, plan: StreamPlan):
        if plan.batch_size < 1 or plan.window < plan.batch_size or plan.window % plan.batch_size:
            raise ValueError(
                f"the window ({plan.window}) must be a positive multiple of the batch "
                f"({plan.batch_size})"
            )
        self.plan = plan
        self.key = hash_int(plan.seed, key_of(plan.dataset_digest))
        self.sizes = np.array([s.samples for s in plan.shards], dtype=np.int64)
        self.nonempty = np.flatnonzero(self.sizes)
        self.n = int(self.sizes.sum())
        if self.n == 0:
            raise ValueError("the train split holds no images")
        self.batch, self.window = plan.batch_size, plan.window
        self.windows_per_pass = math.ceil(self.n / self.window)
        self._shard_keys = np.array([key_of(s.sha256) for s in plan.shards], dtype=np.uint64)

    # --- what sits at a position -------------------------------------------------

    def samples(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, member) of each position: the shard's index in the plan's list
        and the sample's index in the shard (its order in the tar)."""
        p = np.asarray(positions, dtype=np.int64)
        q = self._q_index(p)
        shard, member = np.empty_like(p), np.empty_like(p)
        passes = p // self.n
        for k in np.unique(passes):
            at = passes == k
            shard[at], member[at] = self._q_sample(int(k), q[at])
        return shard, member

    def flips(self, positions: np.ndarray) -> np.ndarray:
        """Whether each position's image is flipped left-right (never without hflip)."""
        p = np.asarray(positions, dtype=np.int64)
        if not self.plan.hflip:
            return np.zeros(p.shape, dtype=bool)
        return (hash64(self.key, p, _FLIP) & np.uint64(1)).astype(bool)

    def noise_seeds(self, positions: np.ndarray) -> np.ndarray:
        """The seed of each position's noise (sigma and n) and label dropout
        (`train_step`): 63-bit, for a torch.Generator."""
        return seed63(self.key, np.asarray(positions, dtype=np.int64), _NOISE)

    def latent_seeds(self, positions: np.ndarray) -> np.ndarray:
        """The seed of each position's latent draw from its posterior (a latent
        dataset stores N(mean, std^2) per image): a new draw each time the image
        comes back, the same draw for a position on any worker and on a resume."""
        return seed63(self.key, np.asarray(positions, dtype=np.int64), _LATENT)

    def dropout_seed(self, step: int, rank: int) -> int:
        """The seed of a worker's activation dropout in a step (dropout draws per
        activation, so it depends on how the batch is split: W changes it)."""
        return int(seed63(self.key, step, rank, _DROPOUT))

    def checks(self, positions: np.ndarray, shard: np.ndarray, member: np.ndarray) -> np.ndarray:
        """A 52-bit fingerprint of (position, shard digest, member) per sample. Summed
        (mod 2^52) over a set of steps, it names what they trained on, whatever the
        workers: `stream_checksum`."""
        p = np.asarray(positions, dtype=np.int64)
        return hash64(p, self._shard_keys[shard], member) & np.uint64(MASK52)

    # --- who reads what ------------------------------------------------------------

    def positions(self, rank: int, world: int, lo: int, hi: int) -> np.ndarray:
        """The positions in [lo, hi) that worker `rank` of `world` trains on, in order."""
        lanes = self._lanes(rank, world)
        p = np.arange(lo, hi, dtype=np.int64)
        slot = p % self.batch
        return p[(slot >= lanes.start) & (slot < lanes.stop)]

    def window_of(self, position: int) -> int:
        """The number of the window that holds `position`."""
        k, i = divmod(position, self.n)
        return k * self.windows_per_pass + i // self.window

    def window_bounds(self, window: int) -> tuple[int, int]:
        """The positions [lo, hi) of a window."""
        k, w = divmod(window, self.windows_per_pass)
        base = k * self.n + w * self.window
        return base, k * self.n + min((w + 1) * self.window, self.n)

    def units(self, start: int, stop: int) -> range:
        """The windows that the positions [start, stop) touch, in order: a worker's
        read units (`unit`) from `start`."""
        if stop <= start:
            return range(0)
        return range(self.window_of(start), self.window_of(stop - 1) + 1)

    def unit(self, window: int, start: int, stop: int) -> Unit:
        """The positions of `window` that a stream over [start, stop) reads."""
        lo, hi = self.window_bounds(window)
        return Unit(window, max(lo, start), min(hi, stop))

    # --- the three levels ----------------------------------------------------------

    def _lanes(self, rank: int, world: int) -> range:
        if world < 1 or self.batch % world or not 0 <= rank < world:
            raise ValueError(f"worker {rank} of {world}: the workers must divide {self.batch}")
        per = self.batch // world
        return range(rank * per, (rank + 1) * per)

    def _q_index(self, p: np.ndarray) -> np.ndarray:
        """Position -> index in its pass's Q, through the lanes of its window."""
        B, M, N = self.batch, self.window, self.n
        k, i = np.divmod(p, N)
        w, e = np.divmod(i, M)
        size = np.minimum(M, N - w * M)  # the window's images
        offset = (k * N) % B  # the lane of the window's first position
        lane = (offset + e) % B
        first = (lane - offset) % B  # where in the window the lane's first image is
        row = (e - first) // B  # the image's place in its lane
        count = size // B + (first < size % B)  # the lane's images in the window
        # The lane's piece of Q follows the pieces of lanes 0..lane-1: size // B
        # images each, one more for the first size % B lanes from `offset` on.
        start = w * M + lane * (size // B) + _count_below(lane, offset, size % B, B)
        # Each (pass, window, lane) permutes its piece with its own key.
        keys = hash64(self.key, k, w, lane, _LANE)
        return start + _permute_by_size(row, count, keys)

    @functools.lru_cache(maxsize=4)  # noqa: B019  # an Order lives as long as its run
    def _pass_layout(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Pass k's shard order (indices into the plan's list) and where each starts in Q."""
        sigma = Permutation(len(self.nonempty), hash_int(self.key, k, _SHARDS))
        order = self.nonempty[sigma(np.arange(len(self.nonempty)))]
        starts = np.concatenate([[0], np.cumsum(self.sizes[order])[:-1]])
        return order, starts

    def _q_sample(self, k: int, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order, starts = self._pass_layout(k)
        slot = np.searchsorted(starts, q, side="right") - 1
        shard, offset = order[slot], q - starts[slot]
        # Each (pass, shard) permutes the shard's samples with its own key.
        keys = hash64(self.key, k, shard, _SAMPLES)
        return shard, _permute_by_size(offset, self.sizes[shard], keys)


def _permute_by_size(index: np.ndarray, size: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """`counter.permute` of each index within its own size and key, the indices
    of one size at a time (a window's lanes differ by one at most, and a dataset's
    shards mostly have one size)."""
    out = np.empty_like(index)
    for n in np.unique(size).tolist():
        at = size == n
        out[at] = permute(index[at], n, keys[at])
    return out


def _count_below(lane: np.ndarray, offset: np.ndarray, extra: np.ndarray, B: int) -> np.ndarray:
    """#{j < lane : (j - offset) % B < extra}, elementwise: the lanes before `lane`
    that hold one image more. Those lanes are offset, offset+1, ... (mod B), the
    first `extra` of them: a run that may wrap past B."""
    end = offset + extra  # the run is [offset, end) taken mod B
    in_first = np.clip(np.minimum(lane, end) - offset, 0, None)
    wrapped = np.clip(np.minimum(lane, end - B), 0, None)
    return in_first + wrapped
