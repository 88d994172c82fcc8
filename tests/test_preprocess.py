"""The preprocess job on Ray Data against the real S3 server: every input
accounted for, shards readable by webdataset and Ray, reproducible, resumable."""

from __future__ import annotations

import collections
import hashlib
import os
import re

import numpy as np
import pytest
from PIL import Image

from pipeline import storage
from pipeline.config import PreprocessConfig
from pipeline.data.sources import InputItem
from pipeline.preprocess import preprocess
from tests import dataset, images

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def test_two_thousand_mixed_images_to_s3(tmp_path, s3_prefix):
    raw = tmp_path / "raw"
    paths = images.mixed_folder(raw, 2000, classes=4)
    (raw / "class0" / "gradient.png").write_bytes(images.encode(images.gradient(300, 200), "PNG"))
    (raw / "class1" / "checker.png").write_bytes(
        images.encode(images.checkerboard(576, 384, 96), "PNG")
    )
    too_small = {str(p) for p in paths if min(images.size_of(p)) < 32}
    assert 50 < len(too_small) < 500  # the mix really has some

    cfg = PreprocessConfig(
        input=str(raw),
        output=s3_prefix,
        resolution=32,
        samples_per_shard=250,
        validation_fraction=0.1,
    )
    result = preprocess(cfg, progress=False)
    counts = result.manifest["counts"]
    assert counts["inputs"] == 2002
    assert counts["written"] == 2002 - len(too_small)
    assert counts["rejected_by_reason"] == {"too_small": len(too_small)}
    assert {r["uri"] for r in dataset.rejects(s3_prefix)} == too_small
    assert result.manifest["classes"] == ["class0", "class1", "class2", "class3"]

    samples = dataset.read_with_webdataset(s3_prefix)
    assert len(samples) == counts["written"]
    for key, s in samples.items():
        assert s["pixels"].shape == (32, 32, 3)
        assert s["cls"] == int(s["meta"]["source"].split("/class")[1][0])
        assert s["shard"].startswith(s["meta"]["split"])
        item = InputItem(s["meta"]["source"], s["meta"]["source"][len(str(raw)) + 1 :])
        assert item.key == key and item.split(0.1) == s["meta"]["split"]
    assert 0.05 < counts["written_by_split"]["validation"] / counts["written"] < 0.15

    rows = dataset.read_with_ray_data(s3_prefix)
    assert len(rows) == counts["written"]
    assert {r["__key__"] for r in rows} == set(samples)
    assert all(r["png"].shape == (32, 32, 3) for r in rows)

    by_source = dataset.by_source(samples)
    gradient = by_source[str(raw / "class0" / "gradient.png")]
    assert gradient["meta"]["original_size"] == [300, 200]
    want = images.expected_gradient(300, 200, 32)
    inner = slice(4, 28)
    assert np.abs(gradient["pixels"][inner, inner, :2] - want[inner, inner]).max() <= 1.0
    checker = by_source[str(raw / "class1" / "checker.png")]["pixels"][..., 0]
    # The 384x384 centre crop starts one 96-pixel square in (on a black one); at
    # resolution 32 each square is 8 pixels, and the middle 2x2 of each lies
    # beyond the filter's reach of any other square.
    for row in range(4):
        for col in range(4):
            middle = checker[row * 8 + 3 : row * 8 + 5, col * 8 + 3 : col * 8 + 5]
            assert (middle == (255 if (row + col) % 2 == 1 else 0)).all(), (row, col)


def _listing(prefix: str) -> dict[str, tuple]:
    """Every object under `prefix` with its ETag and modification time, from S3."""
    import boto3

    bucket, _, key = prefix[len("s3://") :].partition("/")
    client = boto3.client("s3")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/")
    return {
        o["Key"]: (o["ETag"], o["LastModified"], o["Size"])
        for page in pages
        for o in page.get("Contents", [])
    }


def test_same_job_twice_gives_identical_shards_and_writes_nothing(tmp_path, s3, s3_prefix):
    raw = tmp_path / "raw"
    images.mixed_folder(raw, 300, classes=3, seed=7)
    cfg = PreprocessConfig(input=str(raw), output=s3_prefix, resolution=24, samples_per_shard=40)
    first = preprocess(cfg, progress=False)
    before = _listing(s3_prefix)

    again = preprocess(cfg, progress=False)
    assert again.already_complete and again.manifest == first.manifest
    assert _listing(s3_prefix) == before

    # The same job into another place (and another medium) gives the same bytes.
    local = tmp_path / "copy"
    other = preprocess(PreprocessConfig(**{**cfg.__dict__, "output": str(local)}), progress=False)
    assert other.manifest["shards"] == first.manifest["shards"]
    for entry in first.manifest["shards"]:
        assert hashlib.sha256((local / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]

    # A local re-run replaces no file (a rewrite would change inode or mtime).
    stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in local.rglob("*")}
    assert preprocess(PreprocessConfig(**{**cfg.__dict__, "output": str(local)})).already_complete
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in local.rglob("*")} == stats


