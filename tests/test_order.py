"""The order of the training stream (`pipeline.data.order`) and the counter-based
randomness under it (`pipeline.maths.counter`), as properties over uneven and
empty shards, batches, windows and seeds (hypothesis): each pass is a
permutation of the split, passes differ, the order is the same in a fresh
process, the global batch of every step is the same for 1, 2, 4 and 8 workers
(also across a pass boundary), a worker holds at most its share of a window, and
each shard is read by about one worker per pass."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config.records import StreamPlan, TrainShard
from pipeline.data.order import Order
from pipeline.maths.counter import Permutation, hash64, mix64, permute, seed63, uniform
from tests.services import ROOT

PROPERTIES = settings(max_examples=40, derandomize=True, database=None, deadline=None)


def stream_plan(sizes, batch, window_batches, seed=0, digest="ab" * 32, hflip=True) -> StreamPlan:
    shards = tuple(TrainShard(f"train-{i:06d}.tar", n, f"{i:064x}") for i, n in enumerate(sizes))
    return StreamPlan(seed, digest, shards, batch, batch * window_batches, hflip)


@st.composite
def plans(draw, min_images=1):
    """Shards of 0 to 40 images (some empty), a global batch of 1, 2, 4, 8 or 16, a
    window of 1 to 6 batches, any seed."""
    sizes = draw(st.lists(st.integers(0, 40), min_size=1, max_size=9))
    if sum(sizes) < min_images:
        sizes.append(min_images)
    batch = draw(st.sampled_from([1, 2, 4, 8, 16]))
    return stream_plan(
        sizes, batch, draw(st.integers(1, 6)), draw(st.integers(0, 2**63 - 1)), draw(st.text())
    )


def every_sample(plan: StreamPlan) -> list[tuple[int, int]]:
    return sorted((s, m) for s, shard in enumerate(plan.shards) for m in range(shard.samples))


@PROPERTIES
@given(plans(), st.integers(0, 3))
def test_each_pass_is_a_permutation_of_the_split(plan, k):
    order = Order(plan)
    shard, member = order.samples(np.arange(k * order.n, (k + 1) * order.n))
    assert sorted(zip(shard.tolist(), member.tolist(), strict=True)) == every_sample(plan)


@PROPERTIES
@given(plans(min_images=12), st.integers(0, 3))
def test_passes_differ(plan, k):
    order = Order(plan)
    first = order.samples(np.arange(k * order.n, (k + 1) * order.n))
    second = order.samples(np.arange((k + 1) * order.n, (k + 2) * order.n))
    # Equal by chance with probability about 1/12! at the least.
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def worker_stream(order: Order, rank: int, world: int, start: int, stop: int) -> np.ndarray:
    """The positions a worker receives, read unit by unit as its reader reads them."""
    parts = []
    for window in order.units(start, stop):
        unit = order.unit(window, start, stop)
        parts.append(order.positions(rank, world, unit.lo, unit.hi))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def global_batches(order: Order, world: int, start: int, steps: int) -> list[set]:
    """Per step: what its global batch trains on, gathered from `world` workers, each
    reading its units and cutting them into batches of B / W."""
    per = order.batch // world
    stop = start + steps * order.batch
    batches: list[set] = [set() for _ in range(steps)]
    for rank in range(world):
        p = worker_stream(order, rank, world, start, stop)
        assert len(p) == steps * per
        for s in range(steps):
            mine = p[s * per : (s + 1) * per]
            shard, member = order.samples(mine)
            seeds, flips = order.noise_seeds(mine), order.flips(mine)
            rows = zip(mine, shard, member, seeds, flips, strict=True)
            batches[s] |= {tuple(int(v) for v in row) for row in rows}
    return batches


@PROPERTIES
@given(plans(), st.data())
def test_the_global_batch_is_the_same_for_one_two_four_and_eight_workers(plan, data):
    order = Order(plan)
    # Steps from just before a pass boundary on (N rarely divides by B: a step
    # then holds the end of one pass and the start of the next), or from 0.
    boundary = order.n * data.draw(st.integers(1, 3)) // plan.batch_size
    first = data.draw(st.sampled_from([0, max(0, boundary - 2)]))
    steps = data.draw(st.integers(1, 6))
    start = first * plan.batch_size
    one = global_batches(order, 1, start, steps)
    for s, batch in enumerate(one):
        assert {row[0] for row in batch} == set(
            range(start + s * order.batch, start + (s + 1) * order.batch)
        )
    for world in (2, 4, 8):
        if plan.batch_size % world == 0:
            assert global_batches(order, world, start, steps) == one


@settings(PROPERTIES, max_examples=30)
@given(plans(), st.sampled_from([1, 2, 4, 8]), st.integers(0, 2))
def test_a_worker_reads_at_most_its_share_of_a_window_and_each_shard_in_one_piece(plan, world, k):
    if plan.batch_size % world:
        world = 1
    order = Order(plan)
    for window in order.units(k * order.n, (k + 1) * order.n):
        lo, hi = order.window_bounds(window)
        # A worker's lanes hold (hi - lo) // B images each, or one more.
        least = (hi - lo) // plan.batch_size * (plan.batch_size // world)
        in_window = Counter(order.samples(np.arange(lo, hi))[0].tolist())
        readers: Counter[int] = Counter()
        for rank in range(world):
            mine = order.positions(rank, world, lo, hi)
            # The memory bound: a worker holds at most its share of a window.
            assert len(mine) <= plan.window // world
            assert least <= len(mine) <= least + plan.batch_size // world
            readers.update(set(order.samples(mine)[0].tolist()))
        for s, count in readers.items():
            # A shard's images in a window are contiguous in its order, and so is a
            # worker's part: the shard meets at most ceil(images / least) + 1 parts.
            assert count <= math.ceil(in_window[s] / max(least, 1)) + 1


def test_a_large_shard_is_read_by_one_worker_a_pass_not_by_all():
    # 8 shards of 1,000 images, batch 64, window 4,096, 8 workers: a worker's part of
    # a window is 512 images, so a shard meets 2 or 3 of them, out of 16 pairs.
    order = Order(stream_plan([1000] * 8, 64, 64))
    readers: dict[int, set[int]] = {}
    for rank in range(8):
        for window in order.units(0, order.n):
            lo, hi = order.window_bounds(window)
            for s in set(order.samples(order.positions(rank, 8, lo, hi))[0].tolist()):
                readers.setdefault(s, set()).add(rank)
    assert sorted(readers) == list(range(8))
    assert max(len(r) for r in readers.values()) <= 3


def test_the_order_is_the_same_in_a_fresh_process():
    plans = [stream_plan([7, 0, 30, 3], 4, 3, seed=s, digest=d) for s, d in [(0, "x"), (9, "y")]]
    positions = list(range(0, 200, 3))
    here = [Order(p).samples(np.array(positions))[1].tolist() for p in plans]
    code = (
        "import json, sys, numpy as np\n"
        "from pipeline.config.records import StreamPlan\n"
        "from pipeline.data.order import Order\n"
        "plans, positions = json.loads(sys.stdin.read())\n"
        "print(json.dumps([Order(StreamPlan.from_dict(p)).samples(np.array(positions))[1]"
        ".tolist() for p in plans]))\n"
    )
    # Another interpreter, with another hash seed for str (Python salts it per process).
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([[p.to_dict() for p in plans], positions]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert json.loads(done.stdout) == here
    assert here[0] != here[1]  # and another seed and dataset version, another order


def test_the_seed_and_the_dataset_version_each_change_the_order_and_the_draws():
    base = Order(stream_plan([50, 50], 4, 8, seed=1, digest="v1"))
    p = np.arange(100)
    for other in (
        stream_plan([50, 50], 4, 8, seed=2, digest="v1"),
        stream_plan([50, 50], 4, 8, seed=1, digest="v2"),
    ):
        o = Order(other)
        assert not np.array_equal(o.samples(p)[1], base.samples(p)[1])
        assert not np.array_equal(o.noise_seeds(p), base.noise_seeds(p))
        assert not np.array_equal(o.flips(p), base.flips(p))
    # The window does not change the draws of a position, only what sits there.
    wider = Order(stream_plan([50, 50], 4, 16, seed=1, digest="v1"))
    assert np.array_equal(wider.noise_seeds(p), base.noise_seeds(p))
    assert not np.array_equal(wider.samples(p)[1], base.samples(p)[1])


def test_a_latent_is_drawn_afresh_each_time_its_image_comes_back():
    # 30 images, 4 passes: each image at 4 positions, each with its own latent seed,
    # none equal to a noise seed; a position's seed is the same in every process.
    order = Order(stream_plan([10, 20], 2, 4, seed=5))
    p = np.arange(120)
    shard, member = order.samples(p)
    seeds = order.latent_seeds(p)
    assert len(set(seeds.tolist())) == 120
    assert not set(seeds.tolist()) & set(order.noise_seeds(p).tolist())
    for image in set(zip(shard.tolist(), member.tolist(), strict=True)):
        comes_back = (shard == image[0]) & (member == image[1])
        assert comes_back.sum() == 4 and len(set(seeds[comes_back].tolist())) == 4
    assert np.array_equal(Order(stream_plan([10, 20], 2, 4, seed=5)).latent_seeds(p), seeds)
    assert (seeds < 2**63).all()


def test_flips_are_a_fair_coin_per_position_and_none_without_hflip():
    flips = Order(stream_plan([5000], 8, 8)).flips(np.arange(20_000))
    assert abs(flips.mean() - 0.5) < 5 * 0.5 / math.sqrt(20_000)  # 5 standard errors
    assert not Order(stream_plan([5000], 8, 8, hflip=False)).flips(np.arange(100)).any()


def test_a_global_batch_draws_from_its_whole_window():
    # 16 shards of 64: a window of 256 images spans 4 shards, and each batch of 16
    # takes one image from each of 16 pieces of 16: 4 from every shard of the window.
    order = Order(stream_plan([64] * 16, 16, 16))
    for step in range(32):
        shards = order.samples(np.arange(step * 16, (step + 1) * 16))[0]
        window = {
            int(s) for s in order.samples(np.arange(step // 16 * 256, (step // 16 + 1) * 256))[0]
        }
        assert set(Counter(shards.tolist()).items()) == {(s, 4) for s in window}


# --- the counter-based randomness ------------------------------------------------------


def test_mix64_is_splitmix64s_finaliser():
    # Java's new SplittableRandom(0).nextLong(): mix64 of the golden gamma, a
    # published value of the algorithm (Steele, Lea and Flood 2014).
    golden = np.uint64(0x9E3779B97F4A7C15)
    assert int(mix64(np.array([golden]))[0]) == 0xE220A8397B1DCDAF


def test_hash64_is_a_function_of_its_words_in_order():
    assert int(hash64(1, 2)) == int(hash64(1, 2)) != int(hash64(2, 1))
    assert int(hash64(1, 2)) != int(hash64(1, 2, 0)) and int(hash64(0)) != int(hash64(0, 0))
    arrays = hash64(7, np.arange(5), 3)
    assert arrays.tolist() == [int(hash64(7, i, 3)) for i in range(5)]
    assert int(seed63(5)) < 2**63 and 0 <= float(uniform(5)) < 1
    with pytest.raises(ValueError, match="non-negative"):
        hash64(-1)


@settings(max_examples=80, derandomize=True, database=None, deadline=None)
@given(st.integers(1, 5000), st.integers(0, 2**64 - 1))
def test_a_permutation_is_a_bijection_of_its_range(n, key):
    perm = Permutation(n, key)
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    some = np.arange(n)[::7]
    assert np.array_equal(perm(some), out[some])  # any index alone maps the same


def test_permutations_are_uniform_over_their_range():
    # Where index 0 goes, over 4,000 keys, for n = 10: a chi-square test against the
    # uniform law (9 degrees of freedom; 30 is beyond the 0.9996 quantile).
    landed = Counter(permute(np.zeros(4000, np.int64), 10, np.arange(4000)).tolist())
    chi2 = sum((landed[i] - 400) ** 2 / 400 for i in range(10))
    assert chi2 < 30, landed
    with pytest.raises(IndexError):
        Permutation(10, 0)(10)
