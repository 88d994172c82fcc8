"""The tasks as users run them, `python -m tasks.<name> ...`: each in a subprocess
in its own process group (so that a test can kill it whole: driver, local Ray,
workers), with this process's environment (the session's Ray cluster and S3
server) unless given another; and killed once its output is part-way."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.edges import storage
from tests import services


def command(name: str, *args: str) -> list[str]:
    """The command line of `python -m tasks.<name> *args`."""
    return [sys.executable, "-m", f"tasks.{name}", *args]


def run(
    argv: list[str], env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run a command (a task, or a CLI such as `ray job submit`) to its end: its
    exit code, stdout and stderr. A group that outlives `timeout` is killed whole."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=services.ROOT,
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
) -> None:
    """Poll `ready()` while the task runs; fail (with the log's tail) if the task
    ends first or `timeout` passes."""

    def failed(why: str) -> AssertionError:
        return AssertionError(why + (f":\n{log.read_text()[-3000:]}" if log else ""))

    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise failed(f"the task ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise failed(f"no {what} after {timeout:.0f}s")
        time.sleep(0.2)  # one storage listing per poll: cheap on 2 CPUs, kills land part-way


def kill_when(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    what: str,
    timeout: float = 300,
    log: Path | None = None,
) -> None:
    """Wait for `ready()` as `wait_for` does, then SIGKILL the task's process group
    (also when waiting failed); fails if a process of the group survives."""
    try:
        wait_for(proc, ready, what, timeout, log)
    except BaseException:
        kill(proc)
        raise
    assert kill(proc), f"processes of the task killed at {what} survived"


def kill_at(proc: subprocess.Popen, prefix: str, objects: int, timeout: float = 300) -> None:
    """Kill the task's process group once `prefix` holds `objects` objects."""
    kill_when(proc, lambda: count(prefix) >= objects, f"{objects} objects under {prefix}", timeout)
