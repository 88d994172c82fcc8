"""The parts of the training task that need no cluster: the worker's collate and
batches, the sample grid, checkpoints, the config and the plan; and the MLflow bookkeeping of
resumed runs, against a real MLflow (server, and an sqlite store)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline.config import ConfigError, ModelConfig, TrainConfig
from pipeline.config.records import LatentSpace, ModelCard
from pipeline.config.train import resolve_tracking_uri
from pipeline.data.order import Order
from pipeline.edges import checkpoint, registry, snapshots, tracking
from pipeline.jobs.train import ingest
from pipeline.jobs.train.driver import _init_model, _plan, _warn_rereads
from pipeline.jobs.train.worker import _inputs, _micro_batches, _restore_profiles, grid
from pipeline.maths.architecture import architecture
from pipeline.maths.counter import seed63
from pipeline.maths.edm import Precond, seeded_normal
from pipeline.maths.ema import EMA
from pipeline.maths.phema import PostHocEMA
from pipeline.maths.train_step import fused_adam, keep_fused, train_step
from pipeline.maths.unet import build
from tests.nets import checkpoint_state, randomised
from tests.services import ROOT


def test_the_workers_collate_wraps_the_readers_arrays_without_copies():
    # Ray hands over arrays in its object store read-only: wrapped without a copy
    # and without torch's warning about them (an error under pytest).
    image = np.ones((2, 3, 4, 4), np.uint8)
    image.flags.writeable = False
    position, check = np.array([64, 65]), np.array([7, 9], dtype=np.uint64)
    out = ingest._Collate(pin=False)(
        {"image": image, "label": np.array([3, 7]), "position": position, "check": check}
    )
    assert out.image.dtype == torch.uint8 and out.image.shape == (2, 3, 4, 4)
    assert out.image.data_ptr() == image.ctypes.data  # the same memory
    assert out.label is not None and out.label.tolist() == [3, 7]
    assert out.position is position and out.check is check
    assert (
        ingest._Collate(pin=False)({"image": image, "position": position, "check": check}).label
        is None
    )


def test_the_worker_maps_pixels_to_minus_one_one_on_the_device():
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 3, 2, 2), dtype=np.uint8)
    pixels[0, :, 0, 0] = [0, 255, 128]
    batch = ingest.Batch(torch.from_numpy(pixels), None, torch.arange(4), np.arange(4), np.zeros(4))
    plan = _plan(TrainConfig(dataset="/d"), MANIFEST, "digest")
    x = _inputs(batch, plan, Order(plan.stream), torch.device("cpu"))
    micro = _micro_batches(x, batch.label, torch.device("cpu"), 2)
    assert [len(x) for x, _ in micro] == [2, 2] and [y.tolist() for _, y in micro] == [
        [0, 1],
        [2, 3],
    ]
    x = torch.cat([x for x, _ in micro])
    assert x.dtype == torch.float32 and x[0, :, 0, 0].tolist() == [
        -1.0,
        1.0,
        pytest.approx(1 / 255, abs=1e-6),
    ]
    np.testing.assert_allclose(x.numpy(), pixels / 127.5 - 1, atol=1e-6)


def test_grid_places_enlarged_images_in_rows_with_grey_gaps():
    images = torch.stack([torch.full((3, 8, 8), v) for v in (-1.0, 0.0, 1.0)])
    images[1, 0] = 1.0  # red channel up: (255, 128, 128)
    canvas = grid(images, columns=2)  # each 8x8 image enlarged to 32x32, 2 px apart
    assert canvas.shape == (2 * 32 + 2, 2 * 32 + 2, 3) and canvas.dtype == np.uint8
    assert (canvas[:32, :32] == 0).all()
    assert (canvas[:32, 34:] == [255, 128, 128]).all()
    assert (canvas[34:, :32] == 255).all()
    assert (canvas[32:34] == 128).all() and (canvas[34:, 34:] == 128).all()  # gap, empty slot


def test_checkpoint_round_trip_continues_the_same_training(tmp_path, capsys):
    def parts(seed):
        torch.manual_seed(seed)
        net = randomised(build("tiny", num_classes=0, dropout=0.0), seed)
        denoiser = Precond(net)
        opt = fused_adam(denoiser.parameters(), lr=1e-3)  # as the training worker builds it
        return net, denoiser, opt, EMA(denoiser, 100, None), PostHocEMA(denoiser)

    def step(denoiser, opt, ema, phema, seen, ema_images=None):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seen))
        return train_step(
            denoiser,
            opt,
            (ema, phema),
            [(x, None)],
            images_seen=seen,
            base_lr=1e-3,
            seeds=seed63(0, np.arange(seen, seen + 4)),
            ema_images=ema_images,
        )

    def nets(phema):
        return {p.std: p.module.net for p in phema.profiles}

    net, denoiser, opt, ema, phema = parts(1)
    result = step(denoiser, opt, ema, phema, 0)
    assert result.ema_beta == ema.beta(0, 4)  # the first average's
    folder = tmp_path / "checkpoint"
    snapshots_at = str(tmp_path / "runs" / "r" / snapshots.FOLDER)
    saved = checkpoint_state(net, images_seen=4, step=1, snapshots=snapshots_at)
    checkpoint.save(folder, net, ema.module.net, opt, saved, nets(phema))
    # The snapshot in storage, as the worker writes it, reads back as both profiles.
    snapshots.write(saved.snapshots, 4, (folder / checkpoint.PHEMA).read_bytes())
    stored = snapshots.read_snapshots(saved.snapshots)
    assert [(images, std) for images, std, _ in stored] == [(4, 0.05), (4, 0.1)]
    for (_, _, tensors), profile in zip(stored, nets(phema).values(), strict=True):
        assert tensors.keys() == profile.state_dict().keys()
        assert all(torch.equal(v, profile.state_dict()[k]) for k, v in tensors.items())
    net2, denoiser2, opt2, ema2, phema2 = parts(2)  # other weights, empty optimizer
    state = checkpoint.load(folder, net2, ema2.module.net, opt2)
    assert checkpoint.load_profiles(folder, nets(phema2))
    keep_fused(opt2)  # as the worker does after loading
    assert state == saved
    pairs = [(net, net2), (ema.module.net, ema2.module.net)]
    pairs += list(zip(nets(phema).values(), nets(phema2).values(), strict=True))
    for a, b in pairs:
        for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(v, v2)
    # The next step from the restored parts is the step the original takes.
    # (As a worker of two steps, whose global batch is 8: the averages count 8.)
    assert step(denoiser, opt, ema, phema, 4, ema_images=8).ema_beta == ema.beta(4, 8)
    step(denoiser2, opt2, ema2, phema2, 4, ema_images=8)
    for p, p2 in zip(denoiser.parameters(), denoiser2.parameters(), strict=True):
        assert torch.equal(p, p2)
    for a, b in zip(phema.profiles, phema2.profiles, strict=True):
        assert all(torch.equal(v, a.module.state_dict()[k]) for k, v in b.state_dict().items())
    assert sorted(f.name for f in folder.iterdir()) == [
        "ema.safetensors",
        "model.safetensors",
        "optimizer.safetensors",
        "phema.safetensors",
        "state.json",
    ]

    # The model loaded from the checkpoint knows where its run's snapshots are.
    card = registry.load_model(str(folder), "", "test.model").card
    assert card.snapshots == snapshots_at and ModelCard.from_dict(card.to_dict()) == card

    # A checkpoint written before the profiles were kept has none: nothing changes,
    # and the worker starts them from the restored model, saying so.
    (folder / checkpoint.PHEMA).unlink()
    untouched = {k: v.clone() for k, v in phema2.profiles[0].module.state_dict().items()}
    assert not checkpoint.load_profiles(folder, nets(phema2))
    assert all(
        torch.equal(v, untouched[k]) for k, v in phema2.profiles[0].module.state_dict().items()
    )
    fresh = _restore_profiles(folder, denoiser2)
    assert "no post-hoc EMA profiles" in capsys.readouterr().out
    for profile in fresh.profiles:
        assert all(
            torch.equal(v, net2.state_dict()[k]) for k, v in profile.module.net.state_dict().items()
        )


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-3, betas=(0.8, 0.95)),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, amsgrad=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
        lambda ps: fused_adam(ps, lr=1e-3),
    ],
    ids=["adam", "adamw-amsgrad", "sgd-nesterov", "fused-adam"],
)
def test_optimizer_state_survives_safetensors_exactly(make):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = make(net.parameters())
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 3)).square().mean().backward()
        opt.step()
    original = opt.state_dict()
    tensors, settings = checkpoint.optimizer_to_safetensors(original)
    settings = json.loads(json.dumps(settings))  # as stored: JSON in the file's metadata
    restored = checkpoint.optimizer_from_safetensors(tensors, settings)
    assert restored["param_groups"] == original["param_groups"]
    assert restored["state"].keys() == original["state"].keys()
    for param, values in original["state"].items():
        assert restored["state"][param].keys() == values.keys()
        for name, value in values.items():
            assert torch.equal(restored["state"][param][name], value), (param, name)
    make(net.parameters()).load_state_dict(restored)  # torch accepts it as its own


def test_a_pickled_optimizer_state_is_refused_not_unpickled(tmp_path):
    net = build("tiny", 8)
    opt = torch.optim.Adam(net.parameters())
    checkpoint.save(tmp_path, net, net, opt, checkpoint_state(net))
    (tmp_path / checkpoint.OPTIMIZER).unlink()
    (tmp_path / "optimizer.pt").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(checkpoint.CheckpointError, match="optimizer.pt.*does not unpickle"):
        checkpoint.load(tmp_path, net, None, opt)


def test_loading_a_checkpoint_or_its_model_never_unpickles(tmp_path, monkeypatch):
    net = build("tiny", 8)
    opt = torch.optim.Adam(net.parameters())
    opt.zero_grad()
    net(torch.randn(2, 3, 8, 8), torch.ones(2)).square().mean().backward()
    opt.step()
    checkpoint.save(tmp_path, net, net, opt, checkpoint_state(net))

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    state = checkpoint.load(tmp_path, build("tiny", 8), None, torch.optim.Adam(net.parameters()))
    model = registry.load_model(str(tmp_path), "", "test.model")
    assert model.lineage.run_id == state.run_id and model.card.model == state.model


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"batch_size": 30, "workers": 4},
            "train.batch_size: must be a multiple of the number of workers (4), got 30",
        ),
        (
            {"batch_size": 64, "workers": 2, "micro_batch": 24},
            "train.micro_batch: must divide batch_size / workers (32), got 24",
        ),
        ({"run_name": "a/b"}, "train.run_name: must be a non-empty name without '/', got 'a/b'"),
        ({"hflip": True, "lr": -1.0}, "train.lr: must be positive, got -1.0"),
        ({"images": 0}, "train.images: must be a positive integer, got 0"),
    ],
)
def test_train_config_errors_name_the_field(changes, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        TrainConfig(dataset=str(tmp_path), **changes)
    assert str(e.value) == message


def test_accumulation_keeps_the_global_batch():
    cfg = TrainConfig(dataset="/d", batch_size=64, workers=2, micro_batch=8)
    assert (cfg.per_worker_batch, cfg.accumulation) == (32, 4)


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("") == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///x/m.db") == f"sqlite:///{tmp_path}/x/m.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri("") == "http://mlflow:5000"


MANIFEST = {
    "resolution": 8,
    "counts": {"written_by_split": {"train": 1610}},
    "classes": [str(d) for d in range(10)],
    "shards": [
        {"name": "train-000000.tar", "split": "train", "samples": 1000, "sha256": "a" * 64},
        {"name": "validation-000000.tar", "split": "validation", "samples": 90, "sha256": "b" * 64},
        {"name": "train-000001.tar", "split": "train", "samples": 0, "sha256": "c" * 64},
        {"name": "train-000002.tar", "split": "train", "samples": 610, "sha256": "d" * 64},
    ],
}


@pytest.fixture(scope="module")
def latent_manifest(tmp_path_factory) -> dict:
    """A latent dataset's manifest (as tasks.encode writes it) over MANIFEST's
    shards, of a tiny autoencoder (f = 4) saved beside: 32 px images, 8x8x4 latents."""
    from pipeline.edges import autoencoders
    from tests.nets import tiny_autoencoder

    folder = tmp_path_factory.mktemp("vae")
    tiny_autoencoder(levels=3).save_pretrained(folder)
    digest = autoencoders.identity_of(autoencoders.read_folder(str(folder))).digest
    return {
        **MANIFEST,
        "kind": "latents",
        "resolution": 32,
        "flips": False,
        "autoencoder": {
            "uri": str(folder),
            "digest": digest,
            "downsample": 4,
            "latent_channels": 4,
        },
        "stats": {
            "raw_mean": [1.0, -2.0, 0.5, 0.0],
            "raw_std": [2.0, 4.0, 1.0, 0.5],
            "final_std": 0.5,
        },
    }


def test_on_latents_the_plans_network_takes_the_datasets_channels_and_side(
    latent_manifest, tmp_path
):
    plan = _plan(TrainConfig(dataset="/d"), latent_manifest, "digest")
    assert (plan.model.in_channels, plan.model.out_channels, plan.resolution) == (4, 4, 8)
    assert plan.latents == LatentSpace.of_dataset(latent_manifest)
    assert plan.latents is not None and plan.latents.side == 8
    with pytest.raises(ConfigError, match=r"^train.hflip: /d holds latents encoded without"):
        _plan(TrainConfig(dataset="/d", hflip=True), latent_manifest, "digest")
    flipped = _plan(TrainConfig(dataset="/d", hflip=True), {**latent_manifest, "flips": True}, "d")
    assert flipped.stream.hflip
    # The autoencoder must be where the dataset says, and the same one.
    moved = {**latent_manifest["autoencoder"], "uri": str(tmp_path / "gone")}
    with pytest.raises(ConfigError, match=r"^train.dataset: its autoencoder: .*gone: not found"):
        _plan(TrainConfig(dataset="/d"), {**latent_manifest, "autoencoder": moved}, "d")
    other = {**latent_manifest["autoencoder"], "digest": "0" * 64}
    with pytest.raises(
        ConfigError,
        match=r"^train.dataset: its autoencoder: .* is not the autoencoder the latents were",
    ):
        _plan(TrainConfig(dataset="/d"), {**latent_manifest, "autoencoder": other}, "d")
    # A warm start from a pixel model is refused: it makes other things.
    net = build("tiny", 8, num_classes=10, label_dropout=0.1)
    checkpoint.save(tmp_path, net, net, torch.optim.Adam(net.parameters()), checkpoint_state(net))
    warm = TrainConfig(dataset="/d", init_from=str(tmp_path))
    with pytest.raises(ConfigError, match=r"makes pixels, this run the latents of [0-9a-f]{12}"):
        _init_model(warm, _plan(warm, latent_manifest, "digest"))


def test_each_latent_is_drawn_with_its_positions_seed_and_normalised(latent_manifest):
    plan = _plan(TrainConfig(dataset="/d", batch_size=8), latent_manifest, "digest")
    order = Order(plan.stream)
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((8, 4, 8, 8)).astype(np.float32)
    std = (np.abs(rng.standard_normal((8, 4, 8, 8))) + 0.1).astype(np.float32)
    position = np.arange(16, 24)
    posterior = torch.from_numpy(np.stack([mean, std], axis=1))
    batch = ingest.Batch(None, posterior, None, position, np.zeros(8))
    x = _inputs(batch, plan, order, torch.device("cpu"))
    e = seeded_normal(order.latent_seeds(position), 4 * 8 * 8, "cpu").reshape(8, 4, 8, 8)
    z = torch.from_numpy(mean) + torch.from_numpy(std) * e
    raw_mean = torch.tensor([1.0, -2.0, 0.5, 0.0]).reshape(4, 1, 1)
    raw_std = torch.tensor([2.0, 4.0, 1.0, 0.5]).reshape(4, 1, 1)
    torch.testing.assert_close(x, (z - raw_mean) * 0.5 / raw_std)
    # A position's draw is its own: the same in a batch of other company.
    alone = ingest.Batch(None, posterior[3:4], None, position[3:4], np.zeros(1))
    torch.testing.assert_close(_inputs(alone, plan, order, torch.device("cpu"))[0], x[3])
    # ... and another position draws another latent from the same posterior.
    moved = ingest.Batch(None, posterior[3:4], None, position[3:4] + 8, np.zeros(1))
    assert not torch.allclose(_inputs(moved, plan, order, torch.device("cpu"))[0], x[3])


def test_plan_rounds_the_length_up_to_whole_batches():
    cfg = TrainConfig(dataset="/d", batch_size=32, images=1000)
    assert _plan(cfg, MANIFEST, "digest").images == 1024
    by_epochs = dataclasses.replace(cfg, epochs=2)
    assert _plan(by_epochs, MANIFEST, "digest").images == 3232  # 3220 rounded up
    plan = _plan(cfg, MANIFEST, "digest")
    assert plan.num_classes == 10 and plan.model.label_dropout == 0.1


def test_the_plans_stream_is_the_train_split_in_manifest_order():
    cfg = TrainConfig(dataset="/d", batch_size=48, shuffle_window=1000, seed=5, hflip=True)
    stream = _plan(cfg, MANIFEST, "digest").stream
    names = [s.name for s in stream.shards]
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s.samples for s in stream.shards] == [1000, 0, 610] and stream.train_images == 1610
    assert stream.shards[2].sha256 == "d" * 64
    assert (stream.seed, stream.dataset_digest, stream.batch_size) == (5, "digest", 48)
    assert stream.window == 1008 and stream.hflip  # 1000 rounded up to 21 batches of 48


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"model": ModelConfig(channel_mult=(1, 2, 2, 2, 2))},
            "train.model: the tiny template "
            "takes images of 16 to 512 px and a multiple of 16 (channel_mult 1,2,2,2,2 halves the "
            "side 4 times), got the dataset's images of 8",
        ),
        ({"model": ModelConfig("small")}, None),  # any template whose levels divide the side
        (
            {"batch_size": 2048},
            "train.batch_size: larger than the dataset's 1610 training images, got 2048",
        ),
    ],
)
def test_plan_refuses_a_model_or_batch_that_does_not_fit_the_data(changes, message):
    if message is None:
        _plan(TrainConfig(dataset="/d", **changes), MANIFEST, "digest")
        return
    with pytest.raises(ConfigError) as e:
        _plan(TrainConfig(dataset="/d", **changes), MANIFEST, "digest")
    assert str(e.value) == message


def test_the_plan_holds_the_whole_network_for_the_datas_side_and_classes():
    cfg = TrainConfig(
        dataset="/d", model=ModelConfig("small", channels=32, blocks=1), label_dropout=0.2
    )
    plan = _plan(cfg, {**MANIFEST, "resolution": 24}, "digest")
    assert plan.model == architecture(
        "small", 24, channels=32, blocks=1, num_classes=10, label_dropout=0.2
    )
    unlabelled = _plan(cfg, {**MANIFEST, "classes": None}, "digest").model
    assert (unlabelled.num_classes, unlabelled.label_dropout) == (0, 0.0)


def test_a_warm_start_must_be_the_very_network_this_run_trains(tmp_path):
    net = build("tiny", 8, num_classes=10, label_dropout=0.1)
    state = checkpoint_state(net)
    checkpoint.save(tmp_path, net, net, torch.optim.Adam(net.parameters()), state)
    same = TrainConfig(dataset="/d", init_from=str(tmp_path), label_dropout=0.2)
    assert _init_model(same, _plan(same, MANIFEST, "digest")) is not None  # dropouts aside
    wider = TrainConfig(dataset="/d", init_from=str(tmp_path), model=ModelConfig(channels=32))
    with pytest.raises(ConfigError) as e:
        _init_model(wider, _plan(wider, MANIFEST, "digest"))
    assert str(e.value) == (
        f"train.init_from: {tmp_path} is another network than this run's (its vs this run's: "
        f"channels (24 vs 32)), got '{tmp_path}'"
    )


@pytest.mark.slow
def test_a_resumed_run_is_the_same_run_and_refuses_changed_settings(mlflow_server, request):
    name = f"resume-{request.node.name[-8:]}-{np.random.default_rng().integers(1 << 30)}"
    run_id = tracking.find_or_create_run(mlflow_server, "unit", name)
    assert tracking.find_or_create_run(mlflow_server, "unit", name) == run_id
    params = {"lr": 0.002, "workers": 2, "images": 1000}
    tracking.log_params(mlflow_server, run_id, params, mutable=["workers", "images"])
    tracking.log_params(mlflow_server, run_id, params, mutable=["workers", "images"])  # again
    tracking.log_params(mlflow_server, run_id, {**params, "workers": 4, "seed": 1}, ["workers"])
    found = MlflowClient(mlflow_server).get_run(run_id)
    assert found.data.params == {"lr": "0.002", "workers": "2", "images": "1000", "seed": "1"}
    assert found.data.tags["resumed.workers"] == "4"
    with pytest.raises(tracking.ParamConflict) as e:
        tracking.log_params(mlflow_server, run_id, {"lr": 0.001, "other": 1}, ["workers"])
    assert e.value.changes == {"lr": ("0.002", "0.001")}
    assert "other" not in MlflowClient(mlflow_server).get_run(run_id).data.params


@pytest.mark.slow
def test_registering_twice_adds_one_version_per_distinct_checkpoint(mlflow_server):
    name = f"reg-{np.random.default_rng().integers(1 << 30)}"
    run_id = tracking.find_or_create_run(mlflow_server, "unit", name)
    files = {"model.safetensors": b"weights", "model.json": b"{}"}
    first = tracking.register_model(mlflow_server, run_id, name, files, {"images_seen": "10"})
    again = tracking.register_model(mlflow_server, run_id, name, files, {"images_seen": "10"})
    later = tracking.register_model(mlflow_server, run_id, name, files, {"images_seen": "20"})
    assert (first, again, later) == (1, 1, 2)
    c = MlflowClient(mlflow_server)
    assert c.get_model_version(name, "2").tags["images_seen"] == "20"


@pytest.mark.slow
def test_the_background_log_keeps_order_and_raises_a_failure_in_the_caller(mlflow_server):
    run_id = tracking.find_or_create_run(
        mlflow_server, "unit", f"background-{np.random.default_rng().integers(1 << 30)}"
    )
    log = tracking.BackgroundLog(mlflow_server, run_id, capacity=4)  # the caller waits for room
    for step in range(40):
        log.log_metrics({"loss": 1 / (step + 1), "images_seen": step * 32}, step=step)
    log.log_image(np.full((4, 4, 3), 200, np.uint8), key="samples", step=39)
    log.flush()
    c = MlflowClient(mlflow_server)
    history = c.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 1 / (s + 1)) for s in range(40)]
    stamps = [m.timestamp for m in history]
    assert stamps == sorted(stamps)  # stamped as queued, in order
    assert any("samples" in a.path for a in c.list_artifacts(run_id, "images"))

    # A failed call is raised in the caller's thread; nothing queued after it is logged.
    failing = tracking.BackgroundLog(mlflow_server, "no-such-run")
    failing.log_metrics({"loss": 1.0}, step=0)
    with pytest.raises(tracking.LoggingFailed, match="run no-such-run at http"):
        failing.flush()
    with pytest.raises(tracking.LoggingFailed):
        failing.log_metrics({"loss": 2.0}, step=1)
    with pytest.raises(tracking.LoggingFailed):
        failing.close()
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.log_metrics({"loss": 0.0}, step=40)


def test_sqlite_runs_keep_their_artifacts_beside_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/db/mlflow.db"
    (tmp_path / "db").mkdir()
    run_id = tracking.find_or_create_run(uri, "local", "r")
    tracking.log_image(uri, run_id, np.zeros((4, 4, 3), np.uint8), key="samples", step=1)
    assert not (tmp_path / "mlruns").exists()
    logged = list((tmp_path / "db" / "mlartifacts" / "local").rglob("*.png"))
    assert len(logged) == 1 and "samples" in logged[0].name


def test_a_snapshot_has_the_same_bytes_in_every_process():
    # safetensors writes metadata in a hash map's order, another in each process;
    # a resumed run's checkpoint must still be the straight run's, byte for byte.
    code = (
        "import hashlib, torch\n"
        "from pipeline.edges import snapshots\n"
        "torch.manual_seed(0)\n"
        "nets = {0.05: torch.nn.Linear(3, 2), 0.1: torch.nn.Linear(3, 2)}\n"
        "print(hashlib.sha256(snapshots.encode(nets, 640)).hexdigest())\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(4)
    ]
    digests = {proc.communicate()[0] for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(digests) == 1, digests  # 4 processes in one order by chance: p = 1/216


def test_a_window_too_small_for_the_workers_is_warned_about(caplog):
    big = {**MANIFEST, "shards": [dict(MANIFEST["shards"][0], samples=1000)] * 16}
    big["counts"] = {"written_by_split": {"train": 16_000}}
    for workers, window, warned in [(4, 4096, False), (16, 4096, True), (16, 16_000, False)]:
        cfg = TrainConfig(dataset="/d", batch_size=64, workers=workers, shuffle_window=window)
        caplog.clear()
        _warn_rereads(cfg, _plan(cfg, big, "digest"))
        assert bool(caplog.records) == warned, (workers, window, caplog.text)
    # 16 workers take 256 images each of a window of 4,096: a shard of 1,000 meets 5.
    assert caplog.records == [] and "a window of 16000 or more" not in caplog.text
    cfg = TrainConfig(dataset="/d", batch_size=64, workers=16)
    _warn_rereads(cfg, _plan(cfg, big, "digest"))
    assert "read by up to 5 of them per pass; a window of 16000 or more" in caplog.text
