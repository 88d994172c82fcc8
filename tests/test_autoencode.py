"""Images to latent posteriors (pipeline/data/autoencode.py), with a tiny random
AutoencoderKL saved to a temporary folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.autoencode import Decoder, Encoder, NonFiniteLatents
from pipeline.edges import autoencoders
from pipeline.maths.latents import LatentStats
from tests.nets import tiny_autoencoder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    tiny_autoencoder().save_pretrained(path)
    return path


def images(n: int, side: int = 32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
        "key": np.array([f"img{i:03d}" for i in range(n)]),
        "label": np.arange(n) % 3,
    }


def test_a_batch_becomes_the_posteriors_a_bare_loop_computes(folder):
    batch = images(5)
    out = Encoder(str(folder), chunk=2)(batch)
    assert set(out) == {"key", "label", "mean", "std"}
    assert (out["key"] == batch["key"]).all() and (out["label"] == batch["label"]).all()
    assert out["mean"].dtype == np.float32 and out["mean"].shape == (5, 4, 4, 4)
    vae, _ = autoencoders.load(str(folder))
    for i in range(5):  # one image at a time, pixels to [-1, 1] by hand
        x = torch.from_numpy(batch["image"][i]).permute(2, 0, 1)[None].double() / 255 * 2 - 1
        with torch.no_grad():
            posterior = vae.double().encode(x).latent_dist
        np.testing.assert_allclose(out["mean"][i], posterior.mean[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(out["std"][i], posterior.std[0].numpy(), atol=1e-5)


def test_the_same_images_give_the_same_bytes_whatever_the_encoder(folder):
    batch = images(6, seed=1)
    first = Encoder(str(folder), chunk=4)(batch)
    again = Encoder(str(folder), chunk=4)(batch)
    assert first["mean"].tobytes() == again["mean"].tobytes()
    assert first["std"].tobytes() == again["std"].tobytes()


def test_bf16_is_close_to_fp32(folder):
    batch = images(4, seed=2)
    full, half = Encoder(str(folder))(batch), Encoder(str(folder), precision="bf16")(batch)
    scale = np.abs(full["mean"]).max()
    assert np.abs(half["mean"] - full["mean"]).max() < 0.05 * scale
    assert not np.array_equal(half["mean"], full["mean"])  # it did run in bf16


def test_non_finite_latents_stop_the_batch_naming_its_images(folder, tmp_path):
    vae = tiny_autoencoder()
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    vae.save_pretrained(tmp_path)
    with pytest.raises(
        NonFiniteLatents,
        match=r"non-finite latents for 3 images \(img000, img001, img002\) in fp32$",
    ):
        Encoder(str(tmp_path))(images(3))


def test_an_autoencoder_that_is_not_the_datasets_is_refused(folder):
    digest = autoencoders.load(str(folder))[1].digest
    Encoder(str(folder), digest=digest)  # its own: accepted
    with pytest.raises(
        autoencoders.AutoencoderError,
        match="where the dataset's latents were encoded by 000000000000",
    ):
        Encoder(str(folder), digest="0" * 64)
    with pytest.raises(ValueError, match="precision: must be one of fp32, bf16, got 'fp16'"):
        Encoder(str(folder), precision="fp16")


def test_the_decoder_denormalises_then_decodes_each_latent_whatever_its_company(folder):
    vae, identity = autoencoders.load(str(folder))
    stats = LatentStats((0.5, -1.0, 0.0, 2.0), (1.5, 0.5, 1.0, 3.0))
    decode = Decoder(str(folder), identity.digest, stats, chunk=4)
    x = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5
    images = decode(x)
    assert images.shape == (5, 3, 32, 32) and images.abs().max() <= 1
    with torch.no_grad():  # a bare loop: one latent at a time, by hand
        for i in range(5):
            z = x[i] * torch.tensor(stats.raw_std).reshape(4, 1, 1) / 0.5
            z = z + torch.tensor(stats.raw_mean).reshape(4, 1, 1)
            want = vae.decode(z[None]).sample[0].clamp(-1, 1)
            torch.testing.assert_close(images[i], want, atol=1e-5, rtol=1e-4)
    # Calls of exactly `chunk` latents: the first three decode to the same bits
    # alone as beside two others.
    assert torch.equal(decode(x[:3]), images[:3])
    with pytest.raises(autoencoders.AutoencoderError, match="the model's latents are of"):
        Decoder(str(folder), "0" * 64, stats)
