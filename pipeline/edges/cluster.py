"""Joining the Ray cluster, and Ray Data settings scoped to one job."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator

from pipeline.edges import storage

log = logging.getLogger(__name__)

_quiet = False
_filtering = False
"""Whether stderr passes through `_drop_known_cpp_lines`'s thread."""


def quiet() -> None:
    """Keep Ray's, Ray Data's, Ray Train's and MLflow's own INFO and WARNING lines
    off the console, in this process and in the local Ray that `connect` starts,
    so that a user sees the pipeline's lines and progress bars (the quickstart
    does this). Errors still show; what workers print stays in Ray's log files.
    Call it before `connect`."""
    global _quiet
    _quiet = True
    # Read by the processes a local Ray starts (they inherit this environment).
    os.environ.update(
        {
            "RAY_DATA_LOG_LEVEL": "ERROR",
            "TORCH_CPP_LOG_LEVEL": "ERROR",  # torch.distributed's start-up notes
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "PYTHONWARNINGS": "ignore::DeprecationWarning",  # Ray's notices to its own API users
        }
    )
    for name in ("ray", "ray.data", "ray.train", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _drop_known_cpp_lines()


KNOWN_CPP_LINES = re.compile(
    rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWE] \d+ \d+\] (?:"
    rb"network_util\.cc:\d+: Failed to determine local IP via external connectivity"
    rb"|core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
    rb"object store and max_restarts > 0\."
    rb")[^\n]*\n?"
)
"""Ray's C++ lines that say nothing to a user of the pipeline: the address probe
of a machine without external network (it falls back to the hostname, as it
should), and a note about Ray Data's actors, which keep their constructor
arguments alive. They come from Ray's C++ core, on the driver's stderr, past
every Python and environment log setting."""


def _drop_known_cpp_lines() -> None:
    """Pass this process's stderr (fd 2, which its C++ code and its children
    write to as well) through a thread that drops KNOWN_CPP_LINES, until exit."""
    global _filtering
    if _filtering:
        return
    try:
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        terminal = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
    except (OSError, ValueError):  # no fd 2 to replace (an embedding host)
        return
    _filtering = True

    def forward() -> None:
        while chunk := os.read(read_end, 1 << 16):
            # glog writes a line in one write(): a chunk holds it whole.
            os.write(terminal, KNOWN_CPP_LINES.sub(b"", chunk))

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:  # the last lines first, then stderr as it was
        sys.stderr.flush()
        os.dup2(terminal, 2)
        thread.join(timeout=2)  # Ray's children may hold the pipe open: no EOF

    atexit.register(restore)


def train_logging():
    """Ray Train's logging config: errors only when `quiet`."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="ERROR" if _quiet else "INFO")


def connect() -> None:
    """Join Ray: RAY_ADDRESS when set (as `ray job submit` sets it), else a cluster
    started with `ray start` on this machine, else a private local one."""
    import ray

    if ray.is_initialized():
        return
    if _quiet:
        ray.init(
            logging_level=logging.ERROR,
            logging_config=ray.LoggingConfig(log_level="ERROR"),
            log_to_driver=False,
        )
    else:
        ray.init()


def warn_local_paths(fields: Iterable[tuple[str, str]]) -> None:
    """Warn when a (name, location) is a local path on a multi-node cluster."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    for name, location in fields:
        if nodes > 1 and not storage.is_s3(location):
            log.warning(
                "%s is a local path on a %d-node cluster: every node must see it "
                "(a shared filesystem), or use s3://",
                name,
                nodes,
            )


@contextlib.contextmanager
def data_settings(**settings: object) -> Iterator[None]:
    """Set Ray Data's DataContext fields for the datasets made inside, and put the
    caller's values back afterwards. Progress bars default to off: the jobs print
    their own, counted in images."""
    import ray

    ctx = ray.data.DataContext.get_current()
    settings = {"enable_progress_bars": False, **settings}
    saved = {name: getattr(ctx, name) for name in settings}
    for name, value in settings.items():
        setattr(ctx, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)


def actor_count(requested: int, use_gpu: bool, work: int) -> int:
    """How many actors a pool gets: `requested`, or when 0 one per GPU of the
    cluster (`use_gpu`) or one per CPU; never more than its `work` items (shards),
    nor fewer than one. Call after `connect()`."""
    import ray

    if requested:
        return max(1, min(requested, work))
    resources = ray.cluster_resources()
    return max(1, min(int(resources.get("GPU" if use_gpu else "CPU", 1)), work))
