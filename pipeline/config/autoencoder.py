"""The config of the autoencoder training task."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from pipeline.config.core import MAX_BATCH, MAX_IMAGES, MAX_SEED, MAX_WORKERS, Checked
from pipeline.config.train import MAX_SHUFFLE_WINDOW, resolve_tracking_uri


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(Checked):
    """Train a diffusers AutoencoderKL on a pixel dataset with Ray Train; track it in
    MLflow and register it as a folder `AutoencoderKL.from_pretrained` loads.

    The loss is L1 + KL, with an optional patch discriminator (hinge loss) from
    `discriminator_start_images` on. LPIPS, the perceptual loss of Stable
    Diffusion's autoencoders, is left out: its VGG weights cannot be had offline.
    Reconstructions are then sharp where L1 and the discriminator make them so."""

    SECTION: ClassVar[str] = "train_autoencoder"

    dataset: str
    """A pixel dataset written by `tasks.preprocess` (folder or `s3://`): training
    reads its `train` shards; PSNR and pixel FD are measured on `validation`."""
    run_name: str = "autoencoder"
    """Name of the run: its checkpoints live under `storage/run_name`, and the same
    name resumes it."""
    storage: str = "runs"
    """Where runs keep their checkpoints: a folder (shared by all nodes) or `s3://`."""
    channels: tuple[int, ...] = (32, 64, 64)
    """Channels of each level (diffusers' block_out_channels): the downsampling
    factor is 2^(levels - 1), 4 with three levels; SD's VAE is 128,256,512,512 (f = 8)."""
    latent_channels: int = 4
    """Channels of the latent."""
    layers_per_block: int = 1
    """Resnet layers per level."""
    images: int = 20_000
    """Training length in images seen, all workers together."""
    batch_size: int = 32
    """Global batch: images per optimizer step over all workers together."""
    lr: float = 1e-3
    """Adam learning rate (the discriminator's too)."""
    kl_weight: float = 1e-3
    """Weight of the KL to N(0, I), per pixel (so it does not depend on the side)."""
    discriminator_start_images: int = 0
    """Images seen before the patch discriminator joins the loss; 0: never."""
    discriminator_weight: float = 0.1
    """Weight of the discriminator's term in the autoencoder's loss."""
    validation_images: int = 512
    """Validation images for PSNR and pixel FD at the end (fewer if the split has fewer)."""
    hflip: bool = False
    """Flip images left-right at random (a pure function of the stream position)."""
    shuffle_window: int = 4096
    """Images shuffled together (see `tasks.train --help`)."""
    workers: int = 1
    """Ray Train workers (one per GPU when GPUs are used)."""
    use_gpu: bool | None = None
    """Train on GPUs; default: when the Ray cluster has any."""
    cpus_per_worker: float = 1.0
    """CPUs reserved by each worker."""
    torch_threads: int = 0
    """torch's CPU threads in each worker; 0: as many as the CPUs it reserves
    (Ray's OMP_NUM_THREADS). More lets a CPU worker use the cores its readers
    leave idle between reads."""
    checkpoint_every_images: int = 5_000
    """Checkpoint interval in images seen (and at the end)."""
    log_every_images: int = 1_000
    """MLflow metrics interval in images seen."""
    seed: int = 0
    """Seeds the weights, the stream's order and each image's latent draw."""
    max_failures: int = 3
    """Restarts from the last checkpoint after a worker or node is lost."""
    model_name: str = ""
    """Registry name of the result; default: run_name."""
    experiment: str = "autoencoders"
    """MLflow experiment."""
    tracking_uri: str = ""
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""

    def __post_init__(self) -> None:
        self.locate("dataset")
        self.locate("storage")
        self.check(bool(self.run_name), "run_name", "must be a non-empty name")
        self.check(
            0 < len(self.channels) <= 6 and all(0 < c <= 4096 for c in self.channels),
            "channels",
            "must be 1 to 6 levels of 1..4096 channels",
        )
        groups = min(32, min(self.channels or (1,)))
        self.check(
            all(c % groups == 0 for c in self.channels),
            "channels",
            f"must each be a multiple of the group norm's {groups} groups (the smallest, up to 32)",
        )
        self.check(0 < self.latent_channels <= 64, "latent_channels", "must be in 1..64")
        self.check(0 < self.layers_per_block <= 8, "layers_per_block", "must be in 1..8")
        self.check(self.images > 0, "images", "must be a positive integer")
        self.at_most(MAX_IMAGES, "images")
        self.check(self.batch_size > 0, "batch_size", "must be a positive integer")
        self.at_most(MAX_BATCH, "batch_size")
        self.check(self.workers > 0, "workers", "must be a positive integer")
        self.at_most(MAX_WORKERS, "workers")
        self.check(
            self.batch_size % self.workers == 0,
            "batch_size",
            f"must be a multiple of workers ({self.workers})",
        )
        self.check(self.lr > 0, "lr", "must be > 0")
        self.at_most(1, "lr")
        self.check(self.kl_weight >= 0, "kl_weight", "must be >= 0")
        self.check(self.discriminator_weight >= 0, "discriminator_weight", "must be >= 0")
        self.at_most(1_000_000, "kl_weight", "discriminator_weight")
        for name in ("discriminator_start_images", "validation_images"):
            self.check(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("checkpoint_every_images", "log_every_images", "shuffle_window"):
            self.check(getattr(self, name) > 0, name, "must be a positive integer")
        self.at_most(
            MAX_IMAGES,
            "discriminator_start_images",
            "validation_images",
            "checkpoint_every_images",
            "log_every_images",
        )
        self.at_most(MAX_SHUFFLE_WINDOW, "shuffle_window")
        self.check(0 <= self.seed <= MAX_SEED, "seed", "must be in 0..2**63-1")
        self.check(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        self.at_most(1024, "cpus_per_worker")
        self.check(self.torch_threads >= 0, "torch_threads", "must be >= 0")
        self.at_most(1024, "torch_threads")
        self.check(self.max_failures >= 0, "max_failures", "must be >= 0")
        self.at_most(1000, "max_failures")
        self.check(bool(self.experiment), "experiment", "must be a non-empty name")
        object.__setattr__(self, "tracking_uri", resolve_tracking_uri(self.tracking_uri))

    @property
    def norm_groups(self) -> int:
        """GroupNorm's groups: the narrowest level's channels, up to 32."""
        return min(32, min(self.channels))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)
