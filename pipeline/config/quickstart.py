"""The config of the quickstart: the nightly pipeline on the example digits."""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

from pipeline.config import locations
from pipeline.config.autoencoder import AutoencoderConfig
from pipeline.config.core import MAX_IMAGES, Checked, ConfigError, blame
from pipeline.config.model import ModelConfig
from pipeline.config.nightly import NightlyConfig

AUTOENCODER_CHANNELS = (8, 16, 16, 16)
"""--latent's autoencoder: four levels (f = 8), 81k parameters, narrow enough for
2 CPU cores (65 images/s trained there; 16,32,32,32: 28)."""
AUTOENCODER_DOWNSAMPLE = 2 ** (len(AUTOENCODER_CHANNELS) - 1)
PIXEL_IMAGES, LATENT_IMAGES = 128_000, 36_000
"""Images training sees by default: on 8x8 pixels, and on --latent's 8x8x4 latents
(label fidelity 0.994 at 36,000 there, 0.997 at 48,000: a minute more on 2 cores)."""

_RENAMED = {
    **{f"nightly.{f}": "workdir" for f in ("raw", "dataset", "storage", "evaluations", "samples")},
    "nightly.eval_compare": "compare",
    "nightly.eval_guidance": "guidance",
    "nightly.sample_guidance": "guidance",
}
"""The nightly's fields that come from a field of another name here."""


