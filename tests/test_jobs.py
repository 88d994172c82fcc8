"""Tasks as Ray Jobs: submitted to the session cluster's dashboard (127.0.0.1 in
the test's network namespace), with this repository as the working directory."""

from __future__ import annotations

import json

import pytest

from pipeline.data import shards
from pipeline.edges import storage
from tests import tasks
from tests.services import BIN

pytestmark = [pytest.mark.slow, pytest.mark.trial]


def test_tasks_submitted_as_ray_jobs_write_to_the_bucket(ray_dashboard, s3_prefix):
    raw, dataset = f"{s3_prefix}/raw", f"{s3_prefix}/dataset"
    # tasks.submit: follows the job's logs and exits with its outcome.
    submitted = tasks.run(
        tasks.command(
            "submit", "--address", ray_dashboard, "digits", "--output", raw, "--count", "40"
        )
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "digits: 40 PNGs" in submitted.stdout and "SUCCEEDED" in submitted.stdout
    assert len(storage.list_objects(raw)) == 40

    # The plain Ray CLI, as the README documents it.
    cli = tasks.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            ray_dashboard,
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "tasks.preprocess",
            "--input",
            raw,
            "--output",
            dataset,
            "--resolution",
            "8",
            "--small_images",
            "upscale",
        ]
    )
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    assert "succeeded" in cli.stdout.lower()
    manifest = json.loads(storage.read_bytes(f"{dataset}/{shards.MANIFEST}"))
    assert manifest["counts"]["inputs"] == 40 and manifest["counts"]["written"] == 40
    for entry in manifest["shards"]:
        data = storage.read_bytes(storage.join(dataset, entry["name"]))
        assert shards.sha256(data) == entry["sha256"]

    # A job that fails on bad input fails the submission, with the task's one line.
    bad = tasks.run(
        tasks.command(
            "submit",
            "--address",
            ray_dashboard,
            "preprocess",
            "--input",
            raw,
            "--output",
            f"{s3_prefix}/bad",
            "--resolution",
            "-5",
        )
    )
    assert bad.returncode == 2 and "FAILED" in bad.stdout  # the task's exit code
    assert "preprocess.resolution: must be an integer in 1..4096, got -5" in bad.stdout
    assert storage.list_objects(f"{s3_prefix}/bad") == []
