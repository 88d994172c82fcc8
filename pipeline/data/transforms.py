"""Geometry and encoding of one decoded image: center crop, resize, PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.data.decode import Rejected

PNG_COMPRESS_LEVEL = 6
"""zlib level for written PNGs (Pillow's default): small shards at little CPU cost
for the image sizes diffusion models train on."""


def center_crop_resize(img: Image.Image, resolution: int, *, upscale: bool) -> Image.Image:
    """The largest centered square of `img`, resized to `resolution` pixels a side.

    The resize uses a Lanczos filter whose support scales with the reduction, so
    downscaling is antialiased. An image whose shorter side is below
    `resolution` is upscaled when `upscale` is true, else Rejected (`too_small`).
    """
    width, height = img.size
    side = min(width, height)
    if side < resolution and not upscale:
        raise Rejected("too_small", f"{width}x{height} is smaller than {resolution}x{resolution}")
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if side == resolution:
        return img.crop(box)
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes of `img`; the same pixels always give the same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def tile(
    images: np.ndarray, columns: int = 8, min_side: int = 32, gap: int = 2, background: int = 128
) -> np.ndarray:
    """uint8 images [N, H, W, 3] -> one uint8 image, `columns` images a row, each
    enlarged (nearest) to at least `min_side` pixels, `gap` pixels of grey
    `background` apart (so that dark or light images keep visible borders)."""
    scale = max(1, -(-min_side // images.shape[1]))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, c), background, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = r * (h + gap), col * (w + gap)
        canvas[top : top + h, left : left + w] = image
    return canvas
