"""The config of the nightly pipeline."""

from __future__ import annotations

import dataclasses
import datetime
import re
from typing import ClassVar

from pipeline.config import locations
from pipeline.config.core import Checked, ConfigError, blame
from pipeline.config.data import PreprocessConfig
from pipeline.config.encode import EncodeConfig
from pipeline.config.evaluate import (
    METRICS,
    EvaluateConfig,
    PromoteConfig,
    check_ema_lengths,
    parse_sampler,
)
from pipeline.config.model import ModelConfig
from pipeline.config.sample import DEFAULT, SampleConfig, is_registry_ref
from pipeline.config.train import TrainConfig, resolve_tracking_uri

_RENAMED = {
    "preprocess.input": "raw",
    "preprocess.output": "dataset",
    "encode.dataset": "dataset",
    "encode.output": "latents",
    "encode.autoencoder": "autoencoder",
    "train.run_name": "model_name",
    "train.checkpoint_every_images": "images",
    "train.log_every_images": "images",
    "evaluate.model": "model_name",
    "evaluate.output": "evaluations",
    "evaluate.images": "eval_images",
    "evaluate.batch_size": "eval_images",
    "evaluate.sampler": "eval_sampler",
    "evaluate.compare": "eval_compare",
    "evaluate.guidance": "eval_guidance",
    "evaluate.ema_length": "ema_lengths",
    "sample.model": "model_name",
    "sample.output": "samples",
    "sample.images": "sample_images",
    "sample.sampler": "sample_sampler",
    "sample.steps": "sample_sampler",
    "sample.guidance": "sample_guidance",
    "sample.samples_per_shard": "sample_samples_per_shard",
}
"""The fields of the steps' configs that come from a field of another name here."""


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
    """Side of the preprocessed images, and so of the network: the template must be
    able to halve it (tiny: any even side from 8 to 512); with an autoencoder, the
    network's side is this over its downsampling factor."""
    autoencoder: str = ""
    """Train on latents: the AutoencoderKL (a `save_pretrained` folder, local or
    `s3://`, or a registered `name/version`) that encodes each night's new images
    into `latents` (tasks.encode, appending); empty: train on pixels. Models are
    scored on pixels either way."""
    latents: str = ""
    """Where the latent dataset goes; default: `dataset` with `-latents` appended."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The network: `--model.template` and overrides of its width and depth (see
    tasks.train --help). A warm start needs the champion's very architecture."""
    validation_fraction: float = 0.1
    """Share of inputs held out (by a hash of their path) for the held-out loss,
    label fidelity's ceiling and CAS."""
    images: int = 100_000
    """Images each night's training sees."""
    batch_size: int = 64
    """Global batch of training."""
    lr: float = TrainConfig.lr
    """Learning rate after the ramp-up (tasks.train's default)."""
    lr_rampup_images: int = TrainConfig.lr_rampup_images
    """Images of the learning-rate ramp-up (tasks.train's default)."""
    ema_halflife_images: int = TrainConfig.ema_halflife_images
    """Half-life of the weight average, in images (tasks.train's default)."""
    hflip: bool = False
    """Flip training images left-right at random (off: a mirrored digit is none)."""
    workers: int = 1
    """Ray Train workers."""
    use_gpu: bool | None = None
    """Train, evaluate and generate on GPUs; default: when the Ray cluster has any
    when each step starts (set true on clusters whose GPU nodes autoscale from zero)."""
    cpus_per_worker: float = 1.0
    """CPUs each training worker reserves."""
    eval_images: int = 1000
    """Images generated (from fixed seeds) to score each model."""
    eval_sampler: str = DEFAULT
    """Sampler and steps of the scored samples. Default: dpmpp_2m_sde:25,
    DPM-Solver++(2M) SDE with eta 0.5 at 25 network evaluations, the sampler
    study's choice (pipeline.config.sample.DEFAULT)."""
    eval_compare: tuple[str, ...] = ()
    """More samplers scored beside it, e.g. euler_ancestral:1000 (reported, not used
    to decide)."""
    eval_guidance: float = 1.0
    """Classifier-free guidance of the scored samples (1: none)."""
    ema_lengths: tuple[float, ...] = (0.05, 0.1, 0.2)
    """Post-hoc EMA lengths (EDM2's sigma_rel, each in (0, 0.2887)) scored beside the
    trained version's own weights (the fixed half-life EMA); the best of them by
    `metric` is tonight's candidate, registered as a new version when a
    reconstructed length wins, and the version carries the tag `ema_length` (the
    length, or `fixed`). Empty: off, the trained version is the candidate."""
    metric: str = "fd_pixel"
    """What promotion decides on (see tasks.promote)."""
    margin: float = 0.0
    """How much better (a fraction) the candidate must be to become champion."""
    sample_images: int = 1000
    """Images the champion generates into `samples/<night>/`; 0: none."""
    sample_samples_per_shard: int = 250
    """Images per shard of the generated images: 1,000 make 4, which keep the
    actors of a small CPU cluster busy (tasks.sample's default is 1,000)."""
    sample_sampler: str = DEFAULT
    """Sampler and steps of the generated images (default: dpmpp_2m_sde:25, as
    eval_sampler)."""
    sample_guidance: float = 1.0
    """Classifier-free guidance of the generated images (1: none; above 1 needs a
    labelled dataset)."""
    max_copy_rate: float = 0.05
    """A candidate whose scored samples copy training images more often than this
    is never promoted, whatever its `metric` (promote.max_copy_rate)."""
    max_copy_ratio: float = 0.2
    """Below this copy ratio a sample is a copy, when scored and when generated
    (evaluate.max_copy_ratio, sample.max_copy_ratio)."""
    drop_copies: bool = True
    """Generated images that copy a training image are drawn again (sample.drop_copies)."""
    min_label_confidence: float = 0.0
    """Generated images must be their label with this probability by the judge, or
    are drawn again (sample.min_label_confidence; needs a labelled dataset)."""
    tracking_uri: str = ""
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""

    def __post_init__(self) -> None:
        for field in ("raw", "dataset", "storage", "evaluations", "samples"):
            self.locate(field)
        if not self.night:
            object.__setattr__(self, "night", today())
        try:
            datetime.date.fromisoformat(self.night)
            well_formed = bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.night))
        except ValueError:
            well_formed = False
        self.check(well_formed, "night", "must be a date, YYYY-MM-DD")
        self.check(
            bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.model_name)),
            "model_name",
            "must be letters, digits, '_', '.' or '-'",
        )
        if self.autoencoder:
            if not is_registry_ref(self.autoencoder):
                self.locate("autoencoder")
            if not self.latents:
                object.__setattr__(self, "latents", self.dataset.rstrip("/") + "-latents")
            self.locate("latents")
        else:  # with an autoencoder the network's side is known once it is read
            self.model.resolve(self.resolution, field=f"{self.SECTION}.resolution")
        self.check(self.sample_images >= 0, "sample_images", "must be >= 0")
        check_ema_lengths(self, "ema_lengths")
        for field in ("eval_guidance", "sample_guidance"):
            self.check(getattr(self, field) >= 0, field, "must be >= 0")
        allowed = [m for m in METRICS if m not in ("fid", "kid")]
        self.check(
            self.metric in allowed,
            "metric",
            f"must be one of {', '.join(allowed)} (FID and KID need Inception "
            "weights, which the nightly does not take)",
        )
        try:
            parse_sampler(self.sample_sampler)
        except ValueError as e:
            self.check(False, "sample_sampler", str(e))
        object.__setattr__(self, "tracking_uri", resolve_tracking_uri(self.tracking_uri))
        # Every step's config, built once here so that a bad value stops the night
        # before anything is written; its errors name the field here it came from.
        try:
            self.preprocess_config(), self.train_config(""), self.promote_config(1)
            if self.autoencoder:
                self.encode_config()
            self.evaluate_config(1, self.ema_lengths), self.sample_config(1)
        except ConfigError as e:
            fields = [f.name for f in dataclasses.fields(self)]
            raise blame(e, self.SECTION, fields, _RENAMED) from None

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig(
            input=self.raw,
            output=self.dataset,
            resolution=self.resolution,
            small_images="upscale",
            validation_fraction=self.validation_fraction,
        )

    def encode_config(self) -> EncodeConfig:
        """Tonight's encoding of the dataset's new shards (with an autoencoder)."""
        return EncodeConfig(
            dataset=self.dataset,
            output=self.latents,
            autoencoder=self.autoencoder,
            flips=self.hflip,
            tracking_uri=self.tracking_uri,
        )

    def train_config(self, init_from: str) -> TrainConfig:
        """Tonight's training run, warm-started from `init_from` (or from scratch)."""
        return TrainConfig(
            dataset=self.latents if self.autoencoder else self.dataset,
            run_name=f"{self.model_name}-{self.night}",
            storage=self.storage,
            model=self.model,
            images=self.images,
            hflip=self.hflip,
            batch_size=self.batch_size,
            workers=self.workers,
            use_gpu=self.use_gpu,
            cpus_per_worker=self.cpus_per_worker,
            lr=self.lr,
            lr_rampup_images=self.lr_rampup_images,
            ema_halflife_images=self.ema_halflife_images,
            checkpoint_every_images=max(self.batch_size, self.images // 4),
            log_every_images=max(self.batch_size, self.images // 20),
            sample_every_images=0,
            tracking_uri=self.tracking_uri,
            experiment="nightly",
            model_name=self.model_name,
            init_from=init_from,
        )

    def evaluate_config(self, version: int, ema_length: tuple[float, ...] = ()) -> EvaluateConfig:
        """The evaluation of `version`'s own weights, and of `ema_length` (post-hoc
        EMA lengths) beside them."""
        return EvaluateConfig(
            model=f"{self.model_name}/{version}",
            ema_length=ema_length,
            dataset=self.dataset,
            output=self.evaluations,
            images=self.eval_images,
            sampler=self.eval_sampler,
            compare=self.eval_compare,
            guidance=self.eval_guidance,
            max_copy_ratio=self.max_copy_ratio,
            batch_size=max(2, min(self.eval_images, 500)),
            use_gpu=self.use_gpu,
            tracking_uri=self.tracking_uri,
        )

    def promote_config(self, version: int, key: str = "") -> PromoteConfig:
        return PromoteConfig(
            model_name=self.model_name,
            version=version,
            metric=self.metric,
            margin=self.margin,
            max_copy_rate=self.max_copy_rate,
            key=key,
            tracking_uri=self.tracking_uri,
        )

    def sample_config(self, version: int) -> SampleConfig:
        sampler, steps = parse_sampler(self.sample_sampler)
        return SampleConfig(
            model=f"{self.model_name}/{version}",
            output=locations.join(self.samples, self.night),
            images=max(1, self.sample_images),
            samples_per_shard=self.sample_samples_per_shard,
            sampler=sampler,
            steps=steps,
            guidance=self.sample_guidance,
            max_copy_ratio=self.max_copy_ratio,
            drop_copies=self.drop_copies,
            min_label_confidence=self.min_label_confidence,
            use_gpu=self.use_gpu,
            tracking_uri=self.tracking_uri,
        )
