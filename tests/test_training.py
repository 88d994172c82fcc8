"""`tasks.train` as users run it: on a two-node local Ray cluster, from shards in
the SeaweedFS bucket, tracked by an MLflow server, with checkpoints in the bucket.
Bad inputs, a NaN in the loss. (Runs killed and nodes lost: tests/test_chaos.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.data import shards
from pipeline.data.digits import write_digits
from pipeline.edges import snapshots, storage
from pipeline.maths.architecture import architecture
from pipeline.maths.phema import STDS
from tests import services
from tests.runs import checkpoints, final_state, history, runs_named
from tests.services import ROOT
from tests.tasks import command, run

pytestmark = pytest.mark.slow

FAULTS = ROOT / "tests" / "faults"
"""Holds the sitecustomize.py that injects faults into the cluster's training runs."""

TRAINING = [
    "--model.template",
    "tiny",
    "--batch_size",
    "32",
    "--lr",
    "2e-3",
    "--lr_rampup_images",
    "256",
    "--ema_halflife_images",
    "500",
    "--log_every_images",
    "128",
    "--sample_every_images",
    "1024",
    "--checkpoint_every_images",
    "512",
    "--keep_checkpoints",
    "2",
    "--experiment",
    "tests",
]


@pytest.fixture(scope="module")
def cluster(s3, session_dir):
    """Two Ray nodes of 2 CPUs each (one training worker and Ray Data's readers on
    each), separate from the session's one-node cluster, with its own RAY_TMPDIR.
    Its processes load tests/faults/sitecustomize.py: a test asks for a fault in
    one run by writing `c.faults` (see there)."""
    workdir = session_dir / "ray-two-nodes"
    workdir.mkdir()
    paths = [str(FAULTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = services.service_env(
        RAY_TMPDIR=tempfile.mkdtemp(prefix="r", dir="/tmp"),
        PYTHONPATH=os.pathsep.join(paths),
        TRAINING_TEST_FAULTS=str(workdir / "faults.json"),
    )
    env.pop("RAY_ADDRESS", None)
    with services.RayCluster(workdir, env) as c:
        c.add_node()
        c.env = dict(env, RAY_ADDRESS=c.address)
        c.faults = workdir / "faults.json"
        yield c


@pytest.fixture(scope="module")
def digits(cluster, s3, tmp_path_factory):
    """The digits preprocessed into the bucket by `tasks.preprocess` on the cluster."""
    raw = tmp_path_factory.mktemp("digits")
    write_digits(str(raw))
    out = s3.prefix("datasets/digits-8")
    result = run(
        command(
            "preprocess",
            "--input",
            str(raw),
            "--output",
            out,
            "--resolution",
            "8",
            "--validation_fraction",
            "0.1",
        ),
        cluster.env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def train_argv(dataset: str, runs: str, tracking: str, name: str, *extra: str) -> list[str]:
    return command(
        "train",
        "--dataset",
        dataset,
        "--storage",
        runs,
        "--tracking_uri",
        tracking,
        "--run_name",
        name,
        *TRAINING,
        *extra,
    )


@pytest.fixture(scope="module")
def two_nodes(cluster, digits, s3, mlflow_server):
    """The run `two-nodes`: two workers, one on each node, 2,048 images; where its
    checkpoints are, and how the task ended."""
    runs = s3.prefix("two-nodes")
    argv = train_argv(digits, runs, mlflow_server, "two-nodes", "--workers", "2")
    argv += ["--placement", "STRICT_SPREAD", "--images", "2048"]
    return runs, run(argv, cluster.env)


def test_two_workers_on_two_nodes_from_the_bucket_tracked_in_mlflow(
    two_nodes, digits, mlflow_server
):
    s3_prefix, result = two_nodes
    assert result.returncode == 0, result.stderr[-5000:]
    assert "train: 2048 images seen" in result.stdout
    logs = result.stdout + result.stderr
    assert "Started training worker group of size 2" in logs
    nodes = dict(re.findall(r"train worker (\d) of 2 on node (\w+)", logs))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], logs[-5000:]  # one per node

    # Checkpoints in the bucket: every 512 images, the newest two kept, complete.
    kept = checkpoints(s3_prefix, "two-nodes")
    files = {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"}
    files.add("phema.safetensors")
    assert kept == {1536: files, 2048: files}
    state = final_state(s3_prefix, "two-nodes")
    assert state["images_seen"] == 2048 and state["step"] == 64
    # The post-hoc EMA snapshots outlive the checkpoints: one per checkpoint, each
    # with EDM2's two profiles, the last the final checkpoint's.
    assert state["snapshots"] == f"{s3_prefix}/two-nodes/phema"
    stored = snapshots.read_snapshots(state["snapshots"])
    assert [(images, std) for images, std, _ in stored] == [
        (images, std) for images in (512, 1024, 1536, 2048) for std in STDS
    ]
    assert storage.read_bytes(f"{s3_prefix}/two-nodes/phema/000000002048.safetensors") == (
        storage.read_bytes(f"{s3_prefix}/two-nodes/checkpoint-000000002048/phema.safetensors")
    )
    narrow, wide = stored[-2][2], stored[-1][2]
    assert narrow.keys() == wide.keys() and any(not narrow[k].equal(wide[k]) for k in narrow)
    assert state["config"]["workers"] == 2 and state["config"]["lr"] == 2e-3

    # MLflow: one run with the config, the metrics, the dataset and the samples.
    client = MlflowClient(mlflow_server)
    [found] = runs_named(client, "two-nodes")
    run_id = found.info.run_id
    assert state["run_id"] == run_id
    assert found.info.status == "FINISHED"
    params = found.data.params
    assert params["model.template"] == "tiny" and params["workers"] == "2"
    assert params["hflip"] == "False" and params["architecture.channels"] == "24"
    assert params["plan.images"] == "2048" and params["dataset"] == digits
    manifest = storage.read_bytes(f"{digits}/{shards.MANIFEST}")
    digest = hashlib.sha256(manifest).hexdigest()
    [dataset] = found.inputs.dataset_inputs
    assert dataset.dataset.digest == digest[:36]
    assert json.loads(dataset.dataset.source)["url"] == f"{digits}/{shards.MANIFEST}"

    loss = history(client, run_id, "loss")
    assert sorted(loss) == list(range(128, 2049, 128))
    first, last = loss[128][0] + loss[256][0], loss[1920][0] + loss[2048][0]
    assert last < 0.75 * first, loss  # the loss falls
    lr = history(client, run_id, "learning_rate")
    # The rate of the step that ended there: ramped up over 256 images, then constant.
    assert lr[128] == [pytest.approx(2e-3 * (128 - 32) / 256)] and lr[2048] == [2e-3]
    assert min(v[0] for v in history(client, run_id, "images_per_second").values()) > 0
    assert any(k.startswith("system/cpu") for k in found.data.metrics)
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any("samples+step+1024+" in p and p.endswith(".png") for p in images), images
    assert any("samples+step+2048+" in p and p.endswith(".png") for p in images), images

    # The registered version: the final EMA weights, tagged with the dataset.
    [version] = client.search_model_versions("name = 'two-nodes'")
    assert version.run_id == run_id
    assert version.tags["dataset_digest"] == digest
    assert version.tags["images_seen"] == "2048"
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, "model", tmp)
        registered = Path(local, "model.safetensors").read_bytes()
        card = json.loads(Path(local, "model.json").read_text())
    assert registered == storage.read_bytes(
        f"{s3_prefix}/two-nodes/checkpoint-000000002048/ema.safetensors"
    )
    assert card["template"] == "tiny" and card["dataset"]["digest"] == digest
    assert card["augmentation"] == {"hflip": False} and version.tags["hflip"] == "False"
    assert card["snapshots"] == state["snapshots"]
    # The whole network, as the workers built it (also in every checkpoint).
    assert card["model"] == architecture("tiny", 8, num_classes=10, label_dropout=0.1).to_dict()
    assert state["model"] == card["model"]


def test_one_worker_trains_on_what_two_do(two_nodes, cluster, digits, s3_prefix, mlflow_server):
    # The same command with one worker: every step holds the same images, flips,
    # noise and label dropout (they follow the images' positions, not the worker
    # that reads them), so the curves agree up to the order of the floating-point
    # sums (the gradient's over two halves, and on CPUs convolutions over 16
    # images, not 32). Noise drawn per worker would move the losses by percents.
    assert two_nodes[1].returncode == 0
    argv = train_argv(digits, s3_prefix, mlflow_server, "one-worker", "--images", "1024")
    result = run(argv, cluster.env)
    assert result.returncode == 0, result.stderr[-5000:]
    client = MlflowClient(mlflow_server)
    [two], [one] = runs_named(client, "two-nodes"), runs_named(client, "one-worker")
    assert two.data.params["workers"] == "2" and one.data.params["workers"] == "1"
    curves = {}
    for key in ("stream_checksum", "loss"):
        both = [history(client, r.info.run_id, key) for r in (one, two)]
        curves[key] = [{s: v[-1] for s, v in h.items() if s <= 1024} for h in both]
        assert sorted(curves[key][0]) == list(range(128, 1025, 128))
    assert curves["stream_checksum"][0] == curves["stream_checksum"][1]
    ones, twos = curves["loss"]
    gaps = {s: abs(ones[s] - twos[s]) / twos[s] for s in ones}
    assert max(gaps.values()) < 1e-4, gaps


@pytest.mark.parametrize(
    "case", ["no-manifest", "uncommitted", "unknown-template", "indivisible-batch", "no-bucket"]
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    case, cluster, digits, s3, s3_prefix, mlflow_server
):
    dataset, extra = digits, []
    if case in ("no-manifest", "uncommitted"):
        dataset = f"{s3_prefix}/dataset"
        if case == "uncommitted":  # the shards of a job that has not finished
            for obj in storage.list_objects(digits):
                if obj.relpath != shards.MANIFEST:
                    storage.write_bytes(f"{dataset}/{obj.relpath}", storage.read_bytes(obj.uri))
    runs, name = f"{s3_prefix}/runs", f"bad-{case}"
    expected = {
        "no-manifest": f"train.dataset: no committed dataset at {dataset} (manifest.json is "
        "missing: run tasks.preprocess)",
        "uncommitted": f"train.dataset: no committed dataset at {dataset} (manifest.json is "
        "missing: run tasks.preprocess)",
        "unknown-template": "train.model.template: must be one of tiny, small, base, base64, "
        "got 'huge'",
        "indivisible-batch": "train.batch_size: must be a multiple of the number of workers "
        "(2), got 33",
        "no-bucket": "train.storage: s3://no-such-bucket/runs/bad-no-bucket: not found",
    }[case]
    if case == "unknown-template":
        extra = ["--model.template", "huge"]
    elif case == "indivisible-batch":
        extra = ["--workers", "2", "--batch_size", "33"]
    elif case == "no-bucket":
        runs = "s3://no-such-bucket/runs"
    before = {o.relpath for o in storage.list_objects(s3_prefix)}
    result = run(train_argv(dataset, runs, mlflow_server, name) + extra, cluster.env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"tasks.train: error: {expected}"), result.stderr
    assert {o.relpath for o in storage.list_objects(s3_prefix)} == before
    assert runs_named(MlflowClient(mlflow_server), name) == []


def test_nan_in_the_loss_stops_with_step_and_checkpoint_named(
    cluster, digits, s3_prefix, mlflow_server
):
    # The run's images become NaN from 640 images seen on (tests/faults/sitecustomize.py).
    cluster.faults.write_text(json.dumps({"nan_at_images": {"nan": 640}}))
    argv = train_argv(
        digits,
        s3_prefix,
        mlflow_server,
        "nan",
        "--images",
        "2048",
        "--checkpoint_every_images",
        "256",
    )
    try:
        result = run(argv, cluster.env)
    finally:
        cluster.faults.unlink()
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line == (
        "tasks.train: failed: stopped at step 20 (640 images seen): loss nan, gradient norm "
        f"nan; last good checkpoint: {s3_prefix}/nan/checkpoint-000000000512"
    )
    assert final_state(s3_prefix, "nan")["images_seen"] == 512
    client = MlflowClient(mlflow_server)
    [found] = runs_named(client, "nan")
    assert found.info.status == "FAILED"
    assert client.search_model_versions("name = 'nan'") == []
