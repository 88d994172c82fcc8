"""Generation whose pixels depend only on (seed, image index): each image has its
own generator and label from (seed, index), and the network always runs on calls
of a fixed number of images, so neither the batch size, the number of workers
nor a retry changes an image. Torch and numpy only."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.maths.edm import karras_sigmas
from pipeline.maths.solvers import SAMPLERS, guided, initial_noise, sample_generators


def image_labels(job: dict, indices: list[int], num_classes: int) -> list[int | None]:
    """Each image's label: none, the fixed class, or drawn from (seed, index)."""
    if job["labels"] == "none":
        return [None] * len(indices)
    if job["labels"] != "uniform":
        return [int(job["labels"])] * len(indices)
    return [int(np.random.default_rng([job["seed"], k, 1]).integers(num_classes)) for k in indices]


def generate(denoiser, job: dict, card: dict, indices: list[int], device):
    """The uint8 images [N, H, W, 3] and labels of image `indices`."""
    resolution = card["resolution"]
    labels = image_labels(job, indices, card["model"].get("num_classes", 0))
    generators = sample_generators(job["seed"], indices, device)
    sigmas = karras_sigmas(job["steps"]).to(device)
    x = initial_noise(
        (len(indices), 3, resolution, resolution), float(sigmas[0]), generators, device
    )
    label = None if labels[0] is None else torch.tensor(labels, device=device)
    stochastic = job["sampler"] in ("euler_ancestral", "edm_stochastic")
    with torch.no_grad():
        out = SAMPLERS[job["sampler"]](
            denoiser,
            x,
            sigmas,
            label=label,
            guidance=job["guidance"],
            generator=generators if stochastic else None,
        )
    pixels = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy(), labels


class FixedBatch:
    """Calls the denoiser on batches of exactly `size` images, padding the last one:
    an image's result then does not depend on how many others share its call.
    With classifier-free guidance each call holds `size` images twice (with and
    without their labels), so the same holds for guided sampling."""

    def __init__(self, denoiser, size: int):
        self.denoiser, self.size = denoiser, size

    def __call__(self, x, sigma, label=None):
        return self._chunked(x, sigma, label, self.denoiser)

    def guided(self, x, sigma, label, guidance: float):
        """Classifier-free guidance (`samplers.guided`) on fixed-size chunks."""

        def call(xs, ss, ls):
            return guided(self.denoiser, xs, ss, ls, guidance)

        return self._chunked(x, sigma, label, call)

    def _chunked(self, x, sigma, label, call):
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
