"""What generation checks each image against before it enters the dataset: the
model's training images (is it a copy?) and the label judge (is it its label?).

The driver resolves a `Gate` (`resolve`) and has what it needs computed once per
dataset version by a Ray task (`prepare`), kept beside the training dataset as the
evaluation's reference is (`reference/`): the judge (`pipeline.data.reference`)
and the copy index, the features of every train image with its key
(`copies-<digest>-<side>.npz`). The actors load them (`Checker`) and return one
`Verdict` per image. Their numbers go into the image's `{key}.json`, so they are
part of the job: they are computed in calls of fixed size, the same bits in any
batch.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import ConfigError
from pipeline.config.evaluate import REFERENCE_IMAGES
from pipeline.data import latent_samples, reference, shards
from pipeline.edges import storage

if TYPE_CHECKING:
    from pipeline.config import SampleConfig
    from pipeline.edges.registry import Model

log = logging.getLogger(__name__)

COPY_BATCH = 64
"""Generated images per lookup of the copy index, the last call padded."""
HISTOGRAM = 20
"""Bins of the copy ratio's histogram over [0, 1] (the last one holds 1 and above)."""


@dataclasses.dataclass(frozen=True)
class Gate:
    """What the actors check each image against, and what they reject."""

    dataset: str
    """The pixel dataset of the model's training images."""
    digest: str
    """Its manifest's sha256: the version the checks were built from."""
    index: str | None
    """The copy index (None: copies not looked for)."""
    judge: str | None
    """The judge's weights (None: an unconditional model or unlabelled data)."""
    classes: int
    judge_side: int
    max_copy_ratio: float
    """An image whose copy ratio is below this is a copy."""
    drop_copies: bool
    min_label_confidence: float
    """The judge's least probability of an image's label for it to be kept (0: all)."""
    max_draws: int

    def settings(self) -> dict[str, Any]:
        """What the images' bytes depend on, for the job's identity."""
        from pipeline.maths import copies

        out = dataclasses.asdict(self)
        del out["dataset"], out["index"], out["judge"]
        return {
            **out,
            "copy_features": {"side": copies.SIDE, "neighbours": copies.NEIGHBOURS},
            "copies": self.index is not None,
            "judge": None if self.judge is None else self.judge.rsplit("/", 1)[-1],
        }


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One image, checked."""

    kept: bool
    reason: str | None
    """Why it was rejected: "copy" or "label"."""
    copy: dict[str, Any] | None
    """nearest (training key), distance, ratio, mirrored, flagged."""
    judge: dict[str, Any] | None
    """predicted (label), confidence (the probability of its own label)."""


# --- the driver's side ---------------------------------------------------------------


def resolve(cfg: SampleConfig, model: Model) -> tuple[Gate | None, dict | None]:
    """The gate of a job, and the manifest of the dataset it checks against; (None,
    None) when there is nothing to check (no training dataset known, or neither
    copies nor labels to check)."""
    from pipeline.maths import classifier

    asked = cfg.min_label_confidence > 0 or cfg.drop_copies
    dataset = cfg.dataset or _trained_on(model)
    if not dataset:
        if asked:
            raise ConfigError(
                "sample.dataset: the model card names no training dataset; give the one "
                "to check against"
            )
        log.warning("sample: the model card names no training dataset: images are not checked")
        return None, None
    field = "sample.dataset"
    try:
        manifest, digest = shards.load_dataset(dataset, field)
    except ConfigError:
        if cfg.dataset or asked:
            raise
        log.warning("sample: the model's training dataset %s is gone: images are not checked",
                    dataset)  # fmt: skip
        return None, None
    if latent_samples.kind(manifest) == latent_samples.KIND:
        if cfg.dataset:
            raise ConfigError(
                f"{field}: {dataset} holds latents; give the pixel dataset they were "
                f"encoded from ({manifest['source']['dataset']})"
            )
        dataset = manifest["source"]["dataset"]
        manifest, digest = shards.load_dataset(dataset, field)
    if manifest["resolution"] != model.card.image_side:
        raise ConfigError(
            f"{field}: its images are {manifest['resolution']} px, the model's "
            f"{model.card.image_side} px, got {dataset!r}"
        )
    classes = len(manifest.get("classes") or [])
    conditional = model.card.model.num_classes
    if conditional and classes and classes != conditional:
        raise ConfigError(f"{field}: has {classes} classes, the model {conditional}")
    train = sum(e["samples"] for e in manifest["shards"] if e["split"] == "train")
    labelled = bool(classes and conditional and train)
    if cfg.min_label_confidence > 0 and not labelled:
        raise ConfigError(
            "sample.min_label_confidence: needs a class-conditional model and a labelled "
            f"training dataset, got {cfg.min_label_confidence:g}"
        )
    index = reference.copy_index_uri(dataset, digest) if cfg.check_copies and train else None
    judge = reference.judge_uri(dataset, manifest, digest, REFERENCE_IMAGES) if labelled else None
    if index is None and judge is None:
        return None, None
    side = classifier.input_side(manifest["resolution"])
    return Gate(dataset, digest, index, judge, classes, side, cfg.max_copy_ratio,
                cfg.drop_copies, cfg.min_label_confidence, cfg.max_draws), manifest  # fmt: skip


def _trained_on(model: Model) -> str:
    """The dataset folder the model card names ('' for none)."""
    ref = model.card.dataset
    if ref is None:
        return ""
    return ref.uri.removesuffix("/" + shards.MANIFEST)


def missing(gate: Gate) -> bool:
    """Whether `prepare` has anything to compute."""
    return not all(storage.exists(uri) for uri in (gate.index, gate.judge) if uri)


def prepare(gate: Gate, manifest: dict, judge_images: int) -> None:
    """Compute and keep the index and the judge if missing: a Ray task's work."""
    if gate.index is not None:
        reference.copy_index(gate.dataset, manifest, gate.digest)
    if gate.judge is not None:
        reference.judge(gate.dataset, manifest, gate.digest, judge_images)


