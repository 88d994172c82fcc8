"""tasks.encode: a pixel dataset to a latent dataset on the real Ray cluster and S3
server, with a tiny random AutoencoderKL saved by `save_pretrained`."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from webdataset import tariterators

from pipeline.config import ConfigError, PreprocessConfig
from pipeline.config.encode import EncodeConfig
from pipeline.data import latent_samples, shards
from pipeline.data.autoencode import Encoder
from pipeline.data.digits import write_digits
from pipeline.edges import autoencoders, storage, tracking
from pipeline.jobs.encode import encode
from pipeline.jobs.preprocess import preprocess
from tests import tasks
from tests.nets import tiny_autoencoder

pytestmark = pytest.mark.slow

SIDE = 32


def _pixels(raw: str, output: str, append: bool = False) -> dict:
    cfg = PreprocessConfig(
        input=raw,
        output=output,
        resolution=SIDE,
        small_images="upscale",
        samples_per_shard=48,
        validation_fraction=0.1,
    )
    return preprocess(cfg, progress=False, append=append).manifest


@pytest.fixture(scope="module")
def pixels(tmp_path_factory, ray_cluster) -> str:
    """300 digits at 32 px in shards of 48, on local disk."""
    root = tmp_path_factory.mktemp("pixels")
    write_digits(str(root / "raw"), 0, 300)
    _pixels(str(root / "raw"), str(root / "dataset"))
    return str(root / "dataset")


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vae") / "tiny"
    tiny_autoencoder().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def encoded(pixels, vae, tmp_path_factory) -> str:
    output = str(tmp_path_factory.mktemp("latents") / "digits")
    result = encode(
        EncodeConfig(dataset=pixels, output=output, autoencoder=vae, chunk=8, actors=2),
        progress=False,
    )
    source, _ = shards.load_dataset(pixels, "pixels")
    assert not result.already_complete and result.added_shards == len(source["shards"]) > 4
    return output


def _samples(prefix: str, name: str) -> dict[str, dict[str, bytes]]:
    data = storage.read_bytes(storage.join(prefix, name))
    samples: dict[str, dict[str, bytes]] = {}
    for m in shards.tar_members(data):
        key, ext = shards.split_member_name(m.name)
        samples.setdefault(key, {})[ext] = data[m.offset : m.offset + m.size]
    return samples


def _files(prefix: str) -> dict[str, bytes]:
    return {o.relpath: storage.read_bytes(o.uri) for o in storage.list_objects(prefix)}


def test_every_image_becomes_the_posterior_a_bare_loop_computes(pixels, vae, encoded):
    source, digest = shards.load_dataset(pixels, "pixels")
    manifest, _ = shards.load_dataset(encoded, "latents")
    assert latent_samples.kind(manifest) == "latents" and manifest["latent_shape"] == [4, 4, 4]
    assert manifest["source"] == {"dataset": pixels, "sha256": digest, "version": 1}
    identity = autoencoders.identity_of(autoencoders.read_folder(vae))
    assert manifest["autoencoder"]["digest"] == identity.digest
    assert manifest["autoencoder"]["input_range"] == [-1.0, 1.0]
    assert manifest["counts"]["written"] == source["counts"]["written"] == 300
    assert [e["name"] for e in manifest["shards"]] == [e["name"] for e in source["shards"]]

    encoder = Encoder(vae, chunk=8)
    means, seconds = [], []
    for entry in source["shards"]:
        pixel_samples = _samples(pixels, entry["name"])
        latent = _samples(encoded, entry["name"])
        assert list(latent) == list(pixel_samples)  # every sample, in the shard's order
        images = np.stack([_png(s["png"]) for s in pixel_samples.values()])
        want = encoder({"image": images, "key": np.array(list(pixel_samples))})
        for j, (key, sample) in enumerate(latent.items()):
            mean = latent_samples.npy_array(sample["mean.npy"])
            std = latent_samples.npy_array(sample["std.npy"])
            assert mean.dtype == np.float32 and mean.shape == (4, 4, 4)
            # The actors run torch on one thread, this process on two: the same
            # sums in another order, so equal to float32's last bits.
            np.testing.assert_allclose(mean, want["mean"][j], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(std, want["std"][j], rtol=1e-5, atol=1e-6)
            assert sample["cls"] == pixel_samples[key]["cls"]
            meta = json.loads(sample["json"])
            assert meta["source"] == json.loads(pixel_samples[key]["json"])["source"]
            assert meta["pixels"] == {"shard": entry["name"], "sha256": entry["sha256"]}
            if entry["split"] == "train":
                means.append(mean.astype(np.float64))
                seconds.append(mean.astype(np.float64) ** 2 + std.astype(np.float64) ** 2)
    # The statistics are those of the train split's drawn latents, per channel.
    first = np.mean(means, axis=(0, 2, 3))
    var = np.mean(seconds, axis=(0, 2, 3)) - first**2
    np.testing.assert_allclose(manifest["stats"]["raw_mean"], first, rtol=1e-10)
    np.testing.assert_allclose(manifest["stats"]["raw_std"], np.sqrt(var), rtol=1e-10)
    assert manifest["stats"]["final_std"] == 0.5


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_webdataset_reads_the_latents_as_arrays(encoded):
    # webdataset's own pipeline stages (grouping, decoding) on a shard's bytes: its
    # URL opener leaves files open for the garbage collector.
    manifest, _ = shards.load_dataset(encoded, "latents")
    entry = manifest["shards"][0]
    data = storage.read_bytes(storage.join(encoded, entry["name"]))
    members = ({**m, "__url__": ""} for m in tariterators.tar_file_iterator(io.BytesIO(data)))
    decode = wds.autodecode.Decoder([wds.autodecode.basichandlers])
    samples = [decode(sample) for sample in tariterators.group_by_keys(members)]
    assert len(samples) == entry["samples"]
    assert samples[0]["mean.npy"].shape == (4, 4, 4) and samples[0]["std.npy"].dtype == np.float32
    assert all((s["std.npy"] > 0).all() and isinstance(s["cls"], int) for s in samples)


def test_killed_then_run_again_is_byte_identical_and_a_third_run_writes_nothing(
    pixels, vae, encoded, s3, tmp_path
):
    # To S3 this time, the autoencoder read from S3 too.
    vae_s3 = s3.prefix("encode-vae")
    for name, data in autoencoders.read_folder(vae).items():
        storage.write_bytes(storage.join(vae_s3, name), data)
    output = s3.prefix("encode-killed")
    argv = tasks.command(
        "encode", "--dataset", pixels, "--output", output, "--autoencoder", vae_s3,
        "--chunk", "8", "--actors", "1",
    )  # fmt: skip
    log = tmp_path / "killed.log"
    # On its own local Ray, which the kill takes down with it: on the session's
    # cluster the actors went on encoding until Ray saw the driver gone, and on a
    # fast machine finished every shard first.
    proc = tasks.start(argv, env=tasks.private_ray_env(), log=log)
    try:
        records = storage.join(output, shards.RECORDS)
        # Polled often: once started, one actor writes all 7 shards in well under a
        # second on a fast machine (CI at 48026a7 saw 7 of 7 written at 0.2 s).
        tasks.wait_for(
            proc, lambda: tasks.count(records) >= 1, "a shard record", log=log, poll=0.01
        )
    finally:
        assert tasks.kill(proc)
    assert shards.MANIFEST not in _files(output)
    shard_count = len(shards.load_dataset(encoded, "latents")[0]["shards"])
    assert 1 <= tasks.count(storage.join(output, shards.RECORDS)) < shard_count  # part-way

    again = tasks.run(argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused" in again.stdout, again.stdout
    want = _files(encoded)
    got = _files(output)
    manifest = json.loads(got.pop(shards.MANIFEST))
    expected = json.loads(want.pop(shards.MANIFEST))
    assert manifest.pop("autoencoder")["uri"] == vae_s3
    assert expected.pop("autoencoder")["uri"] == vae
    assert manifest == expected
    assert got == want  # every shard and record, byte for byte

    # A third run (in this process: the task's start-up is the two runs' above).
    third = EncodeConfig(dataset=pixels, output=output, autoencoder=vae_s3, chunk=8, actors=1)
    assert encode(third, progress=False).already_complete
    assert _files(output) == {**got, shards.MANIFEST: _files(output)[shards.MANIFEST]}


def test_a_registered_autoencoder_is_copied_into_the_output_and_encodes_as_its_folder(
    pixels, vae, encoded, mlflow_server, tmp_path
):
    # Registered as tasks.train_autoencoder registers one: its folder's files.
    run_id = tracking.find_or_create_run(mlflow_server, "tests", "encode-registered")
    files = autoencoders.read_folder(vae)
    version = tracking.register_model(mlflow_server, run_id, "encode-vae", files, {"k": "v"})
    output = str(tmp_path / "z")

    def cfg(ref: str) -> EncodeConfig:
        return EncodeConfig(
            dataset=pixels, output=output, autoencoder=ref, chunk=8, tracking_uri=mlflow_server
        )

    for ref, why in [
        ("encode-vae/99", "model 'encode-vae' has no version 99"),
        ("no-such-vae@best", "no registered model 'no-such-vae' at "),
    ]:
        with pytest.raises(ConfigError, match=f"^encode.autoencoder: {why}"):
            encode(cfg(ref), progress=False)
        assert not (tmp_path / "z").exists()  # refused before anything is written

    result = encode(cfg(f"encode-vae/{version}"), progress=False)
    got, want = _files(output), _files(encoded)
    manifest, expected = json.loads(got.pop(shards.MANIFEST)), json.loads(want.pop(shards.MANIFEST))
    ae = manifest.pop("autoencoder")
    assert ae["uri"] == f"{output}/autoencoder" and ae["registered"] == f"encode-vae/{version}"
    assert autoencoders.read_folder(ae["uri"]) == files  # where training and sampling read it
    assert {k: v for k, v in ae.items() if k not in ("uri", "registered")} == {
        k: v for k, v in expected.pop("autoencoder").items() if k not in ("uri", "registered")
    }
    assert manifest == expected
    copied = {f"autoencoder/{name}": data for name, data in files.items()}
    assert got == {**want, **copied}  # every shard and record, byte for byte, and the copy
    assert result.manifest["autoencoder"]["uri"] == ae["uri"]
    assert encode(cfg(f"encode-vae/{version}"), progress=False).already_complete


@pytest.mark.trial
def test_a_grown_dataset_is_appended_as_its_next_version(vae, tmp_path, ray_cluster):
    raw, dataset, output = str(tmp_path / "raw"), str(tmp_path / "px"), str(tmp_path / "z")
    write_digits(raw, 0, 200)
    _pixels(raw, dataset)
    cfg = EncodeConfig(dataset=dataset, output=output, autoencoder=vae, chunk=8)
    first = encode(cfg, progress=False).manifest
    before = _files(output)
    write_digits(raw, 200, 100)
    grown = _pixels(raw, dataset, append=True)
    result = encode(cfg, progress=False)
    after = _files(output)

    assert result.manifest["version"] == 2
    assert result.added_shards == len(grown["shards"]) - len(first["shards"]) > 0
    assert result.manifest["previous"]["sha256"] == shards.sha256(before[shards.MANIFEST])
    assert after[f"{shards.MANIFESTS}/000001.json"] == before[shards.MANIFEST]
    for name, data in before.items():  # the first version's shards are untouched
        if shards.is_shard_name(name):
            assert after[name] == data
    # The same as encoding the grown dataset from scratch: shards and statistics.
    fresh = encode(dataclasses.replace(cfg, output=str(tmp_path / "fresh")), progress=False)
    assert result.manifest["shards"] == fresh.manifest["shards"]
    assert result.manifest["stats"] == fresh.manifest["stats"]
    assert result.manifest["stats"] != first["stats"]
    assert encode(cfg, progress=False).already_complete


def test_flips_encode_each_image_mirrored_too(pixels, vae, tmp_path):
    output = str(tmp_path / "z")
    cfg = EncodeConfig(dataset=pixels, output=output, autoencoder=vae, chunk=8, flips=True)
    manifest = encode(cfg, progress=False).manifest
    assert manifest["flips"] and manifest["config"]["flips"]
    entry = manifest["shards"][0]
    latent = _samples(output, entry["name"])
    pixel_samples = _samples(pixels, entry["name"])
    mirrored = np.stack([_png(s["png"])[:, ::-1] for s in pixel_samples.values()])
    want = Encoder(vae, chunk=8)({"image": mirrored, "key": np.array(list(pixel_samples))})
    for j, sample in enumerate(latent.values()):
        flipped = latent_samples.npy_array(sample["flipped.mean.npy"])
        np.testing.assert_allclose(flipped, want["mean"][j], rtol=1e-5, atol=1e-6)
        unflipped = latent_samples.npy_array(sample["mean.npy"])
        assert np.abs(flipped - unflipped[:, :, ::-1]).max() > 1e-3  # not the flipped latent
    # The statistics count both: each train image twice, 4x4 latent positions each.
    assert manifest["stats"]["values"] == 2 * 16 * manifest["counts"]["written_by_split"]["train"]


def test_another_autoencoder_or_dataset_for_the_same_output_is_refused(pixels, encoded, tmp_path):
    other = tmp_path / "other-vae"
    tiny_autoencoder(seed=1).save_pretrained(other)
    with pytest.raises(ConfigError, match=r"^encode.output: .* another autoencoder; choose"):
        encode(EncodeConfig(dataset=pixels, output=encoded, autoencoder=str(other), chunk=8))
    vae = json.loads(storage.read_bytes(storage.join(encoded, shards.MANIFEST)))["autoencoder"]
    with pytest.raises(ConfigError, match=r"^encode.dataset: .* holds latents already"):
        encode(EncodeConfig(dataset=encoded, output=str(tmp_path / "z"), autoencoder=vae["uri"]))
    elsewhere = tmp_path / "px"  # a copy of the pixel dataset's manifest is enough
    storage.write_bytes(
        str(elsewhere / shards.MANIFEST), storage.read_bytes(storage.join(pixels, shards.MANIFEST))
    )
    with pytest.raises(ConfigError, match=r"^encode.output: .* holds a pixel dataset"):
        encode(EncodeConfig(dataset=pixels, output=str(elsewhere), autoencoder=vae["uri"]))


def test_a_dataset_that_is_not_a_later_version_is_refused(vae, pixels, encoded, tmp_path):
    # Another pixel dataset: its manifest, one shard's bytes (so its sha256) changed.
    other = str(tmp_path / "px")
    manifest = json.loads(storage.read_bytes(storage.join(pixels, shards.MANIFEST)))
    manifest["shards"][0]["sha256"] = "0" * 64
    storage.write_bytes(storage.join(other, shards.MANIFEST), json.dumps(manifest).encode())
    with pytest.raises(ConfigError, match=r"^encode.dataset: .* is not a later version"):
        encode(EncodeConfig(dataset=other, output=encoded, autoencoder=vae, chunk=8))


def test_a_resolution_the_autoencoder_cannot_take_is_refused(pixels, tmp_path):
    deep = tmp_path / "f64"
    tiny_autoencoder(levels=7).save_pretrained(deep)  # f = 64 > 32 px
    with pytest.raises(ConfigError, match=r"^encode.autoencoder: resolution 32 is not a multiple"):
        encode(EncodeConfig(dataset=pixels, output=str(tmp_path / "z"), autoencoder=str(deep)))
    assert not (tmp_path / "z").exists()


def test_non_finite_latents_stop_the_job_naming_the_images(pixels, tmp_path):
    broken = tiny_autoencoder()
    with torch.no_grad():
        broken.encoder.conv_in.bias[0] = float("nan")
    broken.save_pretrained(tmp_path / "nan")
    output = tmp_path / "z"
    cfg = EncodeConfig(dataset=pixels, output=str(output), autoencoder=str(tmp_path / "nan"))
    with pytest.raises(RuntimeError, match=r"^encode: (train|validation)-\d{6}.tar: non-finite"):
        encode(cfg, progress=False)
    assert not (output / shards.MANIFEST).exists()
