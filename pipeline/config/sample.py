"""The config of the batch sampling task."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import ClassVar, Literal

from pipeline.config.core import MAX_BATCH, MAX_IMAGES, MAX_SEED, MAX_SHARD, MAX_WORKERS, Checked
from pipeline.config.train import resolve_tracking_uri

SamplerName = Literal[
    "euler", "heun", "dpmpp_2m", "euler_ancestral", "edm_stochastic", "dpmpp_2m_sde", "restart"
]
SAMPLER_NAMES: tuple[SamplerName, ...] = typing.get_args(SamplerName)

DEFAULT_SAMPLER: SamplerName = "dpmpp_2m_sde"
DEFAULT_STEPS = 25
DEFAULT = f"{DEFAULT_SAMPLER}:{DEFAULT_STEPS}"
"""The sampler of tasks.sample, tasks.evaluate and the nightly unless told: DPM-Solver++(2M)
SDE (its default eta 0.5, s_noise 1, midpoint correction), 25 steps = 25 network
evaluations. The sampler study (bench/quality.py, bench/results/quality-cpu2.json)
chose it on one set of seeds over three trained models per dataset: of the settings
this config can name (a sampler and its steps) at <= 35 evaluations, the one whose
worse mean pixel-FD ratio to the 1000-step Euler ancestral sampler over two datasets
is least. README's "Which sampler" gives its ratios on other seeds, with intervals."""

MAX_STEPS = 10_000
"""Sampler steps: ten times the 1000-step stochastic reference."""
MAX_GUIDANCE = 100
"""Classifier-free guidance: common scales are 1 to 10."""
MAX_DRAWS = 1000
"""Draws of one image: a gate that rejects more is mis-set."""

_REGISTRY_REF = re.compile(r"^[A-Za-z0-9_.-]+(@[A-Za-z0-9_-]+|/\d+)$")


def is_registry_ref(model: str) -> bool:
    """`name@alias` or `name/version`, against a checkpoint location."""
    return bool(_REGISTRY_REF.match(model)) and not model.startswith(".")


