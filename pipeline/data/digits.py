"""Example data: scikit-learn's bundled handwritten digits as a folder of PNGs.

1,797 real 8x8 grey images in 10 classes, shipped inside scikit-learn (no
download), written as `{label}/{index:04d}.png`, the layout `preprocess`
reads class labels from. The 17 grey levels (0..16) are scaled to 0..255.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.data.transforms import encode_png
from pipeline.edges import storage


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images as uint8 [N, 8, 8] in 0..255, labels [N])."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise RuntimeError(
            "the example digits need scikit-learn: pip install -e '.[examples]'"
        ) from None
    digits = sklearn_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def write_digits(output: str, first: int = 0, count: int | None = None) -> int:
    """Write digits [first, first + count) (default: all from `first`) under `output`,
    skipping files already there; returns how many there are in that range."""
    images, labels = load_digits()
    stop = len(images) if count is None else min(len(images), first + count)
    present = {o.relpath for o in _listing(output)}
    for index in range(first, stop):
        relpath = f"{labels[index]}/{index:04d}.png"
        if relpath not in present:
            png = encode_png(Image.fromarray(images[index], "L"))
            storage.write_bytes(storage.join(output, relpath), png)
    return max(0, stop - first)


def _listing(output: str) -> list[storage.ObjectInfo]:
    try:
        return storage.list_objects(output)
    except storage.NotFound:
        return []
