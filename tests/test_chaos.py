"""Chaos trials: a task killed at a random moment of its work, then run again
(here preprocessing, encoding and generation; training's, a run killed and a
node lost, are in tests/test_training.py, on its two-node cluster and straight
run; generation with its checks and filter in tests/test_gate.py; the
autoencoder's training in tests/test_train_autoencoder.py).

A trial starts a task as users run it, SIGKILLs its whole process group (or, in
a node trial, one node of the two-node cluster a training run is on) at a
moment drawn from the trial's seed, and runs the same command again. Wherever
in its work the kill lands (mid-write, between shards, mid-checkpoint) the
tasks' contracts hold: the shards are byte-identical to an uninterrupted
reference run's and every manifest entry matches its bytes; a training run ends
at exactly the images asked for, in one MLflow run, FINISHED, every step on the
samples of the straight run's, with its weights bit for bit; and nothing of the
killed task is left running.

Every moment lies in the task's working window: after its first progress point
(its first shard record; for training, the first images seen rank 0 logs to
MLflow) and before its commit. An even seed kills at a progress point drawn
from the first three quarters of the work; an odd seed at a time drawn from the
first 80% of the reference run's working window (from its first progress point
to its last), counted from the first progress point, and at the latest at the
last of those points. Progress is polled every 10 ms. Each trial checks,
from the task's own records read after the kill, that it landed mid-work: some
work recorded, no commit.

Seed 0 of each kind but two is a trial of `pytest -m trial` (minutes each, not
in the default suite; their results are in bench/results/trials-cpu2.xml); a
training run killed and run again, and generation with its filter, seed 0, are
in the default suite. `pytest -m chaos` runs seeds 1-10 and writes every trial
(seed, moment, what was running, outcome) with the commit it ran on to
bench/results/chaos-cpu2.json. Each trial also prints its record.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import save

from pipeline.config import PreprocessConfig
from pipeline.data import shards
from pipeline.data.digits import write_digits
from pipeline.edges import autoencoders, storage, tracking
from pipeline.jobs.preprocess import preprocess
from pipeline.maths.unet import build
from tests import chaos, images, tasks
from tests.nets import randomised, tiny_autoencoder

pytestmark = pytest.mark.slow

# --- preprocessing -------------------------------------------------------------------

PREPROCESS = ["--resolution", "32", "--samples_per_shard", "12"]
RAW_IMAGES, PREPROCESS_SHARDS = 240, 21
"""Noise images, 128x96 in 3 classes: 21 shards (train and validation)."""


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    for i in range(RAW_IMAGES):
        (root / f"c{i % 3}").mkdir(exist_ok=True)
        (root / f"c{i % 3}" / f"{i}.png").write_bytes(
            images.encode(images.noise(128, 96, i), "PNG")
        )
    return root


def preprocess_argv(raw: Path, output: str) -> list[str]:
    return tasks.command("preprocess", "--input", str(raw), *PREPROCESS, "--output", output)


@pytest.fixture(scope="module")
def preprocessed(raw, tmp_path_factory) -> chaos.Reference:
    """The dataset built uninterrupted, by a task with its own Ray as the trials'."""
    out = str(tmp_path_factory.mktemp("preprocess-reference") / "out")
    argv = preprocess_argv(raw, out)
    return chaos.shard_reference(argv, tasks.private_ray_env(), out, PREPROCESS_SHARDS)


