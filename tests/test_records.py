"""The typed hand-offs between jobs (`pipeline.config.records`): each goes to plain
data and back unchanged, refuses unknown and missing keys by name, and writes the
JSON the files have always held (the expected dicts are written out literally)."""

from __future__ import annotations

import json

import pytest

from pipeline.config.records import (
    CheckpointState,
    DatasetRef,
    GenerationJob,
    LatentSpace,
    Lineage,
    ModelCard,
    RecordError,
    StreamPlan,
    TrainingPlan,
    TrainShard,
)
from pipeline.data import shards
from pipeline.jobs.generate.sampler import ShardRecord
from pipeline.jobs.train.worker import Stop
from pipeline.maths.architecture import architecture

NET = architecture("tiny", 8, num_classes=10, label_dropout=0.1)
NET_DICT = {
    "resolution": 8,
    "in_channels": 3,
    "out_channels": 3,
    "channels": 24,
    "channel_mult": [1, 2],
    "blocks": 1,
    "attention": [1],
    "head_channels": 48,
    "dropout": 0.0,
    "num_classes": 10,
    "label_dropout": 0.1,
}
DATASET = DatasetRef("s3://b/digits-8/manifest.json", "ab" * 32, 1610)
DATASET_DICT = {"uri": "s3://b/digits-8/manifest.json", "digest": "ab" * 32, "train_images": 1610}
CLASSES = [str(d) for d in range(10)]

CARD = ModelCard(
    template="tiny",
    model=NET,
    resolution=8,
    classes=tuple(CLASSES),
    sigma_data=0.5,
    images_seen=2048,
    dataset=DATASET,
    run_id="run1",
    augmentation={"hflip": False},
)
CARD_DICT = {
    "template": "tiny",
    "model": NET_DICT,
    "resolution": 8,
    "classes": CLASSES,
    "sigma_data": 0.5,
    "images_seen": 2048,
    "dataset": DATASET_DICT,
    "run_id": "run1",
    "augmentation": {"hflip": False},
}

STATE = CheckpointState(
    images_seen=512,
    step=16,
    run_id="run1",
    model=NET,
    config={"model": {"template": "tiny"}, "tracking_uri": "http://***@mlflow:5000"},
    dataset=DATASET,
    seed=0,
)
STATE_DICT = {
    "images_seen": 512,
    "step": 16,
    "run_id": "run1",
    "model": NET_DICT,
    "config": {"model": {"template": "tiny"}, "tracking_uri": "http://***@mlflow:5000"},
    "dataset": DATASET_DICT,
    "seed": 0,
}

STREAM = StreamPlan(
    7, "ab" * 32, (TrainShard("train-000000.tar", 1000, "01" * 32),), 64, 4096, False
)
STREAM_DICT = {
    "seed": 7,
    "dataset_digest": "ab" * 32,
    "shards": [{"name": "train-000000.tar", "samples": 1000, "sha256": "01" * 32}],
    "batch_size": 64,
    "window": 4096,
    "hflip": False,
}
PLAN = TrainingPlan(2048, 10, NET, 8, DATASET, tuple(CLASSES), STREAM, run_id="run1")
PLAN_DICT = {
    "images": 2048,
    "num_classes": 10,
    "model": NET_DICT,
    "resolution": 8,
    "dataset": DATASET_DICT,
    "classes": CLASSES,
    "stream": STREAM_DICT,
    "run_id": "run1",
}

SPACE = LatentSpace(
    "s3://b/vae", "ab" * 32, 8, 4, 64, (0.5, -1.0, 0.0, 2.0), (1.0, 2.0, 3.0, 4.0), 0.5, True
)
SPACE_DICT = {
    "autoencoder": "s3://b/vae",
    "digest": "ab" * 32,
    "downsample": 8,
    "channels": 4,
    "resolution": 64,
    "raw_mean": [0.5, -1.0, 0.0, 2.0],
    "raw_std": [1.0, 2.0, 3.0, 4.0],
    "final_std": 0.5,
    "flips": True,
}
LATENT_NET = architecture("tiny", 8, in_channels=4, out_channels=4)
LATENT_CARD = ModelCard("tiny", LATENT_NET, 8, latents=SPACE)
LATENT_CARD_DICT = {
    "template": "tiny",
    "model": LATENT_NET.to_dict(),
    "resolution": 8,
    "classes": None,
    "sigma_data": None,
    "images_seen": None,
    "dataset": None,
    "run_id": None,
    "augmentation": None,
    "latents": SPACE_DICT,
}

