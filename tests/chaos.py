"""What the chaos trials (tests/test_chaos.py, and the training ones in
tests/test_training.py) share: the seeds, the kill moment drawn from a trial's
seed, the trial's record and its named checks, and the checks of the output of
a task that writes shards (a dataset, generated images)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import random
import signal
import subprocess
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
    """When a trial kills: `seconds` after the task's start, or once its progress
    (as `progress_of` counts it) reaches `progress`."""

    seconds: float | None = None
    window: tuple[float, float] | None = None
    progress: int | None = None
    progress_of: str = ""


def draw(kind: str, seed: int, duration: float, points: Sequence[int], of: str) -> Moment:
    """The kill moment of trial `seed`: for an odd seed a time in [0.5 s, 1.1 x the
    reference run's `duration`], for an even one a progress point of `points`."""
    rng = random.Random(f"{kind}:{seed}")
    if seed % 2:
        window = (0.5, round(1.1 * duration, 1))
        return Moment(seconds=round(rng.uniform(*window), 2), window=window)
    return Moment(progress=rng.choice(points), progress_of=of)


def reach(
    moment: Moment,
    proc: subprocess.Popen,
    started: float,
    progress: Callable[[], int],
    log: Path | None = None,
) -> float:
    """Wait until `moment` (a time after the task's end comes at its end); the
    seconds since `started`."""
    if moment.seconds is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, started + moment.seconds - time.monotonic()))
    else:
        assert moment.progress is not None
        ready = lambda: progress() >= moment.progress  # noqa: E731
        tasks.wait_for(proc, ready, f"{moment.progress} {moment.progress_of}", log=log)
    return round(time.monotonic() - started, 2)


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
        if moment.seconds is not None:
            self.moment = {"mode": "time", "window_s": moment.window, "seconds": moment.seconds}
        else:
            self.moment = {"mode": "progress", "of": moment.progress_of, "at": moment.progress}

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
        "command": "pytest -m chaos tests/test_chaos.py tests/test_training.py",
        "summary": kinds,
        "trials": [dataclasses.asdict(t) for t in done],
    }
    path.write_text(json.dumps(results, indent=1) + "\n")


# --- the output of a task that writes shards ----------------------------------------


@dataclasses.dataclass(frozen=True)
class Reference:
    """An uninterrupted run: what every trial of its kind must end with."""

    manifest: dict
    seconds: float
    """How long it ran: the window of the kill moments."""

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
    moment: Moment,
    proc: subprocess.Popen,
    at: float,
    progress: int,
    total: int,
    committed: bool,
) -> None:
    """Record and check how a killed task stood: `progress` of `total` units done,
    its output `committed` or not."""
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
        running = "committing: all done, no manifest yet"
    t.killed = {"seconds": at, "progress": progress, "of": total, "running": running}
    t.check("the task ran without error until the kill", ended in (None, 0), ended)
    if moment.progress is not None:
        t.check("a kill at a progress point lands part-way", ended is None and not committed)
