"""`tasks.train` as users run it: on a two-node local Ray cluster, from shards in
the SeaweedFS bucket, tracked by an MLflow server, with checkpoints in the bucket.
One straight run of two workers, one per node, is checked whole; a run killed
part-way and run again must end as it, bit for bit (the chaos train trial: seed
0 here, seeds 1-10 with `-m chaos`), and so must one whose node is lost (node
trials: seed 0 with `-m trial`, 1-10 with `-m chaos`); one worker trains on
what two do. Bad inputs, a NaN in the loss. (See tests/test_chaos.py for the
chaos trials' design.)"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.data import shards
from pipeline.data.digits import write_digits
from pipeline.edges import snapshots, storage
from pipeline.maths.architecture import architecture
from pipeline.maths.phema import STDS
from tests import chaos, services, tasks
from tests.runs import (
    checkpoints,
    final_state,
    history,
    images_logged,
    registered,
    runs_named,
    worker_starts,
)
from tests.services import ROOT

pytestmark = pytest.mark.slow

FAULTS = ROOT / "tests" / "faults"
"""Holds the sitecustomize.py that injects faults into the cluster's training runs."""

TRAIN_IMAGES, CHECKPOINT_EVERY, LOG_EVERY, SAMPLE_EVERY = 1024, 256, 128, 512
SNAPSHOT_EVERY = 500
TRAINING = [
    *("--model.template", "tiny", "--batch_size", "32", "--lr", "2e-3"),
    *("--lr_rampup_images", "256", "--ema_halflife_images", "500"),
    *("--images", str(TRAIN_IMAGES), "--log_every_images", str(LOG_EVERY)),
    *("--checkpoint_every_images", str(CHECKPOINT_EVERY), "--keep_checkpoints", "2"),
    *("--snapshot_every_images", str(SNAPSHOT_EVERY)),
    *("--sample_every_images", str(SAMPLE_EVERY), "--experiment", "tests"),
]
"""A checkpoint every 8 steps, the newest two kept; a post-hoc EMA snapshot at the
first checkpoint from every 500 images on (512) and at the end (1024)."""
TWO_NODES = ["--workers", "2", "--placement", "STRICT_SPREAD"]
"""One worker on each node."""
PART_WAY = range(LOG_EVERY, TRAIN_IMAGES * 3 // 4 + 1, LOG_EVERY)
"""The progress points of training trials: images seen as rank 0 last logged them
to MLflow, the first log point the start of the working window. (Not the
checkpoints Ray Train records: it records one seconds after its upload, and on a
fast machine after the last step.)"""
NODE_PART_WAY = range(LOG_EVERY, TRAIN_IMAGES // 2 + 1, LOG_EVERY)
"""The node trials' progress points (and, as the last, their ceiling): the first
half. Losing a node lands a second or more after the moment (its processes killed
and gone), while the last quarter of this run takes about one: with the first
three quarters, 3 of 10 node trials found rank 0 had logged all 1,024 images by
then."""


@pytest.fixture(scope="module")
def cluster(s3, session_dir) -> Iterator[services.RayCluster]:
    """Two Ray nodes of 2 CPUs each (one training worker and Ray Data's readers on
    each), separate from the session's one-node cluster, with its own RAY_TMPDIR.
    Its processes load tests/faults/sitecustomize.py: a test asks for a fault in
    one run by writing `c.faults` (see there). A node trial kills the last node
    and adds a new one."""
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
        c.faults = workdir / "faults.json"
        yield c


def on(cluster: services.RayCluster) -> dict[str, str]:
    """The environment of a task run on `cluster` (its nodes change in node trials).
    Ray's log deduplication is off: it masks numbers, so the second worker's
    "train worker 1 of 2 on node ..." line could be folded into the first's."""
    return dict(cluster.env, RAY_ADDRESS=cluster.address, RAY_DEDUP_LOGS="0")


@pytest.fixture(scope="module")
def digits(cluster, s3, tmp_path_factory) -> str:
    """The digits preprocessed into the bucket by `tasks.preprocess` on the cluster."""
    raw = tmp_path_factory.mktemp("digits")
    write_digits(str(raw))
    out = s3.prefix("datasets/digits-8")
    argv = tasks.command(
        "preprocess", "--input", str(raw), "--output", out, "--resolution", "8",
        "--validation_fraction", "0.1",
    )  # fmt: skip
    result = tasks.run(argv, on(cluster))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def train_argv(dataset: str, runs: str, tracking: str, name: str, *extra: str) -> list[str]:
    """The command of the straight run (with `extra` settings after its own)."""
    return tasks.command(
        "train", *("--dataset", dataset, "--storage", runs, "--tracking_uri", tracking),
        *("--run_name", name, *TRAINING, *TWO_NODES, *extra),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Straight:
    """The training run `two-nodes`, uninterrupted: what the task printed, where
    its checkpoints are, and the curves and weights every trial's run must end with."""

    result: subprocess.CompletedProcess
    runs: str
    loss: dict[int, list[float]]
    learning_rate: dict[int, list[float]]
    checksum: dict[int, list[float]]
    """`stream_checksum`: what the steps up to each log point trained on."""
    weights: dict[str, str]
    window: float
    """Its working window: seconds from its first log point to its last."""


@pytest.fixture(scope="module")
def straight(cluster, digits, s3, mlflow_server) -> Straight:
    name, runs = "two-nodes", s3.prefix("runs")
    client = MlflowClient(mlflow_server)
    result, window = chaos.reference_run(
        train_argv(digits, runs, mlflow_server, name),
        on(cluster),
        lambda: images_logged(client, name),
        LOG_EVERY,
        TRAIN_IMAGES,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    [found] = runs_named(client, name)
    run_id = found.info.run_id
    return Straight(
        result,
        runs,
        history(client, run_id, "loss"),
        history(client, run_id, "learning_rate"),
        history(client, run_id, "stream_checksum"),
        final_weights(runs, name),
        window,
    )


def test_two_workers_on_two_nodes_from_the_bucket_tracked_in_mlflow(
    straight, digits, mlflow_server
):
    runs, result = straight.runs, straight.result
    assert f"train: {TRAIN_IMAGES} images seen" in result.stdout
    logs = result.stdout + result.stderr
    assert "Started training worker group of size 2" in logs
    nodes = dict(re.findall(r"train worker (\d) of 2 on node (\w+)", logs))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], logs[-5000:]  # one per node

    # Checkpoints in the bucket: every 256 images, the newest two kept, complete.
    kept = checkpoints(runs, "two-nodes")
    files = {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"}
    files.add("phema.safetensors")
    assert kept == {768: files, 1024: files}
    state = final_state(runs, "two-nodes")
    assert state["images_seen"] == 1024 and state["step"] == 32
    # The post-hoc EMA snapshots outlive the checkpoints: at the first checkpoint
    # from each multiple of snapshot_every_images on, and at the end, each with
    # EDM2's two profiles, the last the final checkpoint's.
    assert state["snapshots"] == f"{runs}/two-nodes/phema"
    stored = snapshots.read_snapshots(state["snapshots"])
    assert [(images, std) for images, std, _ in stored] == [
        (images, std) for images in (512, 1024) for std in STDS
    ]
    assert storage.read_bytes(f"{runs}/two-nodes/phema/000000001024.safetensors") == (
        storage.read_bytes(f"{runs}/two-nodes/checkpoint-000000001024/phema.safetensors")
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
    assert params["plan.images"] == "1024" and params["dataset"] == digits
    manifest = storage.read_bytes(f"{digits}/{shards.MANIFEST}")
    digest = hashlib.sha256(manifest).hexdigest()
    [dataset] = found.inputs.dataset_inputs
    assert dataset.dataset.digest == digest[:36]
    assert json.loads(dataset.dataset.source)["url"] == f"{digits}/{shards.MANIFEST}"

    loss = history(client, run_id, "loss")
    assert sorted(loss) == list(range(128, 1025, 128))
    first, last = loss[128][0] + loss[256][0], loss[896][0] + loss[1024][0]
    assert last < 0.75 * first, loss  # the loss falls
    lr = history(client, run_id, "learning_rate")
    # The rate of the step that ended there: ramped up over 256 images, then constant.
    assert lr[128] == [pytest.approx(2e-3 * (128 - 32) / 256)] and lr[1024] == [2e-3]
    assert min(v[0] for v in history(client, run_id, "images_per_second").values()) > 0
    assert any(k.startswith("system/cpu") for k in found.data.metrics)
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any("samples+step+512+" in p and p.endswith(".png") for p in images), images
    assert any("samples+step+1024+" in p and p.endswith(".png") for p in images), images

    # The registered version: the final EMA weights, tagged with the dataset.
    [version] = client.search_model_versions("name = 'two-nodes'")
    assert version.run_id == run_id
    assert version.tags["dataset_digest"] == digest
    assert version.tags["images_seen"] == "1024"
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, "model", tmp)
        registered = Path(local, "model.safetensors").read_bytes()
        card = json.loads(Path(local, "model.json").read_text())
    assert registered == storage.read_bytes(
        f"{runs}/two-nodes/checkpoint-000000001024/ema.safetensors"
    )
    assert card["template"] == "tiny" and card["dataset"]["digest"] == digest
    assert card["augmentation"] == {"hflip": False} and version.tags["hflip"] == "False"
    assert card["snapshots"] == state["snapshots"]
    # The whole network, as the workers built it (also in every checkpoint).
    assert card["model"] == architecture("tiny", 8, num_classes=10, label_dropout=0.1).to_dict()
    assert state["model"] == card["model"]


@pytest.mark.trial
def test_one_worker_trains_on_what_two_do(straight, cluster, digits, s3_prefix, mlflow_server):
    # The same command with one worker: every step holds the same images, flips,
    # noise and label dropout (they follow the images' positions, not the worker
    # that reads them), so the curves agree up to the order of the floating-point
    # sums (the gradient's over two halves, and on CPUs convolutions over 16
    # images, not 32). Noise drawn per worker would move the losses by percents.
    argv = train_argv(digits, s3_prefix, mlflow_server, "one-worker", "--workers", "1")
    result = tasks.run(argv, on(cluster))
    assert result.returncode == 0, result.stderr[-5000:]
    client = MlflowClient(mlflow_server)
    [two], [one] = runs_named(client, "two-nodes"), runs_named(client, "one-worker")
    assert two.data.params["workers"] == "2" and one.data.params["workers"] == "1"
    curves = {}
    for key in ("stream_checksum", "loss"):
        both = [history(client, r.info.run_id, key) for r in (one, two)]
        curves[key] = [{s: v[-1] for s, v in h.items()} for h in both]
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
    argv = train_argv(dataset, runs, mlflow_server, name, *extra)
    # Refused as the command is read: in the task's process; once the dataset and
    # storage are read, after the task's imports: in this one.
    as_read = case in ("unknown-template", "indivisible-batch")
    line = tasks.refused(argv, on(cluster), in_process=not as_read)
    assert line.startswith(f"tasks.train: error: {expected}"), line
    assert {o.relpath for o in storage.list_objects(s3_prefix)} == before
    assert runs_named(MlflowClient(mlflow_server), name) == []


@pytest.mark.trial
def test_nan_in_the_loss_stops_with_step_and_checkpoint_named(
    cluster, digits, s3_prefix, mlflow_server
):
    # The run's images become NaN from 640 images seen on (tests/faults/sitecustomize.py).
    cluster.faults.write_text(json.dumps({"nan_at_images": {"nan": 640}}))
    argv = train_argv(digits, s3_prefix, mlflow_server, "nan", "--workers", "1")
    try:
        result = tasks.run(argv, on(cluster))
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


# --- chaos: a run killed, a node lost ------------------------------------------------


def final_weights(runs: str, name: str) -> dict[str, str]:
    """The sha256 of the final checkpoint's model, EMA, optimizer state and post-hoc EMA
    profiles."""
    last = max(registered(runs, name))
    folder = f"{runs}/{name}/checkpoint-{last:012d}"
    files = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "phema.safetensors")
    return {f: shards.sha256(storage.read_bytes(f"{folder}/{f}")) for f in files}


def last_checkpoint(runs: str, name: str) -> int:
    """Images seen at the checkpoint of run `name` last recorded (0: none yet)."""
    return max(registered(runs, name), default=0)


def check_run(
    t: chaos.Trial, client: MlflowClient, runs: str, name: str, straight: Straight, resumed_at: int
) -> None:
    """A finished training run, resumed at `resumed_at` images: its length, its
    one MLflow run and model version, and the straight run's curves."""
    state = final_state(runs, name)
    t.check(
        "training ends at exactly the images asked for",
        state["images_seen"] == TRAIN_IMAGES,
        state["images_seen"],
    )
    found = runs_named(client, name)
    statuses = [r.info.status for r in found]
    t.check("the run name's experiment holds one run, FINISHED", statuses == ["FINISHED"], statuses)
    run_id = found[0].info.run_id
    t.check("the checkpoints are the MLflow run's", state["run_id"] == run_id)
    versions = [
        (v.run_id, v.tags["images_seen"]) for v in client.search_model_versions(f"name = '{name}'")
    ]
    t.check("one model version is registered", versions == [(run_id, str(TRAIN_IMAGES))], versions)

    loss = history(client, run_id, "loss")
    t.check("the loss is logged at the straight run's steps", loss.keys() == straight.loss.keys())
    once = all(len(loss[step]) == 1 for step in loss if step <= resumed_at)
    t.check("the steps up to the resume point are logged once", once, loss)
    # The learning rate is a function of images seen: equal at every step.
    lr = {s: v[-1] for s, v in history(client, run_id, "learning_rate").items()}
    t.check(
        "the learning rate is the straight run's at every step",
        lr == {s: v[-1] for s, v in straight.learning_rate.items()},
        lr,
    )
    # The stream is a function of the images seen: every step after the resume
    # trains on the samples (flips, noise) of the straight run's step. The checksum
    # of each log point's steps says so; the weights, the losses with them.
    checksum = {s: v[-1] for s, v in history(client, run_id, "stream_checksum").items()}
    t.check(
        "every step trains on the straight run's samples (stream_checksum)",
        checksum == {s: v[-1] for s, v in straight.checksum.items()},
        (checksum, straight.checksum),
    )
    t.check(
        "the final weights, average and optimizer state are the straight run's, bit for bit",
        final_weights(runs, name) == straight.weights,
        (final_weights(runs, name), straight.weights),
    )
    t.check(
        "every logged loss is the straight run's, exactly",
        {s: v[-1] for s, v in loss.items()} == {s: v[-1] for s, v in straight.loss.items()},
        (loss, straight.loss),
    )


@pytest.mark.parametrize("seed", chaos.seeds(zero_in_default_suite=True))
def test_train_killed_then_run_again_continues_the_straight_run(
    seed, trial, cluster, digits, straight, s3, mlflow_server, tmp_path
):
    runs, name, log = s3.prefix("runs"), f"chaos-killed-{seed}", tmp_path / "killed.log"
    argv, client = train_argv(digits, runs, mlflow_server, name), MlflowClient(mlflow_server)
    with trial("train", seed) as t:
        moment = chaos.draw("train", seed, straight.window, PART_WAY, "images logged")
        t.plan(moment)
        before = set(tasks.task_processes())
        started = time.monotonic()
        job = tasks.start(argv, on(cluster), log)
        try:
            at = chaos.reach(moment, job, started, lambda: images_logged(client, name), log)
        finally:
            t.check("the killed process group is gone", tasks.kill(job))
        # The controller and workers run on the cluster: Ray ends them with the driver.
        t.no_strays(before)
        checkpoint, logged = last_checkpoint(runs, name), images_logged(client, name)
        chaos.killed(t, job, at, logged, TRAIN_IMAGES, checkpoint == TRAIN_IMAGES)
        t.killed["checkpoint"] = checkpoint

        again = tasks.run(argv, on(cluster))
        t.rerun_exit_code = again.returncode
        t.check("the re-run exits 0", again.returncode == 0, again.stderr[-5000:])
        t.check(
            "the re-run reports the images asked for",
            f"train: {TRAIN_IMAGES} images seen" in again.stdout,
            again.stdout[-3000:],
        )
        resumed = {at for _, _, at in worker_starts(again.stdout + again.stderr)}
        t.killed["resumed_at"] = sorted(resumed)
        t.check(
            "the re-run resumes from one checkpoint, the last one recorded or later",
            len(resumed) == 1
            and min(resumed) >= checkpoint
            and min(resumed) % CHECKPOINT_EVERY == 0,
            resumed,
        )
        t.no_strays(before)
        check_run(t, client, runs, name, straight, min(resumed))

        if seed:
            return  # the rest does not depend on the kill
        # Resuming with a setting that must not change is refused, naming it (in
        # this process: the refusal comes once MLflow is read, before Ray is used).
        refused = tasks.refused([*argv, "--lr", "1e-3"], in_process=True)
        t.check(
            "a resume with another learning rate is refused, naming it",
            refused
            == (
                f"tasks.train: error: train.lr: run '{name}' was started with lr=0.002, "
                "now 0.001; resume it with the same value, or start a new train.run_name"
            ),
            refused,
        )


@pytest.mark.parametrize("seed", chaos.seeds())
def test_node_lost_then_the_run_restarts_from_a_checkpoint_and_finishes(
    seed, trial, cluster, digits, straight, s3, mlflow_server, tmp_path
):
    runs, name, log = s3.prefix("runs"), f"chaos-node-{seed}", tmp_path / "train.log"
    argv, client = train_argv(digits, runs, mlflow_server, name), MlflowClient(mlflow_server)
    with trial("node", seed) as t:
        moment = chaos.draw("node", seed, straight.window, NODE_PART_WAY, "images logged")
        t.plan(moment)
        before = set(tasks.task_processes())
        started = time.monotonic()
        job = tasks.start(argv, on(cluster), log)
        try:
            at = chaos.reach(moment, job, started, lambda: images_logged(client, name), log)
            first = worker_starts(log.read_text())
            node = cluster.nodes[-1]
            cluster.kill_node(node)
            t.check("the killed node's process group is gone", services.group_gone(node.pid))
            checkpoints = registered(runs, name)
            logged = images_logged(client, name)
            running = job.poll() is None
            cluster.add_node()  # the replacement
            code = job.wait(timeout=600)
        finally:
            tasks.kill(job)
        ranks = {rank for rank, _, _ in first}
        done = max(checkpoints, default=0)
        t.killed = {
            **at,
            "progress": logged,
            "of": TRAIN_IMAGES,
            "checkpoint": done,
            "workers_started": sorted(ranks),
        }
        # The node went mid-work, from the run's own records: both workers had
        # started and rank 0 had logged steps, not the end (it cannot step on
        # without rank 1).
        t.check(
            "the node was lost mid-work (both workers training, not at the end)",
            running and ranks == {"0", "1"} and LOG_EVERY <= logged < TRAIN_IMAGES,
            t.killed,
        )
        t.rerun_exit_code = code
        output = log.read_text()
        t.check("the run exits 0", code == 0, output[-5000:])
        t.check(
            "the run reports the images asked for",
            f"train: {TRAIN_IMAGES} images seen" in output,
            output[-3000:],
        )
        starts = worker_starts(output)
        t.killed["worker_starts"] = sorted(starts)
        # A restarted worker on its first node from the same checkpoint prints the
        # line of its first start: the restarts are the other lines, and a restart
        # from no checkpoint (0) starts rank 1 on the replacement.
        restarts = starts - first
        t.check("the workers restart", bool(restarts), starts)
        replacement = {node for _, node, _ in restarts} - {node for _, node, _ in first}
        t.check("the replacement node takes a worker", len(replacement) == 1, starts)
        resumed = {at for _, _, at in restarts}
        t.check(
            "the restart resumes from one checkpoint, the last one recorded or later",
            len(resumed) == 1 and min(resumed) >= done and min(resumed) % CHECKPOINT_EVERY == 0,
            starts,
        )
        t.no_strays(before)
        check_run(t, client, runs, name, straight, min(resumed))
