"""Chaos trials: a task killed at a random moment, then run again.

A trial starts a task as users run it, SIGKILLs its whole process group (or, in
a node trial, one node of the two-node cluster a training run is on) at a
moment drawn from the trial's seed, and runs the same command again. Wherever
the kill lands (Ray start-up, listing, mid-write, committing, after the end)
the tasks' contracts hold: the shards are byte-identical to an uninterrupted
reference run's and every manifest entry matches its bytes; a training run ends
at exactly the images asked for, in one MLflow run, FINISHED, every step on the
samples of the straight run's, with its weights bit for bit; and nothing of the
killed task is left running.

The moment is a time drawn uniformly from 0.5 s to 1.1 times the reference
run's duration (odd seeds), or a progress point drawn from the first half of
the task's work (even seeds: shard records written, checkpoints recorded), so
that the even trials interrupt work in flight, as fixed-moment kill tests do,
with a margin for a poll that sees the point late on a loaded machine.

Seed 0 of each kind is one of the trials of `pytest -m trial` (minutes each, not
in the default suite; their results are in bench/results/trials-cpu2.xml);
`pytest -m chaos` runs seeds 1-10 and writes every trial (seed, moment, what was
running, outcome) to bench/results/chaos-cpu2.json. Each trial also prints its
record.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from safetensors.torch import save

from pipeline.data import shards
from pipeline.data.digits import write_digits
from pipeline.edges import storage, tracking
from pipeline.maths.unet import build
from tests import chaos, images, services, tasks
from tests.nets import randomised
from tests.runs import (
    final_state,
    history,
    images_logged,
    registered,
    runs_named,
    worker_starts,
)

pytestmark = pytest.mark.slow

RESULTS = services.ROOT / "bench" / "results" / "chaos-cpu2.json"
TRIALS = range(1, 11)
"""The seeds of `-m chaos`; seed 0 is `-m trial`'s."""


def seeds() -> list[Any]:
    return [
        pytest.param(0, marks=pytest.mark.trial),
        *(pytest.param(s, marks=pytest.mark.chaos) for s in TRIALS),
    ]


@pytest.fixture(scope="module")
def trial() -> Iterator[chaos.Trials]:
    """`with trial(kind, seed) as t:` runs and records a trial; after a `-m chaos`
    run the records go to RESULTS."""
    trials = chaos.Trials()
    yield trials
    if any(t.seed in TRIALS for t in trials.done):
        chaos.write_results(RESULTS, trials.done)


# --- preprocessing -------------------------------------------------------------------

PREPROCESS = ["--resolution", "32", "--samples_per_shard", "12"]
RAW_IMAGES = 240
"""Noise images, 128x96 in 3 classes: 21 shards (train and validation)."""


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    for i in range(RAW_IMAGES):
        (root / f"c{i % 3}").mkdir(exist_ok=True)
        (root / f"c{i % 3}" / f"{i}.png").write_bytes(
            images.encode(images.noise(128, 96, i), "PNG")
        )
    return root


def preprocess_argv(raw: Path, output: str) -> list[str]:
    return tasks.command("preprocess", "--input", str(raw), *PREPROCESS, "--output", output)


@pytest.fixture(scope="module")
def preprocessed(raw, tmp_path_factory) -> chaos.Reference:
    """The dataset built uninterrupted, by a task with its own Ray as the trials'."""
    out = str(tmp_path_factory.mktemp("preprocess-reference") / "out")
    started = time.monotonic()
    done = tasks.run(preprocess_argv(raw, out), tasks.private_ray_env())
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = shards.load_manifest(out)
    assert manifest is not None
    return chaos.Reference(manifest, time.monotonic() - started)


