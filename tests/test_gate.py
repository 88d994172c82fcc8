"""Generation's gate: copies of training images found with their keys, the label
filter's redraws deterministic and exactly-once on the real Ray cluster and
MLflow server, and the dataset card."""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import save

from pipeline.config.evaluate import REFERENCE_IMAGES
from pipeline.data import reference, shards
from pipeline.data.digits import load_digits
from pipeline.edges import storage, tracking
from pipeline.jobs.generate import gate as gates
from pipeline.maths import copies
from pipeline.maths import solvers as S
from pipeline.maths.classifier import input_side
from pipeline.maths.edm import karras_sigmas
from pipeline.maths.reproducible import image_labels
from tests import chaos, tasks
from tests.services import ROOT
from tests.test_classifier import write_dataset
from tests.test_sampling import read_shards, sample_argv

pytestmark = pytest.mark.slow

RGB = np.repeat(load_digits()[0][..., None], 3, axis=-1)
LABELS = load_digits()[1]
ORDER = np.random.default_rng(0).permutation(len(RGB))
TRAIN, VALIDATION = ORDER[:1400], ORDER[1400:]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[str, dict, str]:
    """The digits as a dataset (train 1,400, validation 397): folder, manifest, digest."""
    folder = str(tmp_path_factory.mktemp("digits"))
    splits = {
        "train": (RGB[TRAIN], LABELS[TRAIN]),
        "validation": (RGB[VALIDATION], LABELS[VALIDATION]),
    }
    manifest = {**write_dataset(folder, splits), "format": shards.FORMAT}
    storage.write_bytes(storage.join(folder, shards.MANIFEST), shards.dumps(manifest))
    return folder, manifest, shards.sha256(shards.dumps(manifest))


def _gate(digits, **changes) -> gates.Gate:
    folder, manifest, digest = digits
    fields = dict(
        dataset=folder,
        digest=digest,
        index=reference.copy_index_uri(folder, digest),
        judge=None,
        classes=10,
        judge_side=input_side(8),
        max_copy_ratio=0.2,
        drop_copies=False,
        min_label_confidence=0.0,
        max_draws=8,
    )
    return gates.Gate(**{**fields, **changes})


def test_planted_and_mirrored_training_images_are_flagged_with_their_keys(digits):
    gate = _gate(digits)
    gates.prepare(gate, digits[1], REFERENCE_IMAGES)
    planted = [5, 700, 1399]
    images = np.concatenate([RGB[VALIDATION], RGB[TRAIN[planted]], RGB[TRAIN[[42]]][:, :, ::-1]])
    verdicts = gates.Checker(gate).check(images, [None] * len(images))
    real, copied = verdicts[: len(VALIDATION)], verdicts[len(VALIDATION) :]
    keys = [f"train-000000.tar/train{i:05d}" for i in [*planted, 42]]
    assert [v.copy["nearest"] for v in copied] == keys
    assert all(v.copy["flagged"] and v.kept for v in copied)  # flagged, kept: not dropped
    assert [v.copy["mirrored"] for v in copied] == [False, False, False, True]
    # No real digit held out of training is a copy, at the default ratio.
    assert not any(v.copy["flagged"] for v in real)
    assert min(v.copy["ratio"] for v in real) > 0.2

    dropping = gates.Checker(_gate(digits, drop_copies=True)).check(images, [None] * len(images))
    assert [v.reason for v in dropping] == [None] * len(VALIDATION) + ["copy"] * 4


def _train(images: np.ndarray, labels: np.ndarray | None, steps: int) -> torch.nn.Module:
    """A tiny UNet trained on `images` as test_learns trains it (bench/gate.py's
    recipe, which the benchmark's model shares); its EMA."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gate import trained
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return trained(images, labels, steps)


def test_a_model_trained_to_memorise_copies_far_more_than_one_trained_on_all_the_digits():
    rates = {}
    for name, images in [("16 digits", RGB[TRAIN[:16]]), ("1,400 digits", RGB[TRAIN])]:
        net = _train(images, None, steps=600)  # the same recipe for both
        noise = S.initial_noise((200, 3, 8, 8), 80.0, S.sample_generators(0, range(200)))
        with torch.no_grad():
            out = S.sample_heun(net, noise, karras_sigmas(18))
        pixels = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        found = copies.nearest(pixels.numpy(), copies.features(images))
        rates[name] = float(np.mean(found.ratio < 0.2))
    print(f"\ncopy rates at ratio < 0.2: {rates}")
    assert rates["16 digits"] > 0.5
    assert rates["1,400 digits"] < 0.02


# --- the job, on the session's Ray cluster ---------------------------------------------

FILTERED = ["--images", "96", "--samples_per_shard", "24", "--sampler", "heun", "--steps", "12",
            "--network_batch", "8", "--min_label_confidence", "0.7"]  # fmt: skip


@pytest.fixture(scope="module")
def registered(digits, mlflow_server) -> dict:
    """A tiny class-conditional model trained briefly on the digits (its samples
    are often not their label: the filter has work), registered with a card
    naming the dataset, as tasks.train registers models."""
    folder, manifest, digest = digits
    net = _train(RGB[TRAIN], LABELS[TRAIN], steps=300).net
    weights = save({k: v.contiguous() for k, v in net.state_dict().items()})
    card = {
        "template": "tiny",
        "model": net.cfg.to_dict(),
        "resolution": 8,
        "classes": [str(d) for d in range(10)],
        "dataset": {"uri": f"{folder}/{shards.MANIFEST}", "digest": digest, "train_images": 1400},
    }
    run_id = tracking.find_or_create_run(mlflow_server, "tests", "gate-digits-training")
    files = {"model.safetensors": weights, "model.json": json.dumps(card).encode()}
    version = tracking.register_model(mlflow_server, run_id, "gate-digits", files, {"k": "v"})
    return {"model": f"gate-digits/{version}", "uri": mlflow_server}


def filtered_argv(registered: dict, output: str) -> list[str]:
    """The filtered job: one actor, batches of 16."""
    return sample_argv(registered["model"], output, registered["uri"], *FILTERED,
                       "--actors", "1", "--batch_size", "16")  # fmt: skip


@pytest.fixture(scope="module")
def filtered_run(registered, ray_cluster, s3) -> tuple[str, chaos.Reference]:
    """The filtered job run once, uninterrupted: its output, and it as the chaos
    trials' reference."""
    output = s3.prefix("gate-reference")
    return output, chaos.shard_reference(filtered_argv(registered, output), None, output, 4)


