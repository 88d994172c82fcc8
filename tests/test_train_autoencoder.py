"""tasks.train_autoencoder as users run it: the digits at 32 px, a small
AutoencoderKL (f = 4) trained briefly on the real Ray cluster, tracked by the
real MLflow server, registered, and loaded back with `from_pretrained`. A trial
(`pytest -m trial`, about 3 minutes): its result is in bench/results/trials-cpu2.xml."""

from __future__ import annotations

import time

import mlflow
import numpy as np
import pytest
import torch

from pipeline.config import PreprocessConfig
from pipeline.data import shards
from pipeline.data.digits import write_digits
from pipeline.data.reference import read_split
from pipeline.jobs.preprocess import preprocess
from pipeline.maths.autoencoder_loss import psnr
from tests import chaos, tasks
from tests.runs import EXPERIMENT, history, images_logged, registered, runs_named

pytestmark = pytest.mark.slow

MIN_PSNR = 20.0
"""dB on the validation digits after 3,072 images, with a margin: the run measured
22.7 dB (2026-12-05, 2 cores), where predicting every image as the split's mean
image scores 12.1."""


@pytest.fixture(scope="module")
def digits(tmp_path_factory, ray_cluster) -> str:
    root = tmp_path_factory.mktemp("ae-digits")
    write_digits(str(root / "raw"))
    cfg = PreprocessConfig(
        input=str(root / "raw"),
        output=str(root / "pixels"),
        resolution=32,
        small_images="upscale",
        validation_fraction=0.1,
    )
    preprocess(cfg, progress=False)
    return cfg.output


@pytest.mark.trial
def test_a_brief_run_reconstructs_the_validation_digits_and_registers_a_loadable_folder(
    digits, s3, mlflow_server, tmp_path
):
    argv = tasks.command(
        "train_autoencoder", "--dataset", digits, "--storage", s3.prefix("ae-runs"),
        "--tracking_uri", mlflow_server, "--run_name", "digits-vae", "--channels", "16,32,32",
        "--images", "3072", "--batch_size", "32", "--log_every_images", "1024",
        "--checkpoint_every_images", "2048", "--discriminator_start_images", "2048",
        "--validation_images", "180",
    )  # fmt: skip
    result = tasks.run(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered digits-vae/1" in result.stdout, result.stdout
    # The last checkpoint is the run's end, whatever the checkpoint interval.
    assert "checkpoint-000000003072" in result.stdout.splitlines()[-1], result.stdout

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(client.get_model_version("digits-vae", "1").run_id)
    reported = run.data.metrics["validation_psnr"]
    assert reported >= MIN_PSNR, run.data.metrics
    assert run.data.metrics["validation_fd_pixel"] > 0
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1024, 2048, 3072]

    # The registered files are a folder diffusers loads as it is.
    from diffusers import AutoencoderKL

    mlflow.set_tracking_uri(mlflow_server)
    folder = mlflow.artifacts.download_artifacts(
        artifact_uri="models:/digits-vae/1", dst_path=str(tmp_path)
    )
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True).eval()
    manifest, _ = shards.load_dataset(digits, "digits")
    images, _ = read_split(digits, manifest, "validation", 180)
    assert images is not None
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    assert abs(float(psnr(x, rec).mean()) - reported) < 0.01
    baseline = float(psnr(x, x.mean(0, keepdim=True).expand_as(x)).mean())
    assert reported > baseline + 5, (reported, baseline)
    print(f"validation PSNR {reported:.2f} dB (the mean image: {baseline:.2f} dB)")
    assert np.isfinite(reported)


# --- chaos: a run killed mid-work and run again --------------------------------------

AE_IMAGES, AE_CHECKPOINT_EVERY, AE_LOG_EVERY = 1536, 256, 128
AE_PART_WAY = range(AE_LOG_EVERY, AE_IMAGES * 3 // 4 + 1, AE_LOG_EVERY)
"""The progress points: images seen as rank 0 last logged them (see
tests/test_training.py's PART_WAY)."""


def ae_argv(digits: str, runs: str, tracking_uri: str, name: str) -> list[str]:
    return tasks.command(
        "train_autoencoder", "--dataset", digits, "--storage", runs,
        "--tracking_uri", tracking_uri, "--run_name", name, "--experiment", EXPERIMENT,
        "--channels", "8,16", "--images", str(AE_IMAGES), "--batch_size", "32",
        "--log_every_images", str(AE_LOG_EVERY),
        "--checkpoint_every_images", str(AE_CHECKPOINT_EVERY),
        "--discriminator_start_images", "512", "--validation_images", "64",
    )  # fmt: skip


@pytest.fixture(scope="module")
def ae_straight(digits, s3, mlflow_server) -> tuple[float, dict[int, list[float]]]:
    """The uninterrupted run: its working window (its first log point to its last)
    and its loss history's steps."""
    runs, name = s3.prefix("ae-chaos-runs"), "ae-straight"
    client = mlflow.MlflowClient(mlflow_server)
    result, window = chaos.reference_run(
        ae_argv(digits, runs, mlflow_server, name),
        None,
        lambda: images_logged(client, name),
        AE_LOG_EVERY,
        AE_IMAGES,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    [run] = runs_named(client, name)
    return window, history(client, run.info.run_id, "loss")


@pytest.mark.parametrize("seed", chaos.seeds())
def test_a_killed_run_run_again_finishes_once_from_its_last_checkpoint(
    seed, trial, digits, s3, mlflow_server, ae_straight
):
    runs, name = s3.prefix("ae-chaos-runs"), f"ae-killed-{seed}"
    argv, client = ae_argv(digits, runs, mlflow_server, name), mlflow.MlflowClient(mlflow_server)
    window, straight_loss = ae_straight
    with trial("train-autoencoder", seed) as t:
        moment = chaos.draw(t.kind, seed, window, AE_PART_WAY, "images logged")
        t.plan(moment)
        before = set(tasks.task_processes())
        started = time.monotonic()
        job = tasks.start(argv)
        try:
            at = chaos.reach(moment, job, started, lambda: images_logged(client, name))
        finally:
            t.check("the killed process group is gone", tasks.kill(job))
        t.no_strays(before)
        checkpoint = max(registered(runs, name), default=0)
        chaos.killed(t, job, at, images_logged(client, name), AE_IMAGES, checkpoint == AE_IMAGES)
        t.killed["checkpoint"] = checkpoint

        again = tasks.run(argv)
        t.rerun_exit_code = again.returncode
        t.check("the re-run exits 0", again.returncode == 0, again.stderr[-3000:])
        t.check(
            "the re-run ends at exactly the images asked for, registered once",
            f"registered {name}/1" in again.stdout
            and f"checkpoint-{AE_IMAGES:012d}" in again.stdout,
            again.stdout[-2000:],
        )
        t.no_strays(before)
        found = runs_named(client, name)
        statuses = [r.info.status for r in found]
        t.check(
            "the run name's experiment holds one run, FINISHED", statuses == ["FINISHED"], statuses
        )
        versions = [v.run_id for v in client.search_model_versions(f"name = '{name}'")]
        t.check("one model version, of that run", versions == [found[0].info.run_id], versions)
        loss = history(client, found[0].info.run_id, "loss")
        t.check(
            "the loss is logged at the straight run's steps", loss.keys() == straight_loss.keys()
        )
        # Resumed from the checkpoint last recorded (or a later one): the steps up to
        # it were logged once, by the killed run.
        once = all(len(v) == 1 for s, v in loss.items() if s <= checkpoint)
        t.check("the steps up to the last checkpoint recorded are logged once", once, loss)
