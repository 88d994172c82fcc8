"""The actors' side of generation: one shard per call, written, then its record
(`ShardRecord`). Ray imports this module in every actor, so it imports no MLflow
and none of the driver (`job.py`): an actor starts about a second sooner."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config.records import GenerationJob, ModelCard, check_fields
from pipeline.data import shards
from pipeline.edges import storage

if TYPE_CHECKING:
    import ray


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """A finished shard: written under `_records/` once the shard is, so that a
    re-run skips it, and listed in the manifest."""

    name: str
    split: str
    samples: int
    seeds: tuple[int, int]
    """The image indices [start, stop) it holds."""
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seeds": list(self.seeds)}

    @classmethod
    def from_dict(cls, data: Any) -> ShardRecord:
        check_fields("shard record", data, cls)
        return cls(**{**data, "seeds": tuple(data["seeds"])})


def shard_seeds(job: GenerationJob, shard: int) -> tuple[int, int]:
    """The image indices [start, stop) of a shard."""
    per = job.samples_per_shard
    return shard * per, min((shard + 1) * per, job.images)


class ShardSampler:
    """A Ray Data actor: loads the model once, then generates one shard per call,
    writes it and its record, and returns the record. PNG encoding runs in threads
    while the next batch is sampled.

    Calls may run at once, on threads: the network runs for one at a time (under
    `sampling`), so one call's last encodes, tar and upload overlap the next call's
    sampling. A call returns only once its shard and then its record are written,
    and a failed write fails that call's shard, so the driver never counts a shard
    that is not complete in storage."""

    def __init__(
        self,
        card: ModelCard,
        weights: bytes | ray.ObjectRef,
        job: GenerationJob,
        output: str,
        batch_size: int,
        autoencoder: str | None = None,
    ):
        """`weights`: the safetensors bytes, or a reference to them in Ray's object
        store (one copy for all actors). `autoencoder`: where a latent model's
        autoencoder is, which decodes its latents in calls of `job.network_batch`."""
        import torch
        from safetensors.torch import load

        from pipeline.maths.edm import Precond
        from pipeline.maths.reproducible import FixedBatch
        from pipeline.maths.unet import UNet

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.backends.cudnn.benchmark = False  # the same kernels for the same shapes
        torch.backends.cudnn.deterministic = True
        if not isinstance(weights, bytes):
            import ray

            weights = bytes(ray.get(weights))
        net = UNet(card.model)
        net.load_state_dict(load(weights))
        self.denoiser = FixedBatch(Precond(net).to(self.device).eval(), job.network_batch)
        self.decode = None
        if card.latents is not None:
            from pipeline.data.autoencode import Decoder

            assert autoencoder is not None, "the driver finds a latent model's autoencoder"
            space = card.latents
            self.decode = Decoder(
                autoencoder, space.digest, space.stats, job.network_batch, self.device
            )
        self.card, self.job, self.output, self.batch_size = card, job, output, batch_size
        self.encoder = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.sampling = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records = []
        for i in batch["shard"]:
            try:
                records.append(self.shard(int(i)).to_dict())
            except storage.StorageError as e:  # as data: Ray would keep only its text
                records.append({"error": str(e)})
        return {"record": [json.dumps(r) for r in records]}

    def shard(self, index: int) -> ShardRecord:
        """Generate shard `index`, write it, then its record; the record."""
        from pipeline.maths.reproducible import generate

        job = self.job
        start, stop = shard_seeds(job, index)
        pending = []
        with self.sampling:
            for first in range(start, stop, self.batch_size):
                indices = list(range(first, min(first + self.batch_size, stop)))
                images, labels = generate(
                    self.denoiser,
                    indices,
                    self.device,
                    seed=job.seed,
                    labels=job.labels,
                    sampler=job.sampler,
                    steps=job.steps,
                    guidance=job.guidance,
                    resolution=self.card.resolution,
                    num_classes=self.card.model.num_classes,
                    channels=self.card.model.in_channels,
                    decode=self.decode,
                )
                pending.append(self.encoder.submit(self._members, indices, images, labels))
        # From here on the next call may sample.
        members = [m for future in pending for m in future.result()]
        name = shards.shard_name("train", index)
        data = shards.write_tar(members)
        storage.write_bytes(storage.join(self.output, name), data)
        record = ShardRecord(
            name, "train", stop - start, (start, stop), len(data), shards.sha256(data)
        )
        record_uri = storage.join(self.output, shards.RECORDS, name.replace(".tar", ".json"))
        storage.write_bytes(record_uri, shards.dumps(record.to_dict()))
        return record

    def _members(
        self, indices: list[int], images: np.ndarray, labels: list[int | None]
    ) -> list[tuple[str, bytes]]:
        from PIL import Image

        from pipeline.data.transforms import encode_png

        members = []
        for k, pixels, label in zip(indices, images, labels, strict=True):
            key = f"{k:09d}"
            info = {
                "key": key,
                "index": k,
                "seed": self.job.seed,
                "label": label,
                "class": None if label is None else class_name(self.card, label),
                "sampler": self.job.sampler,
                "steps": self.job.steps,
                "guidance": self.job.guidance,
                "model": self.job.model.to_dict(),
            }
            png = encode_png(Image.fromarray(pixels))
            members += [(f"{key}.png", png), (f"{key}.json", shards.dumps(info))]
            if label is not None:
                members.append((f"{key}.cls", str(label).encode()))
        return members


def class_name(card: ModelCard, label: int) -> str:
    return card.classes[label] if card.classes else str(label)
