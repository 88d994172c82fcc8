"""Joining the Ray cluster, and Ray Data settings scoped to one job."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

from pipeline import storage

log = logging.getLogger(__name__)


def connect() -> None:
    """Join Ray: RAY_ADDRESS when set (as `ray job submit` sets it), else a cluster
    started with `ray start` on this machine, else a private local one."""
    import ray

    if not ray.is_initialized():
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
def data_settings(**settings) -> Iterator[None]:
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
