"""Building one shard on a worker, without Ray: what the task pool runs."""

import dataclasses
import io
import json
import tarfile

import numpy as np

from pipeline.config import PreprocessConfig
from pipeline.data import shards
from pipeline.data.sources import InputItem, ShardPlan
from pipeline.jobs.preprocess import build
from tests import images


def run(plan: ShardPlan, cfg: PreprocessConfig) -> dict:
    batch = {
        "split": np.array([plan.split], dtype=object),
        "index": np.array([plan.index]),
        "plan_sha256": np.array(["digest"], dtype=object),
        "items": np.array([json.dumps([dataclasses.asdict(i) for i in plan.items])], dtype=object),
    }
    (record,) = build.build_shards(batch, cfg)["record"]
    return json.loads(record)


def test_a_shard_holds_its_samples_and_its_record_says_so(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.png").write_bytes(images.encode(images.noise(40, 30, 0), "PNG"))
    (raw / "b.png").write_bytes(b"")
    items = (
        InputItem(str(raw / "a.png"), "a.png", 3),
        InputItem(str(raw / "b.png"), "b.png"),
        InputItem(str(raw / "gone.png"), "gone.png"),
    )  # deleted since it was listed
    cfg = PreprocessConfig(input=str(raw), output=str(tmp_path / "out"), resolution=16)
    record = run(ShardPlan("train", 7, items), cfg)

    assert record["name"] == "train-000007.tar" and record["inputs"] == 3
    assert record["samples"] == 1 and record["software"] == build.software()
    assert [(r["uri"], r["reason"]) for r in record["rejects"]] == [
        (str(raw / "b.png"), "empty"),
        (str(raw / "gone.png"), "vanished"),
    ]
    data = (tmp_path / "out" / "train-000007.tar").read_bytes()
    assert len(data) == record["bytes"] and shards.sha256(data) == record["sha256"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        key = items[0].key
        assert names == [f"{key}.png", f"{key}.json", f"{key}.cls"]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())
        meta = json.loads(tar.extractfile(f"{key}.json").read())
    assert meta == {
        "key": key,
        "relpath": "a.png",
        "source": str(raw / "a.png"),
        "original_size": [40, 30],
        "label": 3,
        "split": "train",
    }
    on_disk = json.loads((tmp_path / "out" / "_records" / "train-000007.tar.json").read_text())
    assert on_disk == record


def test_storage_failures_come_back_as_data_not_as_a_crashed_task(tmp_path):
    (tmp_path / "out").write_text("a file where the output folder should be")
    raw = tmp_path / "a.png"
    raw.write_bytes(images.encode(images.noise(40, 30, 0), "PNG"))
    cfg = PreprocessConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), resolution=16)
    record = run(ShardPlan("train", 0, (InputItem(str(raw), "a.png"),)), cfg)
    assert record["name"] == "train-000000.tar" and "out/train-000000.tar" in record["error"]


def tarfile_reference(members: list[tuple[str, bytes]]) -> bytes:
    """What the shard writer wrote before it built headers itself: tarfile, PAX."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_shard_tars_are_the_bytes_tarfile_writes():
    # Short ASCII names take the hand-built ustar header; names of 101 characters,
    # non-ASCII or undecodable ones tarfile's PAX records. Sizes cross block edges.
    rng = np.random.default_rng(0)
    names = ["a.png", "x" * 100, "x" * 101, "é-1.json", "dir/k.cls", "\udcff.png"]
    for name in names:
        for sizes in ([0], [511, 512, 513], [10_237, 1], list(rng.integers(0, 20_000, 25))):
            members = [(f"{i or ''}{name}", rng.bytes(int(s))) for i, s in enumerate(sizes)]
            assert shards.write_tar(members) == tarfile_reference(members), (name, sizes)
    assert shards.write_tar([]) == tarfile_reference([])
