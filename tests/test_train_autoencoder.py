"""tasks.train_autoencoder as users run it: the digits at 32 px, a small
AutoencoderKL (f = 4) trained briefly on the real Ray cluster, tracked by the
real MLflow server, registered, and loaded back with `from_pretrained`. A trial
(`pytest -m trial`, about 3 minutes): its result is in bench/results/trials-cpu2.xml."""

from __future__ import annotations

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
from tests import tasks

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
