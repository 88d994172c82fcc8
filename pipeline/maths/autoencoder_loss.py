"""The autoencoder's training losses and its reconstruction metric, for a
posterior N(mean, exp(logvar)) per latent element (as diffusers' AutoencoderKL
gives): an L1 reconstruction term, the KL divergence to N(0, I), and a hinge loss
for an optional patch discriminator (Esser et al. 2021, taming-transformers).
LPIPS, the perceptual term of those recipes, needs pretrained weights that
cannot be had offline: it is left out. Torch only."""

from __future__ import annotations

import torch


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per image [N]: the closed form
    0.5 * (mean^2 + var - 1 - logvar), summed over the latent's elements."""
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar)
    return kl.flatten(1).sum(dim=1)


def reconstruction_l1(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per image [N]."""
    return (x - reconstruction).abs().flatten(1).mean(dim=1)


def autoencoder_loss(
    x: torch.Tensor,
    reconstruction: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    kl_weight: float,
) -> torch.Tensor:
    """The batch's L1 + kl_weight * KL / (pixels per image), a scalar: the KL is
    per pixel so that kl_weight does not depend on the resolution."""
    pixels = x[0].numel()
    per_image = reconstruction_l1(x, reconstruction) + kl_weight * (
        kl_to_standard_normal(mean, logvar) / pixels
    )
    return per_image.mean()


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss on its logits for real and reconstructed
    patches: mean(relu(1 - real)) + mean(relu(1 + fake)), halved."""
    return 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())


def psnr(x: torch.Tensor, reconstruction: torch.Tensor, peak_to_peak: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image [N], in dB, for pixels spanning
    `peak_to_peak` (2 for [-1, 1]): 10 log10(peak^2 / MSE)."""
    mse = (x - reconstruction).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(peak_to_peak**2 / mse)


class PatchDiscriminator(torch.nn.Module):
    """pix2pix's PatchGAN, as Stable Diffusion's autoencoders train against: strided
    4x4 convolutions to one logit per patch ([N, 1, h, w]), each seeing about
    (2^layers * 6) pixels across. GroupNorm, not BatchNorm: the same with any
    number of workers."""

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        blocks: list[torch.nn.Module] = [
            torch.nn.Conv2d(3, channels, 4, 2, 1),
            torch.nn.LeakyReLU(0.2),
        ]
        width = channels
        for i in range(1, layers + 1):
            wider = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [
                torch.nn.Conv2d(width, wider, 4, stride, 1, bias=False),
                torch.nn.GroupNorm(min(32, wider // 4), wider),
                torch.nn.LeakyReLU(0.2),
            ]
            width = wider
        blocks.append(torch.nn.Conv2d(width, 1, 4, 1, 1))
        self.net = torch.nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
