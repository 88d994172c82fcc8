"""What a dataset version is scored against, read back from its shards and kept
beside it under `reference/`, so that it is computed once per manifest version:

- pixel features of `reference_images` train images (`pixels-*.npz`);
- the label-fidelity judge: a classifier trained on those images and labels, with
  its accuracy on the validation split, the ceiling (`classifier-*.safetensors`);
- the CAS baseline: the same classifier trained on the first n of them.

The images are a sample of the split that does not grow with it: its shards in
the order of their sha256 (`SAMPLING`), each shard's samples in the order of
their keys' sha256, up to the number needed. So a dataset grown by many nights
is represented by shards of all of them, not by its first, and reading the
sample costs the shards it takes, whatever the dataset's size. `prepare` computes
them in a Ray task of the evaluation (`pipeline.jobs.evaluate`), not on the driver.

The classifiers are `pipeline.maths.classifier.SmallCNN`s; their file names hold the
manifest digest, the number of images, the sampling and a hash of the training
recipe.
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
SAMPLING = "sha256"
"""How a split's images are chosen (see the module doc); in the kept files' names
and the evaluation's settings, so results from another sampling are not reused."""
PIXEL_SIDE = 32
"""Pixel-space metrics see images of at most about this side (larger ones are
averaged down in blocks): the covariance of 64x64x3 pixels would not fit in memory."""


