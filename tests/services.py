"""Real services for the tests: SeaweedFS (S3), an MLflow server, a Ray head.

Each starts from the same scripts a person uses on a laptop (`infra/local/`), in
its own process group, on 127.0.0.1 and a free port, over a fresh temporary
directory, and is stopped by signalling that whole group, also when start-up
fails half-way.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(span: int = 1, grpc_offset: int = 0) -> int:
    """A port p with p..p+span-1 free (and the same + grpc_offset, for SeaweedFS)."""
    for _ in range(200):
        p = random.randint(20000, 30000)
        ports = [p + i for i in range(span)]
        if grpc_offset:
            ports += [q + grpc_offset for q in ports]
        if all(port_is_free(q) for q in ports):
            return p
    raise RuntimeError("no free port found")


def wait_until(check, what: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    """Poll `check()` until it is true; fail early (with the log) if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)  # polling interval while a server starts
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s:\n{tail(log)}")


def tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_group(proc: subprocess.Popen, timeout: float = 5) -> None:
    """SIGINT the process group of `proc` (Ray and MLflow shut down cleanly on it),
    then SIGKILL what is left after `timeout` (SeaweedFS lingers for many seconds)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start `cmd` in a process group of its own, its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT
        )


@contextlib.contextmanager
def process_group(cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    proc = spawn(cmd, log, env)
    try:
        yield proc
    finally:
        stop_group(proc)


def service_env(**extra: str) -> dict[str, str]:
    env = dict(
        os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHON=sys.executable
    )
    env.update(extra)
    return env


class S3Server:
    """A SeaweedFS S3 server with one identity and one bucket, checked by a real put
    and get, that a test can also stop and start again on the same ports, data
    folder and identity: an outage, after which the objects are still there."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port, self.base = free_port(), free_port(span=3, grpc_offset=10000)
        self.key, self.secret = "test-key", f"test-secret-{uuid.uuid4().hex[:8]}"
        self.bucket = "pipeline-test"
        self.proc: subprocess.Popen | None = None

    @property
    def settings(self) -> dict[str, str]:
        """The AWS_* variables that point at it, plus S3_BUCKET."""
        return {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": "us-east-1",
            "S3_BUCKET": self.bucket,
        }

    def client(self, **config: Any) -> Any:
        """A boto3 client of this server (`config`: botocore.config.Config fields)."""
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=self.settings["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            config=botocore.config.Config(**config),
        )

    def start(self) -> None:
        """Start the server (the first time: create the bucket) and wait until it
        stores and returns bytes."""
        assert self.proc is None, "the S3 server is running"
        env = service_env(
            S3_PORT=str(self.port),
            S3_BUCKET="",
            S3_ACCESS_KEY=self.key,
            S3_SECRET_KEY=self.secret,
            SEAWEED_PORT_BASE=str(self.base),
        )
        # SeaweedFS adds an admin identity of its own from any AWS_* keys it is
        # given (a test's, pointing at a server), which then owns new buckets.
        for name in [k for k in env if k.startswith("AWS_")]:
            del env[name]
        log = self.workdir / "s3.log"
        script = [str(ROOT / "infra/local/start-s3.sh"), str(self.workdir / "data")]
        self.proc = spawn(script, log, env)
        try:
            client = self.client()

            def bucket_ready() -> bool:
                try:
                    client.create_bucket(Bucket=self.bucket)
                except client.exceptions.BucketAlreadyOwnedByYou:
                    pass  # created before a restart, or an earlier attempt's answer was lost
                return True

            wait_until(bucket_ready, "SeaweedFS S3", 60, self.proc, log)
            probe = os.urandom(1 << 16)
            wait_until(
                lambda: client.put_object(Bucket=self.bucket, Key="_probe", Body=probe) is not None,
                "SeaweedFS S3 writes",
                60,
                self.proc,
                log,
            )
            got = client.get_object(Bucket=self.bucket, Key="_probe")["Body"].read()
            assert got == probe, "S3 server returned different bytes than were put"
            client.delete_object(Bucket=self.bucket, Key="_probe")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGKILL the server's whole process group, as a crash would, and wait until
        it is gone: SeaweedFS takes about 25 s to exit after SIGTERM, and a new one
        on the same ports and folder fails to start while the old one lingers."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        assert group_gone(self.proc.pid), "SeaweedFS outlived SIGKILL"
        self.proc = None

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[dict[str, str]]:
    """A SeaweedFS S3 server (`S3Server`), stopped at the end. Yields the AWS_*
    variables that point at it, plus S3_BUCKET."""
    with S3Server(workdir) as server:
        yield server.settings


