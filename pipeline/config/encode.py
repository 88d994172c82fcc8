"""The config of the encode task: a pixel dataset to a latent dataset."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from pipeline.config import locations
from pipeline.config.core import MAX_BATCH, MAX_WORKERS, Checked
from pipeline.config.sample import is_registry_ref
from pipeline.config.train import resolve_tracking_uri


@dataclasses.dataclass(frozen=True)
class EncodeConfig(Checked):
    """A dataset of tasks.preprocess -> its latents: per image, the mean and std of
    the autoencoder's posterior, in shards named as the dataset's own."""

    SECTION: ClassVar[str] = "encode"

    dataset: str
    """The pixel dataset (a folder or `s3://` prefix holding the manifest.json of
    tasks.preprocess). A later version of it is encoded by appending: only the
    shards the latent dataset lacks."""
    output: str
    """Where the latent dataset goes (folder or `s3://` prefix): one shard per shard
    of the dataset, and manifest.json, written last as the commit point."""
    autoencoder: str
    """diffusers AutoencoderKL: a folder written by `save_pretrained` (config.json
    and diffusion_pytorch_model.safetensors), local or `s3://`; or a version in the
    MLflow registry (`name/version` or `name@alias`, as tasks.train_autoencoder
    registers them), which is copied into the output's `autoencoder/` folder, where
    training and sampling read it. Loaded offline: nothing is fetched from a hub."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Encoder arithmetic: fp32, or bf16 autocast (every latent is checked finite
    either way; some autoencoders give NaNs in half precision)."""
    flips: bool = False
    """Also encode each image mirrored left to right, so that training on the
    latents may flip (`train.hflip`): a flipped image's latent is not the flipped
    latent."""
    chunk: int = 16
    """Images per autoencoder call: fixed, because the same images in calls of
    another size differ in the last bits."""
    actors: int = 0
    """Encoder actors, each holding the autoencoder, one GPU each when GPUs are used;
    default: one per GPU of the cluster, or one per CPU (one thread each) without
    GPUs, and never more than the shards to encode."""
    use_gpu: bool | None = None
    """Encode on GPUs; default: when the Ray cluster has any."""
    tracking_uri: str = ""
    """MLflow tracking URI of a registered autoencoder; default: $MLFLOW_TRACKING_URI,
    else sqlite:///mlflow.db."""

    def __post_init__(self) -> None:
        self.locate("dataset")
        self.locate("output")
        registered = is_registry_ref(self.autoencoder)
        if not registered:
            self.locate("autoencoder")
        for other in ("dataset",) if registered else ("dataset", "autoencoder"):
            self.check(
                not locations.contains(getattr(self, other), self.output)
                and not locations.contains(self.output, getattr(self, other)),
                "output",
                f"must lie apart from {other}",
            )
        self.check(self.chunk > 0, "chunk", "must be a positive integer")
        self.at_most(MAX_BATCH, "chunk")
        self.check(self.actors >= 0, "actors", "must be >= 0 (0: one per GPU, or per CPU)")
        self.at_most(MAX_WORKERS, "actors")
        object.__setattr__(self, "tracking_uri", resolve_tracking_uri(self.tracking_uri))
