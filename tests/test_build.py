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


def tarfile_members(data: bytes) -> list[shards.TarMember] | str:
    """What tarfile alone reads of `data`: its regular files, or its error's type."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            return [shards.TarMember(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except tarfile.TarError as e:
        return type(e).__name__


def indexed(data: bytes) -> list[shards.TarMember] | str:
    try:
        return shards.tar_members(data)
    except tarfile.TarError as e:
        return type(e).__name__


def other_tars(rng: np.random.Generator) -> list[bytes]:
    """Tars that are not (only) plain ustar: GNU and PAX formats, directories,
    links, a long name's prefix, and tarfile's own ustar headers (uname, mtime)."""
    out = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, kind in [
                ("d", tarfile.DIRTYPE),
                ("d/" + "p" * 120 + "/a.png", tarfile.REGTYPE),
                ("l", tarfile.SYMTYPE),
                ("b.json", tarfile.REGTYPE),
            ]:
                info = tarfile.TarInfo(name)
                info.type, info.uname, info.mtime = kind, "someone", 1_700_000_000
                payload = rng.bytes(700) if kind == tarfile.REGTYPE else b""
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        out.append(buf.getvalue())
    return out


def test_the_fast_tar_index_reads_what_tarfile_reads_or_leaves_the_tar_to_it():
    # Plain shards take the fast path; every other tar, and every mutation of a
    # header byte, a truncation or an extension, must read as tarfile reads it
    # (the same members, or the same error).
    rng = np.random.default_rng(1)
    members = [
        (f"k{i}.{ext}", rng.bytes(int(rng.integers(0, 1500))))
        for i in range(6)
        for ext in ("png", "json")
    ]
    plain = shards.write_tar(members)
    assert shards._plain_members(plain) == tarfile_members(plain) != []
    tars = [plain, shards.write_tar([("é.png", b"x" * 600), ("a.cls", b"1")]), *other_tars(rng)]
    tars += [b"", bytes(10_240), plain[:512], plain[:700], plain + b"\0" * 3]
    folder = bytearray(shards.write_tar([("d/", b""), ("a.png", b"x")]))
    folder[156], folder[148:156] = 0, b" " * 8  # an old-style folder: tarfile's AREGTYPE
    folder[148:155] = b"%06o\0" % sum(folder[:512])
    tars.append(bytes(folder))
    headers = [m.offset - 512 for m in shards.tar_members(plain)]  # the header blocks
    for _ in range(1500):
        data = bytearray(plain)
        at = int(rng.choice(headers)) + int(rng.integers(0, 512))
        data[at] = int(rng.integers(0, 256))
        tars.append(bytes(data))
    for _ in range(1500):  # the same, the checksum then made right again
        data = bytearray(plain)
        header = int(rng.choice(headers))
        data[header + int(rng.integers(0, 512))] = int(rng.choice([0, 32, 48, 55, 56, 120, 255]))
        data[header + 148 : header + 156] = b" " * 8
        data[header + 148 : header + 155] = b"%06o\0" % sum(data[header : header + 512])
        tars.append(bytes(data))
    for _ in range(100):
        tars.append(plain[: int(rng.integers(0, len(plain)))])
    for data in tars:
        assert indexed(data) == tarfile_members(data), data[:600]
