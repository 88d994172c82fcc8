"""Chaos trials: a task killed at a random moment, then run again (here
preprocessing and generation; training's, a run killed and a node lost, are in
tests/test_training.py, on its two-node cluster and straight run).

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

Seed 0 of each kind but one is a trial of `pytest -m trial` (minutes each, not
in the default suite; their results are in bench/results/trials-cpu2.xml); a
training run killed and run again, seed 0, is in the default suite.
`pytest -m chaos` runs seeds 1-10 and writes every trial (seed, moment, what was
running, outcome) to bench/results/chaos-cpu2.json. Each trial also prints its
record.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import save

from pipeline.data import shards
from pipeline.edges import storage, tracking
from pipeline.maths.unet import build
from tests import chaos, images, tasks
from tests.nets import randomised

pytestmark = pytest.mark.slow

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
        *(
            pytest.param(s, ("s3", "local")[s // 2 % 2], marks=pytest.mark.chaos)
            for s in chaos.TRIALS
        ),
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


@pytest.mark.parametrize("seed", chaos.seeds())
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
