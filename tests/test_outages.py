"""Outages of the real services while the tasks run, as `python -m tasks.<name>`.

SeaweedFS is killed and started again 10 s later on the same ports, data folder
and identity: mid-preprocess, mid-generation, and while training uploads its
checkpoints. The MLflow server is stopped mid-training and started again 10 s
later. Each kind runs three trials, the outage beginning at a moment drawn from
the trial's number: a progress point (shard records; for training the first
checkpoint recorded) and a delay of up to 0.1 s. Each asserts from the job's
own records that the outage landed mid-work: the job was running when the
server went and when it came back, had done work before, and did more after.
A job may ride an
outage out or exit 1 with one line and complete when run again; either way it
must end with the bytes of an undisturbed run, and a listing of its prefix,
taken over and over during and after the outage, must never show a partial
object or a temporary name. The pipeline's choice is to ride it out: S3 writes
wait up to `s3.WRITE_PATIENCE_S`, pyarrow's requests (Ray Train, Ray Data)
retry for about as long, and MLflow's client retries its requests; so each test
also requires that the job completed without a re-run.

Each test runs its own servers in its own folder (never the session's, which
the rest of the suite shares) and its tasks on a private local Ray, pointed at
them through the environment. Each trial's outcome is merged into
bench/results/outages-cpu2.json, by place and trial: `outcome`, `exit_codes`
(the run's, then a re-run's), `unreachable_s` (the outage and the server's
start-up), `seconds` (the disturbed job, a re-run included), `identical` (to
the undisturbed run), `progress` (the moment, and the work done at the outage,
when the server was back and at the end) and the commit the trial ran on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.data import shards
from pipeline.edges import checkpoint, storage
from pipeline.maths.edm import Precond
from pipeline.maths.unet import build
from tests import images, services, tasks
from tests.chaos import source_version
from tests.nets import checkpoint_state, randomised

OUTAGE_S = 10.0
"""How long a server stays down (its start-up time comes on top)."""

RESULTS = services.ROOT / "bench" / "results" / "outages-cpu2.json"


# --- servers and jobs ----------------------------------------------------------------------


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[services.S3Server]:
    """This test's own SeaweedFS; the AWS_* variables of this process (and so of the
    tasks it starts) point at it while the test runs."""
    workdir = tmp_path / "s3"
    workdir.mkdir()
    with services.S3Server(workdir) as server:
        settings = server.settings
        del settings["S3_BUCKET"]
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        yield server


def job_env() -> dict[str, str]:
    """A task's environment: this process's (the test's servers), and a local Ray
    of its own, as on a laptop."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="r", dir="/tmp")
    return env


def mlflow_restart(server: services.MlflowServer) -> float:
    """Restart the MLflow server as an operator would: stop it, keep it down
    OUTAGE_S, start it on the same port and store; returns how long it did not
    answer (the outage and its start-up)."""
    start = time.monotonic()
    server.stop()
    time.sleep(OUTAGE_S)  # the outage itself
    server.start()
    return time.monotonic() - start


def s3_outage(server: services.S3Server) -> float:
    """Kill SeaweedFS, keep it down OUTAGE_S, start it again on the same data;
    returns how long it did not answer (the outage and its start-up)."""
    start = time.monotonic()
    server.stop()
    time.sleep(OUTAGE_S)  # the outage itself
    server.start()
    return time.monotonic() - start


TRIALS = (1, 2, 3)
"""The trials of each kind of outage, each at its own drawn moment."""
MAX_DELAY_S = 0.1
"""The longest delay after a moment's progress point: at most a few shard records
on a fast machine, where preprocessing writes 60 a second."""


@dataclasses.dataclass(frozen=True)
class Moment:
    """When an outage begins: once the job's progress reaches `point`, then
    `delay` seconds more."""

    point: int
    delay: float

    @classmethod
    def draw(cls, kind: str, trial: int, points: Sequence[int]) -> Moment:
        rng = random.Random(f"outage:{kind}:{trial}")
        return cls(rng.choice(points), round(rng.uniform(0.0, MAX_DELAY_S), 3))


class Job:
    """A task run through an outage: started, disturbed by `outage()` at `moment`,
    waited for, and (if it failed) run again to completion. What it had done
    (`progress()`) is read when the outage begins, once the server is back, and
    at the end: the outage must land mid-work, with work done before it and
    after it."""

    def __init__(self, argv: list[str], log: Path):
        self.argv, self.log, self.env = argv, log, job_env()
        self.codes: list[int] = []
        """Exit codes: of the disturbed run, then of the re-run if there was one."""
        self.unreachable = 0.0
        """Seconds the server did not answer: the outage and its start-up."""
        self.seconds = 0.0
        """From the start of the disturbed run to the end of the last."""
        self.progress: dict[str, Any] = {}

    def run_through(
        self,
        moment: Moment,
        progress: Callable[[], int],
        of: str,
        outage: Callable[[], float],
    ) -> None:
        start = time.monotonic()
        proc = tasks.start(self.argv, self.env, self.log)
        try:
            ready = lambda: progress() >= moment.point  # noqa: E731
            tasks.wait_for(proc, ready, f"{moment.point} {of}", log=self.log, poll=0.05)
            time.sleep(moment.delay)
            before, running_before = progress(), proc.poll() is None
            self.unreachable = outage()
            after, running_after = progress(), proc.poll() is None
            self.codes.append(proc.wait(timeout=600))
        finally:
            tasks.kill(proc)
        if self.codes[0] != 0:
            assert self.codes[0] == 1, self.log.read_text()[-5000:]
            # The verdict, in one line, is the last thing the task prints.
            lines = self.log.read_text().strip().splitlines()
            assert lines[-1].startswith(f"{self.argv[2]}: failed: "), lines[-20:]
            again = tasks.run(self.argv, self.env)
            self.codes.append(again.returncode)
            assert again.returncode == 0, again.stderr[-5000:]
        self.seconds = time.monotonic() - start
        self.progress = {
            "of": of,
            "moment": dataclasses.asdict(moment),
            "at_outage": before,
            "when_back": after,
            "at_end": progress(),
            "running_at_outage": running_before,
            "running_when_back": running_after,
        }

    def check_mid_work(self) -> None:
        """The outage overlapped the work: the job ran through it, with work done
        before it began and after the server was back."""
        p = self.progress
        assert p["running_at_outage"] and p["running_when_back"], p
        assert p["at_outage"] >= 1, p
        assert p["at_end"] > p["when_back"], p

    @property
    def outcome(self) -> str:
        return "completed (retried)" if self.codes == [0] else "exit 1, re-run completed"


def record(place: str, trial: int, job: Job, identical: bool, **more: Any) -> None:
    """Merge the outcome of one trial into RESULTS (the others' are kept)."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    # Trials by number; what an older layout kept beside them goes.
    results = {
        k: {n: r for n, r in v.items() if n.isdigit()} for k, v in results.items() if k in PLACES
    }
    results.setdefault(place, {})[str(trial)] = {
        "outcome": job.outcome,
        "exit_codes": job.codes,
        "unreachable_s": round(job.unreachable, 1),
        "seconds": round(job.seconds, 1),
        "identical": identical,
        "progress": job.progress,
        **source_version(),
        **more,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


PLACES = ("preprocess", "sample", "train-checkpoints", "train-mlflow")


class Lister:
    """Lists an S3 prefix over and over from a thread, as a reader of the bucket
    would, through every key (hidden ones too), while the server comes and goes.
    Keeps every key ever listed and the sha256 of each shard when first listed."""

    def __init__(self, server: services.S3Server, prefix: str):
        self.bucket, self.key = storage.split_s3(prefix)
        # One quick try per request: the loop itself is the retry.
        self.client = server.client(retries={"max_attempts": 1}, connect_timeout=1)
        self.keys: set[str] = set()
        self.shards: dict[str, str] = {}
        self.listings = self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Lister:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._list()  # once more, after the job

    def _watch(self) -> None:
        while not self._stop.wait(0.1):  # a listing every 0.1 s (plus its own time)
            self._list()

    def _list(self) -> None:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.key}/"
            )
            found = [o["Key"][len(self.key) + 1 :] for p in pages for o in p.get("Contents", [])]
            for relpath in found:
                self.keys.add(relpath)
                if shards.is_shard_name(relpath) and relpath not in self.shards:
                    key = f"{self.key}/{relpath}"
                    data = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                    self.shards[relpath] = hashlib.sha256(data).hexdigest()
            self.listings += 1
        except Exception:  # noqa: BLE001 - the server is down: list again next time
            self.failures += 1


def shard_digests(manifest: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["sha256"] for s in manifest["shards"]}


def shards_through_an_outage(
    server: services.S3Server, task: str, settings: list[str], log: Path, trial: int
) -> tuple[Job, dict[str, Any]]:
    """Run `task` writing shards to the bucket twice: undisturbed, then through an
    S3 outage that begins at a moment drawn from the first half of its shards
    (`trial`'s), while a `Lister` watches its prefix. Checks what was listed and
    that the outage landed mid-work; returns the job and whether it ended with the
    undisturbed run's shards, byte for byte."""
    bucket = f"s3://{server.bucket}"
    argv = tasks.command(task, *settings, "--output", f"{bucket}/reference")
    reference = tasks.run(argv, job_env())
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads(storage.read_bytes(f"{bucket}/reference/{shards.MANIFEST}"))
    out = f"{bucket}/disturbed"
    job = Job(tasks.command(task, *settings, "--output", out), log)
    records = f"{out}/{shards.RECORDS}"
    moment = Moment.draw(task, trial, range(1, len(expected["shards"]) // 2 + 1))
    with Lister(server, out) as lister:
        job.run_through(
            moment, lambda: tasks.count(records), "shard records", lambda: s3_outage(server)
        )
    found = json.loads(storage.read_bytes(f"{out}/{shards.MANIFEST}"))
    names = shard_digests(expected)
    identical = shard_digests(found) == names and all(
        storage.read_bytes(f"{out}/{n}") == storage.read_bytes(f"{bucket}/reference/{n}")
        for n in names
    )
    print(
        f"{task}: {job.outcome} {job.codes}; {lister.listings} listings, {lister.failures} failed"
    )

    # Every name ever listed is one the finished output has (no temporary or
    # partial object), and every shard listed had its final bytes at once.
    assert lister.failures > 0, "the listings never met the outage"
    final = {o.relpath for o in storage.list_objects(out)}
    assert lister.keys <= final, lister.keys - final
    assert lister.shards == names, {n for n in names if lister.shards.get(n) != names[n]}
    job.check_mid_work()
    return job, {"identical": identical, "listings": lister.listings}


# --- S3 outages ----------------------------------------------------------------------------


@pytest.mark.outage
@pytest.mark.slow
@pytest.mark.parametrize("trial", TRIALS)
def test_preprocess_through_an_s3_outage(trial, tmp_path, s3_server):
    raw = tmp_path / "raw"
    for i in range(360):
        (raw / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (raw / f"c{i % 3}" / f"{i}.png").write_bytes(images.encode(images.noise(96, 72, i), "PNG"))
    settings = ["--input", str(raw), "--resolution", "16", "--samples_per_shard", "6"]
    job, checks = shards_through_an_outage(
        s3_server, "preprocess", settings, tmp_path / "log", trial
    )
    record("preprocess", trial, job, **checks)
    assert checks["identical"]
    assert job.codes == [0], "a write waits out an outage shorter than WRITE_PATIENCE_S"


@pytest.mark.outage
@pytest.mark.slow
@pytest.mark.parametrize("trial", TRIALS)
def test_sample_through_an_s3_outage(trial, tmp_path, s3_server):
    net = randomised(build("tiny", num_classes=10), seed=5)
    model = tmp_path / "checkpoint-000000000512"
    optimizer = torch.optim.Adam(Precond(net).parameters())
    checkpoint.save(model, net, net, optimizer, checkpoint_state(net, run_id="r1"))
    settings = [
        "--model",
        str(model),
        "--tracking_uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--images",
        "480",
        "--samples_per_shard",
        "16",
        "--steps",
        "4",
        "--batch_size",
        "16",
        "--actors",
        "1",
    ]
    job, checks = shards_through_an_outage(s3_server, "sample", settings, tmp_path / "log", trial)
    record("sample", trial, job, **checks)
    assert checks["identical"]
    assert job.codes == [0], "a write waits out an outage shorter than WRITE_PATIENCE_S"


# --- training: checkpoint uploads, and MLflow -------------------------------------------------

IMAGES, CHECKPOINT_EVERY = 1024, 256
"""Images a training run sees: 32 steps of 32, a checkpoint every 8."""

TRAINING = [
    "--model.template",
    "tiny",
    "--workers",
    "1",
    "--batch_size",
    "32",
    "--images",
    str(IMAGES),
    "--lr",
    "2e-3",
    "--lr_rampup_images",
    "256",
    "--ema_halflife_images",
    "500",
    "--log_every_images",
    "128",
    "--checkpoint_every_images",
    str(CHECKPOINT_EVERY),
    "--sample_every_images",
    str(IMAGES),
    "--keep_checkpoints",
    "2",
    "--experiment",
    "outages",
]
"""A tiny run on one worker. Its dataset is one shard of 64 images and it
checkpoints at multiples of 64, so the data stream restarts (on a re-run or a
worker restart) where an undisturbed run's next pass begins: a resumed run
trains on the very batches of an undisturbed one, and ends with its weights."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """64 noise images, 8x8, in one local shard (local: the outages here are of
    the run's storage and of MLflow, not of its data)."""
    raw = tmp_path_factory.mktemp("raw")
    for i in range(64):
        (raw / f"{i}.png").write_bytes(images.encode(images.noise(8, 8, i), "PNG"))
    out = str(tmp_path_factory.mktemp("dataset"))
    settings = ["--resolution", "8", "--validation_fraction", "0", "--samples_per_shard", "64"]
    argv = tasks.command("preprocess", "--input", str(raw), "--output", out, *settings)
    result = tasks.run(argv, job_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def train_argv(dataset: str, runs: str, tracking: str, name: str) -> list[str]:
    return tasks.command(
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
    )


def committed(runs: str, name: str) -> set[int]:
    """Images seen of the checkpoints Ray Train has recorded for run `name`."""
    try:
        snapshot = json.loads(storage.read_bytes(f"{runs}/{name}/checkpoint_manager_snapshot.json"))
    except storage.NotFound:
        return set()
    return {r["metrics"]["images_seen"] for r in snapshot["checkpoint_results"]}


def final_checkpoint(runs: str, name: str) -> dict[str, bytes]:
    """The files of the run's last checkpoint that say what it learned."""
    folder = f"{runs}/{name}/checkpoint-{IMAGES:012d}"
    files = (checkpoint.MODEL, checkpoint.EMA_WEIGHTS, checkpoint.STATE)
    return {f: storage.read_bytes(f"{folder}/{f}") for f in files}


def same_training(a: dict[str, bytes], b: dict[str, bytes]) -> bool:
    """The same weights, averaged weights and images seen."""
    seen = [json.loads(x[checkpoint.STATE])["images_seen"] for x in (a, b)]
    weights = (checkpoint.MODEL, checkpoint.EMA_WEIGHTS)
    return seen[0] == seen[1] and all(a[w] == b[w] for w in weights)


@pytest.fixture(scope="module")
def straight(dataset: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The final checkpoint of an undisturbed run (local storage, sqlite tracking:
    where a run keeps them does not change what it learns)."""
    folder = tmp_path_factory.mktemp("straight")
    runs, tracking = str(folder / "runs"), f"sqlite:///{folder}/mlflow.db"
    result = tasks.run(train_argv(dataset, runs, tracking, "straight"), job_env())
    assert result.returncode == 0, result.stderr[-5000:]
    return final_checkpoint(runs, "straight")


def worker_starts(log: Path) -> list[int]:
    """Images seen at each start of a training worker: 0, then one per restart."""
    pattern = r"pid=(\d+)\)\S*\s+train worker \d+ of \d+ on node \w+ \(\w+\) starts at (\d+)"
    return sorted(int(at) for _, at in set(re.findall(pattern, log.read_text())))


def last_committed(runs: str, name: str) -> int:
    return max(committed(runs, name), default=0)


TRAIN_POINTS = (CHECKPOINT_EVERY,)
"""Where training outages begin (then a drawn delay): at the first checkpoint
recorded, so that most of the run is still to come once the server is back."""


@pytest.mark.outage
@pytest.mark.slow
@pytest.mark.parametrize("trial", TRIALS)
def test_train_through_an_s3_outage_during_checkpoint_uploads(
    trial, tmp_path, s3_server, dataset, straight
):
    runs, tracking = f"s3://{s3_server.bucket}/runs", f"sqlite:///{tmp_path}/mlflow.db"
    job = Job(train_argv(dataset, runs, tracking, "disturbed"), tmp_path / "log")
    # The next checkpoints are due every 2-3 s, while the server is down.
    job.run_through(
        Moment.draw("train-checkpoints", trial, TRAIN_POINTS),
        lambda: last_committed(runs, "disturbed"),
        "images at the checkpoint last recorded",
        lambda: s3_outage(s3_server),
    )
    identical = same_training(straight, final_checkpoint(runs, "disturbed"))
    starts = worker_starts(job.log)
    record("train-checkpoints", trial, job, identical, worker_starts=starts)
    job.check_mid_work()
    print(f"train: {job.outcome} {job.codes}; workers started at {starts} images")
    assert identical
    assert max(committed(runs, "disturbed")) == IMAGES
    # The upload waited for the server: no worker restart, no re-run.
    assert job.codes == [0] and starts == [0]


@pytest.mark.outage
@pytest.mark.slow
@pytest.mark.parametrize("trial", TRIALS)
def test_train_through_an_mlflow_restart(trial, tmp_path, dataset, straight):
    from mlflow import MlflowClient

    runs, workdir = str(tmp_path / "runs"), tmp_path / "mlflow"
    workdir.mkdir()
    with services.MlflowServer(workdir, str(workdir / "artifacts")) as server:
        job = Job(train_argv(dataset, runs, server.uri, "disturbed"), tmp_path / "log")
        job.run_through(
            Moment.draw("train-mlflow", trial, TRAIN_POINTS),
            lambda: last_committed(runs, "disturbed"),
            "images at the checkpoint last recorded",
            lambda: mlflow_restart(server),
        )
        final = final_checkpoint(runs, "disturbed")
        identical = same_training(straight, final)
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("outages")
        assert experiment is not None
        found = client.search_runs(
            [experiment.experiment_id], filter_string="tags.`mlflow.runName` = 'disturbed'"
        )
        history = client.get_metric_history(found[0].info.run_id, "images_seen")
    starts = worker_starts(job.log)
    record("train-mlflow", trial, job, identical, worker_starts=starts)
    job.check_mid_work()
    print(f"train: {job.outcome} {job.codes}; workers started at {starts} images")
    assert identical
    assert max(committed(runs, "disturbed")) == IMAGES
    assert len(found) == 1, [r.info.run_id for r in found]  # never a second run
    assert found[0].info.status == "FINISHED"
    assert json.loads(final[checkpoint.STATE])["run_id"] == found[0].info.run_id
    # Every metric logged once: none lost while the server was away, none twice.
    steps = sorted(m.step for m in history)
    assert steps == list(range(128, IMAGES + 1, 128)), steps
    assert all(m.value == m.step for m in history)


# --- what the outages rely on, without servers ---------------------------------------------


def test_pyarrow_s3_filesystem_keeps_its_retries_when_pickled(monkeypatch):
    # Ray pickles the filesystem to its controller and workers; pyarrow's own
    # pickling would bring back its default of 3 tries (about a second).
    from ray import cloudpickle

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.arrow_filesystem("s3://bucket/runs")
    for copy in (pickle.loads(pickle.dumps(fs)), cloudpickle.loads(cloudpickle.dumps(fs))):
        assert type(copy) is type(fs) and copy.options == fs.options
        assert copy.options["endpoint_override"] == "http://127.0.0.1:9"
    assert path == "bucket/runs"


def test_a_failed_training_is_reported_in_one_line():
    from pipeline.jobs.train.driver import brief

    # Ray Train's errors: what failed, then a traceback or a message that ends
    # with the cause.
    workers = RuntimeError(
        "Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n"
        'Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
        "OSError: When uploading part: Could not connect to server\n"
    )
    assert brief(workers) == (
        "Training failed due to worker errors: OSError: When uploading part: "
        "Could not connect to server"
    )
    controller = RuntimeError("Training failed due to controller error:\nOSError: down")
    assert brief(controller) == "Training failed due to controller error: OSError: down"
    assert brief(RuntimeError("one line")) == "one line"
