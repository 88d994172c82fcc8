"""The configs of evaluation and promotion."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from pipeline.config.core import MAX_BATCH, MAX_SEED, Checked
from pipeline.config.sample import (
    DEFAULT,
    MAX_GUIDANCE,
    MAX_STEPS,
    SAMPLER_NAMES,
    SamplerName,
    is_registry_ref,
)
from pipeline.config.train import resolve_tracking_uri

LOWER_IS_BETTER = ("fd_pixel", "swd_pixel", "heldout_loss", "fid", "kid")
HIGHER_IS_BETTER = ("precision", "recall", "label_fidelity", "cas")
METRICS = LOWER_IS_BETTER + HIGHER_IS_BETTER
"""What `tasks.evaluate` reports and `tasks.promote` can decide on."""
MAX_EMA_LENGTH = 12**-0.5
"""0.2887: the widest post-hoc EMA length (`pipeline.maths.phema.MAX_STD`, a flat
average of all training; named here so that configs do not import torch)."""
MAX_EVAL_IMAGES = 10_000_000
"""Images generated, referenced or held out by one evaluation (FID uses 50,000)."""


def parse_sampler(text: str) -> tuple[SamplerName, int]:
    """`heun:18` -> ("heun", 18); a ValueError naming what is wrong."""
    name, _, steps = text.partition(":")
    for known in SAMPLER_NAMES:
        if name == known and steps.isdecimal() and 1 <= int(steps) <= MAX_STEPS:
            return known, int(steps)
    raise ValueError(
        f"expected sampler:steps with a sampler of {', '.join(SAMPLER_NAMES)} "
        f"and 1..{MAX_STEPS} steps"
    )


def check_ema_lengths(cfg: Checked, field: str) -> None:
    """Each post-hoc EMA length in `cfg.<field>` is a width a power-function
    profile can have, and none is given twice."""
    lengths = getattr(cfg, field)
    cfg.check(
        all(0 < length < MAX_EMA_LENGTH for length in lengths),
        field,
        f"each length (EDM2's sigma_rel) must be in (0, {MAX_EMA_LENGTH:.4f})",
    )
    cfg.check(len(set(lengths)) == len(lengths), field, "must not repeat a length")


REFERENCE_IMAGES = 10_000
"""The default reference sample: also what generation's judge is trained on."""
HELDOUT_IMAGES = 1000
"""The default validation images: also what generation's CAS is tested on."""


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(Checked):
    """Score a model against its dataset: samples from fixed seeds against the
    dataset's reference statistics, and the held-out denoising loss."""

    SECTION: ClassVar[str] = "evaluate"

    model: str
    """The model: `name@alias` or `name/version` in the MLflow registry, or a
    checkpoint folder written by `tasks.train`."""
    dataset: str
    """A dataset written by `tasks.preprocess`: its train split is the reference,
    its validation split gives the held-out loss. Reference statistics are computed
    once per manifest version and kept beside it, under `reference/`."""
    output: str = "evaluations"
    """Folder or `s3://` prefix that receives one JSON file of results per model,
    dataset version and settings."""
    images: int = 1000
    """Images generated from seeds 0..images-1 (the same seeds for every model)."""
    sampler: str = DEFAULT
    """The sampler and its steps whose samples are scored. Default: dpmpp_2m_sde:25,
    DPM-Solver++(2M) SDE with eta 0.5 at 25 network evaluations, the sampler
    study's choice (pipeline.config.sample.DEFAULT)."""
    compare: tuple[str, ...] = ()
    """More samplers scored the same way, reported beside the first, e.g.
    `euler_ancestral:1000` (the 1000-step stochastic sampler)."""
    guidance: float = 1.0
    """Classifier-free guidance scale of the samples: 1 is none; above 1 trades
    diversity for fidelity to the label (one batched network call per step).
    Ignored for unconditional models."""
    ema_length: tuple[float, ...] = ()
    """Post-hoc EMA lengths (EDM2's sigma_rel, each in (0, 0.2887)) at which the
    model is also scored, e.g. `0.05,0.1,0.2`: its weights at each length are
    reconstructed from the power-function snapshots its training run stored, and
    each length is scored like the model's own weights, with its own results.
    Empty: only the model's own EMA weights (the fixed half-life EMA that training
    registers)."""
    seed: int = 0
    """Seed of the samples and of the held-out noise."""
    reference_images: int = REFERENCE_IMAGES
    """At most this many train images make the reference: a sample by sha256 (the
    shards in the order of theirs, each shard's keys in the order of theirs), so
    the reference does not grow with the dataset, nor cost more to read."""
    max_copy_ratio: float = 0.2
    """A sample whose copy ratio (its distance to the nearest training image over
    the mean distance to the 50 nearest, as tasks.sample measures it) is below
    this counts as a copy: `copy_rate` is the share of such samples, which
    promotion can refuse (promote.max_copy_rate)."""
    heldout_images: int = HELDOUT_IMAGES
    """At most this many validation images give the held-out loss."""
    heldout_sigmas: tuple[float, ...] = (0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)
    """Noise levels of the held-out loss; each image gets fixed noise at each."""
    neighbours: int = 3
    """k of the k-nearest-neighbour precision and recall."""
    inception: str = ""
    """A local TorchScript Inception-v3 feature extractor (NVIDIA's
    `inception-2015-12-05.pt`); with it FID and KID are computed, without it they are
    reported as not computed."""
    batch_size: int = 256
    """Images per network call."""
    use_gpu: bool | None = None
    """Evaluate on a GPU; default: when the Ray cluster has any."""
    tracking_uri: str = ""
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""

    def __post_init__(self) -> None:
        self.check(bool(self.model), "model", "must be name@alias, name/version or a checkpoint")
        if not is_registry_ref(self.model):
            self.locate("model")
        self.locate("dataset")
        self.locate("output")
        for field in ("images", "reference_images", "heldout_images", "batch_size"):
            self.check(getattr(self, field) > 1, field, "must be an integer above 1")
        # Every sample and reference image is held in memory at once.
        self.at_most(MAX_EVAL_IMAGES, "images", "reference_images", "heldout_images")
        self.at_most(MAX_BATCH, "batch_size")
        for text in (self.sampler, *self.compare):
            try:
                parse_sampler(text)
            except ValueError as e:
                field = "sampler" if text == self.sampler else "compare"
                self.check(False, field, str(e))
        self.check(
            bool(self.heldout_sigmas) and all(s > 0 for s in self.heldout_sigmas),
            "heldout_sigmas",
            "must be positive numbers",
        )
        self.at_most(1000, "heldout_sigmas")  # EDM samples from sigma 80
        self.check(0 <= self.max_copy_ratio <= 1, "max_copy_ratio", "must be in 0..1")
        self.check(self.neighbours > 0, "neighbours", "must be a positive integer")
        self.at_most(1000, "neighbours")
        self.check(self.guidance >= 0, "guidance", "must be >= 0")
        self.at_most(MAX_GUIDANCE, "guidance")
        check_ema_lengths(self, "ema_length")
        self.check(0 <= self.seed <= MAX_SEED, "seed", "must be in 0..2**63-1")
        object.__setattr__(self, "tracking_uri", resolve_tracking_uri(self.tracking_uri))


