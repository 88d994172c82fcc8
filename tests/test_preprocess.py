"""The preprocess job on Ray Data against the real S3 server: every input
accounted for, shards readable by webdataset and Ray, reproducible, resumable,
and appendable (new inputs in new shards, old shards untouched)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import socket
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import PreprocessConfig
from pipeline.data import shards
from pipeline.data.sources import InputItem
from pipeline.edges import storage
from pipeline.jobs.preprocess import preprocess, versions
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


def test_bad_input_corpus_every_file_written_right_or_rejected(tmp_path, s3_prefix, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    corpus = images.bad_corpus()
    for name, (data, _, _) in corpus.items():
        (raw / name).write_bytes(data)
    # Entries that are no files: each must cost itself, never the job (a FIFO
    # opened for reading would block it forever).
    os.symlink("deleted.png", raw / "broken link.png")
    os.symlink("loop b", raw / "loop a")
    os.symlink("loop a", raw / "loop b")
    os.symlink(".", raw / "itself")
    os.mkfifo(raw / "fifo.png")
    monkeypatch.chdir(raw)  # a socket's path must be short
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("socket.png")
    for name, reason in [
        ("broken link.png", "broken_link"),
        ("loop a", "link_loop"),
        ("loop b", "link_loop"),
        ("itself", "link_loop"),
        ("fifo.png", "not_a_regular_file"),
        ("socket.png", "not_a_regular_file"),
    ]:
        corpus[name] = (b"", "rejected", reason)
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


# --- appending: the nightly job adds what arrived since the last version ---------------


def _files(root: Path) -> dict[str, tuple]:
    """Every file under `root`, hidden ones included: (size, sha256, inode, mtime),
    so that a rewrite with the same bytes shows too."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[p.relative_to(root).as_posix()] = (st.st_size, digest, st.st_ino, st.st_mtime_ns)
    return out


def _shard_inputs(out: Path, names: list[str]) -> set[str]:
    """The inputs the shards `names` hold: their samples' sources and their rejects."""
    found = set()
    for name in names:
        record = json.loads((out / "_records" / f"{name}.json").read_text())
        found |= {r["uri"] for r in record["rejects"]}
        with tarfile.open(out / name) as tar:
            found |= {
                json.loads(tar.extractfile(m).read())["source"]
                for m in tar.getmembers()
                if m.name.endswith(".json")
            }
    return found


