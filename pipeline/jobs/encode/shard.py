"""Encoding one shard, on the cluster: plain callables on batch dicts, no Ray.

`pipeline.jobs.encode.job` wires them into Ray Data: `read_shards` (CPU tasks)
reads a pixel shard, checks it against the manifest and decodes its images;
`ShardEncoder` (an actor pool, one autoencoder each) encodes the whole shard in
fixed chunks, writes the latent shard, then its record under `_records/`. A
shard travels as one row, so a shard is always one encoder call sequence, and
its bytes are the same on every run.
"""

from __future__ import annotations

import functools
import io
import json
from importlib import metadata
from typing import Any

import numpy as np
import torch

from pipeline.data import latent_samples, shards
from pipeline.data.autoencode import Encoder, NonFiniteLatents
from pipeline.edges import storage
from pipeline.maths.latents import ChannelMoments


def software() -> dict[str, str]:
    """What a latent shard's bytes depend on besides the pixels, the autoencoder
    and the config."""
    return dict(_software())


@functools.cache
def _software() -> tuple[tuple[str, str], ...]:
    # Looked up once a process: a package's metadata costs milliseconds a shard.
    return (
        ("format_version", str(latent_samples.FORMAT_VERSION)),
        ("torch", metadata.version("torch")),
        ("diffusers", metadata.version("diffusers")),
        ("numpy", np.__version__),
    )


def read_shards(batch: dict[str, np.ndarray], dataset: str, resolution: int) -> dict[str, Any]:
    """Each pixel shard of a batch of plans, checked and decoded: its keys, images
    (uint8 [N, R, R, 3] as bytes), `.json` and `.cls` members; or the error that
    stopped it, as text the driver reports in one line."""
    fields = ("keys", "images", "meta", "labels", "error")
    out: dict[str, list] = {k: [] for k in ("plan", *fields)}
    for plan_json in batch["plan"]:
        plan = json.loads(plan_json)
        try:
            row = _read_shard(plan, dataset, resolution)
        except (storage.StorageError, _BadShard) as e:
            row = {"keys": "[]", "images": b"", "meta": "[]", "labels": "[]", "error": str(e)}
        out["plan"].append(plan_json)
        for k in fields:
            out[k].append(row[k])
    return {k: np.array(v, dtype=object) for k, v in out.items()}


class _BadShard(ValueError):
    """A pixel shard that is not what its manifest says."""


def _read_shard(plan: dict, dataset: str, resolution: int) -> dict[str, Any]:
    from PIL import Image

    uri = storage.join(dataset, plan["name"])
    data = storage.read_bytes(uri, patient=True)
    if shards.sha256(data) != plan["source_sha256"]:
        raise _BadShard(
            f"{uri}: not the shard its manifest lists (sha256 differs); "
            "the dataset was changed by something else"
        )
    samples: dict[str, dict[str, bytes]] = {}
    for m in shards.tar_members(data):
        key, ext = shards.split_member_name(m.name)
        samples.setdefault(key, {})[ext] = data[m.offset : m.offset + m.size]
    if len(samples) != plan["samples"]:
        raise _BadShard(f"{uri}: holds {len(samples)} samples, its manifest {plan['samples']}")
    images = []
    for key, sample in samples.items():
        with Image.open(io.BytesIO(sample["png"])) as img:
            pixels = np.asarray(img.convert("RGB"))
        if pixels.shape != (resolution, resolution, 3):
            raise _BadShard(
                f"{uri}: {key}.png is {pixels.shape[1]}x{pixels.shape[0]}, "
                f"where the manifest says {resolution}x{resolution}"
            )
        images.append(pixels)
    labels = [s["cls"].decode() if "cls" in s else None for s in samples.values()]
    return {
        "keys": json.dumps(list(samples)),
        "images": np.stack(images).tobytes() if images else b"",
        "meta": json.dumps([s["json"].decode() for s in samples.values()]),
        "labels": json.dumps(labels),
        "error": "",
    }


class ShardEncoder:
    """Encodes the shards `read_shards` decoded and writes them: one per row."""

    def __init__(
        self,
        autoencoder: str,
        digest: str,
        output: str,
        resolution: int,
        precision: str,
        chunk: int,
        flips: bool,
    ):
        self.encoder = Encoder(autoencoder, precision=precision, chunk=chunk, digest=digest)
        self.output, self.resolution, self.flips = output, resolution, flips
        self.channels = self.encoder.identity.latent_channels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = []
        for i, plan_json in enumerate(batch["plan"]):
            plan = json.loads(plan_json)
            if batch["error"][i]:
                record = {"name": plan["name"], "error": str(batch["error"][i])}
            else:
                try:
                    record = self._encode(plan, {k: batch[k][i] for k in batch})
                except NonFiniteLatents as e:
                    record = {"name": plan["name"], "error": f"{plan['name']}: {e}"}
                except storage.StorageError as e:
                    record = {"name": plan["name"], "error": str(e)}
            records.append(json.dumps(record))
        return {"record": np.array(records, dtype=object)}

    def _encode(self, plan: dict, row: dict[str, Any]) -> dict[str, Any]:
        keys = json.loads(row["keys"])
        side = self.resolution
        images = np.frombuffer(row["images"], np.uint8).reshape(len(keys), side, side, 3)
        posterior = self._posterior(images, keys)
        flipped = None
        if self.flips:
            flipped = self._posterior(np.ascontiguousarray(images[:, :, ::-1]), keys)
        moments = ChannelMoments(self.channels)
        for mean, std in [posterior, *([flipped] if flipped else [])]:
            moments.add(torch.from_numpy(mean), torch.from_numpy(std))
        pixel_shard = {"shard": plan["name"], "sha256": plan["source_sha256"]}
        members: list[tuple[str, bytes]] = []
        for j, (key, meta, label) in enumerate(
            zip(keys, json.loads(row["meta"]), json.loads(row["labels"]), strict=True)
        ):
            lineage = {**json.loads(meta), "pixels": pixel_shard}
            members += latent_samples.members(
                key,
                posterior[0][j],
                posterior[1][j],
                json.dumps(lineage, sort_keys=True).encode(),
                None if label is None else label.encode(),
                None if flipped is None else (flipped[0][j], flipped[1][j]),
            )
        tar = shards.write_tar(members)
        storage.write_bytes(storage.join(self.output, plan["name"]), tar)
        record = {
            "name": plan["name"],
            "split": plan["split"],
            "plan_sha256": plan["plan_sha256"],
            "source_sha256": plan["source_sha256"],
            "samples": len(keys),
            "bytes": len(tar),
            "sha256": shards.sha256(tar),
            "moments": moments.to_dict(),
            "software": software(),
        }
        record_uri = storage.join(self.output, shards.RECORDS, f"{plan['name']}.json")
        storage.write_bytes(record_uri, shards.dumps(record))
        return record

    def _posterior(self, images: np.ndarray, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not len(images):
            shape = (0, self.channels, *self.encoder.identity.latent_shape(self.resolution)[1:])
            return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        out = self.encoder({"image": images, "key": np.array(keys)})
        return out["mean"], out["std"]
