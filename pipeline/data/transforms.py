"""Geometry and encoding of one decoded image: center crop, resize, PNG."""

from __future__ import annotations

import io

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
