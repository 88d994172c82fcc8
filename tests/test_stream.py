"""Reading the training stream: `data.stream.WindowReader` on its own, and the
worker's stream (`jobs.train.ingest.batches`) through a real Ray cluster with
Ray Train, for 1 and 2 workers. What a worker receives, position by position
and pixel by pixel, is what the plan says sits there: the shards read
independently with the webdataset library, each image flipped where the plan
flips it."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config.records import StreamPlan, TrainShard
from pipeline.data import latent_samples, shards
from pipeline.data.order import Order
from pipeline.data.stream import Reading, StreamError, WindowReader
from tests import images

SIZES = [37, 0, 50, 13, 60]
"""Train shards of uneven sizes, one empty: 160 images of 8x8."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, StreamPlan]:
    """Shards written as tasks.preprocess writes them ({key}.png, .json, .cls), of
    random images, and the stream plan over them (batch 8, window 32, flips on)."""
    root = tmp_path_factory.mktemp("stream-dataset")
    rng = np.random.default_rng(0)
    refs = []
    for i, size in enumerate(SIZES):
        members = []
        for j in range(size):
            key = f"s{i}x{j:03d}"
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            png = images.encode(images.Image.fromarray(pixels), "PNG")
            members += [
                (f"{key}.png", png),
                (f"{key}.json", b"{}"),
                (f"{key}.cls", b"%d" % (j % 7)),
            ]
        data = shards.write_tar(members)
        name = shards.shard_name("train", i)
        (root / name).write_bytes(data)
        refs.append(TrainShard(name, size, shards.sha256(data)))
    return str(root), StreamPlan(3, "cd" * 32, tuple(refs), 8, 32, True)


def expected(prefix: str, plan: StreamPlan, positions: np.ndarray) -> list[tuple[int, str, int]]:
    """(position, sha256 of its pixels as trained on, label), from the shards read
    with the webdataset library and the plan's (shard, member) and flip."""
    from webdataset import tariterators

    samples = []
    for ref in plan.shards:
        with open(Path(prefix, ref.name), "rb") as f:
            members = tariterators.tar_file_iterator(io.BytesIO(f.read()))
            named = ({**m, "__url__": ref.name} for m in members)
            samples.append(list(tariterators.group_by_keys(named)))
    order = Order(plan)
    shard, member = order.samples(positions)
    out = []
    for p, s, m, flip in zip(positions, shard, member, order.flips(positions), strict=True):
        sample = samples[s][m]
        pixels = images.pixels_of(sample["png"]).transpose(2, 0, 1)
        pixels = pixels[:, :, ::-1] if flip else pixels
        out.append((int(p), digest(pixels), int(sample["cls"])))
    return out


def digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:16]


def received(blocks) -> list[tuple[int, str, int]]:
    return [
        (int(p), digest(image), int(label))
        for block in blocks
        for p, image, label in zip(block["position"], block["image"], block["label"], strict=True)
    ]


@pytest.mark.parametrize("world", [1, 2])
def test_a_reader_gives_a_worker_its_positions_and_the_plans_pixels(dataset, world):
    prefix, plan = dataset
    order = Order(plan)
    start, stop = 24, 24 + 3 * 160  # from a resume point, over three passes
    for rank in range(world):
        reader = WindowReader(plan, Reading(prefix, rank, world, start, stop, 8, True))
        windows = order.units(start, stop)
        blocks = list(reader({"id": np.array(list(windows))}))
        mine = order.positions(rank, world, start, stop)
        assert received(blocks) == expected(prefix, plan, mine)
        assert all(
            b["image"].dtype == np.uint8 and b["image"].shape[1:] == (3, 8, 8) for b in blocks
        )
        checks = np.concatenate([b["check"] for b in blocks])
        assert np.array_equal(checks, order.checks(mine, *order.samples(mine)))
        # The memory bound: a worker's reader holds at most its share of a window.
        assert 0 < reader.held <= plan.window // world


def test_a_shard_that_changed_after_the_manifest_is_refused_by_name(dataset, tmp_path):
    prefix, plan = dataset
    for name in (s.name for s in plan.shards):
        (tmp_path / name).write_bytes(Path(prefix, name).read_bytes())
    target = shards.shard_name("train", 2)
    data = bytearray((tmp_path / target).read_bytes())
    data[600] ^= 1
    (tmp_path / target).write_bytes(bytes(data))
    reader = WindowReader(plan, Reading(str(tmp_path), 0, 1, 0, 160, 8, True))
    with pytest.raises(StreamError, match=f"{target}: its sha256 is not the manifest's"):
        for window in Order(plan).units(0, 160):
            list(reader.read(window))
    # And one whose count is not the manifest's.
    fewer = dict(plan.to_dict())
    fewer["shards"] = [
        {**s, "samples": s["samples"] - (s["name"] == target)} for s in fewer["shards"]
    ]
    fewer_plan = StreamPlan.from_dict(fewer)
    reader = WindowReader(fewer_plan, Reading(prefix, 0, 1, 0, 159, 8, True))
    with pytest.raises(StreamError, match=f"{target}: holds 50 samples, the manifest says 49"):
        for window in Order(fewer_plan).units(0, 159):
            list(reader.read(window))


