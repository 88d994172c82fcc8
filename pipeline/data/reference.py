"""What a dataset version is scored against, read back from its shards and kept
beside it under `reference/`, so that it is computed once per manifest version:

- pixel features of the first `reference_images` train images (`pixels-*.npz`);
- the label-fidelity judge: a classifier trained on those images and labels, with
  its accuracy on the validation split, the ceiling (`classifier-*.safetensors`);
- the CAS baseline: the same classifier trained on the first n train images.

The classifiers are `pipeline.maths.classifier.SmallCNN`s; their file names hold the
manifest digest, the number of images and a hash of the training recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import ConfigError
from pipeline.data import shards
from pipeline.edges import storage
from pipeline.maths.metrics import block_factor

if TYPE_CHECKING:
    from pipeline.maths.classifier import SmallCNN

REFERENCE = "reference"
PIXEL_SIDE = 32
"""Pixel-space metrics see images of at most about this side (larger ones are
averaged down in blocks): the covariance of 64x64x3 pixels would not fit in memory."""


def read_split(
    dataset: str, manifest: dict, split: str, limit: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The first `limit` images of a split in shard order, uint8 [N, H, W, 3], and
    their labels (None for an unlabelled dataset); (None, None) if the split is empty."""
    from PIL import Image

    images: list[np.ndarray] = []
    labels: list[int | None] = []
    for entry in manifest["shards"]:
        if entry["split"] != split or not entry["samples"] or len(images) >= limit:
            continue
        data = storage.read_bytes(storage.join(dataset, entry["name"]))
        members: dict[str, dict[str, bytes]] = {}
        for m in shards.tar_members(data):
            key, ext = shards.split_member_name(m.name)
            members.setdefault(key, {})[ext] = data[m.offset : m.offset + m.size]
        for sample in members.values():
            if "png" not in sample or len(images) >= limit:
                continue
            images.append(np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")))
            labels.append(int(sample["cls"]) if "cls" in sample else None)
    if not images:
        return None, None
    return np.stack(images), None if labels[0] is None else np.array(labels, dtype=np.int64)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> float64 [N, D] in [-1, 1], averaged down in blocks of
    `block_factor(H, PIXEL_SIDE)` pixels."""
    x = images.astype(np.float64) / 127.5 - 1.0
    factor = block_factor(x.shape[1], PIXEL_SIDE)
    if factor > 1:
        n, h, w, c = x.shape
        x = x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    return x.reshape(len(x), -1)


def kept(uri: str, compute: Callable[[], bytes]) -> bytes:
    """The bytes stored at `uri`; computed and stored there first if absent."""
    try:
        return storage.read_bytes(uri)
    except storage.NotFound:
        pass
    data = compute()
    storage.write_bytes(uri, data)
    return data


def kept_array(uri: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """The features array stored at `uri` (.npz); computed and stored if absent."""

    def save() -> bytes:
        buf = io.BytesIO()
        np.savez(buf, features=compute())
        return buf.getvalue()

    with np.load(io.BytesIO(kept(uri, save)), allow_pickle=False) as saved:
        return saved["features"]


class Split:
    """A split of a dataset version (its first `limit` images), read from its
    shards at most once, and only when needed."""

    def __init__(self, dataset: str, manifest: dict, split: str, limit: int):
        self.dataset, self.manifest, self.split, self.limit = dataset, manifest, split, limit
        self._read: tuple | None = None

    def count(self) -> int:
        """How many images `read` gives, from the manifest."""
        entries = (s["samples"] for s in self.manifest["shards"] if s["split"] == self.split)
        return min(self.limit, sum(entries))

    def read(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(uint8 images [N, H, W, 3], labels or None), see `read_split`."""
        if self._read is None:
            self._read = read_split(self.dataset, self.manifest, self.split, self.limit)
        return self._read


def reference_features(train: Split, digest: str) -> np.ndarray:
    """Pixel features of the train split's first `limit` images, computed once per
    manifest version: `reference/pixels-<digest>-<n>.npz`."""

    def compute() -> np.ndarray:
        images, _ = train.read()
        if images is None:
            raise ConfigError(
                f"evaluate.dataset: {train.dataset} has no train images to compare with"
            )
        return pixel_features(images).astype(np.float32)

    uri = storage.join(train.dataset, REFERENCE, f"pixels-{digest[:16]}-{train.limit}.npz")
    return kept_array(uri, compute)


# --- label fidelity and the Classification Accuracy Score ---------------------------


def label_scores(
    train: Split,
    validation: Split,
    digest: str,
    samples: dict[str, np.ndarray],
    labels: np.ndarray | None,
    prefixes: dict[str, str],
) -> tuple[dict[str, float], dict[str, str]]:
    """Label fidelity and CAS (`pipeline.maths.classifier`) of each sampler's `samples`,
    generated for `labels` (None: unconditionally); (scores, {metric: why not
    computed}). Metric names get the sampler's prefix (`prefixes`). Beside them:
    the judge's accuracy on the real validation images (`label_fidelity_ceiling`)
    and the CAS baseline's (`cas_real_accuracy`)."""
    from pipeline.maths import classifier

    classes = len(train.manifest.get("classes") or [])
    if not classes or labels is None:
        why = "the model is unconditional" if classes else "the dataset has no class labels"
        missing = {
            prefix + metric: why
            for prefix in prefixes.values()
            for metric in ("label_fidelity", "cas")
        }
        return {}, missing
    if train.count() == 0:
        raise ConfigError(f"evaluate.dataset: {train.dataset} has no train images to learn from")
    judge = _kept_classifier(train, digest, classes, train.count())
    val_images, val_labels = validation.read()
    scores: dict[str, float] = {}
    not_computed: dict[str, str] = {}
    n = min(len(labels), train.count())
    if val_images is not None:
        assert val_labels is not None  # a labelled dataset: every split has labels
        scores["label_fidelity_ceiling"] = classifier.accuracy(judge, val_images, val_labels)
        baseline = _kept_classifier(train, digest, classes, n)
        scores["cas_real_accuracy"] = classifier.accuracy(baseline, val_images, val_labels)
    for name, images in samples.items():
        prefix = prefixes[name]
        scores[prefix + "label_fidelity"] = classifier.label_fidelity(judge, images, labels)
        if val_images is None or val_labels is None:
            not_computed[prefix + "cas"] = "the dataset has no validation images"
            continue
        cas = classifier.classification_accuracy_score(
            (images[:n], labels[:n]), baseline, (val_images, val_labels), classes
        )
        scores[prefix + "cas"] = cas["cas"]
        scores[prefix + "cas_accuracy"] = cas["cas_accuracy"]
    return scores, not_computed


def _kept_classifier(train: Split, digest: str, classes: int, n: int) -> SmallCNN:
    """The classifier of the first `n` train images, trained once per manifest
    version, recipe and n: `reference/classifier-<digest>-<n>-<recipe>.safetensors`."""
    from safetensors.torch import load, save

    from pipeline.maths import classifier

    recipe = classifier.Recipe()
    key = json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode()
    name = f"classifier-{digest[:16]}-{n}-{hashlib.sha256(key).hexdigest()[:8]}.safetensors"

    def compute() -> bytes:
        images, labels = train.read()
        assert images is not None and labels is not None  # checked by label_scores
        net = classifier.train_classifier(images[:n], labels[:n], classes, recipe)
        return save({k: v.contiguous() for k, v in net.state_dict().items()})

    data = kept(storage.join(train.dataset, REFERENCE, name), compute)
    side = classifier.input_side(train.manifest["resolution"])
    net = classifier.SmallCNN(classes, side, recipe.channels)
    net.load_state_dict(load(data))
    return net.eval()
