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
from typing import Any

from pipeline.config import ConfigError
from pipeline.config.sample import is_registry_ref
from pipeline.edges import storage, tracking
from pipeline.maths.architecture import NATIVE_RESOLUTION, UNetConfig, architecture


@dataclasses.dataclass(frozen=True)
class Model:
    """The weights of a trained denoiser and where they came from."""

    card: dict[str, Any]
    """template, model (the whole architecture, `UNetConfig.to_dict`), resolution,
    classes, augmentation... (as `tasks.train` registers them)."""
    weights: bytes
    """The EMA weights, as safetensors bytes."""
    lineage: dict[str, Any]
    """name, version, run_id (or checkpoint), digest (sha256 of the weights)."""

    def architecture(self) -> UNetConfig:
        """The network the weights belong to."""
        return UNetConfig.from_dict(self.card["model"])

    def describe(self) -> str:
        """`name/version` for a registered model, else the checkpoint folder."""
        if self.lineage.get("name") is not None:
            return f"{self.lineage['name']}/{self.lineage['version']}"
        return str(self.lineage.get("checkpoint"))


def split_ref(ref: str) -> tuple[str, int | None, str | None]:
    """`name@alias` -> (name, None, alias); `name/3` -> (name, 3, None)."""
    name, sep, alias = ref.partition("@")
    if sep:
        return name, None, alias
    name, _, version = ref.rpartition("/")
    return name, int(version), None


def load_model(ref: str, tracking_uri: str, field: str) -> Model:
    """The model `ref` names; a config error naming `field` (say `sample.model`)
    when it does not exist."""
    if is_registry_ref(ref):
        name, version, alias = split_ref(ref)
        try:
            version, run_id, files = tracking.load_registered(tracking_uri, name, version, alias)
        except tracking.NotRegistered as e:
            raise ConfigError(f"{field}: {e}") from None
        if "model.safetensors" not in files or "model.json" not in files:
            raise ConfigError(f"{field}: {ref} has no model.safetensors/model.json")
        card, weights = json.loads(files["model.json"]), files["model.safetensors"]
        lineage = {"name": name, "version": version, "run_id": run_id}
    else:
        from pipeline.edges import checkpoint

        try:
            state = json.loads(storage.read_bytes(storage.join(ref, checkpoint.STATE)))
            weights = storage.read_bytes(storage.join(ref, checkpoint.EMA_WEIGHTS))
        except storage.StorageError as e:
            raise ConfigError(f"{field}: no checkpoint at {ref} ({e})") from None
        config = state["config"]
        template = config.get("preset") or config["model"]["template"]
        card = {
            "template": template,
            "model": state["model"],
            "classes": None,
            "dataset": state.get("dataset"),
            "augmentation": {"hflip": config.get("hflip")},
        }
        lineage = {"name": None, "version": None, "run_id": state.get("run_id"), "checkpoint": ref}
    card = _complete(card)
    lineage["digest"] = hashlib.sha256(weights).hexdigest()
    return Model(card, weights, lineage)


def _complete(card: dict[str, Any]) -> dict[str, Any]:
    """The card with the whole architecture. Models registered before templates
    (0.1.0) name a preset and record only what differed from it; at the preset's
    own resolution its template is the same network."""
    if "preset" in card:
        card = {**card, "template": card["preset"]}
        del card["preset"]
    model = card["model"]
    if "channels" not in model:
        resolution = card.get("resolution") or NATIVE_RESOLUTION[card["template"]]
        model = architecture(card["template"], resolution, **model).to_dict()
    return {**card, "model": model, "resolution": model["resolution"]}