def record_stream(config: dict) -> None:
    """A Ray Train worker: the training stream as `tasks.train`'s worker reads it,
    as worker r of 2 and (rank 0 also) as the only worker of 1; each batch's
    positions, pixel digests and labels go to a file per reading (the test's
    folder, on this one machine)."""
    import ray.train

    from pipeline.jobs.train import ingest

    rank = ray.train.get_context().get_world_rank()
    plan = StreamPlan.from_dict(config["plan"])
    for world in (2, 1) if rank == 0 else (2,):
        reading = Reading(config["prefix"], rank, world, config["start"], config["stop"], 8, True)
        steps = []
        for batch in ingest.batches(plan, reading):
            assert batch.label is not None
            rows = zip(batch.position, batch.image, batch.label, strict=True)
            steps.append([(int(p), digest(image.numpy()), int(label)) for p, image, label in rows])
        Path(config["out"], f"{rank}-of-{world}.json").write_text(json.dumps(steps))


@pytest.mark.slow
def test_through_ray_data_a_worker_receives_the_plans_positions_and_pixels(
    dataset, ray_cluster, tmp_path
):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    prefix, plan = dataset
    start, stop = 120, 200  # from a resume point, across a pass boundary: 4 windows
    config = {"plan": plan.to_dict(), "prefix": prefix, "start": start, "stop": stop}
    config["out"] = str(tmp_path)
    TorchTrainer(
        record_stream,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="stream", storage_path=str(tmp_path / "runs")),
    ).fit()
    order = Order(plan)
    steps = (stop - start) // plan.batch_size
    for rank, world in [(0, 1), (0, 2), (1, 2)]:
        got = json.loads(Path(tmp_path, f"{rank}-of-{world}.json").read_text())
        mine = expected(prefix, plan, order.positions(rank, world, start, stop))
        assert len(got) == steps and all(len(step) == plan.batch_size // world for step in got)
        assert [tuple(row) for step in got for row in step] == mine


@pytest.mark.slow
def test_two_readers_at_once_and_several_datasets_still_deliver_in_order(dataset, ray_cluster):
    # The Ray Train workers above hold a CPU of the session's two, so their readers
    # run one at a time. Here nothing else holds one: two readers at once, on read
    # units of 64, 64 and 32 images (a pass of 160 in windows of 64), finish out
    # of order, and the stream must still come in order (preserve_order), across
    # the Datasets that follow each other, two running at once at each hand-over.
    from pipeline.jobs.train import ingest

    prefix, plan = dataset
    plan = dataclasses.replace(plan, window=64)
    start, stop = 64, 64 + 4 * 160
    for rank in (0, 1):
        reading = Reading(prefix, rank, 2, start, stop, 8, True)
        got = [
            (int(p), digest(image.numpy()), int(label))
            # Datasets of 4 windows: the next starts while the last 2 are read.
            for batch in ingest.batches(plan, reading, readers=2, segment=4)
            for p, image, label in zip(batch.position, batch.image, batch.label, strict=True)
        ]
        assert got == expected(prefix, plan, Order(plan).positions(rank, 2, start, stop))


@pytest.fixture(scope="module")
def latent_dataset(tmp_path_factory) -> tuple[str, StreamPlan, dict]:
    """Latent shards as tasks.encode writes them (mean, std and the mirrored image's
    of 4x2x2 latents, .json, .cls), and the plan over them (flips on); the stored
    arrays by (shard, member)."""
    root = tmp_path_factory.mktemp("stream-latents")
    rng = np.random.default_rng(1)
    refs, stored = [], {}
    for i, size in enumerate(SIZES):
        members = []
        for j in range(size):
            arrays = rng.standard_normal((4, 4, 2, 2)).astype(np.float32)
            arrays[1] = np.abs(arrays[1]) + 0.1
            arrays[3] = np.abs(arrays[3]) + 0.1
            stored[i, j] = arrays
            members += latent_samples.members(
                f"s{i}x{j:03d}",
                arrays[0],
                arrays[1],
                b"{}",
                b"%d" % (j % 7),
                (arrays[2], arrays[3]),
            )
        data = shards.write_tar(members)
        name = shards.shard_name("train", i)
        (root / name).write_bytes(data)
        refs.append(TrainShard(name, size, shards.sha256(data)))
    return str(root), StreamPlan(3, "ef" * 32, tuple(refs), 8, 32, True), stored


def test_a_reader_gives_each_position_its_posterior_the_mirrored_one_where_it_flips(
    latent_dataset,
):
    prefix, plan, stored = latent_dataset
    order = Order(plan)
    start, stop = 16, 16 + 2 * 160
    reader = WindowReader(plan, Reading(prefix, 0, 1, start, stop, 2, True, latent_channels=4))
    blocks = list(reader({"id": np.array(list(order.units(start, stop)))}))
    assert all("image" not in b and b["posterior"].dtype == np.float32 for b in blocks)
    posterior = np.concatenate([b["posterior"] for b in blocks])
    positions = np.concatenate([b["position"] for b in blocks])
    assert np.array_equal(positions, np.arange(start, stop))
    shard, member = order.samples(positions)
    flips = order.flips(positions)
    assert 0 < flips.sum() < len(flips)
    for got, s, m, flip in zip(posterior, shard, member, flips, strict=True):
        want = stored[s, m][2:] if flip else stored[s, m][:2]
        np.testing.assert_array_equal(got, want)
    labels = np.concatenate([b["label"] for b in blocks])
    assert np.array_equal(labels, member % 7)
