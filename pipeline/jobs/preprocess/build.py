"""Building one shard, on a worker: plain callables on batch dicts, no Ray.

`pipeline.jobs.preprocess` wires these into Ray Data with `map_batches`; they read
their inputs through `pipeline.edges.storage`, so they run the same in a test, on a
laptop and on a cluster node.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.config import PreprocessConfig
from pipeline.data import shards, sources
from pipeline.data.decode import Rejected, decode_image
from pipeline.data.sources import InputItem, ShardPlan
from pipeline.data.transforms import center_crop_resize, encode_png
from pipeline.edges import storage


def software() -> dict[str, str]:
    """Versions of what a shard's bytes depend on besides the config and inputs:
    decoders, resampling and zlib all live in the Pillow build."""
    import PIL
    from PIL import features

    return {
        "format_version": str(shards.FORMAT_VERSION),
        "pillow": PIL.__version__,
        "zlib": str(features.version("zlib")),
        "libjpeg": str(features.version("jpg")),
        "littlecms": str(features.version("littlecms2")),
    }


def index_tars(batch: dict[str, np.ndarray], labels: str, ours: bool) -> dict[str, np.ndarray]:
    """The inputs (and rejects) found in a batch of webdataset tars, as JSON lists."""
    out_items, out_rejects = [], []
    for uri, relpath, size in zip(batch["uri"], batch["relpath"], batch["size"], strict=True):
        tar = storage.ObjectInfo(uri, relpath, int(size))
        try:
            items, rejects = sources.tar_inputs(tar, labels, ours)
        except (storage.NotFound, storage.AccessDenied) as e:
            items, rejects = [], [_read_reject(tar.uri, e)]
        except storage.StorageError as e:
            items, rejects = [], [{"error": str(e)}]
        out_items.append(items_json(items))
        out_rejects.append(json.dumps(rejects))
    return {
        "items": np.array(out_items, dtype=object),
        "rejects": np.array(out_rejects, dtype=object),
    }


_ITEM_FIELDS = tuple(f.name for f in dataclasses.fields(InputItem))


def items_json(items: Iterable[InputItem]) -> str:
    """Inputs as a JSON list of their fields, as they travel to a task. Read field
    by field: `dataclasses.asdict` deep-copies each value, 5x slower (16 against
    3 us an input, on the driver before the first shard starts)."""
    return json.dumps([{f: getattr(i, f) for f in _ITEM_FIELDS} for i in items])


def build_shards(batch: dict[str, np.ndarray], cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """Build and write the shards of a batch of shard plans; return their records."""
    records = []
    for split, index, digest, items in zip(
        batch["split"],
        batch["index"],
        batch["plan_sha256"],
        batch["items"],
        strict=True,
    ):
        plan = ShardPlan(str(split), int(index), tuple(InputItem(**d) for d in json.loads(items)))
        try:
            record = _build_shard(plan, str(digest), cfg)
        except storage.StorageError as e:
            # Travels as data, so the driver can report it in one line.
            record = {"name": plan.name, "error": str(e)}
        records.append(json.dumps(record))
    return {"record": np.array(records, dtype=object)}


def _build_shard(plan: ShardPlan, digest: str, cfg: PreprocessConfig) -> dict[str, Any]:
    members, rejects = [], []
    for item, data in _reads(plan.items):
        if isinstance(data, storage.StorageError):
            rejects.append(_read_reject(item.source, data))
            continue
        try:
            members += _sample_members(item, data, plan.split, cfg)
        except Rejected as r:
            rejects.append(sources.reject(item.source, r.reason, r.detail))
        except Exception as e:  # noqa: BLE001 - a decoder bug must cost one image, not the job
            rejects.append(sources.reject(item.source, "decode_error", f"{type(e).__name__}: {e}"))
    tar = shards.write_tar(members)
    storage.write_bytes(storage.join(cfg.output, plan.name), tar)
    record = {
        "name": plan.name,
        "split": plan.split,
        "index": plan.index,
        "plan_sha256": digest,
        "inputs": len(plan.items),
        "samples": len(plan.items) - len(rejects),
        "bytes": len(tar),
        "sha256": shards.sha256(tar),
        "rejects": rejects,
        "software": software(),
        # Every input planned here, written or rejected: what an append reads to
        # know which inputs the dataset already holds.
        "sources": [item.source for item in plan.items],
    }
    storage.write_bytes(
        storage.join(cfg.output, shards.RECORDS, f"{plan.name}.json"), shards.dumps(record)
    )
    return record


def _sample_members(
    item: InputItem, data: bytes, split: str, cfg: PreprocessConfig
) -> list[tuple[str, bytes]]:
    red, green, blue = cfg.background
    img, original = decode_image(
        data, max_pixels=cfg.max_pixels, background=(red, green, blue), min_side=cfg.resolution
    )
    img = center_crop_resize(img, cfg.resolution, upscale=cfg.small_images == "upscale")
    key = item.key
    meta = {
        "key": key,
        "relpath": item.relpath,
        "source": item.source,
        "original_size": list(original),
        "label": item.label,
        "split": split,
    }
    members = [
        (f"{key}.png", encode_png(img)),
        (f"{key}.json", json.dumps(meta, sort_keys=True).encode()),
    ]
    if item.label is not None:
        members.append((f"{key}.cls", str(item.label).encode()))
    return members


def _read_reject(uri: str, error: storage.StorageError) -> dict[str, str]:
    """The reject for an input whose read raised NotFound (deleted after it was
    listed) or AccessDenied (S3 403, file permissions): each costs one input. The
    other storage errors (an unreachable endpoint, bad credentials) would fail
    every input alike, so they stop the job instead."""
    reason = "vanished" if isinstance(error, storage.NotFound) else "permission_denied"
    return sources.reject(uri, reason, str(error))


def _read(item: InputItem) -> bytes | storage.StorageError:
    """The bytes of `item`, or the NotFound or AccessDenied that reading it raised."""
    try:
        return item.read()
    except (storage.NotFound, storage.AccessDenied) as e:
        return e


def _reads(items: Sequence[InputItem]) -> Iterator[tuple[InputItem, Any]]:
    """(item, what `_read` gave) in order. Objects in S3 are read ahead on threads,
    so request latency overlaps with decoding; local files are read here, one by
    one, since handing each to a thread costs more than the read (155 against 71
    us an image, measured on a 30 KB JPEG)."""
    if any(storage.is_s3(item.uri) for item in items):
        return _prefetch(items)
    return ((item, _read(item)) for item in items)


def _prefetch(items: Iterable[InputItem], depth: int = 16) -> Iterator[tuple[InputItem, Any]]:
    """`_reads` with up to `depth` reads ahead on threads."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=depth) as pool:
        window: collections.deque = collections.deque()
        for item in items:
            window.append((item, pool.submit(_read, item)))
            if len(window) >= depth:
                head, future = window.popleft()
                yield head, future.result()
        while window:
            head, future = window.popleft()
            yield head, future.result()
