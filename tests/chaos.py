"""What the chaos trials (CHAOS_FILES; the design is in tests/test_chaos.py's
doc) share: the seeds, the kill moment drawn from a trial's seed inside the
task's working window, the trial's record and its named checks, a reference
run timed to its first progress point, and a killed-and-re-run trial of a job
that writes shards (a dataset, latents, generated images) with the checks of
its output."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import random
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pipeline.data import shards
from pipeline.edges import storage
from tests import tasks

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "chaos-cpu2.json"
"""Where a `-m chaos` run writes every trial's record (`write_results`)."""
TRIALS = range(1, 11)
"""The seeds of `-m chaos`; seed 0 is the default suite's or `-m trial`'s."""


def seeds(zero_in_default_suite: bool = False) -> list[Any]:
    """The seeds of a kind of trial: 0 (in the default suite, or a `-m trial`
    trial, minutes long), then `-m chaos`'s."""
    zero = pytest.param(0) if zero_in_default_suite else pytest.param(0, marks=pytest.mark.trial)
    return [zero, *(pytest.param(s, marks=pytest.mark.chaos) for s in TRIALS)]


@dataclasses.dataclass(frozen=True)
class Moment:
    """When a trial kills: always inside the task's working window, after its first
    progress point (`first`) and before its commit. Once its progress (as
    `progress_of` counts it) reaches `progress`; or `seconds` after the first
    point, and at the latest once progress reaches `ceiling`, so that a run
    faster than the reference's is still killed before its commit."""

    progress_of: str
    first: int
    progress: int | None = None
    seconds: float | None = None
    window: float | None = None
    """The reference run's working window (seconds), `seconds` drawn from."""
    ceiling: int | None = None


def draw(
    kind: str,
    seed: int,
    window: float,
    points: Sequence[int],
    of: str,
    ceiling: int | None = None,
) -> Moment:
    """The kill moment of trial `seed`: for an even seed a progress point of
    `points` (its first is the first progress point), for an odd one a time drawn
    uniformly from the first 80% of the reference run's working window (`window`
    seconds from its first progress point to its end), at the latest at progress
    `ceiling` (default: the last of `points`)."""
    rng = random.Random(f"{kind}:{seed}")
    if seed % 2 == 0:
        return Moment(of, points[0], progress=rng.choice(points))
    seconds = round(rng.uniform(0, 0.8 * window), 2)
    return Moment(
        of, points[0], seconds=seconds, window=round(window, 2), ceiling=ceiling or points[-1]
    )


POLL = 0.01
"""Seconds between reads of a task's progress while a trial waits for its moment:
a kill lands within a poll (and a listing) of the moment."""


def reach(
    moment: Moment,
    proc: subprocess.Popen,
    started: float,
    progress: Callable[[], int],
    log: Path | None = None,
) -> dict[str, Any]:
    """Wait for `moment`, failing if the task ends first: the seconds since
    `started` then, and what fired (the progress point, the time, the ceiling)."""
    first = lambda: progress() >= moment.first  # noqa: E731
    tasks.wait_for(proc, first, f"{moment.first} {moment.progress_of}", log=log, poll=POLL)
    working = time.monotonic()
    if moment.progress is not None:
        point = moment.progress
        ready = lambda: progress() >= point  # noqa: E731
        tasks.wait_for(proc, ready, f"{point} {moment.progress_of}", log=log, poll=POLL)
        fired = "progress"
    else:
        assert moment.seconds is not None and moment.ceiling is not None
        ceiling, deadline = moment.ceiling, working + moment.seconds
        at_ceiling = lambda: progress() >= ceiling  # noqa: E731
        timed = lambda: time.monotonic() >= deadline or at_ceiling()  # noqa: E731
        tasks.wait_for(proc, timed, "the kill moment", log=log, poll=POLL)
        fired = "time" if time.monotonic() >= deadline else "ceiling"
    now = time.monotonic()
    return {
        "seconds": round(now - started, 2),
        "after_first_progress_s": round(now - working, 2),
        "fired_by": fired,
    }


