"""Autoencoders of latent datasets: diffusers' `AutoencoderKL`, as folders made by
`save_pretrained` (a user's `stabilityai/sd-vae-ft-mse` folder works unchanged),
from a local path or an `s3://` prefix. They are loaded offline, always: nothing
is fetched from a hub. Weights must be safetensors (a pickled `.bin` runs code
when loaded, so it is refused).

An autoencoder is known by its identity (`Identity`): the digest of its folder's
files, its class, its scaling and shift factors, its latent channels and
downsampling factor, and the input range it expects. A latent dataset records
it; whatever decodes its latents checks it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.edges import storage

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
INPUT_RANGE = (-1.0, 1.0)
"""What diffusers' autoencoders take and give: pixels in [-1, 1] (EDM2's own
pipeline feeds [0, 1] to the same VAE through a wrapper; we do not)."""


class AutoencoderError(ValueError):
    """A folder that is not a loadable AutoencoderKL; the message names it."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a latent dataset records of the autoencoder that made it."""

    digest: str
    """sha256 of what is loaded (config.json and the weights): of each file's name
    and sha256, in name order."""
    cls: str
    """The diffusers class (`_class_name` of its config)."""
    scaling_factor: float
    shift_factor: float | None
    """diffusers' constants for its own pipelines (latents are normalised here by
    statistics measured on the data instead); recorded, not used."""
    latent_channels: int
    downsample: int
    """Pixels per latent along each side, f (8 for SD's VAE)."""
    input_range: tuple[float, float] = INPUT_RANGE

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, H, W) of the latents of `resolution` px images."""
        if resolution % self.downsample:
            raise AutoencoderError(
                f"resolution {resolution} is not a multiple of the autoencoder's "
                f"downsampling factor {self.downsample}"
            )
        side = resolution // self.downsample
        return (self.latent_channels, side, side)


def folder_digest(files: dict[str, bytes]) -> str:
    """The digest of a folder's files (name to bytes), as `Identity.digest`."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return h.hexdigest()


def read_folder(uri: str) -> dict[str, bytes]:
    """The files of the autoencoder folder at `uri` (a path or an `s3://` prefix),
    checked: a config of an AutoencoderKL and its safetensors weights."""
    try:
        found = {o.relpath: o.uri for o in storage.list_objects(uri)}
    except storage.NotFound:
        raise AutoencoderError(f"{uri}: not found") from None
    config = storage.read_bytes(found[CONFIG]) if CONFIG in found else None
    _check(uri, config, found)  # before reading weights that may be gigabytes
    return {CONFIG: config or b"", WEIGHTS: storage.read_bytes(found[WEIGHTS])}


def checked_files(where: str, files: Mapping[str, bytes]) -> dict[str, bytes]:
    """An autoencoder folder's files given in memory (a registered version's
    artifacts), checked as `read_folder` checks a folder; `where` names them."""
    _check(where, files.get(CONFIG), files)
    return {CONFIG: files[CONFIG], WEIGHTS: files[WEIGHTS]}


def _check(where: str, config_bytes: bytes | None, names: Collection[str]) -> None:
    if config_bytes is None:
        raise AutoencoderError(
            f"{where}: no {CONFIG}: not an autoencoder folder (make one with save_pretrained)"
        )
    try:
        cls = json.loads(config_bytes).get("_class_name")
    except (ValueError, AttributeError):
        raise AutoencoderError(f"{where}: {CONFIG} is not a JSON object") from None
    if cls != "AutoencoderKL":
        raise AutoencoderError(f"{where}: {CONFIG} is of a {cls!r}, not an AutoencoderKL")
    if WEIGHTS not in names:
        pickled = sorted(n for n in names if n.endswith(".bin"))
        why = ""
        if pickled:
            why = f" ({', '.join(pickled)} is pickled: save it with safe_serialization=True)"
        raise AutoencoderError(f"{where}: no {WEIGHTS}{why}")


def identity_of(files: dict[str, bytes]) -> Identity:
    """The identity of a folder read by `read_folder`."""
    config = json.loads(files[CONFIG])
    return Identity(
        digest=folder_digest(files),
        cls=config["_class_name"],
        scaling_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=None if config.get("shift_factor") is None else float(config["shift_factor"]),
        latent_channels=int(config.get("latent_channels", 4)),
        downsample=2 ** (len(config.get("block_out_channels", [64])) - 1),
    )


def check(uri: str, digest: str) -> Identity:
    """The identity of the autoencoder folder at `uri`, which must be the one of
    digest `digest` (the one a latent dataset or model was made with): an
    AutoencoderError naming both digests when it is another, or was changed."""
    found = identity_of(read_folder(uri))
    if found.digest != digest:
        raise AutoencoderError(
            f"{uri} is not the autoencoder the latents were encoded with (digest "
            f"{found.digest[:12]}..., the latents' {digest[:12]}...)"
        )
    return found


def load(
    uri: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[AutoencoderKL, Identity]:
    """The AutoencoderKL at `uri`, in eval mode without gradients, and its identity.
    An `s3://` folder is copied down to a temporary folder for the load (once per
    process that calls this: an actor calls it in its constructor)."""
    import torch
    from diffusers import AutoencoderKL

    files = read_folder(uri)
    found = identity_of(files)
    with tempfile.TemporaryDirectory(prefix="autoencoder-") as folder:
        for name, data in files.items():
            Path(folder, name).write_bytes(data)
        vae = AutoencoderKL.from_pretrained(
            folder,
            local_files_only=True,
            use_safetensors=True,
            low_cpu_mem_usage=False,  # accelerate's loader: not a dependency
            torch_dtype=dtype or torch.float32,
        )
    vae = vae.to(device).eval().requires_grad_(False)
    return vae, found