@pytest.fixture(scope="module")
def filtered(filtered_run) -> str:
    return filtered_run[0]


def _members(found: dict, ext: str) -> dict[str, bytes]:
    return {n: d for shard in found.values() for n, d in shard.items() if n.endswith(ext)}


def test_the_label_filter_redraws_to_the_requested_counts_the_same_bytes_on_any_pool(
    registered, filtered, s3
):
    reference = read_shards(filtered)
    infos = [json.loads(d) for d in _members(reference, ".json").values()]
    assert sorted(i["index"] for i in infos) == list(range(96))
    # Each image is its seed's label: the counts per class are the requested ones.
    wanted = Counter(image_labels("uniform", 0, list(range(96)), 10))
    assert Counter(i["label"] for i in infos) == wanted
    assert min(i["judge"]["confidence"] for i in infos) >= 0.7
    redrawn = [i for i in infos if i["draw"] > 0]
    assert redrawn, "the filter rejected nothing: this test would not see a redraw"
    manifest = json.loads(storage.read_bytes(storage.join(filtered, shards.MANIFEST)))
    card = manifest["card"]
    assert card["counts"]["per_class"] == {str(k): v for k, v in sorted(wanted.items())}
    assert card["counts"]["drawn"] == 96 + sum(i["draw"] for i in infos)
    assert card["counts"]["rejected"] == {"label": sum(i["draw"] for i in infos)}
    assert card["label_fidelity"] == pytest.approx(
        np.mean([i["judge"]["predicted"] == i["label"] for i in infos])
    )
    assert 0 <= card["memorisation"]["rate"] <= 1 and card["cas"] is not None
    assert sum(card["memorisation"]["histogram"]["counts"]) == 96

    # Two actors, batches of 48: the same bytes.
    output = s3.prefix("gate-other-pool")
    argv = sample_argv(registered["model"], output, registered["uri"], *FILTERED,
                       "--actors", "2", "--batch_size", "48")  # fmt: skip
    result = tasks.run(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_shards(output) == reference


@pytest.mark.parametrize("seed", chaos.seeds(zero_in_default_suite=True))
def test_a_killed_filtering_job_run_again_is_byte_identical(
    seed, trial, registered, filtered_run, s3
):
    """The chaos trial of generation with its checks and filter (seed 0 in the
    default suite; see tests/test_chaos.py)."""
    output = s3.prefix(f"chaos-filtered-{seed}")
    with trial("sample-filtered", seed) as t:
        # Its own Ray: the kill takes the actor down mid-shard, judge and redraws too.
        done, again = chaos.shard_job_trial(
            t, filtered_argv(registered, output), output, filtered_run[1], tasks.private_ray_env()
        )
        t.check(
            "the re-run generates exactly the shards without a record",
            f"({4 - done} written now, {done} already complete)" in again.stdout,
            again.stdout,
        )


def test_the_card_is_written_beside_the_manifest_and_logged_to_mlflow(registered, filtered):
    text = storage.read_bytes(storage.join(filtered, "card.md")).decode()
    assert "## Copies of training images" in text and "Label fidelity:" in text
    assert "96 images kept of" in text
    grid = storage.read_bytes(storage.join(filtered, "grid.png"))
    assert grid.startswith(b"\x89PNG")
    run = tracking.find_run(
        registered["uri"],
        "sampling",
        "sample-" + hashlib.sha256(filtered.encode()).hexdigest()[:12],
    )
    assert run is not None
    client = tracking.client(registered["uri"])
    logged = {a.path for a in client.list_artifacts(run[0], "card")}
    assert logged == {"card/card.md", "card/grid.png"}
    assert client.get_run(run[0]).data.metrics["card_images"] == 96
