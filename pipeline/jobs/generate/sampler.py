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
from pipeline.jobs.generate.gate import Checker, Gate, Verdict, ratio_bin

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
    tally: dict[str, Any]
    """What the gate saw (`Tally.to_dict`): images drawn and rejected by reason,
    kept per class, copies flagged, the judge's agreement, the copy ratios."""

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seeds": list(self.seeds)}

    @classmethod
    def from_dict(cls, data: Any) -> ShardRecord:
        check_fields("shard record", data, cls)
        return cls(**{**data, "seeds": tuple(data["seeds"])})


class Tally:
    """What a shard's gate saw; shards' tallies add up (`add`) to the dataset's."""

    def __init__(self, data: dict[str, Any] | None = None):
        from pipeline.jobs.generate.gate import HISTOGRAM

        d = data or {}
        self.drawn: int = d.get("drawn", 0)
        self.rejected: dict[str, int] = dict(d.get("rejected", {}))
        self.per_class: dict[str, int] = dict(d.get("per_class", {}))
        self.flagged: int = d.get("flagged", 0)
        self.judged: int = d.get("judged", 0)
        self.agree: int = d.get("agree", 0)
        self.ratios: list[int] = list(d.get("ratios", [0] * HISTOGRAM))

    def kept(self, label: int | None, verdict: Verdict | None) -> None:
        key = "none" if label is None else str(label)
        self.per_class[key] = self.per_class.get(key, 0) + 1
        if verdict is not None and verdict.copy is not None:
            self.flagged += verdict.copy["flagged"]
            self.ratios[ratio_bin(verdict.copy["ratio"])] += 1
        if verdict is not None and verdict.judge is not None:
            self.judged += 1
            self.agree += verdict.judge["predicted"] == label

    def add(self, other: Tally) -> Tally:
        out = Tally(self.to_dict())
        out.drawn += other.drawn
        for attr in ("rejected", "per_class"):
            mine = getattr(out, attr)
            for k, v in getattr(other, attr).items():
                mine[k] = mine.get(k, 0) + v
        out.flagged += other.flagged
        out.judged += other.judged
        out.agree += other.agree
        out.ratios = [a + b for a, b in zip(out.ratios, other.ratios, strict=True)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "drawn": self.drawn,
            "rejected": dict(sorted(self.rejected.items())),
            "per_class": dict(sorted(self.per_class.items(), key=lambda kv: _class_order(kv[0]))),
            "flagged": self.flagged,
            "judged": self.judged,
            "agree": self.agree,
            "ratios": self.ratios,
        }


def _class_order(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdigit() else (1 << 62, key)


class GateError(RuntimeError):
    """An image the gate rejected in every one of its draws."""


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
        gate: Gate | None = None,
    ):
        """`weights`: the safetensors bytes, or a reference to them in Ray's object
        store (one copy for all actors). `autoencoder`: where a latent model's
        autoencoder is, which decodes its latents in calls of `job.network_batch`.
        `gate`: what each image is checked against (None: nothing)."""
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
        self.checker = None if gate is None else Checker(gate)
        self.encoder = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.sampling = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records = []
        for i in batch["shard"]:
            try:
                records.append(self.shard(int(i)).to_dict())
            except (storage.StorageError, GateError) as e:  # as data: Ray keeps only text
                records.append({"error": str(e)})
        return {"record": [json.dumps(r) for r in records]}

    def shard(self, index: int) -> ShardRecord:
        """Generate shard `index`, write it, then its record; the record. Each of
        its images is drawn again, from its next seed, while the gate rejects it."""
        start, stop = shard_seeds(self.job, index)
        draws = dict.fromkeys(range(start, stop), 0)
        tally = Tally()
        pending: dict[int, concurrent.futures.Future] = {}
        with self.sampling:
            todo = list(draws)
            while todo:
                rejected = []
                for first in range(0, len(todo), self.batch_size):
                    indices = todo[first : first + self.batch_size]
                    rejected += self._draw(indices, draws, tally, pending)
                todo = rejected
        # From here on the next call may sample.
        members = [m for k in sorted(pending) for m in pending[k].result()]
        name = shards.shard_name("train", index)
        data = shards.write_tar(members)
        storage.write_bytes(storage.join(self.output, name), data)
        record = ShardRecord(
            name, "train", stop - start, (start, stop), len(data), shards.sha256(data),
            tally.to_dict(),
        )  # fmt: skip
        record_uri = storage.join(self.output, shards.RECORDS, name.replace(".tar", ".json"))
        storage.write_bytes(record_uri, shards.dumps(record.to_dict()))
        return record

    def _draw(
        self,
        indices: list[int],
        draws: dict[int, int],
        tally: Tally,
        pending: dict[int, concurrent.futures.Future],
    ) -> list[int]:
        """Draw the images `indices` (each at its draw), check them, queue the kept
        ones' PNGs; the indices rejected, each with its draw advanced."""
        from pipeline.maths.reproducible import generate

        job = self.job
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
            draws=[draws[k] for k in indices],
        )
        tally.drawn += len(indices)
        verdicts = self.checker.check(images, labels) if self.checker else [None] * len(indices)
        rejected = []
        for k, pixels, label, verdict in zip(indices, images, labels, verdicts, strict=True):
            if verdict is None or verdict.kept:
                tally.kept(label, verdict)
                args = (k, draws[k], pixels, label, verdict)
                pending[k] = self.encoder.submit(self._members, *args)
                continue
            assert verdict.reason is not None
            tally.rejected[verdict.reason] = tally.rejected.get(verdict.reason, 0) + 1
            draws[k] += 1
            assert self.checker is not None  # nothing else rejects
            if draws[k] >= self.checker.gate.max_draws:
                field = "min_label_confidence" if verdict.reason == "label" else "max_copy_ratio"
                raise GateError(
                    f"image {k} (label {label}) was rejected in all {draws[k]} of its draws, "
                    f"the last for its {verdict.reason}: lower sample.{field} or raise "
                    "sample.max_draws"
                )
            rejected.append(k)
        return rejected

    def _members(
        self, k: int, draw: int, pixels: np.ndarray, label: int | None, verdict: Verdict | None
    ) -> list[tuple[str, bytes]]:
        from PIL import Image

        from pipeline.data.transforms import encode_png

        key = f"{k:09d}"
        info = {
            "key": key,
            "index": k,
            "seed": self.job.seed,
            "draw": draw,
            "label": label,
            "class": None if label is None else class_name(self.card, label),
            "sampler": self.job.sampler,
            "steps": self.job.steps,
            "guidance": self.job.guidance,
            "model": self.job.model.to_dict(),
            "copy": None if verdict is None else verdict.copy,
            "judge": None if verdict is None else verdict.judge,
        }
        png = encode_png(Image.fromarray(pixels))
        members = [(f"{key}.png", png), (f"{key}.json", shards.dumps(info))]
        if label is not None:
            members.append((f"{key}.cls", str(label).encode()))
        return members


def class_name(card: ModelCard, label: int) -> str:
    return card.classes[label] if card.classes else str(label)