def test_bad_input_corpus_every_file_written_right_or_rejected(tmp_path, s3_prefix):
    raw = tmp_path / "raw"
    raw.mkdir()
    corpus = images.bad_corpus()
    for name, (data, _, _) in corpus.items():
        (raw / name).write_bytes(data)
    result = preprocess(
        PreprocessConfig(input=str(raw), output=s3_prefix, resolution=32), progress=False
    )

    written = dataset.by_source(dataset.read_with_webdataset(s3_prefix))
    rejected = {r["uri"]: r for r in dataset.rejects(s3_prefix)}
    counts = result.manifest["counts"]
    assert counts["inputs"] == len(corpus) == len(written) + len(rejected)
    assert counts["written"] == len(written) and counts["rejected"] == len(rejected)
    for name, (_, outcome, expected) in corpus.items():
        uri = str(raw / name)
        if outcome == "rejected":
            assert uri not in written and rejected[uri]["reason"] == expected, (
                name,
                rejected.get(uri),
            )
            assert rejected[uri]["detail"]
        else:
            assert uri not in rejected, (name, rejected.get(uri))
            expected(written[uri]["pixels"])
    reasons = collections.Counter(o[2] for o in corpus.values() if o[1] == "rejected")
    assert counts["rejected_by_reason"] == dict(reasons)
    dotted = written[str(raw / "my holiday.photo v2.final.png")]
    assert re.fullmatch(r"my_holiday_photo_v2_final_png-[0-9a-f]{16}", dotted["meta"]["key"])


def test_s3_input_and_webdataset_input(tmp_path, s3):
    raw, first, second = s3.prefix("raw"), s3.prefix("first"), s3.prefix("second")
    for i in range(60):
        colour = (i * 4, 255 - i * 4, 7 * (i % 3))
        img = Image.new("RGB", (48 + i, 40), colour)
        storage.write_bytes(
            storage.join(raw, f"c{i % 3}", f"im {i}.png"), images.encode(img, "PNG")
        )
    made = preprocess(
        PreprocessConfig(input=raw, output=first, resolution=32, samples_per_shard=25),
        progress=False,
    )
    assert made.manifest["counts"]["written"] == 60
    assert made.manifest["classes"] == ["c0", "c1", "c2"]

    # A prefix holding a dataset reads as webdataset, through its manifest, and
    # every sample keeps its identity: key, split and label.
    again = preprocess(PreprocessConfig(input=first, output=second, resolution=16), progress=False)
    assert again.manifest["counts"] == made.manifest["counts"]
    assert again.manifest["input"] == {"format": "webdataset", "labels": "cls"}
    resized = dataset.read_with_webdataset(second)
    originals = dataset.read_with_webdataset(first)
    assert set(resized) == set(originals)
    for key, s in resized.items():
        tar_uri, _, member = s["meta"]["source"].partition("#")
        assert tar_uri.startswith(first) and member == key
        assert s["meta"]["split"] == originals[key]["meta"]["split"]
        assert s["meta"]["relpath"] == originals[key]["meta"]["relpath"]
        assert s["cls"] == originals[key]["cls"]
        assert s["pixels"].shape == (16, 16, 3)
        assert np.abs(s["pixels"].mean((0, 1)) - originals[key]["pixels"].mean((0, 1))).max() < 2


def test_foreign_tars_with_broken_members_are_accounted_for(tmp_path, s3):
    import webdataset as wds

    tars, out = s3.prefix("tars"), s3.prefix("out")
    path = tmp_path / "a.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(5):
            jpeg = images.encode(Image.new("RGB", (40, 40), (50 * i, 0, 0)), "JPEG", quality=95)
            sink.write({"__key__": f"sample{i}", "jpg": jpeg, "cls": str(i % 2).encode()})
        sink.write({"__key__": "no-image", "json": b"{}"})
        sink.write({"__key__": "twice", "png": images.encode(images.noise(40, 40, 1), "PNG")})
        sink.write({"__key__": "twice", "png": images.encode(images.noise(40, 40, 2), "PNG")})
        sink.write(
            {
                "__key__": "bad-label",
                "png": images.encode(images.noise(40, 40, 0), "PNG"),
                "cls": b"cat",
            }
        )
    storage.write_bytes(storage.join(tars, "a.tar"), path.read_bytes())
    storage.write_bytes(storage.join(tars, "b.tar"), b"this is not a tar archive" * 40)
    result = preprocess(PreprocessConfig(input=tars, output=out, resolution=32), progress=False)

    counts = result.manifest["counts"]
    assert counts["inputs"] == 9 and counts["written"] == 5
    assert counts["rejected_by_reason"] == {
        "bad_label": 1,
        "bad_tar": 1,
        "duplicate_member": 1,
        "no_image_member": 1,
    }
    written = dataset.read_with_webdataset(out)
    assert sorted(s["cls"] for s in written.values()) == [0, 0, 0, 1, 1]
    assert result.manifest["classes"] == ["0", "1"]


