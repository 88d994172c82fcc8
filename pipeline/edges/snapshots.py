"""Post-hoc EMA snapshots: the power-function averages a training run stored.

Training keeps EDM2's power-function averages (`pipeline.maths.phema`) and
stores them in every checkpoint folder, to resume (`checkpoint.PHEMA`), and at
the first checkpoint from each multiple of `train.snapshot_every_images` on, and
at the end, as `{storage}/{run_name}/phema/{images_seen:012d}.safetensors`, which
outlives the checkpoints that Ray Train prunes: a reconstruction
(`phema.reconstruct`) combines the history up to the weights it stands for.

A snapshot is safetensors (reading one unpickles nothing): `{std:.3f}/{name}`
for each width's raw network (`phema.snapshot_tensors`), with `format`,
`images_seen` and `stds` (a JSON list) in its metadata.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from pipeline.edges import storage
from pipeline.maths.phema import snapshot_tensors, split_snapshot

FOLDER = "phema"
"""The folder of a run's snapshots, beside its checkpoints."""
FORMAT = "diffusion-pipeline.phema"
_NAME = re.compile(r"^(\d{12})\.safetensors$")

Snapshot = tuple[int, float, dict[str, torch.Tensor]]
"""(images seen, relative width, the raw network's state dict) of one average."""


class SnapshotError(ValueError):
    """A snapshot that is not in this format; the message names it."""


def location(runs: str, run_name: str) -> str:
    """Where the run `run_name` under the training storage `runs` keeps its snapshots."""
    return storage.join(runs, run_name, FOLDER)


def encode(nets: Mapping[float, nn.Module], images_seen: int) -> bytes:
    """The snapshot of the averaged raw networks `nets` (by width) after `images_seen`."""
    metadata = {
        "format": FORMAT,
        "images_seen": str(images_seen),
        "stds": json.dumps(sorted(nets)),
    }
    return _canonical(save_tensors(snapshot_tensors(nets), metadata=metadata))


def _canonical(data: bytes) -> bytes:
    """safetensors bytes with the header's keys sorted. safetensors writes its
    metadata in a hash map's order, which changes from process to process, so the
    same snapshot would have other bytes after a resume; sorted, it has one."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":"))
    header += " " * (-len(header) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(header)) + header.encode() + data[8 + size :]


def decode(data: bytes, what: str) -> tuple[int, dict[float, dict[str, torch.Tensor]]]:
    """Images seen and each width's state dict, from a snapshot's bytes; `what`
    (its location) names it in errors."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + size])["__metadata__"]
        found = metadata.get("format")
    except (struct.error, ValueError, KeyError, AttributeError) as e:
        raise SnapshotError(f"{what}: not a readable snapshot ({e!r})") from None
    if found != FORMAT:
        raise SnapshotError(f"{what}: not a post-hoc EMA snapshot (format {found!r})")
    try:
        images_seen = int(metadata["images_seen"])
        stored = sorted(json.loads(metadata["stds"]))
        profiles = split_snapshot(load_tensors(data))
    except (ValueError, KeyError, SafetensorError) as e:
        raise SnapshotError(f"{what}: not a readable snapshot ({e})") from None
    if sorted(profiles) != stored:
        raise SnapshotError(f"{what}: holds widths {sorted(profiles)}, its metadata says {stored}")
    return images_seen, profiles


def write(snapshots: str, images_seen: int, data: bytes) -> None:
    """Store a snapshot (`encode`'s bytes) in the folder `snapshots`, atomically."""
    storage.write_bytes(storage.join(snapshots, f"{images_seen:012d}.safetensors"), data)


def read_snapshots(snapshots: str, up_to: int | None = None) -> list[Snapshot]:
    """Every average stored in the folder `snapshots` (those taken after `up_to`
    images are not read), ordered by images seen and width: what
    `phema.reconstruct` takes. Other files there are ignored."""
    out: list[Snapshot] = []
    for obj in storage.list_objects(snapshots):
        match = _NAME.match(obj.relpath)
        if match is None or (up_to is not None and int(match.group(1)) > up_to):
            continue
        images_seen, profiles = decode(storage.read_bytes(obj.uri), obj.uri)
        if images_seen != int(match.group(1)):
            raise SnapshotError(f"{obj.uri}: its metadata says {images_seen} images seen")
        out += [(images_seen, std, state) for std, state in profiles.items()]
    return sorted(out, key=lambda s: (s[0], s[1]))
