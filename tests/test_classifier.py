"""Label fidelity and the Classification Accuracy Score against known answers, on
the real digits written as a dataset: real images score the ceiling, shuffled
labels score chance, real training images have a CAS of about 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import shards
from pipeline.data.digits import load_digits
from pipeline.data.reference import REFERENCE, Split, label_scores, read_split
from pipeline.data.transforms import encode_png
from pipeline.edges import storage
from pipeline.maths import classifier
from pipeline.maths.metrics import block_factor


def write_dataset(folder: str, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """A dataset as tasks.preprocess lays it out (one shard per split, a manifest),
    without Ray: what evaluation reads back."""
    from PIL import Image

    entries = []
    for split, (images, labels) in splits.items():
        members = []
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            members += [
                (f"{split}{i:05d}.png", encode_png(Image.fromarray(image))),
                (f"{split}{i:05d}.cls", str(int(label)).encode()),
            ]
        data = shards.write_tar(members)
        name = shards.shard_name(split, 0)
        storage.write_bytes(storage.join(folder, name), data)
        entries.append(
            {"name": name, "split": split, "samples": len(images), "sha256": shards.sha256(data)}
        )
    manifest = {
        "resolution": images.shape[1],
        "classes": [str(c) for c in range(10)],
        "shards": entries,
    }
    storage.write_bytes(storage.join(folder, shards.MANIFEST), json.dumps(manifest).encode())
    return manifest


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    images, labels = load_digits()
    rgb = np.repeat(images[..., None], 3, axis=-1)
    order = np.random.default_rng(0).permutation(len(rgb))
    train, validation = order[:1400], order[1400:]
    folder = str(tmp_path_factory.mktemp("digits"))
    splits = {
        "train": (rgb[train], labels[train]),
        "validation": (rgb[validation], labels[validation]),
    }
    return folder, write_dataset(folder, splits), splits["train"], splits["validation"]


def scores(digits, samples: np.ndarray, labels: np.ndarray):
    folder, manifest, _, _ = digits
    train = Split(folder, manifest, "train", 10_000)
    validation = Split(folder, manifest, "validation", 10_000)
    return label_scores(train, validation, "d" * 64, {"s": samples}, labels, {"s": ""})


def test_real_validation_images_score_the_ceiling(digits):
    _, _, _, (images, labels) = digits
    found, not_computed = scores(digits, images, labels)
    assert not_computed == {}
    assert found["label_fidelity"] == found["label_fidelity_ceiling"]
    assert found["label_fidelity_ceiling"] > 0.95  # the judge does recognise digits


def test_shuffled_labels_score_about_one_in_ten(digits):
    _, _, _, (images, labels) = digits
    shuffled = np.random.default_rng(1).permutation(labels)
    found, _ = scores(digits, images, shuffled)
    # 397 images, P(match) ~ 0.1: 4 standard deviations are 0.06
    assert 0.04 < found["label_fidelity"] < 0.17
    # and a classifier trained on shuffled labels learns next to nothing
    assert found["cas"] < 0.4


def test_the_cas_of_real_training_images_is_about_one(digits):
    _, _, (images, labels), _ = digits
    # Real train images, as many as the baseline learns from (600 of the sample).
    found, _ = scores(digits, images[600:1200], labels[600:1200])
    assert 0.95 < found["cas"] < 1.05
    assert found["cas_real_accuracy"] > 0.9


def test_the_classifiers_are_kept_beside_the_dataset_and_reused(digits):
    folder = digits[0]
    _, _, (images, labels), _ = digits
    first, _ = scores(digits, images[:300], labels[:300])
    kept = sorted(o.relpath for o in storage.list_objects(storage.join(folder, REFERENCE)))
    assert {k.split("-")[2] for k in kept} >= {"1400", "300"}  # the judge, the baseline
    again, _ = scores(digits, images[:300], labels[:300])
    assert again == first
    assert sorted(o.relpath for o in storage.list_objects(storage.join(folder, REFERENCE))) == kept


def test_without_labels_there_is_nothing_to_score_and_the_reason_is_given(digits):
    folder, manifest, _, (images, labels) = digits
    unlabelled = {**manifest, "classes": None}
    train = Split(folder, unlabelled, "train", 10)
    validation = Split(folder, unlabelled, "validation", 10)
    prefixes = {"a": "", "b": "b."}
    found = label_scores(train, validation, "d" * 64, {"a": images, "b": images}, labels, prefixes)
    assert found == (
        {},
        {
            "label_fidelity": "the dataset has no class labels",
            "cas": "the dataset has no class labels",
            "b.label_fidelity": "the dataset has no class labels",
            "b.cas": "the dataset has no class labels",
        },
    )
    train = Split(folder, manifest, "train", 10)
    _, why = label_scores(train, validation, "d" * 64, {"a": images}, None, {"a": ""})
    assert why == {
        "label_fidelity": "the model is unconditional",
        "cas": "the model is unconditional",
    }


def test_training_is_seeded_and_the_labels_are_checked():
    images, labels = load_digits()
    rgb = np.repeat(images[:300, ..., None], 3, axis=-1)
    recipe = classifier.Recipe(min_steps=20)
    a = classifier.train_classifier(rgb, labels[:300], 10, recipe)
    b = classifier.train_classifier(rgb, labels[:300], 10, recipe)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9"):
        classifier.train_classifier(rgb, labels[:300] + 1, 10, recipe)


def test_large_images_are_averaged_down_in_blocks():
    assert [block_factor(s, 32) for s in (8, 32, 64, 96, 200, 512)] == [1, 1, 2, 3, 5, 16]
    assert classifier.input_side(200) == 40 and classifier.input_side(512) == 32
    blocks = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    big = blocks.repeat(4, axis=1).repeat(4, axis=2)  # 64x64 in 4x4 blocks
    np.testing.assert_allclose(
        classifier.to_inputs(big),
        classifier.to_inputs(blocks.repeat(2, 1).repeat(2, 2)),
        atol=1e-6,
    )


def test_the_reference_is_a_sample_by_sha256_that_reads_only_the_shards_it_takes(tmp_path):
    # Eight train shards of five images; three images are one shard and a part of
    # another: the shards of the two smallest sha256, whatever the manifest's order,
    # each read in the order of its keys' sha256, and no other shard is read.
    import hashlib

    images, labels = load_digits()
    rgb = np.repeat(images[:40, ..., None], 3, axis=-1)
    folder, entries = str(tmp_path), []
    for index in range(8):
        members = []
        for i in range(index * 5, index * 5 + 5):
            members += [(f"k{i:03d}.png", encode_png(Image.fromarray(rgb[i])))]
            members += [(f"k{i:03d}.cls", str(int(labels[i])).encode())]
        data = shards.write_tar(members)
        name = shards.shard_name("train", index)
        storage.write_bytes(storage.join(folder, name), data)
        entries.append(
            {"name": name, "split": "train", "samples": 5, "sha256": shards.sha256(data)}
        )
    manifest = {"resolution": 8, "classes": [str(c) for c in range(10)], "shards": entries}

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    first, second = sorted(range(8), key=lambda i: sha(entries[i]["sha256"]))[:2]
    keys = [
        sorted((f"k{i:03d}" for i in range(s * 5, s * 5 + 5)), key=sha) for s in (first, second)
    ]
    expected = [int(k[1:]) for k in keys[0] + keys[1][:2]]
    for index in set(range(8)) - {first, second}:
        (tmp_path / entries[index]["name"]).unlink()  # never read
    for order in (entries, entries[::-1]):
        found, found_labels = read_split(folder, {**manifest, "shards": order}, "train", 7, True)
        assert found is not None and found_labels is not None
        assert (found == rgb[expected]).all() and (found_labels == labels[expected]).all()
    assert {first, second} != {0, 1}  # not the manifest's first shards (seeded: holds)
