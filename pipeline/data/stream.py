"""Reading the training stream: one worker's read unit (a window of `data.order`)
from the dataset's shards to arrays, in position order.

`WindowReader` is a plain callable on batch dicts (numpy in, numpy out), which
the training job hands to Ray Data's `map_batches`: given window numbers, it
reads the shards that hold the worker's positions of each window (each once,
checking its sha256 against the manifest's), keeps only the encoded samples it
needs, and yields them decoded and flipped, a block of rows at a time:

    image     uint8 [n, 3, H, W] (pixel datasets)
    posterior float32 [n, 2, C, H, W] (latent datasets): each latent's mean and
              std, the mirrored image's where the position flips
    label     int64 [n] (labelled datasets only)
    position  int64 [n], ascending: the global positions
    check     uint64 [n]: `Order.checks`, the fingerprint of what sits there

What a reader holds at once: the encoded samples of one unit (at most
ceil(window / workers) of them), one shard's bytes while it takes them out, and
one block of decoded rows (`BLOCK_BYTES`).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config.records import StreamPlan
from pipeline.data import latent_samples, shards
from pipeline.data.order import Order
from pipeline.edges import storage

BLOCK_BYTES = 4 << 20
"""Decoded bytes per block a reader yields (at least one image)."""


class StreamError(RuntimeError):
    """A shard is not what the dataset's manifest says it is."""


@dataclasses.dataclass(frozen=True)
class Reading:
    """What one worker reads: its positions in [start, stop) of the stream."""

    prefix: str
    """The dataset (where its shards are)."""
    rank: int
    world: int
    start: int
    stop: int
    resolution: int
    """Side of the dataset's images (of its latents, for a latent dataset)."""
    labelled: bool
    latent_channels: int = 0
    """A latent dataset's channels (0: a pixel dataset)."""


