"""The nightly pipeline on the real services: SeaweedFS, an MLflow server and the
session's Ray cluster. Three runs: a first night, a second night after new raw
images arrived, and the second night again."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid

import pytest

from pipeline.config.nightly import today as tracking_today
from pipeline.data import shards
from pipeline.data.digits import write_digits
from pipeline.edges import registry, storage, tracking
from tests import tasks

pytestmark = pytest.mark.slow

# Known fake MLflow credentials (the test server ignores them), searched for below:
# in the environment, and as user:password in the tracking URI the tasks are given.
MLFLOW_SECRETS = {
    "MLFLOW_TRACKING_USERNAME": "nightly-user",
    "MLFLOW_TRACKING_PASSWORD": f"mlflow-password-{uuid.uuid4().hex}",
}
URI_PASSWORD = f"uri-password-{uuid.uuid4().hex}"
SMALL = [
    "--images",
    "640",
    "--lr_rampup_images",
    "128",
    "--eval_images",
    "128",
    "--eval_sampler",
    "heun:4",
    "--sample_images",
    "64",
    "--sample_sampler",
    "heun:4",
    "--ema_lengths",
    "0.15",  # one reconstructed length against the fixed EMA: each costs an evaluation
]


def nightly_task(
    prefix: str, name: str, night: str, uri: str, *extra: str
) -> subprocess.CompletedProcess:
    paths = [
        arg
        for part in ("raw", "dataset", "storage", "evaluations", "samples")
        for arg in (f"--{part}", f"{prefix}/{part}")
    ]
    with_password = uri.replace("://", f"://nightly:{URI_PASSWORD}@")
    argv = tasks.command(
        "nightly",
        *paths,
        "--model_name",
        name,
        "--night",
        night,
        "--tracking_uri",
        with_password,
        *SMALL,
        *extra,
    )
    return tasks.run(argv, {**os.environ, **MLFLOW_SECRETS}, timeout=900)


def bucket_listing(prefix: str) -> dict[str, tuple]:
    import boto3

    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    pages = (
        boto3.client("s3")
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=key + "/")
    )
    return {o["Key"]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])}


def mlflow_state(uri: str, name: str) -> dict:
    """Every run of the nightly's experiments and every version of the model, with
    everything a re-run could change."""
    c = tracking.client(uri)
    runs = {}
    for experiment in ("nightly", "promotion", "sampling"):
        found = c.get_experiment_by_name(experiment)
        for r in c.search_runs([found.experiment_id]) if found else []:
            history = {
                k: [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, k)]
                for k in r.data.metrics
            }
            runs[r.info.run_id] = (
                r.info.status,
                r.info.end_time,
                r.data.params,
                r.data.tags,
                history,
            )
    versions = {v.version: v.tags for v in c.search_model_versions(f"name = '{name}'")}
    champion = tracking.model_version(uri, name, alias="champion")["version"]
    return {"runs": runs, "versions": versions, "champion": champion}


def shard_digests(dataset: str, manifest: dict) -> dict[str, str]:
    return {
        s["name"]: hashlib.sha256(storage.read_bytes(storage.join(dataset, s["name"]))).hexdigest()
        for s in manifest["shards"]
    }


def ema_candidate(uri: str, name: str, run_id: str) -> int:
    """The candidate of the night whose training run is `run_id`, checked: the
    trained version's own weights and each post-hoc EMA length were scored, and the
    candidate is the best of them, tagged with its length."""
    c = tracking.client(uri)
    versions = {int(v.version): v.tags for v in c.search_model_versions(f"run_id = '{run_id}'")}
    [trained] = [v for v, tags in versions.items() if "ema_source_version" not in tags]
    tags = versions[trained]
    assert tags["ema_length"] == "fixed"  # its own weights: the fixed half-life EMA
    scored = {"fixed": float(tags[f"eval.{tags['eval.key']}.fd_pixel"])}
    for key in {k.split(".")[1] for k in tags if k.endswith(".ema_length")}:
        scored[tags[f"eval.{key}.ema_length"]] = float(tags[f"eval.{key}.fd_pixel"])
    assert set(scored) == {"fixed", "0.15"}, tags
    best = min(scored, key=scored.__getitem__)
    if best == "fixed":
        assert set(versions) == {trained}
        return trained
    [candidate] = set(versions) - {trained}
    found = versions[candidate]
    assert found["ema_length"] == best and found["ema_source_version"] == str(trained)
    assert float(found[f"eval.{found['eval.key']}.fd_pixel"]) == scored[best]
    assert found["eval.key"] == tags["eval.key"]  # comparable with the champion
    return candidate


@pytest.mark.trial
def test_three_nights(ray_cluster, mlflow_server, s3_prefix):
    uri, name = mlflow_server, f"digits-{uuid.uuid4().hex[:6]}"
    dataset = f"{s3_prefix}/dataset"
    write_digits(f"{s3_prefix}/raw", 0, 600)

    # Night 1: builds the dataset, trains from scratch, the first model is champion.
    first = nightly_task(s3_prefix, name, "2026-11-24", uri)
    assert first.returncode == 0, first.stderr[-3000:]
    v1_bytes = storage.read_bytes(f"{dataset}/{shards.MANIFEST}")
    v1 = json.loads(v1_bytes)
    assert v1["version"] == 1 and v1["counts"]["inputs"] == 600
    old_digests = shard_digests(dataset, v1)
    assert old_digests == {s["name"]: s["sha256"] for s in v1["shards"]}
    c = tracking.client(uri)
    nightly_runs = c.get_experiment_by_name("nightly").experiment_id
    [run1] = c.search_runs(
        [nightly_runs], filter_string=f"tags.`mlflow.runName` = '{name}-2026-11-24'"
    )
    candidate1 = ema_candidate(uri, name, run1.info.run_id)
    assert "ema: fd_pixel by EMA length: fixed " in first.stdout
    assert tracking.model_version(uri, name, alias="champion")["version"] == candidate1
    version1 = tracking.model_version(uri, name, candidate1)
    assert version1["tags"]["promotion.decision"] == "first_champion"
    key1 = version1["tags"]["eval.key"]
    for metric in (
        "fd_pixel",
        "swd_pixel",
        "precision",
        "recall",
        "heldout_loss",
        "label_fidelity",
        "cas",
    ):
        assert float(version1["tags"][f"eval.{key1}.{metric}"]) >= 0
    evaluated = [
        json.loads(storage.read_bytes(o.uri))
        for o in storage.list_objects(f"{s3_prefix}/evaluations")
    ]
    lengths = sorted(
        r["settings"].get("ema_length", 0) for r in evaluated if r["model"]["version"] == 1
    )
    assert lengths == [0, 0.15]  # version 1's own weights, and the length
    [results] = [
        r
        for r in evaluated
        if r["model"]["version"] == candidate1 and "ema_length" not in r["settings"]
    ]
    assert results["dataset"]["version"] == 1
    # A winning length's scores are carried to its version, not generated again.
    assert ("carried_from" in results) == (candidate1 != 1)
    assert set(results["not_computed"]) == {"fid", "kid"}  # no Inception weights given
    samples = json.loads(storage.read_bytes(f"{s3_prefix}/samples/2026-11-24/manifest.json"))
    assert samples["counts"]["images"] == 64
    assert samples["job"]["model"]["version"] == candidate1

    # New raw images arrive; night 2 preprocesses only those, from the champion.
    write_digits(f"{s3_prefix}/raw", 600, 300)
    second = nightly_task(s3_prefix, name, "2026-11-25", uri)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "appended 300 new inputs" in second.stdout
    v2_bytes = storage.read_bytes(f"{dataset}/{shards.MANIFEST}")
    v2 = json.loads(v2_bytes)
    assert v2["version"] == 2
    assert v2["previous"] == {"version": 1, "sha256": hashlib.sha256(v1_bytes).hexdigest()}
    assert storage.read_bytes(f"{dataset}/manifests/000001.json") == v1_bytes
    assert v2["shards"][: len(v1["shards"])] == v1["shards"]  # old entries first, unchanged
    assert {n: d for n, d in shard_digests(dataset, v2).items() if n in old_digests} == old_digests
    assert v2["counts"]["inputs"] == 900
    assert v2["counts"]["written"] + v2["counts"]["rejected"] == 900

    night2 = f"tags.`mlflow.runName` = '{name}-2026-11-25'"
    [run2] = c.search_runs([nightly_runs], filter_string=night2)
    assert run2.info.status == "FINISHED"
    assert run2.data.params["init_from"] == f"{name}/{candidate1}"
    assert run2.data.tags["init_from.digest"] == results["model"]["digest"]
    candidate2 = ema_candidate(uri, name, run2.info.run_id)
    version2 = tracking.model_version(uri, name, candidate2)
    key2 = version2["tags"]["eval.key"]
    assert key2 != key1  # a new dataset version: a new evaluation ...
    champion_tags = tracking.model_version(uri, name, candidate1)["tags"]
    assert f"eval.{key2}.fd_pixel" in champion_tags  # ... of the champion too
    decision = version2["tags"]["promotion.decision"]
    assert decision in ("promoted", "kept_champion")
    assert float(version2["tags"]["promotion.candidate_value"]) == float(
        version2["tags"][f"eval.{key2}.fd_pixel"]
    )
    assert float(version2["tags"]["promotion.champion_value"]) == float(
        champion_tags[f"eval.{key2}.fd_pixel"]
    )
    champion = tracking.model_version(uri, name, alias="champion")["version"]
    assert champion == (candidate2 if decision == "promoted" else candidate1)
    night2_samples = json.loads(storage.read_bytes(f"{s3_prefix}/samples/2026-11-25/manifest.json"))
    assert night2_samples["job"]["model"]["version"] == champion

    # The same night again writes nothing: not to the bucket, not to MLflow.
    bucket_before, mlflow_before = bucket_listing(s3_prefix), mlflow_state(uri, name)
    third = nightly_task(s3_prefix, name, "2026-11-25", uri)
    assert third.returncode == 0, third.stderr[-3000:]
    assert bucket_listing(s3_prefix) == bucket_before
    assert mlflow_state(uri, name) == mlflow_before
    assert "already complete" in third.stdout and "finished earlier" in third.stdout

    # A new night without new data trains nothing (a version has this dataset).
    fourth = nightly_task(s3_prefix, name, "2026-11-26", uri, "--sample_images", "0")
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert "train: nothing new" in fourth.stdout
    assert set(mlflow_state(uri, name)["versions"]) == set(mlflow_before["versions"])

    # No credential value reached MLflow, the logs, or any object in the bucket.
    secrets = [
        os.environ["AWS_SECRET_ACCESS_KEY"],
        os.environ["AWS_ACCESS_KEY_ID"],
        MLFLOW_SECRETS["MLFLOW_TRACKING_PASSWORD"],
        URI_PASSWORD,
    ]
    logged = json.dumps(mlflow_state(uri, name), default=str) + "".join(
        r.stdout + r.stderr for r in (first, second, third, fourth)
    )
    stored = b"".join(storage.read_bytes(o.uri) for o in storage.list_objects(s3_prefix))
    for secret in secrets:
        assert secret not in logged and secret.encode() not in stored
    assert "://***@127.0.0.1" in json.dumps(mlflow_before)  # redacted, not dropped


def test_guidance_without_class_labels_is_refused_before_training(
    ray_cluster, mlflow_server, s3_prefix, tmp_path
):
    raw = tmp_path / "raw"  # digits without class folders: an unlabelled dataset
    write_digits(str(raw), 0, 40)
    for png in raw.glob("*/*.png"):
        png.rename(raw / f"{png.parent.name}-{png.name}")
    done = tasks.run(
        tasks.command(
            "nightly",
            "--raw",
            str(raw),
            "--dataset",
            f"{s3_prefix}/dataset",
            "--storage",
            f"{s3_prefix}/runs",
            "--model_name",
            "flat",
            "--tracking_uri",
            mlflow_server,
            "--sample_guidance",
            "2",
        )
    )
    assert done.returncode == 2, done.stderr[-3000:]
    # (Ray's own lines of the preprocessing come before it.)
    [line] = [e for e in done.stderr.splitlines() if e.startswith("tasks.nightly")]
    assert line == done.stderr.splitlines()[-1]
    assert line == (
        f"tasks.nightly: error: nightly.sample_guidance: guidance needs class "
        f"labels, and {s3_prefix}/dataset has none (its inputs are not in class "
        f"folders), got 2.0"
    )
    assert not storage.exists(f"{s3_prefix}/runs/flat-{tracking_today()}")
    assert tracking.model_version(mlflow_server, "flat") is None


@pytest.mark.trial
def test_two_latent_nights_encode_only_the_new_shards_and_generate_pixels(
    ray_cluster, mlflow_server, s3_prefix, tmp_path
):
    # Digits at 32 px through a tiny random autoencoder (f = 4: 8x8x4 latents) kept
    # in the bucket; everything else in the bucket too, tracked by the MLflow server.
    from tests.nets import tiny_autoencoder

    uri, name = mlflow_server, f"latent-{uuid.uuid4().hex[:6]}"
    tiny_autoencoder(levels=3).save_pretrained(tmp_path / "vae")
    vae = f"{s3_prefix}/autoencoders/tiny"
    for path in (tmp_path / "vae").iterdir():
        storage.write_bytes(f"{vae}/{path.name}", path.read_bytes())
    latents = f"{s3_prefix}/latents"
    extra = ("--resolution", "32", "--autoencoder", vae, "--latents", latents, "--ema_lengths", "")
    write_digits(f"{s3_prefix}/raw", 0, 400)

    first = nightly_task(s3_prefix, name, "2026-11-24", uri, *extra)
    assert first.returncode == 0, first.stderr[-3000:]
    z1_bytes = storage.read_bytes(f"{latents}/{shards.MANIFEST}")
    z1 = json.loads(z1_bytes)
    pixels1 = json.loads(storage.read_bytes(f"{s3_prefix}/dataset/{shards.MANIFEST}"))
    assert z1["kind"] == "latents" and z1["version"] == 1 and z1["latent_shape"] == [4, 8, 8]
    assert (
        z1["source"]["sha256"]
        == hashlib.sha256(storage.read_bytes(f"{s3_prefix}/dataset/{shards.MANIFEST}")).hexdigest()
    )
    assert [s["name"] for s in z1["shards"]] == [s["name"] for s in pixels1["shards"]]
    champion = tracking.model_version(uri, name, alias="champion")
    assert champion is not None
    card = registry.load_model(f"{name}/{champion['version']}", uri, "model").card
    assert card.latents is not None and card.latents.digest == z1["autoencoder"]["digest"]
    assert champion["tags"]["autoencoder_digest"] == z1["autoencoder"]["digest"]
    key = champion["tags"]["eval.key"]
    assert float(champion["tags"][f"eval.{key}.fd_pixel"]) > 0  # scored on pixels
    samples = json.loads(storage.read_bytes(f"{s3_prefix}/samples/2026-11-24/manifest.json"))
    assert samples["resolution"] == 32 and samples["counts"]["images"] == 64
    old = shard_digests(latents, z1)

    write_digits(f"{s3_prefix}/raw", 400, 200)
    second = nightly_task(s3_prefix, name, "2026-11-25", uri, *extra)
    assert second.returncode == 0, second.stderr[-3000:]
    z2 = json.loads(storage.read_bytes(f"{latents}/{shards.MANIFEST}"))
    assert z2["version"] == 2 and z2["previous"]["sha256"] == hashlib.sha256(z1_bytes).hexdigest()
    assert len(z2["shards"]) > len(z1["shards"])
    assert {n: d for n, d in shard_digests(latents, z2).items() if n in old} == old
    assert f"encode: appended {len(z2['shards']) - len(z1['shards'])} shards" in second.stdout
    [run2] = tracking.client(uri).search_runs(
        [tracking.client(uri).get_experiment_by_name("nightly").experiment_id],
        filter_string=f"tags.`mlflow.runName` = '{name}-2026-11-25'",
    )
    assert run2.data.params["init_from"] == f"{name}/{champion['version']}"
    assert run2.data.params["dataset"] == latents
