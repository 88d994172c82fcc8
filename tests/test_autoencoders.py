"""Autoencoder folders (pipeline/edges/autoencoders.py): a tiny, randomly initialised
diffusers AutoencoderKL saved with `save_pretrained`, loaded offline from a folder
and from the session's S3 server."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.edges import autoencoders, storage
from pipeline.edges.autoencoders import AutoencoderError
from tests.nets import tiny_autoencoder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    tiny_autoencoder().save_pretrained(path)
    return path


def test_a_saved_folder_loads_offline_with_its_identity(folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vae, identity = autoencoders.load(str(folder))
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert identity.cls == "AutoencoderKL" and identity.downsample == 8
    assert identity.latent_channels == 4 and identity.scaling_factor == 0.18215
    assert identity.input_range == (-1.0, 1.0)
    # The digest is the folder's: the same files, the same digest; other weights, another.
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert identity.digest == autoencoders.folder_digest(files)
    torch.testing.assert_close(vae.state_dict(), tiny_autoencoder().state_dict(), rtol=0, atol=0)


def test_another_autoencoder_has_another_digest(folder, tmp_path):
    tiny_autoencoder(seed=1).save_pretrained(tmp_path)
    assert autoencoders.load(str(tmp_path))[1].digest != autoencoders.load(str(folder))[1].digest


def test_check_accepts_only_the_autoencoder_of_the_digest(folder, tmp_path):
    identity = autoencoders.check(str(folder), autoencoders.load(str(folder))[1].digest)
    assert identity == autoencoders.load(str(folder))[1]
    tiny_autoencoder(seed=1).save_pretrained(tmp_path)
    with pytest.raises(AutoencoderError) as e:
        autoencoders.check(str(tmp_path), identity.digest)
    other = autoencoders.load(str(tmp_path))[1].digest
    assert str(e.value) == (
        f"{tmp_path} is not the autoencoder the latents were encoded with (digest "
        f"{other[:12]}..., the latents' {identity.digest[:12]}...)"
    )


@pytest.mark.parametrize("resolution", [32, 64, 256, 512])
def test_latents_are_an_eighth_of_the_side_and_decode_to_the_images_shape(folder, resolution):
    vae, identity = autoencoders.load(str(folder))
    x = torch.rand(1, 3, resolution, resolution) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        assert tuple(posterior.mean.shape[1:]) == identity.latent_shape(resolution)
        assert posterior.std.shape == posterior.mean.shape and (posterior.std > 0).all()
        assert vae.decode(posterior.mean).sample.shape == x.shape


def test_a_resolution_the_latents_cannot_tile_is_refused(folder):
    identity = autoencoders.load(str(folder))[1]
    with pytest.raises(AutoencoderError, match="resolution 60 is not a multiple of .* 8"):
        identity.latent_shape(60)


@pytest.mark.slow
def test_an_s3_folder_loads_as_the_local_one(folder, s3_prefix):
    for path in folder.iterdir():
        storage.write_bytes(f"{s3_prefix}/vae/{path.name}", path.read_bytes())
    local, here = autoencoders.load(str(folder))
    remote, there = autoencoders.load(f"{s3_prefix}/vae")
    assert there == here
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(remote.encode(x).latent_dist.mean, local.encode(x).latent_dist.mean)


def test_what_is_not_an_autoencoder_folder_is_refused_by_name(folder, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(AutoencoderError, match=f"^{missing}: not found$"):
        autoencoders.load(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AutoencoderError, match=f"^{empty}: no config.json: not an autoencoder"):
        autoencoders.load(str(empty))
    other = tmp_path / "unet"
    other.mkdir()
    config = json.loads((folder / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(AutoencoderError, match="is of a 'UNet2DModel', not an AutoencoderKL"):
        autoencoders.load(str(other))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((folder / "config.json").read_bytes())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AutoencoderError, match=r"diffusion_pytorch_model.bin is pickled"):
        autoencoders.load(str(pickled))
