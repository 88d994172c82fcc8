"""Training on a latent dataset and generating from it, as users run the tasks:
digits at 32 px, a tiny random AutoencoderKL (f = 4, so 8x8 latents), the real
Ray cluster, S3 server and MLflow server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import PreprocessConfig
from pipeline.config.encode import EncodeConfig
from pipeline.config.records import LatentSpace
from pipeline.data import shards
from pipeline.data.digits import write_digits
from pipeline.edges import registry, storage
from pipeline.jobs.encode import encode
from pipeline.jobs.preprocess import preprocess
from tests import tasks
from tests.nets import tiny_autoencoder

pytestmark = [pytest.mark.slow, pytest.mark.trial]

TRAINING = [
    "--model.template", "tiny", "--batch_size", "32", "--images", "256",
    "--log_every_images", "128", "--checkpoint_every_images", "256",
    "--sample_every_images", "256", "--experiment", "tests",
]  # fmt: skip


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, ray_cluster) -> dict[str, str]:
    """Digits at 32 px; their latents with and without flips; the autoencoder."""
    root = tmp_path_factory.mktemp("latent-training")
    write_digits(str(root / "raw"), 0, 400)
    pixels = str(root / "pixels")
    cfg = PreprocessConfig(
        input=str(root / "raw"), output=pixels, resolution=32, small_images="upscale"
    )
    preprocess(cfg, progress=False)
    tiny_autoencoder(levels=3).save_pretrained(root / "vae")
    out = {"pixels": pixels, "vae": str(root / "vae")}
    for name, flips in (("flipped", True), ("latents", False)):
        out[name] = str(root / name)
        encode(EncodeConfig(pixels, out[name], out["vae"], flips=flips), progress=False)
    return out


def test_a_model_trained_on_latents_generates_pixels_through_its_autoencoder(
    datasets, s3, mlflow_server, tmp_path
):
    name = "latent-digits"
    argv = tasks.command(
        "train", "--dataset", datasets["flipped"], "--storage", s3.prefix("latent-runs"),
        "--tracking_uri", mlflow_server, "--run_name", name, "--hflip", "true", *TRAINING,
    )  # fmt: skip
    result = tasks.run(argv)
    assert result.returncode == 0, result.stderr[-3000:]

    model = registry.load_model(f"{name}/1", mlflow_server, "model")
    manifest, _ = shards.load_dataset(datasets["flipped"], "latents")
    assert model.card.latents == LatentSpace.of_dataset(manifest)
    assert model.card.model.in_channels == model.card.model.out_channels == 4
    assert model.card.resolution == 8 and model.card.image_side == 32
    assert model.card.augmentation == {"hflip": True}

    def sample(output: str, *extra: str) -> list[str]:
        return tasks.command(
            "sample", "--model", f"{name}/1", "--output", output, "--images", "12",
            "--samples_per_shard", "12", "--steps", "4", "--network_batch", "4",
            "--batch_size", "8", "--tracking_uri", mlflow_server, *extra,
        )  # fmt: skip

    output = str(tmp_path / "generated")
    result = tasks.run(sample(output))
    assert result.returncode == 0, result.stderr[-3000:]
    data = storage.read_bytes(storage.join(output, "train-000000.tar"))
    pngs = [
        data[m.offset : m.offset + m.size]
        for m in shards.tar_members(data)
        if m.name.endswith(".png")
    ]
    decoded = [np.asarray(Image.open(io.BytesIO(png))) for png in pngs]
    assert len(decoded) == 12 and all(d.shape == (32, 32, 3) for d in decoded)
    assert np.std([d.astype(float).mean() for d in decoded]) > 0  # not one image twelve times

    # Another autoencoder cannot decode its latents: refused before any sampling.
    other = tmp_path / "other-vae"
    tiny_autoencoder(seed=3, levels=3).save_pretrained(other)
    result = tasks.run(sample(str(tmp_path / "g2"), "--autoencoder", str(other)))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tasks.sample: error: sample.autoencoder: ") and "digest" in last, last
    assert not (tmp_path / "g2").exists()


def test_hflip_on_latents_encoded_without_flips_is_refused_in_one_line(datasets, s3, mlflow_server):
    argv = tasks.command(
        "train", "--dataset", datasets["latents"], "--storage", s3.prefix("latent-noflip"),
        "--tracking_uri", mlflow_server, "--run_name", "noflip", "--hflip", "true", *TRAINING,
    )  # fmt: skip
    result = tasks.run(argv)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tasks.train: error: train.hflip: ") and "--flips true" in last, last