# --- the actors' side -----------------------------------------------------------------


class Checker:
    """A gate loaded in an actor: `check` gives each image's verdict."""

    def __init__(self, gate: Gate):
        self.gate = gate
        self.features: np.ndarray | None = None
        if gate.index is not None:
            self.features, self.keys = reference.read_copy_index(gate.index)
        self.judge = None
        if gate.judge is not None:
            from safetensors.torch import load

            from pipeline.maths.classifier import SmallCNN

            self.judge = SmallCNN(gate.classes, gate.judge_side)
            self.judge.load_state_dict(load(storage.read_bytes(gate.judge)))
            self.judge.eval()

    def check(self, images: np.ndarray, labels: list[int | None]) -> list[Verdict]:
        """The verdict on each uint8 image [N, H, W, 3] generated for `labels`."""
        from pipeline.maths import classifier, copies

        gate, n = self.gate, len(images)
        found = None
        if self.features is not None:
            padded = _pad(images, COPY_BATCH)
            found = [copies.nearest(chunk, self.features) for chunk in padded]
        probs = None
        if self.judge is not None:
            probs = classifier.probabilities(self.judge, images)
        out = []
        for i in range(n):
            copy = judge = None
            reason = None
            if found is not None:
                f = found[i // COPY_BATCH]
                j = i % COPY_BATCH
                ratio = float(f.ratio[j])
                copy = {
                    "nearest": str(self.keys[f.index[j]]),
                    "distance": round(float(f.distance[j]), 6),
                    "ratio": round(ratio, 6),
                    "mirrored": bool(f.mirror[j]),
                    "flagged": ratio < gate.max_copy_ratio,
                }
                if copy["flagged"] and gate.drop_copies:
                    reason = "copy"
            if probs is not None and labels[i] is not None:
                confidence = float(probs[i, labels[i]])
                judge = {"predicted": int(probs[i].argmax()), "confidence": round(confidence, 6)}
                if reason is None and confidence < gate.min_label_confidence:
                    reason = "label"
            out.append(Verdict(reason is None, reason, copy, judge))
        return out


def _pad(images: np.ndarray, size: int) -> list[np.ndarray]:
    """`images` in chunks of exactly `size`, the last one padded with zeros."""
    chunks = []
    for lo in range(0, len(images), size):
        chunk = images[lo : lo + size]
        if len(chunk) < size:
            pad = np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        chunks.append(chunk)
    return chunks


def ratio_bin(ratio: float) -> int:
    """The bin of a copy ratio among HISTOGRAM over [0, 1] (1 and above: the last)."""
    return min(int(ratio * HISTOGRAM), HISTOGRAM - 1)
