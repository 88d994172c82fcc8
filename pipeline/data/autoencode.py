"""Images to the posteriors of their latents and latents back to images.

`Encoder` is the callable a Ray Data actor pool runs (`map_batches(Encoder,
fn_constructor_kwargs=..., compute=ActorPoolStrategy(...))`), one autoencoder
loaded per actor.

A batch is encoded in chunks of `chunk` images from its start: CPU convolutions
give other last bits over another number of images, so a job that hands it one
shard per batch gets the same bytes on every run, whatever the pool's size.
`Decoder` turns what a latent model makes into pixels, likewise in fixed calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.edges import autoencoders, host
from pipeline.maths.latents import LatentStats

PRECISIONS = ("fp32", "bf16")


class NonFiniteLatents(ValueError):
    """An autoencoder gave NaN or infinite latents; the message names the samples."""


class Encoder:
    """`{"image": uint8 [N, H, W, 3], "key": [N], ...}` to the same batch with the
    image replaced by the posterior's "mean" and "std" (float32 [N, C, h, w])."""

    def __init__(
        self,
        autoencoder: str,
        precision: str = "fp32",
        chunk: int = 16,
        digest: str | None = None,
        device: torch.device | str | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(
                f"precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            host.keep_freed_memory()
        vae, self.identity = autoencoders.load(autoencoder, self.device)
        # diffusers wraps encode() in a hook decorator that hides it from mypy.
        self.vae: Any = vae
        if digest is not None and self.identity.digest != digest:
            raise autoencoders.AutoencoderError(
                f"{autoencoder}: digest {self.identity.digest[:12]}..., where the dataset's "
                f"latents were encoded by {digest[:12]}..."
            )
        self.precision, self.chunk = precision, chunk

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = np.asarray(batch["image"])
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3, (
            images.dtype,
            images.shape,
        )
        means, stds = [], []
        for lo in range(0, len(images), self.chunk):
            mean, std = self._posterior(images[lo : lo + self.chunk])
            means.append(mean)
            stds.append(std)
        mean, std = np.concatenate(means), np.concatenate(stds)
        finite = np.isfinite(mean).all(axis=(1, 2, 3)) & np.isfinite(std).all(axis=(1, 2, 3))
        if not finite.all():
            keys = np.asarray(batch.get("key", np.arange(len(images))))[~finite]
            raise NonFiniteLatents(
                f"non-finite latents for {len(keys)} images ({', '.join(map(str, keys[:5]))}"
                f"{', ...' if len(keys) > 5 else ''}) in {self.precision}"
                f"{': try fp32' if self.precision != 'fp32' else ''}"
            )
        out = {k: v for k, v in batch.items() if k != "image"}
        out["mean"], out["std"] = mean, std
        return out

    def _posterior(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """mean and std (float32) of a chunk: pixels to [-1, 1], diffusers' input range."""
        # A copy: the chunk may be a read-only view of a batch's buffer.
        x = torch.tensor(images, device=self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"),
        ):
            posterior = self.vae.encode(x).latent_dist
        return (
            posterior.mean.float().cpu().numpy(),
            posterior.std.float().cpu().numpy(),
        )


class Decoder:
    """What a latent model makes (latents normalised by `stats`, [N, C, h, w]) to
    images in [-1, 1], [N, 3, H, W]: denormalised, then decoded by the autoencoder
    in calls of exactly `chunk` latents (the last one padded), so that an image
    does not depend on the others decoded with it."""

    def __init__(
        self,
        autoencoder: str,
        digest: str,
        stats: LatentStats,
        chunk: int = 16,
        device: torch.device | str | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        vae, identity = autoencoders.load(autoencoder, self.device)
        if identity.digest != digest:
            raise autoencoders.AutoencoderError(
                f"{autoencoder}: digest {identity.digest[:12]}..., where the model's latents "
                f"are of the autoencoder {digest[:12]}..."
            )
        self.vae: Any = vae
        self.stats, self.chunk = stats, chunk

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = self.stats.denormalise(x.to(self.device, torch.float32))
        out = []
        for lo in range(0, len(z), self.chunk):
            part = z[lo : lo + self.chunk]
            n = len(part)
            if n < self.chunk:
                part = torch.cat([part, part.new_zeros((self.chunk - n, *part.shape[1:]))])
            with torch.no_grad():
                out.append(self.vae.decode(part).sample[:n])
        return torch.cat(out).clamp(-1, 1)