def test_resume_with_another_plan_rebuilds_and_removes_orphan_shards(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    images.mixed_folder(raw, 120, classes=2, seed=3)
    small = PreprocessConfig(input=str(raw), output=str(out), resolution=24, samples_per_shard=10)
    first = preprocess(small, progress=False)
    # As if that run had died just before its commit, then the config changed.
    (out / "manifest.json").unlink()
    (out / "rejects.jsonl").unlink()
    (out / ".train-000000.tar.0123456789abcdef0123456789abcdef.partial").write_bytes(b"half")
    big = PreprocessConfig(input=str(raw), output=str(out), resolution=24, samples_per_shard=40)
    second = preprocess(big, progress=False)

    assert second.reused_shards == 0  # another plan: nothing of the first run is reused
    assert len(first.manifest["shards"]) > len(second.manifest["shards"])
    expected = {s["name"] for s in second.manifest["shards"]}
    on_disk = {p.name for p in out.iterdir() if p.suffix == ".tar" or p.name.startswith(".")}
    assert on_disk == expected  # orphans and the partial write are gone
    assert {p.name for p in (out / "_records").iterdir()} == {f"{n}.json" for n in expected}
    assert second.manifest["counts"]["written"] == first.manifest["counts"]["written"]


def test_label_and_format_decisions(tmp_path):
    raw = tmp_path / "raw"
    images.mixed_folder(raw, 12, classes=3, seed=4)
    (raw / "README.txt").write_text("about this dataset")
    auto = preprocess(
        PreprocessConfig(input=str(raw), output=str(tmp_path / "a"), resolution=24), progress=False
    )
    # one stray non-image file at the top does not switch class folders off
    assert auto.manifest["input"] == {"format": "files", "labels": "folders"}
    assert auto.manifest["classes"] == ["class0", "class1", "class2"]
    assert dataset.rejects(str(tmp_path / "a"))[0]["reason"] == "no_class_folder"

    none = PreprocessConfig(
        input=str(raw), output=str(tmp_path / "n"), resolution=24, labels="none"
    )
    unlabelled = preprocess(none, progress=False)
    assert unlabelled.manifest["classes"] == []
    assert unlabelled.manifest["counts"]["rejected_by_reason"] == {"not_an_image": 1}
    samples = dataset.read_with_webdataset(str(tmp_path / "n"))
    assert all(s["cls"] is None and s["meta"]["label"] is None for s in samples.values())

    # a folder of tars with a stray marker file reads as webdataset
    tars = tmp_path / "tars"
    tars.mkdir()
    for shard in (tmp_path / "a").glob("*.tar"):
        (tars / shard.name).write_bytes(shard.read_bytes())
    (tars / "_SUCCESS").write_text("")
    again = preprocess(
        PreprocessConfig(input=str(tars), output=str(tmp_path / "t"), resolution=24), progress=False
    )
    assert again.manifest["input"] == {"format": "webdataset", "labels": "cls"}
    assert again.manifest["counts"]["written"] == 12
    assert again.manifest["counts"]["rejected_by_reason"] == {"not_a_tar": 1}


def test_unicode_names_are_one_identity_and_duplicates_are_rejected(tmp_path):
    import unicodedata

    raw = tmp_path / "raw"
    raw.mkdir()
    png = images.encode(images.noise(40, 40, 0), "PNG")
    nfc, nfd = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png")
    (raw / nfc).write_bytes(png)
    (raw / nfd).write_bytes(png)  # the same name as macOS spells it: a second file here
    os.makedirs(raw, exist_ok=True)
    with open(os.path.join(os.fsencode(raw), b"latin1-\xe9t\xe9.png"), "wb") as f:
        f.write(png)  # a name that is not UTF-8
    result = preprocess(
        PreprocessConfig(input=str(raw), output=str(tmp_path / "o"), resolution=32), progress=False
    )

    counts = result.manifest["counts"]
    assert counts["inputs"] == 3 and counts["written"] == 2
    assert counts["rejected_by_reason"] == {"duplicate_key": 1}
    written = dataset.read_with_webdataset(str(tmp_path / "o"))
    sources = sorted(s["meta"]["source"] for s in written.values())
    (duplicate,) = dataset.rejects(str(tmp_path / "o"))
    kept = min(nfc, nfd)  # the first by path, so the same one every time
    assert sources[0] == str(raw / kept) and duplicate["uri"] == str(raw / max(nfc, nfd))
    assert duplicate["detail"] == f"same key as {raw / kept}"
    assert "latin1-" in sources[1] and os.path.exists(sources[1])  # its source still opens