@pytest.mark.parametrize(
    ("seed", "where"),
    [
        pytest.param(0, "s3", marks=pytest.mark.trial),
        pytest.param(0, "local", marks=pytest.mark.trial),
        *(pytest.param(s, ("s3", "local")[s // 2 % 2], marks=pytest.mark.chaos) for s in TRIALS),
    ],
)
def test_preprocess_killed_then_run_again_ends_as_an_uninterrupted_run(
    seed, where, trial, preprocessed, raw, s3, ray_cluster, tmp_path
):
    prefix = s3.prefix(f"chaos-preprocess-{seed}") if where == "s3" else str(tmp_path / "out")
    records = storage.join(prefix, shards.RECORDS)
    total = len(preprocessed.digests)
    argv = preprocess_argv(raw, prefix)
    # The killed job runs its own Ray, in its own process group: SIGKILL takes the
    # driver, Ray and the workers (mid-write) down together.
    env = tasks.private_ray_env()
    with trial("preprocess", seed) as t:
        moment = chaos.draw(
            "preprocess", seed, preprocessed.seconds, range(1, total // 2 + 1), "shard records"
        )
        t.plan(moment)
        t.moment["storage"] = where
        before = set(tasks.task_processes())
        with chaos.ShardWatcher(prefix, preprocessed.digests) as watcher:
            started = time.monotonic()
            job = tasks.start(argv, env)
            try:
                at = chaos.reach(moment, job, started, lambda: tasks.count(records))
            finally:
                t.check("the killed process group is gone", tasks.kill(job))
            t.no_strays(before, env["RAY_TMPDIR"])
            done, committed = tasks.count(records), shards.load_manifest(prefix) is not None
            chaos.killed(t, moment, job, at, done, total, committed)

            again = tasks.run(argv)  # on the session's cluster
            t.rerun_exit_code = again.returncode
            t.check("the re-run exits 0", again.returncode == 0, again.stderr[-3000:])
        if committed:
            t.check("a committed dataset is not rebuilt", "already complete" in again.stdout)
        else:
            found = re.search(r"shards \((\d+) reused\)", again.stdout)
            t.killed["reused"] = reused = int(found.group(1)) if found else 0
            t.check("the re-run reuses the shards with records", reused == done, again.stdout)
        t.no_strays(before)
        chaos.check_output(t, prefix, preprocessed, watcher)
        if where == "local":
            partial = list(Path(prefix).rglob("*.partial"))
            t.check("no interrupted write is left", partial == [], partial)

        written = chaos.snapshot(prefix)
        third = tasks.run(argv)
        t.check(
            "a third run finds the dataset complete",
            third.returncode == 0 and "already complete" in third.stdout,
            third.stdout + third.stderr[-2000:],
        )
        t.check("a third run writes nothing", chaos.snapshot(prefix) == written)


# --- generation ----------------------------------------------------------------------

MODEL = "chaos-tiny"
SAMPLING = [
    *("--images", "320", "--samples_per_shard", "32", "--seed", "7"),
    *("--sampler", "heun", "--steps", "4", "--guidance", "2", "--network_batch", "16"),
    *("--actors", "1", "--batch_size", "16"),
]
SAMPLE_SHARDS = 10


@pytest.fixture(scope="module")
def model(mlflow_server) -> str:
    """A tiny class-conditional model (random weights) registered as tasks.train
    registers models; its reference `name/version`."""
    net = randomised(build("tiny", num_classes=10), seed=3)
    weights = save({k: v.contiguous() for k, v in net.state_dict().items()})
    card = {
        "template": "tiny",
        "model": net.cfg.to_dict(),
        "resolution": 8,
        "classes": [str(d) for d in range(10)],
    }
    run_id = tracking.find_or_create_run(mlflow_server, "tests", f"{MODEL}-training")
    files = {"model.safetensors": weights, "model.json": json.dumps(card).encode()}
    return f"{MODEL}/{tracking.register_model(mlflow_server, run_id, MODEL, files, {})}"


def sample_argv(model: str, output: str, tracking_uri: str) -> list[str]:
    return tasks.command(
        "sample", "--model", model, "--output", output, "--tracking_uri", tracking_uri, *SAMPLING
    )


@pytest.fixture(scope="module")
def sampled(model, mlflow_server, ray_cluster, s3) -> chaos.Reference:
    """The images generated uninterrupted, on the session's cluster as the trials'."""
    prefix = s3.prefix("chaos-sample-reference")
    started = time.monotonic()
    done = tasks.run(sample_argv(model, prefix, mlflow_server))
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = shards.load_manifest(prefix)
    assert manifest is not None and len(manifest["shards"]) == SAMPLE_SHARDS
    return chaos.Reference(manifest, time.monotonic() - started)


@pytest.mark.parametrize("seed", seeds())
def test_sample_killed_then_run_again_writes_each_shard_once(
    seed, trial, sampled, model, mlflow_server, s3
):
    prefix = s3.prefix(f"chaos-sample-{seed}")
    records = storage.join(prefix, shards.RECORDS)
    argv = sample_argv(model, prefix, mlflow_server)
    with trial("sample", seed) as t:
        moment = chaos.draw(
            "sample", seed, sampled.seconds, range(1, SAMPLE_SHARDS // 2 + 1), "shard records"
        )
        t.plan(moment)
        before = set(tasks.task_processes())
        with chaos.ShardWatcher(prefix, sampled.digests) as watcher:
            started = time.monotonic()
            job = tasks.start(argv)
            try:
                at = chaos.reach(moment, job, started, lambda: tasks.count(records))
            finally:
                t.check("the killed process group is gone", tasks.kill(job))
            # The job's actors run on the session's cluster, outside the group: Ray
            # ends them when their driver is gone. Count what they finished then.
            t.no_strays(before)
            done, committed = tasks.count(records), shards.load_manifest(prefix) is not None
            chaos.killed(t, moment, job, at, done, SAMPLE_SHARDS, committed)

            again = tasks.run(argv)
            t.rerun_exit_code = again.returncode
            t.check("the re-run exits 0", again.returncode == 0, again.stderr[-3000:])
        t.check(
            "the re-run generates exactly the shards without a record",
            f"({SAMPLE_SHARDS - done} written now, {done} already complete)" in again.stdout,
            again.stdout,
        )
        t.no_strays(before)
        chaos.check_output(t, prefix, sampled, watcher)
        client = MlflowClient(mlflow_server)
        experiment = client.get_experiment_by_name("sampling")  # the reference made it
        assert experiment is not None
        found = client.search_runs([experiment.experiment_id], f"tags.output = '{prefix}'")
        statuses = [r.info.status for r in found]
        t.check("the job is one MLflow run, FINISHED", statuses == ["FINISHED"], statuses)

        written = chaos.snapshot(prefix)
        third = tasks.run(argv)
        t.check(
            "a third run finds every shard complete",
            third.returncode == 0
            and f"(0 written now, {SAMPLE_SHARDS} already complete)" in third.stdout,
            third.stdout + third.stderr[-2000:],
        )
        t.check("a third run writes nothing", chaos.snapshot(prefix) == written)


# --- training ------------------------------------------------------------------------

TRAIN_IMAGES, CHECKPOINT_EVERY, LOG_EVERY = 1024, 256, 128
TRAINING = [
    *("--model.template", "tiny", "--batch_size", "32", "--lr", "2e-3"),
    *("--lr_rampup_images", "256", "--ema_halflife_images", "500"),
    *("--images", str(TRAIN_IMAGES), "--log_every_images", str(LOG_EVERY)),
    *("--checkpoint_every_images", str(CHECKPOINT_EVERY), "--keep_checkpoints", "2"),
    *("--sample_every_images", "0", "--experiment", "tests"),
    *("--workers", "2", "--placement", "STRICT_SPREAD"),
]
"""One worker on each node; a checkpoint every 8 steps."""
PART_WAY = range(CHECKPOINT_EVERY, TRAIN_IMAGES // 2 + 1, CHECKPOINT_EVERY)
"""The progress points of training trials: the checkpoint last recorded (what a
restart resumes from). Ray Train records one several steps after its upload, so
only the first half's: a kill at the last one could land after the end."""


@pytest.fixture(scope="module")
def two_nodes(s3, session_dir) -> Iterator[services.RayCluster]:
    """A Ray head and one worker node, 2 CPUs each, with their own RAY_TMPDIR. A
    node trial kills the last node and adds a new one."""
    workdir = session_dir / "ray-chaos"
    workdir.mkdir()
    env = services.service_env(RAY_TMPDIR=tempfile.mkdtemp(prefix="r", dir="/tmp"))
    env.pop("RAY_ADDRESS", None)
    with services.RayCluster(workdir, env) as cluster:
        cluster.add_node()
        yield cluster


def on(cluster: services.RayCluster) -> dict[str, str]:
    """The environment of a task run on `cluster`."""
    return dict(cluster.env, RAY_ADDRESS=cluster.address)


@pytest.fixture(scope="module")
def digits(two_nodes, s3, tmp_path_factory) -> str:
    """The digits preprocessed into the bucket by `tasks.preprocess` on the cluster."""
    raw = tmp_path_factory.mktemp("digits")
    write_digits(str(raw))
    out = s3.prefix("datasets/chaos-digits-8")
    argv = tasks.command("preprocess", "--input", str(raw), "--output", out, "--resolution", "8")
    result = tasks.run(argv, on(two_nodes))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def train_argv(dataset: str, runs: str, tracking_uri: str, name: str) -> list[str]:
    return tasks.command(
        "train",
        *("--dataset", dataset, "--storage", runs, "--tracking_uri", tracking_uri),
        *("--run_name", name, *TRAINING),
    )


@dataclasses.dataclass(frozen=True)
class Straight:
    """The training run uninterrupted: the curves every trial's run must follow,
    and the weights it must end with."""

    loss: dict[int, list[float]]
    learning_rate: dict[int, list[float]]
    checksum: dict[int, list[float]]
    """`stream_checksum`: what the steps up to each log point trained on."""
    weights: dict[str, str]
    seconds: float


@pytest.fixture(scope="module")
def straight(two_nodes, digits, s3, mlflow_server) -> Straight:
    name, runs = "chaos-straight", s3.prefix("runs")
    started = time.monotonic()
    result = tasks.run(train_argv(digits, runs, mlflow_server, name), on(two_nodes))
    assert result.returncode == 0, result.stderr[-5000:]
    seconds = time.monotonic() - started
    client = MlflowClient(mlflow_server)
    [found] = runs_named(client, name)
    run_id = found.info.run_id
    return Straight(
        history(client, run_id, "loss"),
        history(client, run_id, "learning_rate"),
        history(client, run_id, "stream_checksum"),
        final_weights(runs, name),
        seconds,
    )


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


@pytest.mark.parametrize("seed", seeds())
def test_train_killed_then_run_again_continues_the_straight_run(
    seed, trial, two_nodes, digits, straight, s3, mlflow_server, tmp_path
):
    runs, name, log = s3.prefix("runs"), f"chaos-killed-{seed}", tmp_path / "killed.log"
    argv, client = train_argv(digits, runs, mlflow_server, name), MlflowClient(mlflow_server)
    with trial("train", seed) as t:
        moment = chaos.draw("train", seed, straight.seconds, PART_WAY, "checkpoint recorded")
        t.plan(moment)
        before = set(tasks.task_processes())
        started = time.monotonic()
        job = tasks.start(argv, on(two_nodes), log)
        try:
            at = chaos.reach(moment, job, started, lambda: last_checkpoint(runs, name), log)
        finally:
            t.check("the killed process group is gone", tasks.kill(job))
        # The controller and workers run on the cluster: Ray ends them with the driver.
        t.no_strays(before)
        checkpoint, logged = last_checkpoint(runs, name), images_logged(client, name)
        chaos.killed(t, moment, job, at, logged, TRAIN_IMAGES, checkpoint == TRAIN_IMAGES)
        t.killed["checkpoint"] = checkpoint

        again = tasks.run(argv, on(two_nodes))
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
        # Resuming with a setting that must not change is refused, naming it.
        changed = tasks.run([*argv, "--lr", "1e-3"], on(two_nodes))
        t.check(
            "a resume with another learning rate is refused, naming it",
            changed.returncode == 2
            and changed.stderr.strip()
            == (
                f"tasks.train: error: train.lr: run '{name}' was started with lr=0.002, "
                "now 0.001; resume it with the same value, or start a new train.run_name"
            ),
            changed.stderr[-2000:],
        )


@pytest.mark.parametrize("seed", seeds())
def test_node_lost_then_the_run_restarts_from_a_checkpoint_and_finishes(
    seed, trial, two_nodes, digits, straight, s3, mlflow_server, tmp_path
):
    runs, name, log = s3.prefix("runs"), f"chaos-node-{seed}", tmp_path / "train.log"
    argv, client = train_argv(digits, runs, mlflow_server, name), MlflowClient(mlflow_server)
    with trial("node", seed) as t:
        moment = chaos.draw("node", seed, straight.seconds, PART_WAY, "checkpoint recorded")
        t.plan(moment)
        before = set(tasks.task_processes())
        started = time.monotonic()
        job = tasks.start(argv, on(two_nodes), log)
        try:
            at = chaos.reach(moment, job, started, lambda: last_checkpoint(runs, name), log)
            first = worker_starts(log.read_text())
            node = two_nodes.nodes[-1]
            two_nodes.kill_node(node)
            t.check("the killed node's process group is gone", services.group_gone(node.pid))
            checkpoints = registered(runs, name)
            logged = images_logged(client, name)
            running = job.poll() is None
            two_nodes.add_node()  # the replacement
            code = job.wait(timeout=600)
        finally:
            tasks.kill(job)
        t.killed = {
            "seconds": at,
            "progress": logged,
            "of": TRAIN_IMAGES,
            "checkpoint": max(checkpoints, default=0),
            "running": "training" if running and len(first) == 2 else "start-up or the end",
        }
        t.rerun_exit_code = code
        output = log.read_text()
        t.check("the run exits 0", code == 0, output[-5000:])
        t.check(
            "the run reports the images asked for",
            f"train: {TRAIN_IMAGES} images seen" in output,
            output[-3000:],
        )
        starts = worker_starts(output)
        restarted = len(starts) > 2
        t.killed["worker_starts"] = sorted(starts)
        if running and len({rank for rank, _, _ in first}) == 2 and logged < TRAIN_IMAGES:
            # Both workers had started and rank 0 had not logged the end (it cannot
            # step on without rank 1): the lost worker's restart takes the new node.
            t.check("the workers restart", restarted, starts)
            nodes = {node for _, node, _ in starts}
            t.check("the replacement node takes a worker", len(nodes) == 3, starts)
        resumed = {at for _, _, at in starts} - {0}
        t.check(
            "the restart resumes from one checkpoint, the last one recorded or later",
            not restarted
            or (len(resumed) <= 1 and max(resumed, default=0) >= max(checkpoints, default=0)),
            starts,
        )
        t.no_strays(before)
        check_run(
            t, client, runs, name, straight, max(resumed, default=0) if restarted else TRAIN_IMAGES
        )
