"""Reading a preprocessed dataset back, the way its users will: with the
webdataset library and with Ray Data, checking it against its manifest."""

from __future__ import annotations

import io
import json

from pipeline.data import shards
from pipeline.edges import storage
from tests import images


def manifest(prefix: str) -> dict:
    found = shards.load_manifest(prefix)
    assert found is not None, f"no manifest under {prefix}"
    return found


def read_with_webdataset(prefix: str) -> dict[str, dict]:
    """Every sample of every shard in the manifest, parsed and grouped into samples
    by the webdataset library; checks each shard's size and sha256 on the way."""
    from webdataset import tariterators

    samples: dict[str, dict] = {}
    for entry in manifest(prefix)["shards"]:
        data = storage.read_bytes(storage.join(prefix, entry["name"]))
        assert len(data) == entry["bytes"] and shards.sha256(data) == entry["sha256"]
        members = (
            {**m, "__url__": entry["name"]}
            for m in tariterators.tar_file_iterator(io.BytesIO(data))
        )
        count = 0
        for sample in tariterators.group_by_keys(members):
            key = sample["__key__"]
            assert "." not in key and key not in samples
            samples[key] = {
                "pixels": images.pixels_of(sample["png"]),
                "meta": json.loads(sample["json"]),
                "cls": int(sample["cls"]) if "cls" in sample else None,
                "shard": entry["name"],
            }
            count += 1
        assert count == entry["samples"], entry
    return samples


def read_with_ray_data(prefix: str) -> list[dict]:
    """Every row of the dataset's shards, read by `ray.data.read_webdataset`."""
    import ray

    fs, path = storage.arrow_filesystem(prefix)
    paths = [f"{path}/{s['name']}" for s in manifest(prefix)["shards"]]
    return ray.data.read_webdataset(paths, filesystem=fs).take_all()


def by_source(samples: dict[str, dict]) -> dict[str, dict]:
    return {s["meta"]["source"]: s for s in samples.values()}


def rejects(prefix: str) -> list[dict]:
    text = storage.read_bytes(storage.join(prefix, shards.REJECTS)).decode()
    return [json.loads(line) for line in text.splitlines()]