def test_append_adds_only_new_inputs_in_new_shards_and_leaves_the_old_untouched(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    images.mixed_folder(raw, 40, classes=3, seed=11)
    (raw / "README.txt").write_text("about")  # rejected by the dataset as a whole
    png = images.encode(images.noise(40, 32, 0), "PNG")
    nfc, nfd = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png")
    (raw / "class0" / nfc).write_bytes(png)
    cfg = PreprocessConfig(
        input=str(raw),
        output=str(out),
        resolution=24,
        samples_per_shard=6,
        validation_fraction=0.25,
    )
    first = preprocess(cfg, progress=False)
    assert first.manifest["version"] == 1 and "previous" not in first.manifest
    old_inputs = {str(p) for p in raw.rglob("*") if p.is_file()}
    # A version committed before versions listed their inputs, with a shard
    # recorded before records listed their sources: read from the shard.
    [listed] = (out / versions.INPUTS).iterdir()
    assert versions._read_inputs(str(out), (out / "manifest.json").read_bytes()) == old_inputs
    listed.unlink()
    legacy = out / "_records" / "train-000000.tar.json"
    record = json.loads(legacy.read_text())
    assert len(record.pop("sources")) == 6
    legacy.write_bytes(shards.dumps(record))
    before, old_manifest = _files(out), (out / "manifest.json").read_bytes()

    for i in range(14):
        (raw / f"class{i % 3}" / f"new{i:02d}.png").write_bytes(
            images.encode(images.noise(40, 32, 100 + i), "PNG")
        )
    (raw / "aardvark").mkdir()
    (raw / "aardvark" / "a.png").write_bytes(png)  # a class the model does not know
    (raw / "class1" / "corrupt.jpg").write_bytes(b"not a jpeg\n" * 20)
    (raw / "stray.png").write_bytes(png)  # would switch class folders off, decided afresh
    (raw / "class0" / nfd).write_bytes(png)  # the key of an input the dataset holds
    new_inputs = {str(p) for p in raw.rglob("*") if p.is_file()} - old_inputs
    second = preprocess(cfg, progress=False, append=True)
    m, old = second.manifest, first.manifest

    assert not second.already_complete and second.added_inputs == len(new_inputs) == 18
    after = _files(out)
    for path, state in before.items():
        if path not in ("manifest.json", "rejects.jsonl"):
            assert after[path] == state, path  # not rewritten, not deleted
    assert (out / "manifests" / "000001.json").read_bytes() == old_manifest
    previous = {"version": 1, "sha256": hashlib.sha256(old_manifest).hexdigest()}
    assert m["version"] == 2 and m["previous"] == previous
    assert m["classes"] == old["classes"] == ["class0", "class1", "class2"]
    assert m["input"] == old["input"] and m["config"] == old["config"]
    assert m["shards"][: len(old["shards"])] == old["shards"]
    added = m["shards"][len(old["shards"]) :]
    assert second.added_shards == len(added)
    for split in shards.SPLITS:
        n_old = sum(e["split"] == split for e in old["shards"])
        names = [e["name"] for e in added if e["split"] == split]
        assert names and names == [shards.shard_name(split, n_old + i) for i in range(len(names))]

    c, c0 = m["counts"], old["counts"]
    new_by_split = {s: sum(e["samples"] for e in added if e["split"] == s) for s in shards.SPLITS}
    assert c["inputs"] == c0["inputs"] + 18 and c["written"] == c0["written"] + 14
    assert c["rejected"] == c0["rejected"] + 4 and sum(new_by_split.values()) == 14
    assert c["written_by_split"] == {
        s: c0["written_by_split"][s] + new_by_split[s] for s in shards.SPLITS
    }
    new_reasons = collections.Counter(
        ["unknown_class", "not_an_image", "no_class_folder", "duplicate_key"]
    )
    assert c["rejected_by_reason"] == dict(
        sorted((collections.Counter(c0["rejected_by_reason"]) + new_reasons).items())
    )

    # Every input is accounted for once: written (with its folder's old label) or rejected.
    written = dataset.by_source(dataset.read_with_webdataset(str(out)))
    rejected = {r["uri"]: r for r in dataset.rejects(str(out))}
    assert len(rejected) == c["rejected"] and not set(written) & set(rejected)
    assert set(written) | set(rejected) == old_inputs | new_inputs and len(written) == c["written"]
    for source, s in written.items():
        assert s["cls"] == m["classes"].index(Path(source).parent.name)
    assert rejected[str(raw / "aardvark" / "a.png")]["reason"] == "unknown_class"
    assert "aardvark" in rejected[str(raw / "aardvark" / "a.png")]["detail"]
    assert rejected[str(raw / "class1" / "corrupt.jpg")]["reason"] == "not_an_image"
    assert rejected[str(raw / "stray.png")]["reason"] == "no_class_folder"
    duplicate = rejected[str(raw / "class0" / nfd)]
    assert duplicate["reason"] == "duplicate_key" and str(raw / "class0" / nfc) in written
    assert [r["uri"] for r in dataset.rejects(str(out))] == sorted(rejected)

    # The new shards hold exactly the new inputs (but those rejected as a whole),
    # and their records say so.
    as_a_whole = {
        str(raw / "aardvark" / "a.png"),
        str(raw / "stray.png"),
        str(raw / "class0" / nfd),
    }
    in_shards = new_inputs - as_a_whole
    assert _shard_inputs(out, [e["name"] for e in added]) == in_shards
    sources = [
        json.loads((out / "_records" / f"{e['name']}.json").read_text())["sources"] for e in added
    ]
    assert sorted(u for s in sources for u in s) == sorted(in_shards)
    assert second.summary().startswith(
        f"appended 18 new inputs in {len(added)} shards to version 2"
    )

    # Version 2 lists what it holds, and the next append reads that list, not
    # the shards or their records (moved away here).
    manifest_bytes = (out / "manifest.json").read_bytes()
    assert versions._read_inputs(str(out), manifest_bytes) == old_inputs | new_inputs
    hidden = tmp_path / "hidden"
    (out / "_records").rename(hidden)
    (out / "train-000000.tar").rename(tmp_path / "shard")
    base = versions.read_base(str(out), manifest_bytes)
    assert base.inputs == old_inputs | new_inputs
    hidden.rename(out / "_records")
    (tmp_path / "shard").rename(out / "train-000000.tar")

    # Nothing new: nothing written, replaced or deleted.
    state = _files(out)
    third = preprocess(cfg, progress=False, append=True)
    assert third.already_complete and third.manifest == m and third.added_inputs == 0
    assert preprocess(cfg, progress=False).already_complete
    assert _files(out) == state


def test_interrupted_append_resumes_to_the_same_manifest(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    images.mixed_folder(raw, 24, classes=2, seed=12)
    cfg = PreprocessConfig(
        input=str(raw),
        output=str(out),
        resolution=24,
        samples_per_shard=4,
        validation_fraction=0.25,
    )
    first = preprocess(cfg, progress=False)
    v1 = {p: (out / p).read_bytes() for p in ("manifest.json", "rejects.jsonl")}
    [v1_list] = (out / versions.INPUTS).iterdir()
    v1_list_bytes = v1_list.read_bytes()
    for i in range(16):
        (raw / f"class{i % 2}" / f"new{i:02d}.png").write_bytes(
            images.encode(images.noise(32, 32, 200 + i), "PNG")
        )
    (raw / "class0" / "corrupt.png").write_bytes(b"\x89PNG broken")  # rejected in a new shard
    (raw / "zebra").mkdir()
    (raw / "zebra" / "z.png").write_bytes(images.encode(images.noise(32, 32, 1), "PNG"))
    uninterrupted = preprocess(cfg, progress=False, append=True)
    # The inputs list of version 2 only: version 1's went once 2 was committed.
    listed = versions.inputs_uri(str(out), (out / "manifest.json").read_bytes())
    assert [str(p) for p in (out / versions.INPUTS).iterdir()] == [listed]
    done = {p: v[1] for p, v in _files(out).items()}
    new = [e["name"] for e in uninterrupted.manifest["shards"][len(first.manifest["shards"]) :]]
    assert len(new) >= 4

    # Killed while building: the base still committed, one new shard written but
    # not yet its record, one not written at all, the others finished.
    for name, data in v1.items():
        (out / name).write_bytes(data)
    shutil.rmtree(out / "manifests")
    (out / "_records" / f"{new[0]}.json").unlink()
    (out / new[1]).unlink()
    (out / "_records" / f"{new[1]}.json").unlink()
    finished = {p: s for p, s in _files(out).items() if any(n in p for n in new[2:])}
    resumed = preprocess(cfg, progress=False, append=True)
    assert resumed.reused_shards == len(new) - 2
    assert {p: v[1] for p, v in _files(out).items()} == done
    assert all(_files(out)[p] == s for p, s in finished.items())  # reused, not rebuilt

    # Killed between writing the new rejects.jsonl and the new manifest.json.
    (out / "manifest.json").write_bytes(v1["manifest.json"])
    again = preprocess(cfg, progress=False, append=True)
    assert again.reused_shards == len(new) and not again.already_complete
    assert {p: v[1] for p, v in _files(out).items()} == done
    assert again.manifest == uninterrupted.manifest

    # Killed after committing version 2, before deleting version 1's inputs
    # list: the next run finds nothing new, and deletes it.
    v1_list.write_bytes(v1_list_bytes)
    assert preprocess(cfg, progress=False, append=True).already_complete
    assert {p: v[1] for p, v in _files(out).items()} == done
    v1_list.write_bytes(v1_list_bytes)
    assert preprocess(cfg, progress=False).already_complete  # and so does a plain run
    assert {p: v[1] for p, v in _files(out).items()} == done


def test_append_to_a_webdataset_dataset_in_s3_keeps_its_label_space(tmp_path, s3):
    import webdataset as wds

    tars, out = s3.prefix("tars"), s3.prefix("out")

    def upload(name: str, labels: list[int | None]) -> None:
        path = tmp_path / name
        with wds.TarWriter(str(path)) as sink:
            for i, label in enumerate(labels):
                sample = {"__key__": f"s{i}", "png": png(i, label)}
                if label is not None:
                    sample["cls"] = str(label).encode()
                sink.write(sample)
        storage.write_bytes(storage.join(tars, name), path.read_bytes())

    def png(i: int, label: int | None) -> bytes:
        return images.encode(Image.new("RGB", (32, 32), (40 * i, 60 * (label or 0), 9)), "PNG")

    upload("a.tar", [0, 1, 0, 1])
    cfg = PreprocessConfig(input=tars, output=out, resolution=16, samples_per_shard=3)
    first = preprocess(cfg, progress=False)
    assert first.manifest["classes"] == ["0", "1"]
    before, old_manifest = _listing(out), storage.read_bytes(storage.join(out, "manifest.json"))

    upload("b.tar", [1, 2, None, 0])  # label 2 is not in the dataset's label space
    second = preprocess(cfg, progress=False, append=True)
    m = second.manifest
    assert m["version"] == 2 and m["classes"] == ["0", "1"]
    assert m["counts"]["inputs"] == 8 and m["counts"]["written"] == 7
    assert m["counts"]["rejected_by_reason"] == {"unknown_class": 1}
    (reject,) = dataset.rejects(out)
    assert reject["uri"] == f"{tars}/b.tar#s1" and "label 2" in reject["detail"]
    after = _listing(out)
    replaced = [k for k, v in before.items() if k in after and after[k] != v]  # ETag, time, size
    assert sorted(k.rpartition("/")[2] for k in replaced) == ["manifest.json", "rejects.jsonl"]
    # Gone: version 1's inputs list only, once version 2 (listing its own) committed.
    [gone] = set(before) - set(after)
    assert gone.endswith(versions.inputs_uri("", old_manifest).rpartition("/")[2])
    assert storage.read_bytes(storage.join(out, "manifests", "000001.json")) == old_manifest
    written = dataset.read_with_webdataset(out)
    new_shards = {e["name"] for e in m["shards"][len(first.manifest["shards"]) :]}
    from_b = {k: s for k, s in written.items() if s["meta"]["source"].startswith(f"{tars}/b.tar")}
    assert {s["cls"] for s in from_b.values()} == {1, None, 0} and len(from_b) == 3
    assert {s["shard"] for s in from_b.values()} <= new_shards

    again = preprocess(cfg, progress=False, append=True)
    assert again.already_complete and again.manifest == m and _listing(out) == after