@dataclasses.dataclass
class Trial:
    """One trial, as bench/results/chaos-cpu2.json records it."""

    kind: str
    seed: int
    moment: dict[str, Any] = dataclasses.field(default_factory=dict)
    killed: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What was seen at the kill: seconds after the start, progress, what was running."""
    rerun_exit_code: int | None = None
    """Of the run after the kill (in a node trial: of the run that lost the node)."""
    invariants: list[str] = dataclasses.field(default_factory=list)
    passed: bool = False
    failure: str | None = None
    seconds: float = 0.0

    def check(self, invariant: str, holds: bool, detail: object = "") -> None:
        """Record `invariant` as checked; fail the trial, naming it, if it does not hold."""
        if invariant not in self.invariants:
            self.invariants.append(invariant)
        if not holds:
            raise AssertionError(f"{self.kind} seed {self.seed}: {invariant}: {detail}")

    def plan(self, moment: Moment) -> None:
        self.moment |= {"of": moment.progress_of, "first": moment.first}
        if moment.progress is not None:
            self.moment |= {"mode": "progress", "at": moment.progress}
        else:
            self.moment |= {
                "mode": "time",
                "window_s": moment.window,
                "seconds_after_first": moment.seconds,
                "ceiling": moment.ceiling,
            }

    def no_strays(self, before: set[int], *markers: str) -> None:
        left = tasks.strays(before, *markers)
        self.check("no process of the killed task is left", not left, left)


class Trials:
    """The trials run so far. `with trials(kind, seed) as t:` runs one: it is
    recorded passed, or failed with the error, and its record printed."""

    def __init__(self) -> None:
        self.done: list[Trial] = []

    @contextlib.contextmanager
    def __call__(self, kind: str, seed: int) -> Iterator[Trial]:
        t, started = Trial(kind, seed), time.monotonic()
        try:
            yield t
            t.passed = True
        except BaseException as e:
            t.failure = f"{type(e).__name__}: {e}"[:3000]
            raise
        finally:
            t.seconds = round(time.monotonic() - started, 1)
            self.done.append(t)
            print(json.dumps(dataclasses.asdict(t)))


CHAOS_FILES = (
    "tests/test_chaos.py",
    "tests/test_training.py",
    "tests/test_gate.py",
    "tests/test_train_autoencoder.py",
)
"""Where the chaos trials are."""


def source_version() -> dict[str, Any]:
    """The commit the trials ran on, and whether the tree had changes beside it."""
    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(  # noqa: E731
        ["git", *a], cwd=root, capture_output=True, text=True, check=False
    ).stdout.strip()
    changed = git(
        "status", "--porcelain", "--untracked-files=no", "--", "pipeline", "tasks", "tests"
    )
    return {"commit": git("rev-parse", "HEAD"), "changes_beside_the_commit": bool(changed)}


def write_results(path: Path, done: list[Trial]) -> None:
    """Every trial's record, and per kind the trials, passes and seconds, to `path`."""
    kinds: dict[str, dict[str, Any]] = {}
    for t in done:
        k = kinds.setdefault(t.kind, {"trials": 0, "passed": 0, "seconds": []})
        k["trials"] += 1
        k["passed"] += t.passed
        k["seconds"].append(t.seconds)
    results = {
        "machine": "cpu2",
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
        "command": f"pytest -m chaos {' '.join(CHAOS_FILES)}",
        **source_version(),
        "summary": kinds,
        "trials": [dataclasses.asdict(t) for t in done],
    }
    path.write_text(json.dumps(results, indent=1) + "\n")


# --- the output of a task that writes shards ----------------------------------------


@dataclasses.dataclass(frozen=True)
class Reference:
    """An uninterrupted run: what every trial of its kind must end with."""

    manifest: dict
    window: float
    """Its working window: seconds from its first unit of work to its last."""

    @property
    def digests(self) -> dict[str, str]:
        return {s["name"]: s["sha256"] for s in self.manifest["shards"]}


