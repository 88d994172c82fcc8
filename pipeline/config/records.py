"""What the jobs hand each other across a process or storage boundary, typed.

    TrainingPlan     the train driver -> its Ray Train workers
    StreamPlan       what decides the training stream (inside TrainingPlan)
    CheckpointState  a checkpoint's `state.json`
    ModelCard        a registered model's `model.json` (and what a checkpoint says
                     of its model)
    Lineage          where a model came from: registry name and version, or
                     checkpoint; the sha256 of its weights
    GenerationJob    a generation job's `_job.json` (and its manifest's `job`)
    DatasetRef       the dataset a run trained on, inside the records above

Each is a frozen dataclass with `to_dict` (plain data for JSON, in the format
these files have always had) and `from_dict`, which refuses unknown and missing
keys by name (`model card: unknown key 'presett'`), so a mistyped key fails where
a record is read, not later on a worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pipeline.config.latent_space import LatentSpace
from pipeline.config.record_keys import RecordError, check_fields, check_keys
from pipeline.maths.architecture import UNetConfig, architecture

__all__ = ["LatentSpace", "RecordError", "check_fields", "check_keys"]


def _network(
    what: str, model: Any, template: str | None = None, resolution: int | None = None
) -> UNetConfig:
    """The whole architecture a record names. Records written before templates
    (0.1.0) name a `template` (their preset) and keep only what differed from it:
    at the preset's own resolution (or `resolution`) its template is the same
    network."""
    if not isinstance(model, Mapping):
        raise RecordError(f"{what}: model: must be a JSON object, got {type(model).__name__}")
    try:
        if "channels" not in model and template is not None:
            return architecture(template, resolution, **model)
        return UNetConfig.from_dict(model)
    except ValueError as e:
        raise RecordError(f"{what}: model: {e}") from None


def _latents(value: Any, what: str) -> LatentSpace | None:
    return None if value is None else LatentSpace.from_dict(value, what)


def _classes(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    """The dataset a run trained on."""

    uri: str
    """Its manifest."""
    digest: str
    """The sha256 of its manifest: the dataset's version."""
    train_images: int
    """Images in its train split."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, what: str = "dataset") -> DatasetRef:
        check_fields(what, data, cls)
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class TrainShard:
    """One shard of a dataset's train split, as its manifest lists it."""

    name: str
    samples: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """What decides the training stream: which sample sits at each global position,
    its flip and its noise (`pipeline.data.order` computes them). Nothing else
    does: not the number of workers, not Ray Data's executor, not a restart."""

    seed: int
    """The run's seed."""
    dataset_digest: str
    """The sha256 of the dataset's manifest: another version, another order."""
    shards: tuple[TrainShard, ...]
    """The train split's shards in manifest order (empty ones included)."""
    batch_size: int
    """The global batch: positions [s * batch_size, (s + 1) * batch_size) are step s."""
    window: int
    """Images shuffled together: a multiple of batch_size."""
    hflip: bool
    """Whether positions flip their image (each with probability 1/2)."""

    @property
    def train_images(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shards": [dataclasses.asdict(s) for s in self.shards]}

    @classmethod
    def from_dict(cls, data: Any, what: str = "stream plan") -> StreamPlan:
        check_fields(what, data, cls)
        shards = data["shards"]
        if not isinstance(shards, list):
            raise RecordError(f"{what}: shards: must be a list")
        for i, shard in enumerate(shards):
            check_fields(f"{what}: shards[{i}]", shard, TrainShard)
        return cls(**{**data, "shards": tuple(TrainShard(**s) for s in shards)})


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """What the training workers need beyond the config: derived sizes and the
    whole network."""

    images: int
    """Images to train on, all workers together: whole global batches."""
    num_classes: int
    """Classes of the dataset (0: unlabelled)."""
    model: UNetConfig
    """The network, resolved for the dataset's side and classes."""
    resolution: int
    """Side of the dataset's images."""
    dataset: DatasetRef
    classes: tuple[str, ...] | None
    """The dataset's class names (None: unlabelled)."""
    stream: StreamPlan
    """What each step trains on."""
    run_id: str | None = None
    """The MLflow run, once the driver has found or created it."""
    latents: LatentSpace | None = None
    """For a latent dataset: its autoencoder and statistics (the network's images
    are then latents of `resolution` per side)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "num_classes": self.num_classes,
            "model": self.model.to_dict(),
            "resolution": self.resolution,
            "dataset": self.dataset.to_dict(),
            "classes": None if self.classes is None else list(self.classes),
            "stream": self.stream.to_dict(),
            "run_id": self.run_id,
            **({"latents": self.latents.to_dict()} if self.latents else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> TrainingPlan:
        what = "training plan"
        fields = [f.name for f in dataclasses.fields(cls)]
        check_keys(what, data, [f for f in fields if f != "latents"], ["latents"])
        return cls(
            **{
                **data,
                "model": _network(what, data["model"]),
                "dataset": DatasetRef.from_dict(data["dataset"], f"{what}: dataset"),
                "classes": _classes(data["classes"]),
                "stream": StreamPlan.from_dict(data["stream"], f"{what}: stream"),
                "latents": _latents(data.get("latents"), f"{what}: latents"),
            }
        )


@dataclasses.dataclass(frozen=True)
class CheckpointState:
    """A checkpoint's `state.json`: everything but the tensors."""

    images_seen: int
    """Images seen by all workers together when it was written."""
    step: int
    """Optimizer steps taken."""
    run_id: str | None
    """The MLflow run that trains it."""
    model: UNetConfig
    """The network the weights belong to."""
    config: dict[str, Any]
    """The run's TrainConfig as plain data (the tracking URI redacted), as that
    version of the code wrote it."""
    dataset: DatasetRef
    seed: int
    """The run's seed."""
    snapshots: str = ""
    """Where the run stores its post-hoc EMA snapshots (`edges.snapshots`); empty
    in checkpoints written before they were kept."""
    latents: LatentSpace | None = None
    """A latent model's autoencoder and statistics (None: pixels)."""

    @property
    def template(self) -> str:
        """The architecture template (0.1.0 checkpoints name a preset)."""
        return self.config.get("preset") or self.config["model"]["template"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "images_seen": self.images_seen,
            "step": self.step,
            "run_id": self.run_id,
            "model": self.model.to_dict(),
            "config": self.config,
            "dataset": self.dataset.to_dict(),
            "seed": self.seed,
            **({"snapshots": self.snapshots} if self.snapshots else {}),
            **({"latents": self.latents.to_dict()} if self.latents else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> CheckpointState:
        what = "checkpoint state"
        optional = ("snapshots", "latents")
        fields = [f.name for f in dataclasses.fields(cls)]
        check_keys(what, data, [f for f in fields if f not in optional], optional)
        config = data["config"]
        if not isinstance(config, Mapping):
            raise RecordError(f"{what}: config: must be a JSON object, got {type(config).__name__}")
        return cls(
            **{
                **data,
                "model": _network(what, data["model"], config.get("preset")),
                "config": dict(config),
                "dataset": DatasetRef.from_dict(data["dataset"], f"{what}: dataset"),
                "latents": _latents(data.get("latents"), f"{what}: latents"),
            }
        )


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What a trained model's weights need beside them: `model.json` of a model
    registered by `tasks.train`. Only template, model and resolution are required:
    the rest is lineage that a card may lack (cards written by hand, checkpoints)."""

    template: str
    """The architecture template the network was made from."""
    model: UNetConfig
    """The whole network (`UNetConfig.to_dict` in JSON)."""
    resolution: int
    """Side of the images, in pixels (the network's)."""
    classes: tuple[str, ...] | None = None
    """Class names, by label (None: unlabelled, or not recorded)."""
    sigma_data: float | None = None
    """EDM's sigma_data the model was trained with."""
    images_seen: int | None = None
    """Training images seen when the weights were taken."""
    dataset: DatasetRef | None = None
    """The dataset the model was trained on."""
    run_id: str | None = None
    """The MLflow run that trained it."""
    augmentation: dict[str, Any] | None = None
    """How the training images were augmented (`{"hflip": ...}`), for people."""
    snapshots: str = ""
    """Where its training run stored the post-hoc EMA snapshots (`edges.snapshots`),
    from which another averaging length can be reconstructed; empty: none known."""
    latents: LatentSpace | None = None
    """A latent model's autoencoder and statistics: its network makes latents of
    `resolution` per side, which the autoencoder decodes to `latents.resolution`
    px. None: a pixel model."""

    def __post_init__(self) -> None:
        if self.latents is not None and self.latents.side != self.resolution:
            raise RecordError(
                f"model card: latents: {self.latents.side} per side, where the network's "
                f"resolution is {self.resolution}"
            )
        if self.resolution != self.model.resolution:
            raise RecordError(
                f"model card: resolution: {self.resolution} is not the network's "
                f"{self.model.resolution}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "template": self.template,
            "model": self.model.to_dict(),
            "resolution": self.resolution,
            "classes": None if self.classes is None else list(self.classes),
            "sigma_data": self.sigma_data,
            "images_seen": self.images_seen,
            "dataset": None if self.dataset is None else self.dataset.to_dict(),
            "run_id": self.run_id,
            "augmentation": self.augmentation,
            **({"snapshots": self.snapshots} if self.snapshots else {}),
            **({"latents": self.latents.to_dict()} if self.latents else {}),
        }

    @property
    def image_side(self) -> int:
        """Side of the images it makes, in pixels (decoded, for a latent model)."""
        return self.resolution if self.latents is None else self.latents.resolution

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """The card in `data`; cards of 0.1.0, which name a `preset` and keep only
        what differed from it, load as the same network."""
        what = "model card"
        if isinstance(data, Mapping) and "preset" in data and "template" not in data:
            data = {("template" if k == "preset" else k): v for k, v in data.items()}
        optional = [
            "classes",
            "sigma_data",
            "images_seen",
            "dataset",
            "run_id",
            "augmentation",
            "snapshots",
            "latents",
        ]
        check_keys(what, data, ["template", "model", "resolution"], optional)
        dataset = data.get("dataset")
        return cls(
            **{
                **data,
                "model": _network(what, data["model"], data["template"], data["resolution"]),
                "classes": _classes(data.get("classes")),
                "dataset": None
                if dataset is None
                else DatasetRef.from_dict(dataset, f"{what}: dataset"),
                "latents": _latents(data.get("latents"), f"{what}: latents"),
            }
        )


@dataclasses.dataclass(frozen=True)
class Lineage:
    """Where a model came from, recorded beside everything made with it."""

    name: str | None
    """Its name in the model registry (None: a checkpoint)."""
    version: int | None
    """Its version in the registry (None: a checkpoint)."""
    run_id: str | None
    """The MLflow run that trained it."""
    digest: str
    """The sha256 of its weights."""
    checkpoint: str | None = None
    """The checkpoint folder it was loaded from (absent for registered models)."""

    def describe(self) -> str:
        """`name/version` for a registered model, else the checkpoint folder."""
        if self.name is not None:
            return f"{self.name}/{self.version}"
        return str(self.checkpoint)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "version": self.version, "run_id": self.run_id}
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint
        return {**out, "digest": self.digest}

    @classmethod
    def from_dict(cls, data: Any, what: str = "model lineage") -> Lineage:
        check_keys(what, data, ["name", "version", "run_id", "digest"], ["checkpoint"])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class GenerationJob:
    """What decides the pixels of a generation job: a re-run must match it to
    continue the job."""

    model: Lineage
    images: int
    """Images in all: image k comes from (seed, k)."""
    samples_per_shard: int
    """Images per shard: shard i holds images [i * samples_per_shard, ...)."""
    sampler: str
    steps: int
    guidance: float
    """Classifier-free guidance weight (1: none)."""
    labels: str | int
    """Each image's label: drawn from (seed, k) ("uniform"), none ("none"), or
    this class's label (an int)."""
    seed: int
    network_batch: int
    """Images per network call, which the pixels depend on."""
    template: str
    """The model's architecture template."""
    checks: dict[str, Any] | None
    """What each image was checked against and what was rejected
    (`pipeline.jobs.generate.gate.Gate.settings`); None: nothing."""

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> GenerationJob:
        what = "generation job"
        check_fields(what, data, cls)
        return cls(**{**data, "model": Lineage.from_dict(data["model"], f"{what}: model")})
