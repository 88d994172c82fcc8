"""The config of the nightly pipeline."""

from __future__ import annotations

import dataclasses
import datetime
import re
from typing import ClassVar

from pipeline.config.core import Checked
from pipeline.config.evaluate import METRICS, parse_sampler
from pipeline.config.train import PRESET_NAMES, resolve_tracking_uri


def today() -> str:
    return datetime.datetime.now(datetime.UTC).date().isoformat()


@dataclasses.dataclass(frozen=True)
class NightlyConfig(Checked):
    """Preprocess the new raw images, retrain from the champion, evaluate, promote,
    generate. Running the same night again changes nothing."""

    SECTION: ClassVar[str] = "nightly"

    raw: str = "nightly/raw/digits"
    """Where new raw images arrive (a folder or `s3://` prefix, class sub-folders
    optional); the inputs not yet in the dataset are the night's new data."""
    dataset: str = "nightly/datasets/digits"
    """The dataset the raw images are preprocessed into; each night with new data
    adds shards and a new manifest version, keeping the old shards."""
    storage: str = "nightly/runs"
    """Where training runs keep their checkpoints."""
    evaluations: str = "nightly/evaluations"
    """Where evaluation results (JSON) go."""
    samples: str = "nightly/samples"
    """Generated shards go to `samples/<night>/`."""
    model_name: str = "digits"
    """Registered model: each night's training adds a version; `champion` marks the best."""
    night: str = ""
    """The night's label (YYYY-MM-DD); default: today (UTC). It names the training run,
    so running the same night again resumes or skips it."""
    resolution: int = 8
    """Side of the preprocessed images."""
    preset: str = "tiny"
    """UNet preset of the model (its resolution must match)."""
    validation_fraction: float = 0.1
    """Share of inputs held out (by a hash of their path) for the held-out loss."""
    images: int = 12_800
    """Images each night's training sees."""
    batch_size: int = 64
    """Global batch of training."""
    lr: float = 2e-3
    """Learning rate after the ramp-up."""
    lr_rampup_images: int = 1_000
    """Images of the learning-rate ramp-up."""
    ema_halflife_images: int = 2_000
    """Half-life of the weight average, in images."""
    workers: int = 1
    """Ray Train workers."""
    use_gpu: bool | None = None
    """Train, evaluate and generate on GPUs; default: when the Ray cluster has any
    when each step starts (set true on clusters whose GPU nodes autoscale from zero)."""
    cpus_per_worker: float = 1.0
    """CPUs each training worker reserves."""
    eval_images: int = 1000
    """Images generated (from fixed seeds) to score each model."""
    eval_sampler: str = "heun:18"
    """Sampler and steps of the scored samples (heun:18 is 35 network evaluations)."""
    eval_compare: tuple[str, ...] = ()
    """More samplers scored beside it, e.g. euler_ancestral:1000 (reported, not used
    to decide)."""
    metric: str = "fd_pixel"
    """What promotion decides on (see tasks.promote)."""
    margin: float = 0.0
    """How much better (a fraction) the candidate must be to become champion."""
    sample_images: int = 1000
    """Images the champion generates into `samples/<night>/`; 0: none."""
    sample_sampler: str = "heun:18"
    """Sampler and steps of the generated images."""
    tracking_uri: str = ""
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""

    def __post_init__(self) -> None:
        for field in ("raw", "dataset", "storage", "evaluations", "samples"):
            self.locate(field)
        if not self.night:
            object.__setattr__(self, "night", today())
        self.check(
            bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.night)), "night", "must be YYYY-MM-DD"
        )
        self.check(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.model_name)), "model_name",
                   "must be letters, digits, '_', '.' or '-'")  # fmt: skip
        presets = ", ".join(PRESET_NAMES)
        self.check(self.preset in PRESET_NAMES, "preset", f"must be one of {presets}")
        for field in ("resolution", "images", "batch_size", "workers", "eval_images"):
            self.check(getattr(self, field) > 0, field, "must be a positive integer")
        self.check(self.sample_images >= 0, "sample_images", "must be >= 0")
        self.check(self.metric in METRICS, "metric", f"must be one of {', '.join(METRICS)}")
        for field in ("eval_sampler", "sample_sampler"):
            try:
                parse_sampler(getattr(self, field))
            except ValueError as e:
                self.check(False, field, str(e))
        object.__setattr__(self, "tracking_uri", resolve_tracking_uri(self.tracking_uri))