@dataclasses.dataclass(frozen=True)
class SampleConfig(Checked):
    """Generate images with a trained model into webdataset shards in object storage."""

    SECTION: ClassVar[str] = "sample"

    model: str
    """The model: `name@alias` or `name/version` in the MLflow registry, or a
    checkpoint folder (local or `s3://`) written by `tasks.train` (its EMA weights)."""
    output: str
    """Folder or `s3://` prefix that receives the shards and the manifest."""
    images: int = 10_000
    """Images to generate."""
    samples_per_shard: int = 1000
    """Images per shard: shard i holds seeds [i*S, (i+1)*S). A shard is what an
    actor samples at a time and what a re-run skips once written: a job of fewer
    shards than actors leaves actors idle; one of smaller shards makes more
    requests to the object store (docs/scaling.md)."""
    sampler: SamplerName = DEFAULT_SAMPLER
    """The sampler (pipeline.maths.solvers), with its own settings. Default:
    dpmpp_2m_sde, DPM-Solver++(2M) SDE with eta 0.5 at 25 steps, the sampler study's
    choice (`DEFAULT`)."""
    steps: int = DEFAULT_STEPS
    """Sampler steps: one network evaluation each (Heun, EDM's stochastic sampler
    and restart evaluate the network 2*steps-1 times, restart 12 more with its
    defaults). Default: 25."""
    guidance: float = 1.0
    """Classifier-free guidance scale: 1 is none; above 1 trades diversity for
    fidelity to the label, each network call then holding its images twice (with
    and without their labels). Needs a class-conditional model."""
    labels: str = "uniform"
    """Class labels: `uniform` (each image's drawn from its seed), `none`
    (unconditional), or one class name for every image."""
    seed: int = 0
    """Job seed: image k comes from a generator seeded from (seed, k)."""
    batch_size: int = 64
    """Images sampled together on an actor: memory and speed only, never the pixels;
    a multiple of network_batch."""
    network_batch: int = 16
    """Images per network call, padded when fewer: fixed for the job, because the
    same images in calls of another size differ in the last bits."""
    actors: int = 0
    """Sampling actors, one GPU each when GPUs are used; default: one per GPU of the
    cluster, or one per CPU (one thread each) without GPUs, and never more than the
    shards to write. The pixels do not depend on it."""
    use_gpu: bool | None = None
    """Sample on GPUs; default: when the Ray cluster has any."""
    autoencoder: str = ""
    """A latent model's autoencoder (folder or `s3://`), to decode its latents;
    default: where its model card says. It must be the one the model's dataset was
    encoded with (the same digest)."""
    dataset: str = ""
    """The pixel dataset of the model's training images: each image is checked
    against them for copies, and labelled by its judge (the evaluation's
    label-fidelity classifier). Default: the one the model card names (for a
    latent model, the pixel dataset its latents were encoded from); without one,
    nothing is checked."""
    check_copies: bool = True
    """Look up each image's nearest training image and its copy ratio (Carlini
    et al. 2023: the distance to it over the mean distance to the 50 nearest, in
    pixels averaged down to 16 px, mirrored images included); recorded in its
    `{key}.json` and the dataset card."""
    max_copy_ratio: float = 0.2
    """An image whose copy ratio is below this is flagged as a copy. Measured
    (bench/gate.py): no real digit held out from the others falls below 0.256
    (1,797 in ten folds), and exact or mirrored copies fall below 0.003."""
    drop_copies: bool = False
    """Replace flagged copies with further draws instead of keeping them flagged."""
    min_label_confidence: float = 0.0
    """Keep only images that the judge gives their label with at least this
    probability, drawing further seeds for the others (0: keep all)."""
    max_draws: int = 32
    """Draws of one image before the job stops, when the gate keeps rejecting it."""
    tracking_uri: str = ""
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    experiment: str = "sampling"
    """MLflow experiment of the job's run (named after the output prefix)."""

    def __post_init__(self) -> None:
        self.check(bool(self.model), "model", "must be name@alias, name/version or a checkpoint")
        if not is_registry_ref(self.model):
            self.locate("model")
        self.locate("output")
        if self.autoencoder:
            self.locate("autoencoder")
        self.check(self.images > 0, "images", "must be a positive integer")
        self.check(self.samples_per_shard > 0, "samples_per_shard", "must be a positive integer")
        self.check(
            self.sampler in SAMPLER_NAMES, "sampler", f"must be one of {', '.join(SAMPLER_NAMES)}"
        )
        self.check(self.steps > 0, "steps", "must be a positive integer")
        self.check(self.guidance >= 0, "guidance", "must be >= 0")
        self.check(bool(self.labels), "labels", "must be uniform, none or a class name")
        self.check(0 <= self.seed <= MAX_SEED, "seed", "must be in 0..2**63-1")
        self.check(self.network_batch > 0, "network_batch", "must be a positive integer")
        self.at_most(MAX_BATCH, "network_batch")
        self.check(
            self.batch_size > 0 and self.batch_size % self.network_batch == 0,
            "batch_size",
            f"must be a multiple of network_batch ({self.network_batch})",
        )
        self.check(self.actors >= 0, "actors", "must be >= 0 (0: one per GPU, or per CPU)")
        if self.dataset:
            self.locate("dataset")
        self.check(0 <= self.max_copy_ratio <= 1, "max_copy_ratio", "must be in 0..1")
        self.check(0 <= self.min_label_confidence <= 1, "min_label_confidence", "must be in 0..1")
        self.check(self.max_draws > 0, "max_draws", "must be a positive integer")
        self.at_most(MAX_DRAWS, "max_draws")
        self.check(self.check_copies or not self.drop_copies, "drop_copies", "needs check_copies")
        self.check(bool(self.experiment), "experiment", "must be a non-empty name")
        self.at_most(MAX_IMAGES, "images")
        self.at_most(MAX_SHARD, "samples_per_shard")
        self.at_most(MAX_STEPS, "steps")
        self.at_most(MAX_GUIDANCE, "guidance")
        self.at_most(MAX_BATCH, "batch_size")
        self.at_most(MAX_WORKERS, "actors")
        object.__setattr__(self, "tracking_uri", resolve_tracking_uri(self.tracking_uri))
