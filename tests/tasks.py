"""The tasks as users run them, `python -m tasks.<name> ...`: each in a subprocess
in its own process group (so that a test can kill it whole: driver, local Ray,
workers), with this process's environment (the session's Ray cluster and S3
server) unless given another; and the processes of a task that must be gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path

from pipeline.edges import storage
from tests import services


def command(name: str, *args: str) -> list[str]:
    """The command line of `python -m tasks.<name> *args`."""
    return [sys.executable, "-m", f"tasks.{name}", *args]


def refused(argv: list[str], env: dict | None = None, *, in_process: bool = False) -> str:
    """The error line a task's command `argv` (as `command` makes it) ends with
    when its input is refused: from the task's own process, whose exit code must
    be 2 and whose stderr must be that one line; or, `in_process`, from the task's
    `main` called here on the config its arguments parse to (for refusals that
    come after the task's heavy imports, MLflow and torch, which a subprocess pays
    again). "not refused" if the task ran instead."""
    if not in_process:
        result = run(argv, env)
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.count("\n") == 1, result.stderr[-3000:]
        return result.stderr
    import importlib
    import typing

    from pipeline.config import ConfigError, make_parser, parse_args
    from tasks.cli import refused_line

    name = argv[2]
    module = importlib.import_module(name)
    config_cls = typing.get_type_hints(module.main)["cfg"]
    try:
        module.main(parse_args(config_cls, make_parser(config_cls, name, ""), argv[3:]))
    except ConfigError as e:
        return refused_line(name, e)
    return "not refused"


def private_ray_env() -> dict[str, str]:
    """The environment of a task that starts its own local Ray, as on a laptop."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="r", dir="/tmp")
    return env


def run(
    argv: list[str], env: dict | None = None, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run a command (a task, or a CLI such as `ray job submit`) to its end, in `cwd`
    (default: the repository): its exit code, stdout and stderr. A group that
    outlives `timeout` is killed whole."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd or services.ROOT,
        env=os.environ if env is None else env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # the timeout, or the test interrupted
        kill(proc)
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def start(argv: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start a command; its output (both streams) goes to `log`, or nowhere."""
    with open(log or os.devnull, "w") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=services.ROOT,
            env=os.environ if env is None else env,
            start_new_session=True,
        )


def kill(proc: subprocess.Popen, timeout: float = 30) -> bool:
    """SIGKILL the task's whole process group; whether all of it was gone within
    `timeout` (what is left then is killed again)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if services.group_gone(proc.pid, timeout):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return False


def count(prefix: str) -> int:
    """How many objects are under `prefix` (0 while a local folder does not exist)."""
    try:
        return len(storage.list_objects(prefix))
    except storage.NotFound:
        return 0


def wait_for(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    what: str,
    timeout: float = 300,
    log: Path | None = None,
    poll: float = 0.2,
) -> None:
    """Poll `ready()` every `poll` seconds while the task runs; fail (with the log's
    tail) if the task ends first or `timeout` passes."""

    def failed(why: str) -> AssertionError:
        return AssertionError(why + (f":\n{log.read_text()[-3000:]}" if log else ""))

    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise failed(f"the task ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise failed(f"no {what} after {timeout:.0f}s")
        time.sleep(poll)  # one storage listing per poll: cheap on 2 CPUs, kills land part-way


CLUSTER_ACTORS = (
    "DashboardAgent",
    "RuntimeEnvAgent",
    "_StatsActor",
    "_StatsSummaryActor",
    "_AutoscalingCoordinatorActor",
    "_UsageCollectionActor",
    "ActorLocationTracker",
    "AutoscalingRequester",
    "TrainStateActor",
)
"""Ray's own processes titled like workers: each node's agents, and Ray Data's and
Ray Train's detached actors (the first job that needs one creates it, and it
stays for the cluster's lifetime, by design)."""


def task_processes(*markers: str) -> dict[int, str]:
    """{pid: command line} of the processes that do a task's work, among those in
    this process's network namespace (the test session's, when it runs `offline`):
    `python -m tasks.<name>` drivers, Ray workers busy for a job (their title is
    `ray::<task or actor>`; idle pool workers, `ray::IDLE...`, and CLUSTER_ACTORS
    are the cluster's), and any whose command line holds one of `markers` (a
    private Ray's temp folder)."""
    found = {}
    ours = os.readlink("/proc/self/ns/net")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "net") != ours:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # it has ended
            continue
        line = " ".join(a.decode(errors="replace") for a in argv if a)
        title = line.removeprefix("ray::").partition(".")[0] if line.startswith("ray::") else ""
        busy_worker = bool(title) and not title.startswith("IDLE") and title not in CLUSTER_ACTORS
        if busy_worker or " -m tasks." in line or any(m in line for m in markers):
            found[int(entry.name)] = line
    return found


def strays(before: Collection[int], *markers: str, timeout: float = 30) -> dict[int, str]:
    """The task processes (see `task_processes`) not in `before` that are still
    there after `timeout`: Ray ends a dead driver's workers within seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = {p: c for p, c in task_processes(*markers).items() if p not in before}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)  # a raylet notices its driver's death and ends the job's workers
