"""Evaluation and promotion: the held-out loss against the closed form of the
exact denoiser, the pixel features, and promotion decisions in a real MLflow."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, EvaluateConfig, PromoteConfig
from pipeline.config.records import Lineage, ModelCard
from pipeline.data import shards
from pipeline.data.reference import pixel_features
from pipeline.edges import registry, snapshots, tracking
from pipeline.edges.registry import Model
from pipeline.jobs.evaluate import EvaluateResult, carry, check_fits
from pipeline.jobs.evaluate.outputs import heldout_losses
from pipeline.jobs.evaluate.results import evaluation_settings
from pipeline.jobs.promote import EXPERIMENT, promote
from pipeline.maths.analytic import GaussianDenoiser
from pipeline.maths.architecture import architecture
from pipeline.maths.edm import SIGMA_DATA
from tests import tasks


def test_heldout_loss_of_the_exact_denoiser_is_the_closed_form():
    # x ~ N(0, s^2) per pixel: D* has the posterior variance s^2 sigma^2 / (s^2 + sigma^2),
    # so its EDM loss is lambda(sigma) times that (GaussianDenoiser.loss_per_dim).
    std = torch.full((3, 4, 4), 0.5)
    exact = GaussianDenoiser(torch.zeros(3, 4, 4), std)
    x = exact.sample(4000, torch.Generator().manual_seed(1))
    sigmas = [0.05, 0.5, 2.0, 10.0]
    losses = heldout_losses(exact, x, None, sigmas, seed=0, batch_size=400)
    for sigma, loss in zip(sigmas, losses, strict=True):
        expected = float(exact.loss_per_dim(torch.tensor(sigma), SIGMA_DATA))
        # 4000 images x 48 pixels of a scaled chi-square: relative std ~ 1/sqrt(96000).
        assert loss == pytest.approx(expected, rel=0.02), sigma
    # Fixed noise per image: another batch size gives the same numbers (to float32
    # rounding of the per-image means; other noise moves them by ~1e-3).
    again = heldout_losses(exact, x, None, sigmas, seed=0, batch_size=36)
    assert again == pytest.approx(losses, rel=1e-6)
    # And other noise (another seed) other numbers, still near the closed form.
    other = heldout_losses(exact, x, None, sigmas, seed=1, batch_size=400)
    assert max(abs(o / a - 1) for o, a in zip(other, losses, strict=True)) > 1e-4


def test_a_worse_denoiser_has_a_higher_heldout_loss():
    std = torch.full((3, 4, 4), 0.5)
    exact = GaussianDenoiser(torch.zeros(3, 4, 4), std)
    wrong = GaussianDenoiser(torch.zeros(3, 4, 4), std * 2)  # assumes the wrong variance
    x = exact.sample(500, torch.Generator().manual_seed(2))
    good = heldout_losses(exact, x, None, [0.5, 1.0], seed=0, batch_size=100)
    bad = heldout_losses(wrong, x, None, [0.5, 1.0], seed=0, batch_size=100)
    assert all(b > g * 1.05 for g, b in zip(good, bad, strict=True))


def test_pixel_features_scale_to_unit_range_and_average_large_images_down():
    small = np.array([[[[0, 255, 0]]]], dtype=np.uint8)  # one 1x1 RGB image
    assert pixel_features(small).tolist() == [[-1.0, 1.0, -1.0]]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    big = blocks.repeat(2, axis=1).repeat(2, axis=2)  # 64x64 made of 2x2 blocks
    assert pixel_features(big).shape == (2, 32 * 32 * 3)
    np.testing.assert_allclose(pixel_features(big), pixel_features(blocks), atol=1e-12)


def test_credentials_in_urls_are_redacted_for_logs():
    uri = "https://alice:s3cret@mlflow.example.com:5000/path?x=1"
    assert tracking.redact(uri) == "https://***@mlflow.example.com:5000/path?x=1"
    text = f"run at {uri} and s3://bucket/key@v1 and sqlite:////tmp/mlflow.db"
    assert tracking.redact(text) == (
        "run at https://***@mlflow.example.com:5000/path?x=1 and "
        "s3://bucket/key@v1 and sqlite:////tmp/mlflow.db"
    )


def _model(classes: list[str] | None, num_classes: int) -> Model:
    card = ModelCard(
        template="tiny",
        model=architecture("tiny", 8, num_classes=num_classes),
        resolution=8,
        classes=None if classes is None else tuple(classes),
    )
    return Model(card, b"", Lineage("m", 1, None, "0" * 64))


def test_a_model_that_does_not_fit_the_dataset_is_refused_before_any_work():
    cfg = EvaluateConfig(model="m/1", dataset="/tmp/d", images=16, reference_images=16)
    digits = {"classes": [str(d) for d in range(10)], "resolution": 8}
    check_fits(cfg, _model([str(d) for d in range(10)], 10), digits)  # fits
    check_fits(cfg, _model(None, 0), digits)  # unconditional: labels are not used
    with pytest.raises(ConfigError, match="the model has 3 classes, the dataset 10"):
        check_fits(cfg, _model(["a", "b", "c"], 3), digits)
    renamed = [str(d) for d in range(9)] + ["x"]
    with pytest.raises(ConfigError, match="the model's classes are"):
        check_fits(cfg, _model(renamed, 10), digits)
    too_few = EvaluateConfig(model="m/1", dataset="/tmp/d", images=3, neighbours=3)
    with pytest.raises(ConfigError, match="evaluate.neighbours: must be below images"):
        check_fits(too_few, _model(None, 0), digits)


def test_ema_lengths_are_reconstructed_at_the_card_s_images_and_need_snapshots(tmp_path):
    from safetensors.torch import load

    from pipeline.maths.unet import UNet

    network = architecture("tiny", 8)
    torch.manual_seed(0)
    stored = {images: {std: UNet(network) for std in (0.05, 0.1)} for images in (128, 256)}
    for images, nets in stored.items():
        snapshots.write(str(tmp_path), images, snapshots.encode(nets, images))
    # A later snapshot is never read: this one would fail the reconstruction.
    (tmp_path / f"{384:012d}.safetensors").write_bytes(b"not a snapshot")
    for images_seen in (128, 256):  # the registered weights' images, not the latest
        card = ModelCard("tiny", network, 8, images_seen=images_seen, snapshots=str(tmp_path))
        model = registry.at_ema_length(Model(card, b"", Lineage("m", 1, "r", "0" * 64)), 0.1, "f")
        # A stored length comes back as it was stored.
        expected = stored[images_seen][0.1].state_dict()
        got = load(model.weights)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)
        assert model.lineage.version == 1 and model.lineage.digest != "0" * 64

    # Weights taken where the run stored no snapshot cannot be reconstructed.
    card = ModelCard("tiny", network, 8, images_seen=200, snapshots=str(tmp_path))
    with pytest.raises(ConfigError, match="no snapshot at its 200 images seen"):
        registry.at_ema_length(Model(card, b"", Lineage("m", 1, "r", "0" * 64)), 0.1, "f")

    with pytest.raises(ConfigError) as err:
        registry.require_snapshots(_model(None, 0), "evaluate.ema_length", (0.05, 0.1))
    assert str(err.value) == (
        "evaluate.ema_length: m/1 has no post-hoc EMA snapshots (its training run stored "
        "none, or it was registered before runs kept them), so only its own EMA weights "
        "can be scored, got (0.05, 0.1)"
    )
    missing = dataclasses.replace(_model(None, 0).card, snapshots=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"^f: m/1: cannot reconstruct from .*none"):
        registry.at_ema_length(Model(missing, b"", Lineage("m", 1, "r", "0" * 64)), 0.1, "f")


def test_an_unreachable_mlflow_is_one_redacted_line_and_exit_1():
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    uri = "http://promoter:topsecret@127.0.0.1:9"  # nothing listens on port 9 here
    argv = tasks.command("promote", "--model_name", "x", "--tracking_uri", uri)
    done = tasks.run(argv, env, timeout=120)
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("tasks.promote: failed: MLflow: ") and "http://***@127.0.0.1:9" in line
    assert "topsecret" not in done.stdout + done.stderr


# --- promotion, in a real MLflow server ------------------------------------------------


def _version(uri: str, name: str, scores: dict[str, float], key: str = "k1") -> int:
    """Register a version (placeholder files) scored with evaluation `key`."""
    run_id = tracking.find_or_create_run(uri, "promotion-test", f"{name}-{uuid.uuid4().hex[:6]}")
    files = {"model.safetensors": uuid.uuid4().bytes, "model.json": b"{}"}
    version = tracking.register_model(uri, run_id, name, files, {"run_id": run_id})
    tags = {f"eval.{key}.{metric}": value for metric, value in scores.items()}
    tracking.set_version_tags(uri, name, version, {"eval.key": key, **tags})
    return version


def _champion(uri: str, name: str) -> int:
    return tracking.model_version(uri, name, alias="champion")["version"]


@pytest.mark.slow
def test_a_candidate_that_copies_is_refused_whatever_its_score(mlflow_server):
    uri, name = mlflow_server, f"copies-{uuid.uuid4().hex[:8]}"
    cfg = dict(model_name=name, metric="fd_pixel", max_copy_rate=0.05, tracking_uri=uri)
    v1 = _version(uri, name, {"fd_pixel": 6.0, "copy_rate": 0.5})
    first = promote(PromoteConfig(**cfg))  # not even the first champion
    assert not first.promoted and tracking.model_version(uri, name, alias="champion") is None
    assert first.summary() == f"{name} version {v1} refused: 50.00% of its samples copy " \
        "training images (at most 5.00%)"  # fmt: skip
    assert tracking.model_version(uri, name, v1)["tags"]["promotion.decision"] == "refused_copies"
    v2 = _version(uri, name, {"fd_pixel": 6.0, "copy_rate": 0.0})
    assert promote(PromoteConfig(**cfg)).promoted and _champion(uri, name) == v2
    v3 = _version(uri, name, {"fd_pixel": 1.0, "copy_rate": 0.06})  # far better FD
    refused = promote(PromoteConfig(**cfg))
    assert not refused.promoted and refused.copy_limit == 0.05 and _champion(uri, name) == v2
    assert refused.candidate == v3 and refused.candidate_value == 0.06
    again = promote(PromoteConfig(**cfg))
    assert again.already_decided and again.summary().startswith("already decided: ")
    assert "refused" in again.summary()
    # A gate with no copy_rate to read is an error, never a promotion.
    _version(uri, name, {"fd_pixel": 0.5})
    with pytest.raises(ConfigError, match=r"^promote.max_copy_rate: .* has no copy_rate"):
        promote(PromoteConfig(**cfg))
    assert _champion(uri, name) == v2


@pytest.mark.slow
def test_promotion_decides_on_the_metric_with_a_margin_and_records_both_numbers(mlflow_server):
    uri, name = mlflow_server, f"promo-{uuid.uuid4().hex[:8]}"
    cfg = dict(model_name=name, metric="fd_pixel", margin=0.1, tracking_uri=uri)

    v1 = _version(uri, name, {"fd_pixel": 6.0, "precision": 0.5})
    first = promote(PromoteConfig(**cfg))  # version 0: the latest
    assert first.promoted and first.champion is None and _champion(uri, name) == v1
    assert tracking.model_version(uri, name, v1)["tags"]["promotion.decision"] == "first_champion"

    v2 = _version(uri, name, {"fd_pixel": 5.0, "precision": 0.6})  # 5.0 < 6.0 * 0.9
    better = promote(PromoteConfig(**cfg, version=v2))
    assert better.promoted and (better.candidate_value, better.champion_value) == (5.0, 6.0)
    assert _champion(uri, name) == v2

    v3 = _version(uri, name, {"fd_pixel": 4.9, "precision": 0.6})  # better, not by 10%
    worse = promote(PromoteConfig(**cfg, version=v3))
    assert not worse.promoted and _champion(uri, name) == v2
    tags = tracking.model_version(uri, name, v3)["tags"]
    assert tags["promotion.decision"] == "kept_champion"
    assert float(tags["promotion.candidate_value"]) == 4.9
    assert float(tags["promotion.champion_value"]) == 5.0
    assert tags["promotion.champion_version"] == str(v2)

    # Both decisions against a champion are runs with the two numbers.
    c = tracking.client(uri)
    runs = c.search_runs(
        [c.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.model_name = '{name}'",
    )
    numbers = {r.data.tags["decision"]: r.data.metrics for r in runs}
    assert numbers["promoted"] == {"candidate": 5.0, "champion": 6.0}
    assert numbers["kept_champion"] == {"candidate": 4.9, "champion": 5.0}

    # Deciding again on v3 writes nothing.
    again = promote(PromoteConfig(**cfg, version=v3))
    assert again.already_decided and not again.promoted
    assert len(
        c.search_runs(
            [c.get_experiment_by_name(EXPERIMENT).experiment_id],
            filter_string=f"tags.model_name = '{name}'",
        )
    ) == len(runs)

    # Higher is better for precision.
    v4 = _version(uri, name, {"fd_pixel": 9.0, "precision": 0.7})
    assert promote(PromoteConfig(**{**cfg, "metric": "precision"}, version=v4)).promoted
    assert _champion(uri, name) == v4
    # The champion itself is no candidate: nothing to decide, nothing written.
    same = promote(PromoteConfig(**cfg, version=v4))
    assert same.already_decided and same.champion == same.candidate == v4

    # The margin is relative to the champion's magnitude, also below zero (KID).
    kid = {**cfg, "metric": "kid"}
    v5 = _version(uri, name, {"kid": -0.001})
    tracking.set_version_tags(uri, name, v4, {"eval.k1.kid": -0.0009})
    assert promote(PromoteConfig(**kid, version=v5)).promoted  # -0.001 < -0.0009 - 0.00009
    v6 = _version(uri, name, {"kid": -0.00105})  # better, but by 5% < 10%
    assert not promote(PromoteConfig(**kid, version=v6)).promoted
    assert _champion(uri, name) == v5


@pytest.mark.slow
def test_a_missing_score_is_an_error_not_a_promotion(mlflow_server):
    uri, name = mlflow_server, f"promo-{uuid.uuid4().hex[:8]}"
    cfg = dict(model_name=name, metric="fd_pixel", tracking_uri=uri)
    v1 = _version(uri, name, {"fd_pixel": 6.0})
    promote(PromoteConfig(**cfg))
    v2 = _version(uri, name, {"precision": 0.9})  # no fd_pixel
    with pytest.raises(ConfigError, match=rf"version {v2} has no fd_pixel"):
        promote(PromoteConfig(**cfg, version=v2))
    v3 = _version(uri, name, {"fd_pixel": 1.0}, key="k2")  # the champion has no k2 score
    with pytest.raises(ConfigError, match=rf"version {v1} has no fd_pixel from evaluation k2"):
        promote(PromoteConfig(**cfg, version=v3))
    assert _champion(uri, name) == v1
    with pytest.raises(ConfigError, match="promote.version: model .* has no version 99"):
        promote(PromoteConfig(**cfg, version=99))
    run_id = tracking.find_or_create_run(uri, "promotion-test", f"{name}-unscored")
    unscored = tracking.register_model(uri, run_id, name, {"model.json": b"{}"}, {"x": "1"})
    with pytest.raises(ConfigError, match=rf"version {unscored} has no evaluation"):
        promote(PromoteConfig(**cfg, version=unscored))
    assert _champion(uri, name) == v1


@pytest.mark.slow
def test_a_winning_ema_length_s_scores_are_carried_to_its_version(mlflow_server, tmp_path):
    # The nightly registers a winning post-hoc EMA length as a version of its own;
    # that version's evaluation is the length's, carried, not generated again.
    uri, name = mlflow_server, f"carry-{uuid.uuid4().hex[:8]}"
    (tmp_path / "dataset").mkdir()
    manifest = json.dumps({"format": shards.FORMAT, "shards": []}).encode()
    (tmp_path / "dataset" / shards.MANIFEST).write_bytes(manifest)
    card = ModelCard("tiny", architecture("tiny", 8), 8)
    weights = uuid.uuid4().bytes
    run_id = tracking.find_or_create_run(uri, "carry-test", name)
    files = {"model.safetensors": weights, "model.json": json.dumps(card.to_dict()).encode()}
    version = tracking.register_model(uri, run_id, name, files, {"run_id": run_id})
    cfg = EvaluateConfig(
        model=f"{name}/{version}",
        dataset=str(tmp_path / "dataset"),
        output=str(tmp_path / "evaluations"),
        tracking_uri=uri,
    )
    settings = evaluation_settings(cfg, hashlib.sha256(manifest).hexdigest())
    digest = hashlib.sha256(weights).hexdigest()
    source = {
        "model_ref": f"{name}/1 at EMA length 0.1",
        "model": {"name": name, "version": 1, "run_id": run_id, "digest": digest},
        "key": "lengthkey",
        "dataset": {"uri": cfg.dataset, "digest": settings["dataset"], "version": 1},
        "settings": {**settings, "ema_length": 0.1},
        "metrics": {"fd_pixel": 1.25, "label_fidelity": 0.875},
        "not_computed": {"fid": "no Inception weights file given"},
        "evaluated_at": "2026-12-05T00:00:00+00:00",
    }
    scored = EvaluateResult(str(tmp_path / "length.json"), source, already_complete=False)

    carried = carry(cfg, scored)
    results = carried.results
    assert results["metrics"] == source["metrics"] and results["carried_from"] == scored.uri
    assert results["model"]["version"] == version and results["model"]["digest"] == digest
    assert "ema_length" not in results["settings"] and results["key"] != "lengthkey"
    assert json.loads((tmp_path / "evaluations" / carried.uri.rsplit("/", 1)[1]).read_text()) == (
        results
    )
    # Tagged as an evaluation would tag it: promotion reads these.
    tags = tracking.model_version(uri, name, version)["tags"]
    assert tags["eval.key"] == results["key"]
    assert float(tags[f"eval.{results['key']}.fd_pixel"]) == 1.25
    assert carry(cfg, scored).already_complete

    other = EvaluateResult(
        scored.uri, {**source, "model": {**source["model"], "digest": "0"}}, False
    )
    with pytest.raises(ValueError, match="scored other weights"):
        carry(cfg, other)
    changed = {**source, "settings": {**source["settings"], "guidance": 3.0}}
    with pytest.raises(ValueError, match="other settings"):
        carry(cfg, EvaluateResult(scored.uri, changed, False))
