"""Training an autoencoder (diffusers' AutoencoderKL) on Ray Train, tracked in MLflow.

For when no pretrained autoencoder suits the data (none can be downloaded here,
and medical or satellite images are far from what Stable Diffusion's VAE saw).
The machinery is the denoiser's: the same stream (`ingest`), Ray Train's
checkpoints under `storage/run_name` (the same command resumes), FailureConfig
restarts, an MLflow run by name. At the end the driver measures the final
autoencoder on the validation split, reconstructing each image from its
posterior's mean: PSNR, and the pixel Frechet distance of the reconstructions
to the originals; and registers the `save_pretrained` folder as a new version
of the model in MLflow, which `AutoencoderKL.from_pretrained` loads as it is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, to_dict
from pipeline.config.autoencoder import AutoencoderConfig
from pipeline.config.records import StreamPlan, TrainShard
from pipeline.data import latent_samples, shards
from pipeline.data.reference import pixel_features, read_split
from pipeline.edges import autoencoders, cluster, storage, tracking
from pipeline.jobs.train.driver import brief, progress, run_config
from pipeline.maths import metrics


@dataclasses.dataclass(frozen=True)
class AutoencoderResult:
    run_id: str
    images_seen: int
    checkpoint: str
    """The final checkpoint; its `autoencoder/` folder is what was registered."""
    model_name: str
    model_version: int
    validation: dict[str, float]
    """psnr (dB) and fd_pixel of the validation split's reconstructions."""

    def summary(self) -> str:
        scores = ", ".join(f"{k} {v:.4g}" for k, v in self.validation.items())
        return (
            f"{self.images_seen} images seen; validation: {scores or 'none (empty split)'}; "
            f"registered {self.model_name}/{self.model_version}; checkpoint {self.checkpoint}"
        )


def train_autoencoder(cfg: AutoencoderConfig) -> AutoencoderResult:
    """Train (or finish training) the autoencoder `cfg` describes; see the module doc."""
    manifest, digest = shards.load_dataset(cfg.dataset, "train_autoencoder.dataset")
    images, stream = _plan(cfg, manifest, digest)
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.jobs.train.autoencoder_worker import train_loop_per_worker

    run_id = tracking.find_or_create_run(cfg.tracking_uri, cfg.experiment, cfg.run_name)
    tracking.log_params(
        cfg.tracking_uri, run_id, tracking.flatten(to_dict(cfg)), ("images", "workers")
    )
    tracking.log_dataset(cfg.tracking_uri, run_id, cfg.dataset, digest, name="pixels")
    tracking.set_running(cfg.tracking_uri, run_id)
    cluster.connect()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": to_dict(cfg),
            "stream": stream,
            "images": images,
            "run_id": run_id,
            "dataset": cfg.dataset,
            "resolution": manifest["resolution"],
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=run_config(cfg.storage, cfg.run_name, cfg.max_failures, keep=2),
    )
    try:
        with progress(cfg.tracking_uri, run_id, images, "train_autoencoder"):
            result = trainer.fit()
    except BaseException as e:
        tracking.end_run(cfg.tracking_uri, run_id, "FAILED")
        if not isinstance(e, Exception):
            raise
        raise RuntimeError(f"training failed (the last checkpoint is kept): {brief(e)}") from e
    if result.checkpoint is None:
        raise RuntimeError(f"training reported no checkpoint under {cfg.storage}/{cfg.run_name}")
    folder = result.checkpoint.path
    folder = f"s3://{folder}" if storage.is_s3(cfg.storage) else folder
    state = json.loads(storage.read_bytes(storage.join(folder, "state.json")))
    if state["images_seen"] != images:
        raise RuntimeError(
            f"the last checkpoint, {folder}, holds {state['images_seen']} images seen, "
            f"not the {images} asked for"
        )
    files = autoencoders.read_folder(storage.join(folder, "autoencoder"))
    scores = validation_scores(files, cfg.dataset, manifest, cfg.validation_images)
    if scores:
        tracking.log_metrics(
            cfg.tracking_uri, run_id, {f"validation_{k}": v for k, v in scores.items()}, images
        )
    name = cfg.model_name or cfg.run_name
    identity = autoencoders.identity_of(files)
    tags = {
        "kind": "autoencoder",
        "digest": identity.digest,
        "downsample": str(identity.downsample),
        "latent_channels": str(identity.latent_channels),
        "dataset_digest": digest,
        "images_seen": str(images),
    }
    version = tracking.register_model(cfg.tracking_uri, run_id, name, files, tags)
    tracking.end_run(cfg.tracking_uri, run_id)
    return AutoencoderResult(run_id, images, folder, name, version, scores)


def _plan(cfg: AutoencoderConfig, manifest: dict, digest: str) -> tuple[int, StreamPlan]:
    """Images to train on (whole batches) and the stream; config errors for a
    dataset the autoencoder cannot take."""
    if latent_samples.kind(manifest) != latent_samples.PIXELS:
        raise ConfigError(
            f"train_autoencoder.dataset: {cfg.dataset} holds latents; give a pixel dataset"
        )
    side = manifest["resolution"]
    if side % cfg.downsample:
        raise ConfigError(
            f"train_autoencoder.channels: {len(cfg.channels)} levels downsample by "
            f"{cfg.downsample}, which does not divide the dataset's {side} px"
        )
    if cfg.discriminator_start_images and side < 32:
        raise ConfigError(
            f"train_autoencoder.discriminator_start_images: the patch discriminator needs "
            f"images of 32 px or more, the dataset's are {side} px; set it to 0"
        )
    train = [TrainShard(s["name"], s["samples"], s["sha256"]) for s in manifest["shards"]]
    train = [t for t, s in zip(train, manifest["shards"], strict=True) if s["split"] == "train"]
    count = sum(t.samples for t in train)
    if count < cfg.batch_size:
        raise ConfigError(
            f"train_autoencoder.batch_size: larger than the dataset's {count} training "
            f"images, got {cfg.batch_size}"
        )
    window = math.ceil(cfg.shuffle_window / cfg.batch_size) * cfg.batch_size
    stream = StreamPlan(cfg.seed, digest, tuple(train), cfg.batch_size, window, cfg.hflip)
    return math.ceil(cfg.images / cfg.batch_size) * cfg.batch_size, stream


def validation_scores(
    files: dict[str, bytes], dataset: str, manifest: dict, limit: int
) -> dict[str, float]:
    """PSNR (dB, mean over images) and the pixel Frechet distance of the validation
    images' reconstructions (from their posteriors' means) to the images; empty
    when the split has fewer than two images."""
    images, _ = read_split(dataset, manifest, "validation", limit)
    if images is None or len(images) < 2:
        return {}
    import torch

    from pipeline.data.autoencode import Encoder
    from pipeline.maths.autoencoder_loss import psnr

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        encoder = Encoder(tmp, device="cpu")
        vae: Any = encoder.vae
        mean = encoder({"image": images})["mean"]
        with torch.no_grad():
            parts = [torch.from_numpy(mean[i : i + 16]) for i in range(0, len(mean), 16)]
            rec = torch.cat([vae.decode(z).sample for z in parts]).clamp(-1, 1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    pixels = ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return {
        "psnr": float(psnr(x, rec).mean()),
        "fd_pixel": metrics.frechet_distance(pixel_features(images), pixel_features(pixels)),
    }