class ShardWatcher:
    """Lists a prefix over and over while jobs run, and checks that every shard it
    ever sees is complete: byte-identical to the reference run's."""

    def __init__(self, prefix: str, reference: dict[str, str]):
        self.prefix, self.reference = prefix, reference
        self.checked: set[str] = set()
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ShardWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while True:
            stopping = self._stop.is_set()  # then one last full listing
            try:
                listed = storage.list_objects(self.prefix)
            except storage.NotFound:  # a local output folder appears with the first shard
                listed = []
            for o in listed:
                if shards.is_shard_name(o.relpath) and o.relpath not in self.checked:
                    if shards.sha256(storage.read_bytes(o.uri)) != self.reference.get(o.relpath):
                        self.problems.append(f"{o.relpath}: listed with other bytes")
                    self.checked.add(o.relpath)
            if stopping:
                return
            self._stop.wait(0.2)  # listing without a pause would slow the jobs on 2 CPUs


def without_output(manifest: dict) -> dict:
    """A manifest less where it was written (the only field a trial's differs in)."""
    out = {k: v for k, v in manifest.items() if k != "output"}
    if "config" in out:
        out["config"] = {k: v for k, v in out["config"].items() if k != "output"}
    return out


def check_output(t: Trial, prefix: str, reference: Reference, watcher: ShardWatcher) -> None:
    """The invariants of a finished dataset: its manifest, its shards, and what a
    watcher saw of them while the jobs ran."""
    manifest = shards.load_manifest(prefix)
    t.check("the output is committed", manifest is not None)
    assert manifest is not None
    t.check(
        "the manifest is the reference's",
        without_output(manifest) == without_output(reference.manifest),
        manifest,
    )
    for entry in manifest["shards"]:
        data = storage.read_bytes(storage.join(prefix, entry["name"]))
        found = (len(data), shards.sha256(data))
        t.check(
            "every manifest entry matches its bytes",
            found == (entry["bytes"], entry["sha256"]),
            f"{entry['name']}: {found}",
        )
        t.check(
            "every shard has the reference's bytes",
            found[1] == reference.digests[entry["name"]],
            entry["name"],
        )
    t.check("every shard listed during the runs was complete", not watcher.problems, watcher)
    t.check(
        "the watcher saw every shard",
        watcher.checked == set(reference.digests),
        sorted(set(reference.digests) - watcher.checked),
    )


def snapshot(prefix: str) -> dict[str, tuple]:
    """{object: (size or ETag, modification time)} of everything under `prefix`,
    hidden names too: equal snapshots mean nothing was written in between."""
    if storage.is_s3(prefix):
        import boto3

        bucket, _, key = prefix.removeprefix("s3://").partition("/")
        pages = (
            boto3.client("s3")
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=key + "/")
        )
        return {
            o["Key"]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])
        }
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(prefix).rglob("*")}


def killed(
    t: Trial,
    proc: subprocess.Popen,
    at: dict[str, Any],
    progress: int,
    total: int,
    committed: bool,
) -> None:
    """Record how the killed task stood, from its own records: `progress` of `total`
    units done, its output `committed` or not; and check that the kill landed in
    its working window, with work done and its commit not."""
    ended = None if proc.returncode == -signal.SIGKILL else proc.returncode
    if ended is not None:
        running = f"nothing: it had ended (exit {ended})"
    elif committed:
        running = "the end: its output was committed"
    elif progress == 0:
        running = "start-up: nothing done yet"
    elif progress < total:
        running = f"work: {progress} of {total} done"
    else:
        running = "committing: all done, no commit yet"
    t.killed = {**at, "progress": progress, "of": total, "running": running}
    t.check("the task ran without error until the kill", ended is None, ended)
    t.check(
        "the kill landed mid-work (its records: some work done, no commit)",
        progress >= 1 and not committed,
        running,
    )


