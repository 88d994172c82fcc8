"""The config of the training task."""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar, Literal

from pipeline.config.core import MAX_BATCH, MAX_IMAGES, MAX_SEED, MAX_WORKERS, Checked
from pipeline.config.model import ModelConfig

MAX_SHUFFLE_WINDOW = 1 << 24
"""The largest shuffle window: 16M images (what one worker's reader would hold)."""
SNAPSHOTS_A_RUN = 32
"""Post-hoc EMA snapshots a run keeps by default, up to `MAX_SNAPSHOT_INTERVAL`."""
MAX_SNAPSHOT_INTERVAL = 8 << 20
"""The longest default interval between snapshots: 8 Mi images, EDM2's
(NVlabs/edm2 train_edm2.py, snapshot_nimg)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig(Checked):
    """Train a denoiser on a preprocessed dataset with Ray Train; track it in MLflow."""

    SECTION: ClassVar[str] = "train"

    dataset: str
    """A dataset written by `tasks.preprocess` (a folder or `s3://` prefix holding its
    committed `manifest.json`); training reads its `train` shards."""
    run_name: str = "diffusion"
    """Name of the run: its checkpoints live under `storage/run_name`, and the same
    name resumes it (Ray Train and MLflow alike)."""
    storage: str = "runs"
    """Where runs keep their checkpoints: a folder (shared by all nodes) or `s3://`."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The network: `--model.template` and overrides of its width and depth
    (`--model.channels 64 --model.channel_mult 1,2,2`); resolution and classes come
    from the dataset."""
    images: int = 100_000
    """Training length in images seen (the global batch counts once per step)."""
    epochs: float | None = None
    """If set, the length in passes over the train split; overrides `images`."""
    batch_size: int = 64
    """Global batch: images per optimizer step over all workers together."""
    micro_batch: int | None = None
    """Images per worker per forward/backward; smaller than batch_size / workers
    accumulates gradients. Default: batch_size / workers (no accumulation)."""
    workers: int = 1
    """Ray Train workers (processes, one per GPU when GPUs are used)."""
    use_gpu: bool | None = None
    """Train on GPUs; default: when the Ray cluster has any."""
    cpus_per_worker: float = 1.0
    """CPUs reserved by each worker (fractions leave room for Ray Data's readers)."""
    placement: Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"] = "PACK"
    """How workers are placed on nodes (Ray placement-group strategy)."""
    lr: float = 2e-3
    """Adam learning rate after the ramp-up. The defaults of lr, lr_rampup_images and
    ema_halflife_images fit small data and the tiny template (the digits: 2e-3, 1,000,
    4,000); for EDM-size networks on large datasets use EDM's 1e-3, 10,000,000 and
    500,000 (CIFAR-10 at batch 512). tasks.nightly and tasks.quickstart use these
    defaults too."""
    lr_rampup_images: int = 1_000
    """Images over which the learning rate rises linearly from 0 (EDM)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this norm."""
    ema_halflife_images: int = 4_000
    """Half-life of the weight average, in images (see lr for larger runs)."""
    ema_rampup_ratio: float = 0.05
    """Early in training the half-life is at most this fraction of the images seen."""
    label_dropout: float = 0.1
    """Share of labels replaced by "no label" (for classifier-free guidance); applies
    when the dataset has classes."""
    shuffle_window: int = 4096
    """Images shuffled together, rounded up to a multiple of batch_size. Every pass
    permutes the shards, then the images of each shard, then mixes the images of
    each window of this many (docs/architecture.md, the training stream); a global
    batch draws from one window. A worker holds its share of a window, about
    shuffle_window / workers encoded images, and each shard is read by about
    1 + samples_per_shard * workers / shuffle_window workers per pass."""
    readers: int = 2
    """Ray Data tasks reading and decoding at once for each worker (one CPU each).
    Each holds its share of a window: raise it when the GPUs wait for data and the
    nodes have CPUs to spare."""
    hflip: bool = False
    """Flip each training image left-right with probability 1/2. Off by default
    (as diffusers' --random_flip and EDM's --xflip): a mirrored digit or letter is
    not one. Turn it on for data whose mirror images are as real (faces, scenes)."""
    seed: int = 0
    """Seeds the weights and the training stream: the order of the images, and each
    image's flip, noise and label dropout, which follow its position in the stream
    (not the worker that reads it)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms on every worker, with cuDNN's deterministic
    kernels: a resumed run on GPUs then repeats an uninterrupted one bit for bit, at
    some cost in speed (ops without a deterministic kernel warn). The CPU step is
    deterministic without it."""
    bf16: bool = True
    """bf16 autocast on GPUs (ignored on CPUs)."""
    compile: bool | None = None
    """torch.compile the network (its first steps take longer, while it compiles).
    Default: on GPUs, where it pays; not on CPUs."""
    channels_last: bool | None = None
    """Keep the network's weights and batches in the channels_last memory layout,
    which GPU convolutions run fastest on. Default: on GPUs; not on CPUs."""
    checkpoint_every_images: int = 20_000
    """A checkpoint every this many images, and one at the end."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept in storage."""
    snapshot_every_images: int = 0
    """A post-hoc EMA snapshot at the first checkpoint from each multiple of this
    many images on, and one at the end. Snapshots outlive the checkpoints: an EMA
    length is reconstructed from them (tasks.evaluate --ema_length). 0: a 32nd of
    the images the run trains, at most 8,388,608 (8 Mi, EDM2's interval), so a
    run keeps about 32 snapshots up to 268 M images and one per 8 Mi beyond."""
    log_every_images: int = 1_000
    """Loss, learning rate and images/s go to MLflow this often."""
    sample_every_images: int = 50_000
    """A grid of EMA samples goes to MLflow this often (0: only at the end)."""
    max_failures: int = 3
    """Times Ray Train restarts the workers (a lost worker or node) from the last
    checkpoint before the run fails."""
    tracking_uri: str = ""
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    experiment: str = "diffusion"
    """MLflow experiment of the run."""
    model_name: str = ""
    """Registered model that receives the final EMA weights; default: run_name."""
    init_from: str = ""
    """Warm start: begin from this model's weights (`name@alias`, `name/version` or a
    checkpoint folder; its EMA weights) instead of random ones. The optimizer, the
    schedules and the images seen start from zero. A resumed run continues from its
    checkpoint and must name the same init_from."""

    def __post_init__(self) -> None:
        self.locate("dataset")
        self.locate("storage")
        self.check(
            bool(self.run_name) and "/" not in self.run_name,
            "run_name",
            "must be a non-empty name without '/'",
        )
        self.check(self.run_name not in (".", ".."), "run_name", "must not be . or ..")
        self.check(bool(self.experiment), "experiment", "must be a non-empty name")
        self.check(self.images > 0, "images", "must be a positive integer")
        self.check(self.epochs is None or self.epochs > 0, "epochs", "must be positive")
        self.at_most(1_000_000, "epochs")
        self.check(self.workers > 0, "workers", "must be a positive integer")
        self.at_most(MAX_WORKERS, "workers")
        self.check(
            self.batch_size > 0 and self.batch_size % self.workers == 0,
            "batch_size",
            f"must be a multiple of the number of workers ({self.workers})",
        )
        self.at_most(MAX_BATCH, "batch_size")
        per_worker = self.batch_size // self.workers
        self.check(
            self.micro_batch is None
            or (0 < self.micro_batch <= per_worker and per_worker % self.micro_batch == 0),
            "micro_batch",
            f"must divide batch_size / workers ({per_worker})",
        )
        self.check(self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")
        self.at_most(1024, "cpus_per_worker")
        self.check(self.lr > 0, "lr", "must be positive")
        self.at_most(1, "lr")
        self.check(self.lr_rampup_images >= 0, "lr_rampup_images", "must be >= 0")
        self.check(self.max_grad_norm > 0, "max_grad_norm", "must be positive")
        self.at_most(1_000_000, "max_grad_norm")  # any larger norm clips nothing either
        self.check(self.ema_halflife_images > 0, "ema_halflife_images", "must be positive")
        self.check(0 < self.ema_rampup_ratio <= 1, "ema_rampup_ratio", "must be in (0, 1]")
        self.check(0 <= self.label_dropout < 1, "label_dropout", "must be in [0, 1)")
        self.check(0 <= self.seed <= MAX_SEED, "seed", "must be in 0..2**63-1")
        self.check(self.shuffle_window > 0, "shuffle_window", "must be a positive integer")
        self.check(self.readers > 0, "readers", "must be a positive integer")
        self.at_most(1024, "readers")
        self.at_most(MAX_SHUFFLE_WINDOW, "shuffle_window")
        for field in ("checkpoint_every_images", "log_every_images"):
            self.check(getattr(self, field) > 0, field, "must be a positive integer")
        self.check(self.snapshot_every_images >= 0, "snapshot_every_images", "must be >= 0")
        self.check(self.sample_every_images >= 0, "sample_every_images", "must be >= 0")
        self.at_most(
            MAX_IMAGES,
            "images",
            "lr_rampup_images",
            "ema_halflife_images",
            "checkpoint_every_images",
            "snapshot_every_images",
            "log_every_images",
            "sample_every_images",
        )
        self.check(self.keep_checkpoints > 0, "keep_checkpoints", "must be a positive integer")
        self.check(self.max_failures >= 0, "max_failures", "must be >= 0")
        self.at_most(1000, "keep_checkpoints", "max_failures")
        object.__setattr__(self, "tracking_uri", resolve_tracking_uri(self.tracking_uri))

    def snapshot_interval(self, images: int) -> int:
        """`snapshot_every_images` of a run that trains `images` images, 0 resolved."""
        if self.snapshot_every_images:
            return self.snapshot_every_images
        return max(1, min(MAX_SNAPSHOT_INTERVAL, images // SNAPSHOTS_A_RUN))

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.workers

    @property
    def accumulation(self) -> int:
        return self.per_worker_batch // (self.micro_batch or self.per_worker_batch)


def resolve_tracking_uri(uri: str) -> str:
    """The MLflow tracking URI, with a local sqlite file made absolute (workers run
    in other folders)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + os.path.abspath(uri[len(prefix) :])
    return uri
