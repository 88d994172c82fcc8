"""Generation whose pixels depend only on (seed, image index): each image has its
own generator and label from (seed, index), and the network always runs on calls
of a fixed number of images, so neither the batch size, the number of workers
nor a retry changes an image. Torch and numpy only."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.maths.edm import karras_sigmas
from pipeline.maths.solvers import (
    SAMPLERS,
    Denoiser,
    guided,
    initial_noise,
    sample_generators,
)


def image_labels(
    labels: str | int, seed: int, indices: list[int], num_classes: int
) -> list[int | None]:
    """Each image's label: none (`labels` "none"), the class `labels`, or drawn
    from (seed, index) (`labels` "uniform")."""
    if labels == "none":
        return [None] * len(indices)
    if labels != "uniform":
        return [int(labels)] * len(indices)
    return [int(np.random.default_rng([seed, k, 1]).integers(num_classes)) for k in indices]


def generate(
    denoiser: Callable[..., torch.Tensor],
    indices: list[int],
    device: torch.device | str,
    *,
    seed: int,
    labels: str | int,
    sampler: str,
    steps: int,
    guidance: float,
    resolution: int,
    num_classes: int,
    channels: int = 3,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    draws: list[int] | None = None,
) -> tuple[np.ndarray, list[int | None]]:
    """The uint8 images [N, H, W, 3] and labels of image `indices` of the job
    (seed, labels, sampler, steps, guidance) with a network of `resolution` px and
    `num_classes` classes. A latent model's network makes `channels` channels,
    which `decode` turns into images in [-1, 1]. `draws`: each index's draw (see
    `solvers.sample_generators`; its label does not change with it)."""
    per_image = image_labels(labels, seed, indices, num_classes)
    generators = sample_generators(seed, indices, device, draws)
    sigmas = karras_sigmas(steps).to(device)
    x = initial_noise(
        (len(indices), channels, resolution, resolution), float(sigmas[0]), generators, device
    )
    label = None if per_image[0] is None else torch.tensor(per_image, device=device)
    stochastic = sampler in ("euler_ancestral", "edm_stochastic", "dpmpp_2m_sde", "restart")
    with torch.no_grad():
        out = SAMPLERS[sampler](
            denoiser,
            x,
            sigmas,
            label=label,
            guidance=guidance,
            generator=generators if stochastic else None,
        )
        if decode is not None:
            out = decode(out)
    pixels = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy(), per_image


class FixedBatch:
    """Calls the denoiser on batches of exactly `size` images, padding the last one:
    an image's result then does not depend on how many others share its call.
    With classifier-free guidance each call holds `size` images twice (with and
    without their labels), so the same holds for guided sampling."""

    def __init__(self, denoiser: Denoiser, size: int):
        self.denoiser, self.size = denoiser, size

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._chunked(x, sigma, label, self.denoiser)

    def guided(
        self, x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor, guidance: float
    ) -> torch.Tensor:
        """Classifier-free guidance (`samplers.guided`) on fixed-size chunks."""

        def call(xs: torch.Tensor, ss: torch.Tensor, ls: torch.Tensor | None) -> torch.Tensor:
            assert ls is not None  # guided calls carry labels
            return guided(self.denoiser, xs, ss, ls, guidance)

        return self._chunked(x, sigma, label, call)

    def _chunked(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        label: torch.Tensor | None,
        call: Denoiser,
    ) -> torch.Tensor:
        out = []
        for i in range(0, len(x), self.size):
            xs, ss = x[i : i + self.size], sigma[i : i + self.size]
            ls = None if label is None else label[i : i + self.size]
            n = len(xs)
            if n < self.size:
                pad = self.size - n
                xs = torch.cat([xs, xs.new_zeros((pad, *xs.shape[1:]))])
                ss = torch.cat([ss, ss.new_ones(pad)])
                ls = None if ls is None else torch.cat([ls, ls.new_zeros(pad)])
            out.append(call(xs, ss, ls)[:n])
        return torch.cat(out)