@dataclasses.dataclass(frozen=True)
class QuickstartConfig(Checked):
    """The nightly pipeline end to end on embedded defaults, on the digits: write
    them as raw PNGs, preprocess, train, evaluate, promote, generate."""

    SECTION: ClassVar[str] = "quickstart"

    workdir: str = "quickstart"
    """Folder (or `s3://` prefix) that receives the raw digits, the dataset, the
    checkpoints, the evaluations, the generated digits and (locally) the MLflow
    database."""
    resolution: int = 0
    """Side of the preprocessed images; default 8, the digits' own (64 with
    --latent). Larger sides (16, 32, 64...) upscale them, and a pixel network runs
    at that size (slower)."""
    latent: bool = False
    """Latent diffusion: train a small autoencoder on the digits (tasks.
    train_autoencoder; f = 8, so 8x8x4 latents at 64 px), encode the dataset with
    it (tasks.encode), train the network on the latents, and decode what it
    generates back to pixels. Scored on pixels, as a pixel model is."""
    autoencoder_images: int = 6_000
    """With --latent: images the autoencoder trains on (about 2 minutes on 2 CPU
    cores; validation PSNR 24.6 to 26.7 dB on the digits over four runs, 28.1
    after 10,000)."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The network (see tasks.train --help): the tiny template by default."""
    images: int = 0
    """Images training sees; default 128,000 (about 80 passes over the digits; about
    2.5 minutes on 2 CPU cores at 8x8), 36,000 with --latent (2 to 4 minutes there)."""
    workers: int = 1
    """Ray Train workers."""
    hflip: bool = False
    """Flip training images left-right at random (off: a mirrored digit is none)."""
    guidance: float = 1.5
    """Classifier-free guidance of the scored and the generated digits: 1 is none;
    1.5 trades a little diversity for digits that are recognisably their label."""
    eval_images: int = 1000
    """Images generated from fixed seeds to score the model."""
    compare: tuple[str, ...] = ()
    """More samplers scored beside the default (DPM-Solver++(2M) SDE, 25 network
    evaluations), e.g. euler_ancestral:1000, the 1000-step stochastic reference
    (minutes more)."""
    ema_lengths: tuple[float, ...] | None = None
    """Post-hoc EMA lengths scored beside the trained weights (see tasks.nightly);
    the best is the model; empty: off. Default: the nightly's, none with --latent
    (each is one more evaluation, decoded: about 1.5 minutes on 2 CPU cores)."""
    sample_images: int = 1000
    """Images the champion generates at the end."""
    night: str = ""
    """The night's label (YYYY-MM-DD); default: today (UTC)."""
    tracking_uri: str = ""
    """MLflow tracking URI; default: an sqlite file in workdir (or $MLFLOW_TRACKING_URI
    when workdir is in S3)."""

    def __post_init__(self) -> None:
        self.locate("workdir")
        if not self.resolution:
            object.__setattr__(self, "resolution", 64 if self.latent else 8)
        if not self.images:
            object.__setattr__(self, "images", LATENT_IMAGES if self.latent else PIXEL_IMAGES)
        if self.ema_lengths is None:
            lengths = () if self.latent else NightlyConfig.ema_lengths
            object.__setattr__(self, "ema_lengths", lengths)
        if self.latent:
            self.check(
                self.resolution % AUTOENCODER_DOWNSAMPLE == 0 and self.resolution >= 64,
                "resolution",
                f"must be a multiple of {AUTOENCODER_DOWNSAMPLE} from 64 on with --latent "
                "(the latents must be 8 or more a side)",
            )
        self.check(self.autoencoder_images > 0, "autoencoder_images", "must be a positive integer")
        self.at_most(MAX_IMAGES, "autoencoder_images")
        self.check(self.images > 0, "images", "must be a positive integer")
        self.check(self.workers > 0, "workers", "must be a positive integer")
        self.check(self.eval_images > 1, "eval_images", "must be an integer above 1")
        self.check(self.sample_images >= 0, "sample_images", "must be >= 0")
        self.check(self.guidance >= 0, "guidance", "must be >= 0")
        batch = NightlyConfig.batch_size  # the quickstart trains at the nightly's default
        self.check(batch % self.workers == 0, "workers", f"must divide the batch of {batch} images")
        # The whole night is checked before anything is written.
        try:
            self.nightly_config()
        except ConfigError as e:
            fields = [f.name for f in dataclasses.fields(self)]
            raise blame(e, self.SECTION, fields, _RENAMED) from None

    @property
    def autoencoder(self) -> str:
        """Where --latent keeps the autoencoder it trained (a save_pretrained folder)."""
        return locations.join(self.workdir, "autoencoders", f"digits-{self.resolution}")

    def autoencoder_config(self) -> AutoencoderConfig:
        night = self.nightly_config()
        return AutoencoderConfig(
            dataset=night.dataset,
            run_name=f"{night.model_name}-autoencoder",
            storage=night.storage,
            channels=AUTOENCODER_CHANNELS,
            images=self.autoencoder_images,
            checkpoint_every_images=self.autoencoder_images,
            log_every_images=max(32, self.autoencoder_images // 10),
            # The one worker on both cores: its readers are idle between reads.
            torch_threads=os.cpu_count() or 1,
            tracking_uri=night.tracking_uri,
        )

    @property
    def raw(self) -> str:
        return locations.join(self.workdir, "raw", "digits")

    def nightly_config(self) -> NightlyConfig:
        tracking_uri = self.tracking_uri
        if not tracking_uri and not locations.is_s3(self.workdir):
            tracking_uri = f"sqlite:///{locations.join(self.workdir, 'mlflow.db')}"
        name = f"digits-{self.resolution}{'-latent' if self.latent else ''}"
        return NightlyConfig(
            raw=self.raw,
            dataset=locations.join(self.workdir, "datasets", name),
            storage=locations.join(self.workdir, "runs"),
            evaluations=locations.join(self.workdir, "evaluations"),
            samples=locations.join(self.workdir, "samples"),
            model_name=name,
            night=self.night,
            resolution=self.resolution,
            autoencoder=self.autoencoder if self.latent else "",
            model=self.model,
            images=self.images,
            workers=self.workers,
            hflip=self.hflip,
            eval_images=self.eval_images,
            eval_compare=self.compare,
            eval_guidance=self.guidance,
            ema_lengths=self.ema_lengths or (),  # set in __post_init__
            sample_images=self.sample_images,
            sample_guidance=self.guidance,
            tracking_uri=tracking_uri,
        )
