"""One training worker's stream, executed by Ray Data: the plan of `data.order`
read by `data.stream.WindowReader` in Ray tasks, delivered in position order.

The order is decided before Ray Data sees it: the worker asks for its read units
(windows) from the images seen on, and Ray Data runs a reader task per unit,
off the training process (decoding in it would compete for the GIL), keeping
their outputs in order (`preserve_order`). Nothing of the stream needs saving:
a resumed worker starts at the unit that holds its checkpoint's images seen.

A Dataset plans all its read tasks before the first one runs (3,000 of them
took Ray Data 10 s here, 30,000 took 107 s), so the units come in segments of
`SEGMENT` windows, a new Dataset each, the next started (on a thread) while the
last windows of the one before are read: the stream runs on across passes and
segments alike.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import itertools
import typing
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.util.torch_utils import convert_ndarray_batch_to_torch_tensor_batch

from pipeline.config.records import StreamPlan
from pipeline.data.order import Order
from pipeline.data.stream import Reading, StreamError, WindowReader
from pipeline.edges import cluster

SEGMENT = 256
"""Windows per Ray Data Dataset."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """One worker's share of one step, as the stream delivers it."""

    image: torch.Tensor | None
    """uint8 [b, 3, H, W] on the host (pinned for CUDA); None for latents."""
    posterior: torch.Tensor | None
    """A latent dataset's posteriors, float32 [b, 2, C, H, W]: mean and std."""
    label: torch.Tensor | None
    position: np.ndarray
    """The global positions, ascending."""
    check: np.ndarray
    """`Order.checks` of each sample (uint64)."""


def batches(
    plan: StreamPlan,
    reading: Reading,
    readers: int = 2,
    pin: bool = False,
    segment: int = SEGMENT,
) -> Iterator[Batch]:
    """Worker `reading.rank`'s batches (B / W images each) of the positions
    [reading.start, reading.stop), in order; each is checked against the plan.
    `readers` reader tasks run at once (each reads one window's share, one CPU);
    `pin` pins the batches for a copy to a GPU. The windows come in Datasets of
    `segment`; the next one starts while the last `readers` windows of the one
    before are read, so the stream does not wait for it."""
    order = Order(plan)
    windows = order.units(reading.start, reading.stop)
    parts = [
        range(w, min(w + segment, windows.stop))
        for w in range(windows.start, windows.stop, segment)
    ]
    position = reading.start
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="next-segment")
    upcoming: concurrent.futures.Future[Iterator[Batch]] | None = None
    try:
        for i, part in enumerate(parts):
            stream = upcoming.result() if upcoming else _started(plan, reading, part, readers, pin)
            upcoming = None
            # Where this part's last `readers` windows begin: the next part starts there.
            handoff = order.window_bounds(max(part.start, part.stop - readers))[0]
            for batch in stream:
                expected = order.positions(
                    reading.rank, reading.world, position, position + plan.batch_size
                )
                if not np.array_equal(batch.position, expected):
                    raise StreamError(
                        f"worker {reading.rank} of {reading.world} received positions "
                        f"{_span(batch.position)} for images seen {position}, where the "
                        f"plan has {_span(expected)}"
                    )
                position += plan.batch_size
                if upcoming is None and i + 1 < len(parts) and position >= handoff:
                    upcoming = pool.submit(_started, plan, reading, parts[i + 1], readers, pin)
                yield batch
    finally:
        # A stream left early (an error, a closed generator) does not wait for
        # the next Dataset to start.
        pool.shutdown(wait=False, cancel_futures=True)


def _started(
    plan: StreamPlan, reading: Reading, windows: range, readers: int, pin: bool
) -> Iterator[Batch]:
    """A Dataset of `windows`, its first batch already fetched (which starts it)."""
    import ray
    from ray.data import TaskPoolStrategy

    options = copy.copy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = True
    with cluster.data_settings(execution_options=options):
        ds = ray.data.range(len(windows), override_num_blocks=len(windows)).map_batches(
            WindowReader(plan, reading, windows.start),
            batch_size=None,
            compute=TaskPoolStrategy(size=readers),
        )
    stream = ds.iter_torch_batches(
        batch_size=plan.batch_size // reading.world,
        drop_last=False,
        device="cpu",
        collate_fn=_Collate(pin),
        prefetch_batches=1,
    )
    batches = typing.cast(Iterator[Batch], iter(stream))  # what _Collate makes
    first = next(batches, None)
    return itertools.chain([] if first is None else [first], batches)


def _span(p: np.ndarray) -> str:
    return f"{p[0]}..{p[-1]} ({len(p)})" if len(p) else "none"


class _Collate(NumpyBatchCollateFn):
    """Numpy arrays -> a `Batch`: image and label wrapped as tensors sharing their
    memory (pinned for a CUDA copy), in the iterator's one thread."""

    def __init__(self, pin: bool):
        self.pin = pin

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        tensors = convert_ndarray_batch_to_torch_tensor_batch(
            {k: v for k, v in batch.items() if k in ("image", "posterior", "label")}
        )
        assert isinstance(tensors, dict)
        if self.pin:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return Batch(
            tensors.get("image"),
            tensors.get("posterior"),
            tensors.get("label"),
            batch["position"],
            batch["check"],
        )
