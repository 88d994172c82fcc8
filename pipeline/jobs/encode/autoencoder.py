"""The autoencoder of an encode job: a `save_pretrained` folder, or a version in
the MLflow registry, read now and copied into the output's `autoencoder/` folder
once the output is known to be this encoding's (training and sampling read it
there)."""

from __future__ import annotations

import dataclasses

from pipeline.config import ConfigError
from pipeline.config.encode import EncodeConfig
from pipeline.config.sample import is_registry_ref
from pipeline.edges import autoencoders, registry, storage, tracking

REGISTERED = "autoencoder"
"""The output's folder holding its copy of a registered autoencoder."""


@dataclasses.dataclass(frozen=True)
class Autoencoder:
    """The autoencoder being encoded with."""

    uri: str
    """Where the actors, and later training and sampling, read it."""
    identity: autoencoders.Identity
    registered: str | None = None
    """`name/version` of a registered autoencoder (copied to `uri`)."""
    files: dict[str, bytes] | None = None
    """A registered autoencoder's files, to copy to `uri` (`keep`)."""

    def keep(self) -> None:
        """Copy a registered autoencoder's files into the output, unless they are
        there already; called once the output is known to be this encoding's."""
        if self.files is None:
            return
        try:
            if autoencoders.read_folder(self.uri) == self.files:
                return
        except autoencoders.AutoencoderError:
            pass
        for name, data in self.files.items():
            storage.write_bytes(storage.join(self.uri, name), data)


def resolve(cfg: EncodeConfig, resolution: int) -> Autoencoder:
    """The autoencoder `cfg` names: a folder, or a registered version (read from
    the registry now, copied into the output once the output is known to be ours)."""
    try:
        if not is_registry_ref(cfg.autoencoder):
            found = autoencoders.identity_of(autoencoders.read_folder(cfg.autoencoder))
            found.latent_shape(resolution)
            return Autoencoder(cfg.autoencoder, found)
        name, version, alias = registry.split_ref(cfg.autoencoder)
        version, _, files = tracking.load_registered(cfg.tracking_uri, name, version, alias)
        files = autoencoders.checked_files(cfg.autoencoder, files)
        found = autoencoders.identity_of(files)
        found.latent_shape(resolution)
    except (autoencoders.AutoencoderError, tracking.NotRegistered) as e:
        raise ConfigError(f"encode.autoencoder: {e}") from None
    uri = storage.join(cfg.output, REGISTERED)
    return Autoencoder(uri, found, f"{name}/{version}", files)