class WindowReader:
    """`map_batches` callable: window numbers in ("id", offset by `first`), the
    worker's samples of each window out, in position order (see the module doc)."""

    def __init__(self, plan: StreamPlan, reading: Reading, first: int = 0):
        self.plan, self.reading, self.first = plan, reading, first
        self.held = 0
        """The most encoded samples held at once so far (for tests of the bound)."""
        self._order: Order | None = None

    @property
    def order(self) -> Order:
        if self._order is None:  # built on the worker that reads, not pickled to it
            self._order = Order(self.plan)
        return self._order

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_order": None}

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for window in batch["id"].tolist():
            yield from self.read(self.first + int(window))

    def read(self, window: int) -> Iterator[dict[str, np.ndarray]]:
        """The worker's samples of `window`, in blocks, in position order."""
        r, order = self.reading, self.order
        unit = order.unit(window, r.start, r.stop)
        position = order.positions(r.rank, r.world, unit.lo, unit.hi)
        if not len(position):
            return
        shard, member = order.samples(position)
        encoded, labels = self._encoded(shard, member)
        self.held = max(self.held, len(encoded))
        flips = order.flips(position)
        checks = order.checks(position, shard, member)
        side = r.resolution
        sample_bytes = 2 * 4 * r.latent_channels * side * side if r.latent_channels else 3 * side**2
        rows = max(1, BLOCK_BYTES // sample_bytes)
        for lo in range(0, len(position), rows):
            part = slice(lo, lo + rows)
            keys = list(zip(shard[part].tolist(), member[part].tolist(), strict=True))
            flip = flips[part]
            out = {"position": position[part], "check": checks[part]}
            if r.latent_channels:
                out["posterior"] = np.stack(
                    [
                        self._posterior(encoded[k], bool(f), k)
                        for k, f in zip(keys, flip, strict=True)
                    ]
                )
            else:
                image = np.stack([self._decode(encoded[k], k) for k in keys])
                image[flip] = image[flip, :, :, ::-1]
                out["image"] = image
            if r.labelled:
                out["label"] = np.array([labels[k] for k in keys], dtype=np.int64)
            yield out

    def _encoded(
        self, shard: np.ndarray, member: np.ndarray
    ) -> tuple[dict[tuple[int, int], Any], dict[tuple[int, int], int]]:
        """The PNG bytes (the latent members, by extension) and labels of the (shard,
        member) pairs, each shard read once."""
        encoded: dict[tuple[int, int], Any] = {}
        labels: dict[tuple[int, int], int] = {}
        for s in np.unique(shard).tolist():
            wanted = set(member[shard == s].tolist())
            for index, (png, label) in self._members(s, wanted):
                encoded[s, index] = png
                if label is not None:
                    labels[s, index] = label
        return encoded, labels

    def _members(self, s: int, wanted: set[int]) -> Iterator[tuple[int, tuple[Any, int | None]]]:
        """(member index, (png or latent members, label)) of the wanted samples of
        shard `s`."""
        ref = self.plan.shards[s]
        uri = storage.join(self.reading.prefix, ref.name)
        # Patient: an S3 endpoint down mid-training is waited out, not a failed run.
        data = storage.read_bytes(uri, patient=True)
        if shards.sha256(data) != ref.sha256:
            raise StreamError(
                f"{uri}: its sha256 is not the manifest's (the shard changed after the "
                f"dataset was written)"
            )
        samples: dict[str, dict[str, shards.TarMember]] = {}
        for m in shards.tar_members(data):
            key, ext = shards.split_member_name(m.name)
            samples.setdefault(key, {})[ext] = m
        if len(samples) != ref.samples:
            raise StreamError(
                f"{uri}: holds {len(samples)} samples, the manifest says {ref.samples}"
            )
        view = memoryview(data)
        for index, parts in enumerate(samples.values()):
            if index not in wanted:
                continue
            need = self._latent_members if self.reading.latent_channels else ("png",)
            if any(e not in parts for e in need) or (self.reading.labelled and "cls" not in parts):
                raise StreamError(f"{uri}: sample {index} lacks its {', .'.join(need)} or .cls")
            payload = {
                e: bytes(view[parts[e].offset : parts[e].offset + parts[e].size]) for e in need
            }
            cls = parts.get("cls")
            label = None if cls is None else int(bytes(view[cls.offset : cls.offset + cls.size]))
            png = payload.get("png")
            yield index, (payload if png is None else png, label if self.reading.labelled else None)

    @property
    def _latent_members(self) -> tuple[str, ...]:
        """The members a latent sample must hold: flipped ones when the plan flips."""
        plain = (latent_samples.MEAN, latent_samples.STD)
        return plain + (
            (latent_samples.FLIPPED_MEAN, latent_samples.FLIPPED_STD) if self.plan.hflip else ()
        )

    def _posterior(
        self, members: dict[str, bytes], flip: bool, where: tuple[int, int]
    ) -> np.ndarray:
        """A latent sample's mean and std (of its mirrored image where `flip`):
        float32 [2, C, h, w]."""
        names = (
            (latent_samples.FLIPPED_MEAN, latent_samples.FLIPPED_STD)
            if flip
            else (latent_samples.MEAN, latent_samples.STD)
        )
        out = np.stack([latent_samples.npy_array(members[n]) for n in names])
        side, channels = self.reading.resolution, self.reading.latent_channels
        if out.shape != (2, channels, side, side) or out.dtype != np.float32:
            name = self.plan.shards[where[0]].name
            raise StreamError(
                f"{name}: sample {where[1]}'s latents are {out.dtype} {list(out.shape[1:])}, "
                f"the dataset's are float32 {[channels, side, side]}"
            )
        return out

    def _decode(self, png: bytes, where: tuple[int, int]) -> np.ndarray:
        """A shard's PNG -> uint8 [3, H, W]."""
        with Image.open(io.BytesIO(png)) as img:
            pixels = np.asarray(img.convert("RGB"))
        side = self.reading.resolution
        if pixels.shape != (side, side, 3):
            name = self.plan.shards[where[0]].name
            raise StreamError(
                f"{name}: sample {where[1]} is {pixels.shape[1]}x{pixels.shape[0]}, "
                f"the dataset's images are {side}x{side}"
            )
        return pixels.transpose(2, 0, 1)
