"""What each Ray Train worker of `tasks.train_autoencoder` runs.

The stream is the denoiser's (`ingest.batches`: shuffled every pass, exactly
resumable, the same for any number of workers), and so is each image's latent
draw: z = mean + std * e with e from its position's seed (`Order.latent_seeds`).
Each step: the autoencoder's L1 + KL (and, from `discriminator_start_images`
on, the patch discriminator's adversarial term), then the discriminator's hinge
loss on the same images. Rank 0 writes the checkpoints: the autoencoder as
`save_pretrained` writes it (`autoencoder/`), both optimizers and the
discriminator as safetensors, and `state.json`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import from_dict
from pipeline.config.autoencoder import AutoencoderConfig
from pipeline.config.records import StreamPlan
from pipeline.data.order import Order
from pipeline.data.stream import Reading
from pipeline.edges import checkpoint, tracking
from pipeline.jobs.train import ingest
from pipeline.maths.autoencoder_loss import (
    PatchDiscriminator,
    autoencoder_loss,
    hinge_discriminator_loss,
    psnr,
)
from pipeline.maths.edm import seeded_normal

AUTOENCODER = "autoencoder"
"""The checkpoint's folder holding the autoencoder, as `save_pretrained` writes it."""
STATE = "state.json"
D_OPTIMIZER = "discriminator_optimizer.safetensors"


def new_autoencoder(cfg: AutoencoderConfig) -> Any:
    """The AutoencoderKL `cfg` describes, its weights from `cfg.seed`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    levels = len(cfg.channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
    )


class Reconstruct(torch.nn.Module):
    """Encode, draw, decode: one forward, so that DDP sees the whole step."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, ...]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * e
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


def train_loop_per_worker(config: dict) -> None:
    cfg: AutoencoderConfig = from_dict(AutoencoderConfig, config["train"])
    plan: StreamPlan = config["stream"]
    images, run_id = config["images"], config["run_id"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)

    vae = new_autoencoder(cfg).to(device)
    discriminator = PatchDiscriminator().to(device) if cfg.discriminator_start_images else None
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    d_optimizer = None
    if discriminator is not None:
        d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    images_seen = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            images_seen = _load(Path(folder), vae, optimizer, discriminator, d_optimizer)
    model = ray.train.torch.prepare_model(Reconstruct(vae))
    critic = None if discriminator is None else ray.train.torch.prepare_model(discriminator)

    order = Order(plan)
    prefix = config["dataset"]
    reading = Reading(prefix, rank, world, images_seen, images, config["resolution"], False)
    batches = ingest.batches(plan, reading, 2, pin=device.type == "cuda")
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, psnr, d_loss, steps
    while images_seen < images:
        batch = next(batches)
        assert batch.image is not None
        x = batch.image.to(device, non_blocking=True).float() / 127.5 - 1.0
        shape = (cfg.latent_channels, x.shape[2] // cfg.downsample, x.shape[3] // cfg.downsample)
        seeds = order.latent_seeds(batch.position)
        e = seeded_normal(seeds, shape[0] * shape[1] * shape[2], device).reshape(-1, *shape)
        rec, mean, logvar = model(x, e)
        loss = autoencoder_loss(x, rec, mean, logvar, cfg.kl_weight)
        adversarial = discriminator is not None and images_seen >= cfg.discriminator_start_images
        if adversarial:
            assert discriminator is not None
            # Through the bare discriminator, frozen: its gradients are its own step's.
            discriminator.requires_grad_(False)
            loss = loss - cfg.discriminator_weight * discriminator(rec).mean()
            discriminator.requires_grad_(True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        d_loss = torch.zeros((), device=device)
        if adversarial and critic is not None and d_optimizer is not None:
            # From discriminator_start_images on, as its term in the loss above
            # (taming's disc_start): trained from the start, it would join
            # overtrained. One forward of real and reconstructed together (DDP
            # allows one a step).
            real, fake = critic(torch.cat([x, rec.detach()])).split(len(x))
            d_loss = hinge_discriminator_loss(real, fake)
            d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            d_optimizer.step()
        with torch.no_grad():
            step = torch.stack([loss, psnr(x, rec).mean(), d_loss, torch.ones((), device=device)])
            sums += step.double()
        before, images_seen = images_seen, images_seen + cfg.batch_size
        done = images_seen >= images
        at_log = _crossed(before, images_seen, cfg.log_every_images) or done
        at_ckpt = _crossed(before, images_seen, cfg.checkpoint_every_images) or done
        if not (at_log or at_ckpt):
            continue
        if world > 1:
            torch.distributed.all_reduce(sums)
        if not torch.isfinite(sums).all():
            raise FloatingPointError(f"the loss is not finite at {images_seen} images seen")
        count = float(sums[3])
        metrics = {
            "loss": float(sums[0]) / count,
            "psnr": float(sums[1]) / count,
            "discriminator_loss": float(sums[2]) / count,
            "images_seen": images_seen,
        }
        sums.zero_()
        if at_log and rank == 0:
            tracking.log_metrics(cfg.tracking_uri, run_id, metrics, step=images_seen)
        if at_ckpt:
            _report(rank, vae, optimizer, discriminator, d_optimizer, images_seen, metrics, done)


def _crossed(before: int, after: int, every: int) -> bool:
    return before // every != after // every


def _report(
    rank: int,
    vae: Any,
    optimizer: torch.optim.Optimizer,
    discriminator: torch.nn.Module | None,
    d_optimizer: torch.optim.Optimizer | None,
    images_seen: int,
    metrics: dict[str, float],
    done: bool,
) -> None:
    """Every rank reports; rank 0 attaches the checkpoint."""
    report: dict[str, Any] = {**metrics, "status": "done" if done else "running"}
    name = f"checkpoint-{images_seen:012d}"
    if rank != 0:
        ray.train.report(report, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        vae.save_pretrained(folder / AUTOENCODER)
        checkpoint.save_optimizer(folder / checkpoint.OPTIMIZER, optimizer)
        if discriminator is not None and d_optimizer is not None:
            save_file(_tensors(discriminator), folder / "discriminator.safetensors")
            checkpoint.save_optimizer(folder / D_OPTIMIZER, d_optimizer)
        (folder / STATE).write_text(json.dumps({"images_seen": images_seen}))
        ray.train.report(
            report, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
        )


def _load(
    folder: Path,
    vae: Any,
    optimizer: torch.optim.Optimizer,
    discriminator: torch.nn.Module | None,
    d_optimizer: torch.optim.Optimizer | None,
) -> int:
    """Restore a checkpoint's weights and optimizers; its images seen."""
    weights = load_file(folder / AUTOENCODER / "diffusion_pytorch_model.safetensors")
    vae.load_state_dict(weights)
    checkpoint.load_optimizer(folder / checkpoint.OPTIMIZER, optimizer)
    if discriminator is not None and d_optimizer is not None:
        if (folder / "discriminator.safetensors").exists():  # it may have joined since
            discriminator.load_state_dict(load_file(folder / "discriminator.safetensors"))
            checkpoint.load_optimizer(folder / D_OPTIMIZER, d_optimizer)
    return int(json.loads((folder / STATE).read_text())["images_seen"])


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
