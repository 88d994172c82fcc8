"""Session fixtures: the real services, started once, stopped by process group.

Run the suite inside a network namespace with only loopback (the README's test
command does), so that Ray, SeaweedFS and MLflow bind to 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import chaos, services

# Settings every test process (and every process it starts) runs with. Set at
# import, before Ray, MLflow or boto3 are imported by any test module.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="pipeline-tests-"))
os.environ.update(
    {
        # Ray keeps sockets under its temp dir, whose path must stay short.
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="r", dir="/tmp"),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TQDM_DISABLE": "1",
    }
)
for _name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def s3(session_dir):
    """A SeaweedFS S3 server for the session; its AWS_* settings are in os.environ
    (so every process started later, Ray workers included, can reach it)."""
    workdir = session_dir / "s3"
    workdir.mkdir()
    with services.s3_server(workdir) as settings:
        bucket = settings.pop("S3_BUCKET")
        saved = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        try:
            yield S3(bucket, settings["AWS_ENDPOINT_URL"])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class S3:
    def __init__(self, bucket: str, endpoint: str):
        self.bucket = bucket
        self.endpoint = endpoint

    def prefix(self, name: str) -> str:
        """A fresh `s3://` prefix in the test bucket."""
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_prefix(s3, request) -> str:
    """A fresh `s3://` prefix named after the test."""
    return s3.prefix(re.sub(r"[^A-Za-z0-9_-]+", "_", request.node.name)[:60])


@pytest.fixture(scope="session")
def mlflow_server(s3, session_dir) -> str:
    """An MLflow server (sqlite runs, artifacts in the S3 bucket); yields its URI."""
    workdir = session_dir / "mlflow"
    workdir.mkdir()
    with services.mlflow_server(workdir, f"s3://{s3.bucket}/mlflow") as uri:
        yield uri


_DASHBOARD: dict[str, str] = {}


@pytest.fixture(scope="session")
def ray_cluster(s3, session_dir) -> str:
    """A one-node local Ray cluster (2 CPUs) that this process is connected to.
    RAY_ADDRESS points at it, so task subprocesses join it too. It starts after
    the S3 server so that its workers inherit the S3 settings. Its dashboard (the
    Jobs API: `ray_dashboard`) runs as on real clusters, where Ray Train queries it."""
    import ray

    workdir = session_dir / "ray"
    workdir.mkdir()
    port = services.free_port()
    _DASHBOARD["url"] = f"http://127.0.0.1:{port}"
    head = services.ray_head(workdir, dashboard=True, dashboard_port=port)
    with head as address:
        os.environ["RAY_ADDRESS"] = address
        ray.init(address=address)
        try:
            yield address
        finally:
            ray.shutdown()
            os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_dashboard(ray_cluster) -> str:
    """The session cluster's dashboard, where `ray job submit` sends jobs."""
    return _DASHBOARD["url"]


@pytest.fixture(scope="session")
def trial() -> Iterator[chaos.Trials]:
    """`with trial(kind, seed) as t:` runs and records a chaos trial; after a run
    with `-m chaos` seeds, the session's records go to chaos.RESULTS."""
    trials = chaos.Trials()
    yield trials
    if any(t.seed in chaos.TRIALS for t in trials.done):
        chaos.write_results(chaos.RESULTS, trials.done)