def read_split(
    dataset: str, manifest: dict, split: str, limit: int, sampled: bool = False
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The first `limit` images of a split in shard order (`sampled`: in the
    order of `SAMPLING`, see the module doc), uint8 [N, H, W, 3], and their labels
    (None for an unlabelled dataset); (None, None) if the split is empty."""
    from PIL import Image

    entries = [e for e in manifest["shards"] if e["split"] == split and e["samples"]]
    if sampled:
        entries.sort(key=lambda e: shards.sha256(e["sha256"].encode()))
    images: list[np.ndarray] = []
    labels: list[int | None] = []
    for entry in entries:
        if len(images) >= limit:
            break
        data = storage.read_bytes(storage.join(dataset, entry["name"]))
        members: dict[str, dict[str, bytes]] = {}
        for m in shards.tar_members(data):
            key, ext = shards.split_member_name(m.name)
            members.setdefault(key, {})[ext] = data[m.offset : m.offset + m.size]
        keys = (
            sorted(members, key=lambda k: shards.sha256(k.encode())) if sampled else list(members)
        )
        for key in keys:
            sample = members[key]
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
    """`limit` images of a split of a dataset version, sampled as the module doc
    says, read from its shards at most once, and only when needed."""

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
            self._read = read_split(self.dataset, self.manifest, self.split, self.limit, True)
        return self._read


def reference_features(train: Split, digest: str) -> np.ndarray:
    """Pixel features of the train split's sample, computed once per manifest
    version: `reference/pixels-<digest>-<n>-<sampling>.npz`."""

    def compute() -> np.ndarray:
        images, _ = train.read()
        if images is None:
            raise ConfigError(
                f"evaluate.dataset: {train.dataset} has no train images to compare with"
            )
        return pixel_features(images).astype(np.float32)

    return kept_array(_pixels_uri(train, digest), compute)


def _pixels_uri(train: Split, digest: str) -> str:
    return storage.join(
        train.dataset, REFERENCE, f"pixels-{digest[:16]}-{train.limit}-{SAMPLING}.npz"
    )


# --- copies of training images ------------------------------------------------------


def copy_index_uri(dataset: str, digest: str) -> str:
    """Where the copy index of a dataset version is kept."""
    from pipeline.maths import copies

    return storage.join(dataset, REFERENCE, f"copies-{digest[:16]}-{copies.SIDE}.npz")


def copy_index(dataset: str, manifest: dict, digest: str) -> tuple[np.ndarray, np.ndarray]:
    """The copy features (`pipeline.maths.copies.features`, float32 [N, D]) of every
    train image of the dataset version and their keys (`<shard>/<key>`), computed
    once per version: `reference/copies-<digest>-<side>.npz` (float16)."""
    data = kept(copy_index_uri(dataset, digest), lambda: _build_copy_index(dataset, manifest))
    return _copy_arrays(data)


def read_copy_index(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """The copy index kept at `uri` (`copy_index_uri`), as `copy_index` gives it."""
    return _copy_arrays(storage.read_bytes(uri))


def _copy_arrays(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as saved:
        return saved["features"].astype(np.float32), saved["keys"]


def _build_copy_index(dataset: str, manifest: dict) -> bytes:
    from PIL import Image

    from pipeline.maths import copies

    feats, keys = [], []
    for entry in manifest["shards"]:
        if entry["split"] != "train" or not entry["samples"]:
            continue
        data = storage.read_bytes(storage.join(dataset, entry["name"]))
        images = []
        for m in shards.tar_members(data):
            key, ext = shards.split_member_name(m.name)
            if ext == "png":
                png = data[m.offset : m.offset + m.size]
                images.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
                keys.append(f"{entry['name']}/{key}")
        feats.append(copies.features(np.stack(images)).astype(np.float16))
    buf = io.BytesIO()
    np.savez(buf, features=np.concatenate(feats), keys=np.array(keys))
    return buf.getvalue()


def copy_rates(
    dataset: str,
    manifest: dict,
    digest: str,
    samples: dict[str, np.ndarray],
    max_ratio: float,
    threads: int,
) -> dict[str, float]:
    """The share of each sampler's `samples` whose copy ratio (`pipeline.maths.copies`)
    is below `max_ratio`: a Ray task's work (a search of the whole train split)."""
    import torch

    from pipeline.maths import copies

    torch.set_num_threads(threads)
    index, _ = copy_index(dataset, manifest, digest)
    return {
        name: float(np.mean(copies.nearest(images, index).ratio < max_ratio))
        for name, images in samples.items()
    }


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


def judge(dataset: str, manifest: dict, digest: str, limit: int) -> str:
    """Where the judge of a labelled dataset version is kept (trained on the
    `limit` images of its train sample first, if it is not there yet)."""
    train = Split(dataset, manifest, "train", limit)
    classes = len(manifest.get("classes") or [])
    assert classes and train.count(), "a judge needs a labelled train split"
    _kept_classifier(train, digest, classes, train.count())
    return _classifier_uri(train, digest, train.count())


def judge_uri(dataset: str, manifest: dict, digest: str, limit: int) -> str:
    """Where `judge` keeps it, without training it."""
    train = Split(dataset, manifest, "train", limit)
    return _classifier_uri(train, digest, train.count())


def _kept_classifier(train: Split, digest: str, classes: int, n: int) -> SmallCNN:
    """The classifier of the first `n` images of the train split's sample, trained
    once per manifest version, recipe and n:
    `reference/classifier-<digest>-<n>-<sampling>-<recipe>.safetensors`."""
    from safetensors.torch import load, save

    from pipeline.maths import classifier

    recipe = classifier.Recipe()

    def compute() -> bytes:
        images, labels = train.read()
        assert images is not None and labels is not None  # checked by label_scores
        net = classifier.train_classifier(images[:n], labels[:n], classes, recipe)
        return save({k: v.contiguous() for k, v in net.state_dict().items()})

    data = kept(_classifier_uri(train, digest, n), compute)
    side = classifier.input_side(train.manifest["resolution"])
    net = classifier.SmallCNN(classes, side, recipe.channels)
    net.load_state_dict(load(data))
    return net.eval()


def _classifier_uri(train: Split, digest: str, n: int) -> str:
    from pipeline.maths import classifier

    key = json.dumps(dataclasses.asdict(classifier.Recipe()), sort_keys=True).encode()
    recipe = hashlib.sha256(key).hexdigest()[:8]
    name = f"classifier-{digest[:16]}-{n}-{SAMPLING}-{recipe}.safetensors"
    return storage.join(train.dataset, REFERENCE, name)


def missing(train: Split, digest: str, cas_images: int | None) -> bool:
    """Whether `prepare` has anything to compute: the pixel features, the copy
    index, or with
    `cas_images` (a conditional model of a labelled dataset: the images its CAS
    classifier learns from) the judge and the CAS baseline."""
    uris = [_pixels_uri(train, digest), copy_index_uri(train.dataset, digest)]
    if cas_images is not None and train.count():
        uris += [_classifier_uri(train, digest, n) for n in _classifier_sizes(train, cas_images)]
    return not all(storage.exists(uri) for uri in uris)


def prepare(
    dataset: str, manifest: dict, digest: str, limit: int, cas_images: int | None, threads: int
) -> None:
    """Compute and keep what `missing` says is missing: the work of a Ray task, on
    the cluster rather than the driver (the judge trains on `limit` images, the
    copy index reads the whole train split)."""
    import torch

    torch.set_num_threads(threads)
    train = Split(dataset, manifest, "train", limit)
    reference_features(train, digest)
    if train.count():
        copy_index(dataset, manifest, digest)
    classes = len(manifest.get("classes") or [])
    if cas_images is not None and classes and train.count():
        for n in _classifier_sizes(train, cas_images):
            _kept_classifier(train, digest, classes, n)


def _classifier_sizes(train: Split, cas_images: int) -> list[int]:
    """The images of the judge and of the CAS baseline (as many as the CAS
    classifier learns from, or all of the sample)."""
    return sorted({train.count(), min(cas_images, train.count())})
