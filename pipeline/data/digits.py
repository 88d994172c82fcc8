"""Example data: scikit-learn's bundled handwritten digits as a folder of PNGs.

1,797 real 8x8 grey images in 10 classes, shipped inside scikit-learn (no
download), written as `{label}/{index:04d}.png`, the layout `preprocess`
reads class labels from. The 17 grey levels (0..16) are scaled to 0..255.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.data.transforms import encode_png


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


def write_digits(output: str) -> int:
    """Write every digit under `output`; returns how many were written."""
    images, labels = load_digits()
    for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        png = encode_png(Image.fromarray(pixels, "L"))
        storage.write_bytes(storage.join(output, str(label), f"{index:04d}.png"), png)
    return len(images)