@dataclasses.dataclass(frozen=True)
class PromoteConfig(Checked):
    """Move the `champion` alias to a candidate version when it beats the champion."""

    SECTION: ClassVar[str] = "promote"

    model_name: str
    """The registered model."""
    version: int = 0
    """The candidate version; 0: the latest."""
    metric: str = "fd_pixel"
    """What decides, as evaluated by `tasks.evaluate` on the same data and settings
    for both: fd_pixel, swd_pixel, heldout_loss, fid, kid (lower is better),
    precision, recall, label_fidelity or cas (higher is better; the last two need
    class labels)."""
    margin: float = 0.02
    """The candidate must be better by this fraction of the champion's value
    (0.02: 2% lower, or higher for the higher-is-better metrics)."""
    max_copy_rate: float = 1.0
    """Refuse a candidate whose samples copy training images more often than
    this (`copy_rate` of its evaluation, see evaluate.max_copy_ratio), whatever
    its other scores: a model that copies is never promoted. 1: no gate (the
    nightly's default is 0.05)."""
    alias: str = "champion"
    """The alias that marks the model in use."""
    key: str = ""
    """The evaluation (`eval.key`, a dataset version and settings) whose scores are
    compared; default: the candidate's latest."""
    tracking_uri: str = ""
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""

    def __post_init__(self) -> None:
        self.check(bool(self.model_name), "model_name", "must name a registered model")
        self.check(
            0 <= self.version < 2**31,  # MLflow keeps versions as 32-bit integers
            "version",
            "must be a version number (below 2**31), or 0 for the latest",
        )
        self.check(self.metric in METRICS, "metric", f"must be one of {', '.join(METRICS)}")
        self.check(0 <= self.margin < 1, "margin", "must be in [0, 1)")
        self.check(0 <= self.max_copy_rate <= 1, "max_copy_rate", "must be in 0..1")
        self.check(bool(self.alias), "alias", "must be a non-empty name")
        object.__setattr__(self, "tracking_uri", resolve_tracking_uri(self.tracking_uri))