@pytest.mark.parametrize(
    ("seed", "where"),
    [
        pytest.param(0, "s3", marks=pytest.mark.trial),
        pytest.param(0, "local", marks=pytest.mark.trial),
        *(
            pytest.param(s, ("s3", "local")[s // 2 % 2], marks=pytest.mark.chaos)
            for s in chaos.TRIALS
        ),
    ],
)
def test_preprocess_killed_then_run_again_ends_as_an_uninterrupted_run(
    seed, where, trial, preprocessed, raw, s3, ray_cluster, tmp_path
):
    prefix = s3.prefix(f"chaos-preprocess-{seed}") if where == "s3" else str(tmp_path / "out")
    argv = preprocess_argv(raw, prefix)
    with trial("preprocess", seed) as t:
        t.moment["storage"] = where
        # The killed job runs its own Ray, in its own process group: SIGKILL takes
        # the driver, Ray and the workers (mid-write) down together.
        done, again = chaos.shard_job_trial(t, argv, prefix, preprocessed, tasks.private_ray_env())
        chaos.check_reused(t, again, done)
        if where == "local":
            partial = list(Path(prefix).rglob("*.partial"))
            t.check("no interrupted write is left", partial == [], partial)
        chaos.third_run_writes_nothing(t, argv, prefix, "already complete")


# --- encoding ---------------------------------------------------------------------------

ENCODE_IMAGES, ENCODE_SHARD = 480, 16
"""Digits at 32 px in 30 pixel shards (27 train, 3 validation)."""


@pytest.fixture(scope="module")
def pixels(tmp_path_factory, ray_cluster) -> str:
    root = tmp_path_factory.mktemp("encode-pixels")
    write_digits(str(root / "raw"), 0, ENCODE_IMAGES)
    cfg = PreprocessConfig(
        input=str(root / "raw"),
        output=str(root / "dataset"),
        resolution=32,
        small_images="upscale",
        samples_per_shard=ENCODE_SHARD,
        validation_fraction=0.1,
    )
    preprocess(cfg, progress=False)
    return str(root / "dataset")


@pytest.fixture(scope="module")
def vae(s3) -> str:
    """A tiny random AutoencoderKL (f = 8), its `save_pretrained` folder on S3."""
    with tempfile.TemporaryDirectory() as tmp:
        tiny_autoencoder().save_pretrained(tmp)
        files = autoencoders.read_folder(tmp)
    folder = s3.prefix("chaos-encode-vae")
    for name, data in files.items():
        storage.write_bytes(storage.join(folder, name), data)
    return folder


def encode_argv(pixels: str, vae: str, output: str) -> list[str]:
    return tasks.command(
        "encode", "--dataset", pixels, "--autoencoder", vae, "--output", output,
        "--chunk", "4", "--actors", "1",
    )  # fmt: skip


@pytest.fixture(scope="module")
def encoded(pixels, vae, s3) -> chaos.Reference:
    """The latents encoded uninterrupted, by a task with its own Ray as the trials'."""
    prefix = s3.prefix("chaos-encode-reference")
    total = len(shards.load_dataset(pixels, "pixels")[0]["shards"])
    argv = encode_argv(pixels, vae, prefix)
    return chaos.shard_reference(argv, tasks.private_ray_env(), prefix, total)


@pytest.mark.parametrize("seed", chaos.seeds())
def test_encode_killed_then_run_again_ends_as_an_uninterrupted_run(
    seed, trial, pixels, vae, encoded, s3
):
    prefix = s3.prefix(f"chaos-encode-{seed}")
    argv = encode_argv(pixels, vae, prefix)
    with trial("encode", seed) as t:
        # Its own Ray: the kill takes the actor down mid-shard.
        done, again = chaos.shard_job_trial(t, argv, prefix, encoded, tasks.private_ray_env())
        chaos.check_reused(t, again, done)
        chaos.third_run_writes_nothing(t, argv, prefix, "already complete")


# --- generation ----------------------------------------------------------------------

MODEL = "chaos-tiny"
SAMPLING = [
    *("--images", "320", "--samples_per_shard", "32", "--seed", "7"),
    *("--sampler", "heun", "--steps", "4", "--guidance", "2", "--network_batch", "16"),
    *("--actors", "1", "--batch_size", "16"),
]
SAMPLE_SHARDS = 10


@pytest.fixture(scope="module")
def model(mlflow_server) -> str:
    """A tiny class-conditional model (random weights) registered as tasks.train
    registers models; its reference `name/version`."""
    net = randomised(build("tiny", num_classes=10), seed=3)
    weights = save({k: v.contiguous() for k, v in net.state_dict().items()})
    card = {
        "template": "tiny",
        "model": net.cfg.to_dict(),
        "resolution": 8,
        "classes": [str(d) for d in range(10)],
    }
    run_id = tracking.find_or_create_run(mlflow_server, "tests", f"{MODEL}-training")
    files = {"model.safetensors": weights, "model.json": json.dumps(card).encode()}
    return f"{MODEL}/{tracking.register_model(mlflow_server, run_id, MODEL, files, {})}"


def sample_argv(model: str, output: str, tracking_uri: str) -> list[str]:
    return tasks.command(
        "sample", "--model", model, "--output", output, "--tracking_uri", tracking_uri, *SAMPLING
    )


@pytest.fixture(scope="module")
def sampled(model, mlflow_server, ray_cluster, s3) -> chaos.Reference:
    """The images generated uninterrupted, on the session's cluster as the trials'."""
    prefix = s3.prefix("chaos-sample-reference")
    return chaos.shard_reference(
        sample_argv(model, prefix, mlflow_server), None, prefix, SAMPLE_SHARDS
    )


@pytest.mark.parametrize("seed", chaos.seeds())
def test_sample_killed_then_run_again_writes_each_shard_once(
    seed, trial, sampled, model, mlflow_server, s3
):
    prefix = s3.prefix(f"chaos-sample-{seed}")
    argv = sample_argv(model, prefix, mlflow_server)
    with trial("sample", seed) as t:
        done, again = chaos.shard_job_trial(t, argv, prefix, sampled)
        t.check(
            "the re-run generates exactly the shards without a record",
            f"({SAMPLE_SHARDS - done} written now, {done} already complete)" in again.stdout,
            again.stdout,
        )
        client = MlflowClient(mlflow_server)
        experiment = client.get_experiment_by_name("sampling")  # the reference made it
        assert experiment is not None
        found = client.search_runs([experiment.experiment_id], f"tags.output = '{prefix}'")
        statuses = [r.info.status for r in found]
        t.check("the job is one MLflow run, FINISHED", statuses == ["FINISHED"], statuses)
        chaos.third_run_writes_nothing(
            t, argv, prefix, f"(0 written now, {SAMPLE_SHARDS} already complete)"
        )
