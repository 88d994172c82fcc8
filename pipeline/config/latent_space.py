"""`LatentSpace`: what a model trained on latents needs to give pixels, recorded in
its training plan, checkpoints' model and model card (see `records`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.config.record_keys import RecordError, check_fields
from pipeline.maths.latents import LatentStats


@dataclasses.dataclass(frozen=True)
class LatentSpace:
    """The autoencoder a latent dataset was encoded with, and the statistics its
    latents are normalised by: the network's inputs and outputs live there."""

    autoencoder: str
    """Where the autoencoder was when the dataset was encoded (folder or `s3://`)."""
    digest: str
    """Its identity (`edges.autoencoders.Identity.digest`): whatever decodes checks it."""
    downsample: int
    """Pixels per latent along each side."""
    channels: int
    """Latent channels."""
    resolution: int
    """Side of the decoded images, in pixels."""
    raw_mean: tuple[float, ...]
    raw_std: tuple[float, ...]
    final_std: float
    """`maths.latents.LatentStats`: x = (z - raw_mean) * final_std / raw_std."""
    flips: bool
    """Whether the dataset holds each image's mirrored latent too."""

    def __post_init__(self) -> None:
        what = "latent space"
        if self.resolution % self.downsample:
            raise RecordError(f"{what}: resolution {self.resolution} is not whole latents")
        if not (len(self.raw_mean) == len(self.raw_std) == self.channels):
            count = len(self.raw_mean)
            raise RecordError(f"{what}: statistics of {count} channels, not {self.channels}")

    @property
    def side(self) -> int:
        """Latents per side."""
        return self.resolution // self.downsample

    @property
    def stats(self) -> LatentStats:
        return LatentStats(self.raw_mean, self.raw_std, self.final_std)

    @classmethod
    def of_dataset(cls, manifest: dict[str, Any]) -> LatentSpace:
        """The latent space of a latent dataset's manifest (`tasks.encode`)."""
        ae, stats = manifest["autoencoder"], manifest["stats"]
        return cls(
            autoencoder=ae["uri"],
            digest=ae["digest"],
            downsample=ae["downsample"],
            channels=ae["latent_channels"],
            resolution=manifest["resolution"],
            raw_mean=tuple(stats["raw_mean"]),
            raw_std=tuple(stats["raw_std"]),
            final_std=stats["final_std"],
            flips=manifest["flips"],
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {**data, "raw_mean": list(self.raw_mean), "raw_std": list(self.raw_std)}

    @classmethod
    def from_dict(cls, data: Any, what: str = "latent space") -> LatentSpace:
        check_fields(what, data, cls)
        stats = {"raw_mean": tuple(data["raw_mean"]), "raw_std": tuple(data["raw_std"])}
        return cls(**{**data, **stats})