REGISTERED = Lineage("digits", 3, "run1", "cd" * 32)
FROM_CHECKPOINT = Lineage(None, None, "run1", "cd" * 32, checkpoint="s3://b/runs/checkpoint-1")
JOB = GenerationJob(
    model=REGISTERED,
    images=640,
    samples_per_shard=64,
    sampler="heun",
    steps=6,
    guidance=2.0,
    labels="uniform",
    seed=7,
    network_batch=16,
    template="tiny",
    checks=None,
)
TALLY = {"drawn": 70, "rejected": {"label": 6}, "per_class": {"0": 30, "1": 34}}
JOB_DICT = {
    "model": {"name": "digits", "version": 3, "run_id": "run1", "digest": "cd" * 32},
    "images": 640,
    "samples_per_shard": 64,
    "sampler": "heun",
    "steps": 6,
    "guidance": 2.0,
    "labels": "uniform",
    "seed": 7,
    "network_batch": 16,
    "template": "tiny",
    "checks": None,
}

RECORDS = [
    (CARD, CARD_DICT),
    (SPACE, SPACE_DICT),
    (LATENT_CARD, LATENT_CARD_DICT),
    (STATE, STATE_DICT),
    (PLAN, PLAN_DICT),
    (STREAM, STREAM_DICT),
    (DATASET, DATASET_DICT),
    (REGISTERED, JOB_DICT["model"]),
    (JOB, JOB_DICT),
    (
        ShardRecord("train-000001.tar", "train", 64, (64, 128), 10240, "ef" * 32, TALLY),
        {
            "name": "train-000001.tar",
            "split": "train",
            "samples": 64,
            "seeds": [64, 128],
            "bytes": 10240,
            "sha256": "ef" * 32,
            "tally": TALLY,
        },
    ),
    (
        Stop(20, 640, "loss nan, gradient norm nan"),
        {"step": 20, "images_seen": 640, "detail": "loss nan, gradient norm nan"},
    ),
]
IDS = [type(record).__name__ for record, _ in RECORDS]


@pytest.mark.parametrize("record, data", RECORDS, ids=IDS)
def test_a_record_writes_the_format_of_its_files_and_reads_it_back(record, data):
    assert record.to_dict() == data
    # The same JSON as before, byte for byte (the files are written with sorted keys).
    assert json.dumps(record.to_dict(), sort_keys=True) == json.dumps(data, sort_keys=True)
    assert type(record).from_dict(json.loads(json.dumps(data))) == record


@pytest.mark.parametrize("record, data", RECORDS, ids=IDS)
def test_a_record_names_an_unknown_or_missing_key(record, data):
    what = {
        ModelCard: "model card",
        CheckpointState: "checkpoint state",
        TrainingPlan: "training plan",
        StreamPlan: "stream plan",
        DatasetRef: "dataset",
        Lineage: "model lineage",
        GenerationJob: "generation job",
        ShardRecord: "shard record",
        Stop: "stop marker",
        LatentSpace: "latent space",
    }[type(record)]
    key = next(iter(data))
    with pytest.raises(RecordError) as e:
        type(record).from_dict({**data, f"{key}t": data[key]})
    assert str(e.value) == f"{what}: unknown key '{key}t'"
    with pytest.raises(RecordError) as e:
        type(record).from_dict({k: v for k, v in data.items() if k != key})
    assert str(e.value) == f"{what}: missing key '{key}'"
    with pytest.raises(RecordError) as e:
        type(record).from_dict({"x": 1, f"{key}t": data[key]})
    assert str(e.value).startswith(f"{what}: unknown keys '{key}t', 'x'; missing key")
    assert f"'{key}'" in str(e.value)