def reference_run(
    argv: list[str],
    env: dict | None,
    progress: Callable[[], int],
    first: int,
    last: int,
) -> tuple[subprocess.CompletedProcess, float]:
    """Run a trial kind's uninterrupted reference: its result (both streams in
    `stdout`), and its working window: the seconds from its progress reaching
    `first` (its first unit of work) to its reaching `last` (all of it)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        proc = tasks.start(argv, env, log)
        try:
            begun = lambda: progress() >= first  # noqa: E731
            tasks.wait_for(proc, begun, f"{first} units of work", log=log, poll=0.05)
            first_at = time.monotonic()
            done = lambda: progress() >= last  # noqa: E731
            tasks.wait_for(proc, done, f"{last} units of work", log=log, poll=0.05)
            window = time.monotonic() - first_at
            proc.wait(timeout=600)
        finally:
            tasks.kill(proc)
        output = log.read_text()
    return subprocess.CompletedProcess(argv, proc.returncode, output, output), window


def shard_reference(argv: list[str], env: dict | None, prefix: str, total: int) -> Reference:
    """The uninterrupted reference run of a job writing `total` shards to `prefix`."""
    records = storage.join(prefix, shards.RECORDS)
    done, window = reference_run(argv, env, lambda: tasks.count(records), 1, total)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = shards.load_manifest(prefix)
    assert manifest is not None and len(manifest["shards"]) == total, manifest
    return Reference(manifest, window)


def check_reused(t: Trial, again: subprocess.CompletedProcess, done: int) -> None:
    """The re-run of a preprocess or encode job reused the shards recorded at the kill."""
    found = re.search(r"shards \((\d+) reused\)", again.stdout)
    t.killed["reused"] = reused = int(found.group(1)) if found else 0
    t.check("the re-run reuses the shards with records", reused == done, again.stdout)


def shard_job_trial(
    t: Trial,
    argv: list[str],
    prefix: str,
    reference: Reference,
    env: dict | None = None,
) -> tuple[int, subprocess.CompletedProcess]:
    """A job that writes shards (preprocess, encode, generation) killed at the
    trial's moment, then run again on the session's cluster to its end: how many
    shards it had recorded at the kill, and the re-run. With `env` (a private Ray:
    `tasks.private_ray_env()`) the kill takes the job's own Ray down with it, its
    workers mid-write; without, its actors are on the session's cluster, which
    ends them once their driver is gone. Checks the kill landed mid-work, the
    re-run exits 0, nothing is left running, and the output (`check_output`)."""
    records = storage.join(prefix, shards.RECORDS)
    total = len(reference.digests)
    # Points and times from the first three quarters of the work: a margin for a
    # poll that sees a point late, the job going on meanwhile.
    moment = draw(t.kind, t.seed, reference.window, range(1, total * 3 // 4 + 1), "shard records")
    t.plan(moment)
    markers = [env["RAY_TMPDIR"]] if env else []
    before = set(tasks.task_processes())
    with ShardWatcher(prefix, reference.digests) as watcher:
        started = time.monotonic()
        job = tasks.start(argv, env)
        try:
            at = reach(moment, job, started, lambda: tasks.count(records))
        finally:
            t.check("the killed process group is gone", tasks.kill(job))
        t.no_strays(before, *markers)
        done = tasks.count(records)
        killed(t, job, at, done, total, shards.load_manifest(prefix) is not None)
        again = tasks.run(argv)
        t.rerun_exit_code = again.returncode
        t.check("the re-run exits 0", again.returncode == 0, again.stderr[-3000:])
    t.no_strays(before)
    check_output(t, prefix, reference, watcher)
    return done, again


def third_run_writes_nothing(t: Trial, argv: list[str], prefix: str, complete: str) -> None:
    """A third run finds the output complete (`complete` in what it prints) and
    writes nothing."""
    written = snapshot(prefix)
    third = tasks.run(argv)
    t.check(
        "a third run finds the output complete",
        third.returncode == 0 and complete in third.stdout,
        third.stdout + third.stderr[-2000:],
    )
    t.check("a third run writes nothing", snapshot(prefix) == written)