class MlflowServer:
    """An MLflow tracking server (sqlite runs, artifacts at `artifacts`) that a test
    can also stop and start again on the same port and backend store."""

    def __init__(self, workdir: Path, artifacts: str):
        self.workdir, self.artifacts = workdir, artifacts
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server and wait until it answers its health check."""
        assert self.proc is None, "the MLflow server is running"
        env = service_env(MLFLOW_PORT=str(self.port), MLFLOW_ARTIFACTS=self.artifacts)
        log = self.workdir / "mlflow.log"
        script = [str(ROOT / "infra/local/start-mlflow.sh"), str(self.workdir / "mlflow")]
        self.proc = spawn(script, log, env)
        try:
            wait_until(
                lambda: urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200,
                "MLflow server",
                120,
                self.proc,
                log,
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server as an operator would (SIGINT, then SIGKILL what is left)."""
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def mlflow_server(workdir: Path, artifacts: str) -> Iterator[str]:
    """An MLflow tracking server (`MlflowServer`), stopped at the end; yields its URI."""
    with MlflowServer(workdir, artifacts) as server:
        yield server.uri


@contextlib.contextmanager
def ray_head(
    workdir: Path,
    num_cpus: int = 2,
    env: dict[str, str] | None = None,
    dashboard: bool = False,
    dashboard_port: int | None = None,
) -> Iterator[str]:
    """A Ray head node (`ray start --head --block`); yields its address. With the
    dashboard on `dashboard_port`, jobs can be submitted at http://127.0.0.1:PORT."""
    port = free_port()
    log = workdir / "ray-head.log"
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--include-dashboard={str(dashboard).lower()}",
        f"--dashboard-port={dashboard_port or free_port()}",
        "--disable-usage-stats",
    ]
    address = f"127.0.0.1:{port}"
    with process_group(cmd, log, env or service_env()) as proc:
        wait_until(lambda: "Ray runtime started" in log.read_text(), "Ray head", 90, proc, log)
        yield address


class RayCluster:
    """A local multi-node Ray cluster: a head and worker nodes, each `ray start
    --block` in its own process group (so a test can SIGKILL one node whole)."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir, self.env = workdir, env
        self.stack = contextlib.ExitStack()
        self.nodes: list[subprocess.Popen] = []
        self.address = ""

    def __enter__(self) -> RayCluster:
        self.stack.__enter__()
        # With the dashboard, as clusters run: Ray Train queries its state API.
        head = ray_head(self.workdir, env=self.env, dashboard=True)
        self.address = self.stack.enter_context(head)
        return self

    def add_node(self, num_cpus: int = 2) -> subprocess.Popen:
        """Start one more worker node and wait until it has joined."""
        name = f"ray-node-{len(self.nodes) + 1}"
        log = self.workdir / f"{name}.log"
        cmd = [
            str(BIN / "ray"),
            "start",
            "--block",
            f"--address={self.address}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--disable-usage-stats",
        ]
        proc = self.stack.enter_context(process_group(cmd, log, self.env))
        wait_until(lambda: "Ray runtime started" in log.read_text(), name, 90, proc, log)
        self.nodes.append(proc)
        return proc

    def kill_node(self, proc: subprocess.Popen) -> None:
        """SIGKILL a node's whole process group: raylet, its workers, everything."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def __exit__(self, *exc) -> None:
        self.stack.__exit__(*exc)


def group_gone(pgid: int, timeout: float = 15) -> bool:
    """Wait until no process of the process group `pgid` is left (killed ones
    take a moment to be reaped); whether that happened within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)  # the killed processes are being reaped
    return False
