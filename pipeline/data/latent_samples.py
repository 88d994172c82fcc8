"""A latent dataset's samples: the posterior of each image's latent, as members of
a webdataset shard.

A latent dataset (tasks.encode) has a pixel dataset's layout: shards named as
its source's, `manifest.json` last, `manifests/` for earlier versions. Its
manifest says `"kind": "latents"` (a pixel dataset's says nothing, or
`"pixels"`), and a sample `{key}` holds:

    {key}.mean.npy           float32 [C, h, w], the posterior's mean
    {key}.std.npy            float32 [C, h, w], its standard deviation
    {key}.flipped.mean.npy   the same for the image mirrored left to right
    {key}.flipped.std.npy    (only when encoded with flips)
    {key}.json               the pixel sample's metadata, and where it came from
    {key}.cls                its class index, as in the pixel dataset

Each time training meets a sample it draws z = mean + std * e afresh
(`pipeline.maths.latents`): one stored draw would freeze one sample of the
posterior forever. `.npy` is what webdataset's default decoders read as arrays.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

KIND = "latents"
PIXELS = "pixels"
MEAN, STD = "mean.npy", "std.npy"
FLIPPED_MEAN, FLIPPED_STD = "flipped.mean.npy", "flipped.std.npy"
FORMAT_VERSION = 1
"""Of the latent members and manifest: bumped whenever the same pixel dataset,
autoencoder and config can give other shard bytes."""


def kind(manifest: dict[str, Any]) -> str:
    """`latents` or `pixels`: what a dataset's samples hold."""
    return str(manifest.get("kind", PIXELS))


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as .npy bytes: the same array gives the same bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    """The array in .npy bytes (never unpickled)."""
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def members(
    key: str,
    mean: np.ndarray,
    std: np.ndarray,
    meta: bytes,
    label: bytes | None,
    flipped: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[tuple[str, bytes]]:
    """A sample's (name, bytes) members, in the order shards hold them."""
    out = [(f"{key}.{MEAN}", npy_bytes(mean)), (f"{key}.{STD}", npy_bytes(std))]
    if flipped is not None:
        out += [
            (f"{key}.{FLIPPED_MEAN}", npy_bytes(flipped[0])),
            (f"{key}.{FLIPPED_STD}", npy_bytes(flipped[1])),
        ]
    out.append((f"{key}.json", meta))
    if label is not None:
        out.append((f"{key}.cls", label))
    return out
