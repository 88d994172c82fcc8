"""A trained model by reference: `name@alias` or `name/version` in the MLflow
registry, or a checkpoint folder written by `tasks.train` (its EMA weights).

Sampling, evaluation and warm-started training all load models through here, so
a model is named the same way everywhere and its lineage (registry name,
version, training run, sha256 of the weights) travels with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from pipeline.config import ConfigError
from pipeline.config.records import CheckpointState, Lineage, ModelCard, RecordError
from pipeline.config.sample import is_registry_ref
from pipeline.edges import storage, tracking
from pipeline.maths.architecture import UNetConfig


@dataclasses.dataclass(frozen=True)
class Model:
    """The weights of a trained denoiser and where they came from."""

    card: ModelCard
    """The whole architecture, resolution, classes... (as `tasks.train` registers them)."""
    weights: bytes
    """The EMA weights, as safetensors bytes."""
    lineage: Lineage
    """Registry name and version (or checkpoint), run, sha256 of the weights."""

    def architecture(self) -> UNetConfig:
        """The network the weights belong to."""
        return self.card.model

    def describe(self) -> str:
        """`name/version` for a registered model, else the checkpoint folder."""
        return self.lineage.describe()


def split_ref(ref: str) -> tuple[str, int | None, str | None]:
    """`name@alias` -> (name, None, alias); `name/3` -> (name, 3, None)."""
    name, sep, alias = ref.partition("@")
    if sep:
        return name, None, alias
    name, _, version = ref.rpartition("/")
    return name, int(version), None


def load_model(ref: str, tracking_uri: str, field: str) -> Model:
    """The model `ref` names; a config error naming `field` (say `sample.model`)
    when it does not exist or its card (or checkpoint state) is not readable."""
    if is_registry_ref(ref):
        name, version, alias = split_ref(ref)
        try:
            version, run_id, files = tracking.load_registered(tracking_uri, name, version, alias)
        except tracking.NotRegistered as e:
            raise ConfigError(f"{field}: {e}") from None
        if "model.safetensors" not in files or "model.json" not in files:
            raise ConfigError(f"{field}: {ref} has no model.safetensors/model.json")
        weights = files["model.safetensors"]
        try:
            card = ModelCard.from_dict(json.loads(files["model.json"]))
        except RecordError as e:
            raise ConfigError(f"{field}: {ref}: {e}") from None
        digest = hashlib.sha256(weights).hexdigest()
        return Model(card, weights, Lineage(name, version, run_id, digest))

    from pipeline.edges import checkpoint

    try:
        state = json.loads(storage.read_bytes(storage.join(ref, checkpoint.STATE)))
        weights = storage.read_bytes(storage.join(ref, checkpoint.EMA_WEIGHTS))
    except storage.StorageError as e:
        raise ConfigError(f"{field}: no checkpoint at {ref} ({e})") from None
    try:
        return _checkpoint_model(CheckpointState.from_dict(state), weights, ref)
    except RecordError as e:
        raise ConfigError(f"{field}: {ref}: {e}") from None


def require_snapshots(model: Model, field: str, value: object) -> str:
    """Where `model`'s post-hoc EMA snapshots are; a config error naming `field`
    (and its `value`) for a model that has none."""
    if not model.card.snapshots:
        raise ConfigError(
            f"{field}: {model.describe()} has no post-hoc EMA snapshots (its training "
            f"run stored none, or it was registered before runs kept them), so only its "
            f"own EMA weights can be scored, got {value}"
        )
    return model.card.snapshots


def at_ema_length(model: Model, length: float, field: str) -> Model:
    """`model` with its weights reconstructed at the post-hoc EMA length `length`
    (EDM2's sigma_rel) from its training run's snapshots, at the images seen when
    its own weights were taken; a config error naming `field` (say
    `evaluate.ema_length`) when the model has no snapshots to reconstruct from."""
    from safetensors.torch import save

    from pipeline.edges import snapshots
    from pipeline.maths.phema import reconstruct

    folder = require_snapshots(model, field, length)
    try:
        # The card's images seen are those of the registered weights: the length
        # is reconstructed at the same point of training (a card without them:
        # the latest snapshot's), from the snapshots up to there.
        out_images = model.card.images_seen
        stored = snapshots.read_snapshots(folder, up_to=out_images)
        if out_images is not None and all(images != out_images for images, _, _ in stored):
            raise ValueError(
                f"no snapshot at its {out_images} images seen (train.snapshot_every_images)"
            )
        state = reconstruct(stored, length, out_images=out_images)
    except (storage.StorageError, ValueError) as e:
        raise ConfigError(
            f"{field}: {model.describe()}: cannot reconstruct from {folder} ({e}), got {length}"
        ) from None
    weights: bytes = save(state)
    digest = hashlib.sha256(weights).hexdigest()
    return dataclasses.replace(
        model, weights=weights, lineage=dataclasses.replace(model.lineage, digest=digest)
    )


def _checkpoint_model(state: CheckpointState, weights: bytes, folder: str) -> Model:
    """A checkpoint's EMA weights as a model: its card says what the checkpoint
    knows (no class names)."""
    card = ModelCard(
        template=state.template,
        model=state.model,
        resolution=state.model.resolution,
        dataset=state.dataset,
        augmentation={"hflip": state.config.get("hflip")},
        snapshots=state.snapshots,
        latents=state.latents,
        images_seen=state.images_seen,
    )
    digest = hashlib.sha256(weights).hexdigest()
    return Model(card, weights, Lineage(None, None, state.run_id, digest, checkpoint=folder))
