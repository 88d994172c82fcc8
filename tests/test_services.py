"""The harness itself: each real service answers and keeps what it is given."""

import os

import pytest

from pipeline.edges import storage
from tests import services

pytestmark = pytest.mark.slow


def test_s3_server_round_trip(s3_prefix):
    data = os.urandom(3 * 1024 * 1024 + 7)
    uri = storage.join(s3_prefix, "blob.bin")
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data


def test_mlflow_server_keeps_runs_and_puts_artifacts_in_s3(mlflow_server, s3, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.create_experiment("harness-check")
    run = client.create_run(experiment)
    client.log_param(run.info.run_id, "resolution", "32")
    client.log_metric(run.info.run_id, "loss", 0.25, step=3)
    (tmp_path / "note.txt").write_text("artifact body")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))

    again = client.get_run(run.info.run_id)
    assert again.data.params == {"resolution": "32"}
    assert again.data.metrics == {"loss": 0.25}
    stored = [
        o
        for o in storage.list_objects(f"s3://{s3.bucket}/mlflow")
        if o.relpath.endswith("note.txt")
    ]
    assert len(stored) == 1 and run.info.run_id in stored[0].relpath
    assert storage.read_bytes(stored[0].uri) == b"artifact body"


def test_ray_cluster_runs_tasks_that_reach_s3(ray_cluster, s3_prefix):
    import ray

    uri = storage.join(s3_prefix, "from-worker.txt")

    @ray.remote(num_cpus=0.5)
    def write(u):
        storage.write_bytes(u, b"written by a Ray worker")
        return ray.get_runtime_context().get_node_id()

    assert ray.get(write.remote(uri))
    assert storage.read_bytes(uri) == b"written by a Ray worker"


def test_a_server_that_fails_to_start_is_reported_and_its_group_stopped(tmp_path):
    # SeaweedFS cannot use a data directory that is a file: start-up fails, the
    # harness says so with the log, and nothing of the process group survives.
    (tmp_path / "not-a-dir").write_text("")
    log = tmp_path / "weed.log"
    cmd = [
        str(services.BIN / "weed"),
        "server",
        f"-dir={tmp_path / 'not-a-dir'}",
        "-ip=127.0.0.1",
        f"-master.port={services.free_port(span=3, grpc_offset=10000)}",
    ]
    with pytest.raises(RuntimeError, match="weed exited"):
        with services.process_group(cmd, log, services.service_env()) as proc:
            services.wait_until(lambda: False, "weed", 60, proc, log)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
