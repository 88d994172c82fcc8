"""One training worker's stream, executed by Ray Data: the plan of `data.order`
read by `data.stream.WindowReader` in Ray tasks, delivered in position order.

The order is decided before Ray Data sees it: the worker asks for its read units
(windows) from the images seen on, and Ray Data runs a reader task per unit,
off the training process (decoding in it would compete for the GIL), keeping
their outputs in order (`preserve_order`). Nothing of the stream needs saving:
a resumed worker starts at the unit that holds its checkpoint's images seen.

A Dataset plans all its read tasks before the first one runs (3,000 of them
took Ray Data 10 s here, 30,000 took 107 s), so the units come in segments of
`SEGMENT` windows, a new Dataset each; within a segment the stream runs on
across passes.
"""

from __future__ import annotations

import copy
import dataclasses
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

    image: torch.Tensor
    """uint8 [b, 3, H, W] on the host (pinned for CUDA)."""
    label: torch.Tensor | None
    position: np.ndarray
    """The global positions, ascending."""
    check: np.ndarray
    """`Order.checks` of each sample (uint64)."""


def batches(
    plan: StreamPlan, reading: Reading, readers: int = 2, pin: bool = False
) -> Iterator[Batch]:
    """Worker `reading.rank`'s batches (B / W images each) of the positions
    [reading.start, reading.stop), in order; each is checked against the plan.
    `readers` reader tasks run at once (each reads one window's share, one CPU);
    `pin` pins the batches for a copy to a GPU."""
    import ray
    from ray.data import TaskPoolStrategy

    order = Order(plan)
    per_worker = plan.batch_size // reading.world
    position = reading.start
    windows = order.units(reading.start, reading.stop)
    options = copy.copy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = True
    for first in range(windows.start, windows.stop, SEGMENT):
        count = min(SEGMENT, windows.stop - first)
        with cluster.data_settings(execution_options=options):
            ds = ray.data.range(count, override_num_blocks=count).map_batches(
                WindowReader(plan, reading, first),
                batch_size=None,
                compute=TaskPoolStrategy(size=readers),
            )
        for raw in ds.iter_torch_batches(
            batch_size=per_worker,
            drop_last=False,
            device="cpu",
            collate_fn=_Collate(pin),
            prefetch_batches=1,
        ):
            batch = typing.cast(Batch, raw)  # what _Collate makes
            expected = order.positions(
                reading.rank, reading.world, position, position + plan.batch_size
            )
            if not np.array_equal(batch.position, expected):
                raise StreamError(
                    f"worker {reading.rank} of {reading.world} received positions "
                    f"{_span(batch.position)} for images seen {position}, where the plan "
                    f"has {_span(expected)}"
                )
            position += plan.batch_size
            yield batch


def _span(p: np.ndarray) -> str:
    return f"{p[0]}..{p[-1]} ({len(p)})" if len(p) else "none"


class _Collate(NumpyBatchCollateFn):
    """Numpy arrays -> a `Batch`: image and label wrapped as tensors sharing their
    memory (pinned for a CUDA copy), in the iterator's one thread."""

    def __init__(self, pin: bool):
        self.pin = pin

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        tensors = convert_ndarray_batch_to_torch_tensor_batch(
            {k: v for k, v in batch.items() if k in ("image", "label")}
        )
        assert isinstance(tensors, dict)
        if self.pin:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return Batch(tensors["image"], tensors.get("label"), batch["position"], batch["check"])
