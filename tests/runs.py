"""Reading a training run back, as the tests check it: its checkpoints in storage
and its MLflow run (in the experiment `tests`)."""

from __future__ import annotations

import json
import re

from mlflow import MlflowClient

from pipeline.edges import storage

EXPERIMENT = "tests"
"""The MLflow experiment of the tests' training runs (`--experiment`)."""


def checkpoints(runs: str, name: str) -> dict[int, set[str]]:
    """{images seen: file names} of the checkpoints of run `name` in storage."""
    found: dict[int, set[str]] = {}
    for obj in storage.list_objects(storage.join(runs, name)):
        folder, _, file = obj.relpath.partition("/")
        if folder.startswith("checkpoint-") and file:
            found.setdefault(int(folder.removeprefix("checkpoint-")), set()).add(file)
    return found


def registered(runs: str, name: str) -> set[int]:
    """Images seen of the checkpoints Ray Train has recorded for run `name`: what a
    restart resumes from. (A checkpoint's files are uploaded before it is
    recorded, so a run killed in between resumes from the one before.)"""
    try:
        snapshot = json.loads(storage.read_bytes(f"{runs}/{name}/checkpoint_manager_snapshot.json"))
    except storage.NotFound:
        return set()
    return {r["metrics"]["images_seen"] for r in snapshot["checkpoint_results"]}


def final_state(runs: str, name: str) -> dict:
    last = max(checkpoints(runs, name))
    return json.loads(storage.read_bytes(f"{runs}/{name}/checkpoint-{last:012d}/state.json"))


def runs_named(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], f"tags.`mlflow.runName` = '{name}'")


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, list[float]]:
    """{step: values in the order logged} of a metric."""
    out: dict[int, list[float]] = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
        out.setdefault(m.step, []).append(m.value)
    return out


def images_logged(client: MlflowClient, name: str) -> int:
    """Images seen, as rank 0 of run `name` last logged them (0 before that)."""
    found = runs_named(client, name)
    return int(found[0].data.metrics.get("images_seen", 0)) if found else 0


def worker_starts(log: str) -> set[tuple[str, str, int]]:
    """(rank, node, images seen) of the training worker starts in a task's output.
    (Two nodes on one machine forward every line twice: count distinct ones.)"""
    pattern = r"train worker (\d) of \d+ on node (\w+) \(cpu\) starts at (\d+)"
    return {(rank, node, int(at)) for rank, node, at in re.findall(pattern, log)}
