"""Counter-based randomness, numpy only: a value is a hash of its coordinates.

`hash64(key, pass_, index)` is the same number in every process, on every
machine and in every release of numpy or torch, and needs no state: the random
choices of the training stream (which sample sits at a position, its flip, the
seed of its noise) are functions of where they are, not of how many draws came
before. `Permutation` turns the hash into a bijection of 0..n-1 that maps any
one index without materialising the others (a Feistel network with cycle walking,
the construction of format-preserving encryption: Black and Rogaway 2002).

The mixing function is splitmix64's finaliser (Steele, Lea and Flood 2014), the
one Java's SplittableRandom and numpy's SeedSequence seeding build on.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
MASK52 = (1 << 52) - 1
"""Integers up to this are exact in a float64 (what MLflow stores metrics as)."""


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of 64-bit words whose every output bit
    depends on every input bit (uint64 in, uint64 out, elementwise)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hash64(*words: int | np.ndarray) -> np.ndarray:
    """A 64-bit hash of the sequence `words` (non-negative integers or integer
    arrays, broadcast together), as a uint64 array of the broadcast shape."""
    arrays = [_words(w) for w in words]
    h = np.full(np.broadcast_shapes(*(a.shape for a in arrays)), _GOLDEN, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i, a in enumerate(arrays):
            h = mix64(h + _GOLDEN * np.uint64(i + 1) ^ a)
    return h


def hash_int(*words: int) -> int:
    """`hash64` of scalars, as a Python int."""
    return int(hash64(*words))


def seed63(*words: int | np.ndarray) -> np.ndarray:
    """`hash64` cut to 63 bits: what `torch.Generator.manual_seed` takes."""
    return hash64(*words) >> np.uint64(1)


def uniform(*words: int | np.ndarray) -> np.ndarray:
    """A float64 in [0, 1) from `hash64(*words)` (its top 53 bits)."""
    return (hash64(*words) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def key_of(text: str) -> int:
    """A word for `hash64` from a string (say a dataset's sha256): the hash of its
    UTF-8 bytes, read eight at a time."""
    data = text.encode()
    data += bytes(-len(data) % 8)
    return hash_int(len(text), *np.frombuffer(data, dtype="<u8").tolist())


def _words(w: int | np.ndarray) -> np.ndarray:
    if isinstance(w, np.ndarray):
        if w.dtype.kind not in "ui":
            raise TypeError(f"hash64 takes integers, got an array of {w.dtype}")
        if w.dtype.kind == "i" and w.size and int(w.min()) < 0:
            raise ValueError("hash64 takes non-negative integers")
        return w.astype(np.uint64)
    if int(w) < 0:
        raise ValueError(f"hash64 takes non-negative integers, got {w}")
    return np.asarray(int(w) & (2**64 - 1), dtype=np.uint64)


ROUNDS = 6
"""Rounds of the Feistel network of `permute`."""


def permute(index: int | np.ndarray | Iterable[int], n: int, key: int | np.ndarray) -> np.ndarray:
    """Where a keyed bijection of 0..n-1 sends each index: `key` is one key for all,
    or one per index (each then a permutation of its own), without the
    permutation in memory.

    A balanced Feistel network of ROUNDS rounds permutes the 2^(2h) words of h+h
    bits (2^(2h) < 4n); an index it sends to n or beyond is sent through again
    until it lands below n (cycle walking), which keeps it a bijection of 0..n-1.
    On average fewer than four passes.
    """
    if n < 1:
        raise ValueError(f"a permutation of 0..n-1 needs n >= 1, got {n}")
    x = np.asarray(index, dtype=np.int64)
    if x.size and (int(x.min()) < 0 or int(x.max()) >= n):
        raise IndexError(f"indices must be in 0..{n - 1}")
    half = (max(1, (n - 1).bit_length()) + 1) // 2
    each = isinstance(key, np.ndarray) and key.ndim > 0
    keys = np.broadcast_to(_words(key), x.shape).ravel() if each else _words(key).reshape(1)
    rounds = hash64(keys[:, None], np.arange(ROUNDS, dtype=np.uint64)[None, :])
    out = _feistel(x.astype(np.uint64).ravel(), rounds, half)
    walking = np.flatnonzero(out >= n)
    while walking.size:
        out[walking] = _feistel(out[walking], rounds[walking] if each else rounds, half)
        walking = walking[out[walking] >= n]
    return out.astype(np.int64).reshape(x.shape)


def _feistel(x: np.ndarray, rounds: np.ndarray, half: int) -> np.ndarray:
    """One pass of the network over words x of 2*half bits, with per-word round keys."""
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    left, right = x >> shift, x & mask
    for r in range(rounds.shape[1]):
        left, right = right, left ^ (hash64(rounds[:, r], right) & mask)
    return (left << shift) | right


class Permutation:
    """A bijection of 0..n-1, keyed by `key`: `perm(i)` for any index or array of
    indices (`permute` with one key)."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"a permutation of 0..n-1 needs n >= 1, got {n}")
        self.n, self.key = n, key

    def __call__(self, index: int | np.ndarray | Iterable[int]) -> np.ndarray:
        return permute(index, self.n, self.key)