def test_a_stream_plan_names_a_bad_shard_entry():
    bad = {**STREAM_DICT, "shards": [{"name": "train-000000.tar", "samples": 1000}]}
    with pytest.raises(RecordError, match=r"^stream plan: shards\[0\]: missing key 'sha256'$"):
        StreamPlan.from_dict(bad)
    with pytest.raises(RecordError, match="^stream plan: shards: must be a list$"):
        StreamPlan.from_dict({**STREAM_DICT, "shards": "train-000000.tar"})


def test_the_generation_job_writes_the_bytes_of_its_job_file():
    digest = "cd" * 32
    assert (
        shards.dumps(JOB.to_dict())
        == (
            '{\n "checks": null,\n "guidance": 2.0,\n "images": 640,\n "labels": "uniform",\n'
            ' "model": {\n'
            f'  "digest": "{digest}",\n  "name": "digits",\n  "run_id": "run1",\n'
            '  "version": 3\n },\n "network_batch": 16,\n "sampler": "heun",\n'
            ' "samples_per_shard": 64,\n "seed": 7,\n "steps": 6,\n "template": "tiny"\n}\n'
        ).encode()
    )


def test_a_checkpoints_lineage_names_its_folder_and_a_registered_ones_does_not():
    assert FROM_CHECKPOINT.to_dict() == {
        "name": None,
        "version": None,
        "run_id": "run1",
        "checkpoint": "s3://b/runs/checkpoint-1",
        "digest": "cd" * 32,
    }
    assert Lineage.from_dict(FROM_CHECKPOINT.to_dict()) == FROM_CHECKPOINT
    assert "checkpoint" not in REGISTERED.to_dict()
    assert (FROM_CHECKPOINT.describe(), REGISTERED.describe()) == (
        "s3://b/runs/checkpoint-1",
        "digits/3",
    )


def test_a_card_needs_only_its_network_and_refuses_a_resolution_that_is_not_the_networks():
    card = ModelCard.from_dict({"template": "tiny", "model": NET_DICT, "resolution": 8})
    assert card == ModelCard("tiny", NET, 8)
    assert card.to_dict() == {
        **{k: None for k in CARD_DICT},
        "template": "tiny",
        "model": NET_DICT,
        "resolution": 8,
    }
    with pytest.raises(RecordError, match="model card: resolution: 16 is not the network's 8"):
        ModelCard.from_dict({**CARD_DICT, "resolution": 16})
    with pytest.raises(RecordError, match=r"model card: model: .*unknown \['width'\]"):
        ModelCard.from_dict({**CARD_DICT, "model": {**NET_DICT, "width": 3}})
    with pytest.raises(RecordError, match="model card: dataset: missing key 'train_images'"):
        ModelCard.from_dict({**CARD_DICT, "dataset": {"uri": "u", "digest": "d"}})
    with pytest.raises(RecordError, match="model card: must be a JSON object, got list"):
        ModelCard.from_dict([])


def test_a_checkpoint_state_from_before_templates_resolves_its_preset():
    # version 0.1.0 wrote the preset in the config and only the overrides as the model
    old = {
        **STATE_DICT,
        "model": {"num_classes": 10, "label_dropout": 0.1},
        "config": {"preset": "tiny"},
    }
    state = CheckpointState.from_dict(old)
    assert state.model == NET and state.template == "tiny"
    assert CheckpointState.from_dict(STATE_DICT).template == "tiny"


def test_a_latent_card_must_be_of_the_networks_side():
    with pytest.raises(RecordError, match="latents: 8 per side, where the network's resolution"):
        ModelCard(
            "tiny", architecture("tiny", 16, in_channels=4, out_channels=4), 16, latents=SPACE
        )
    assert LATENT_CARD.image_side == 64 and CARD.image_side == CARD.resolution
