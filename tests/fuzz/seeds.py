"""Valid seed files: every format the fuzzing covers, in the modes worth telling apart."""

from __future__ import annotations

import dataclasses
import functools
import struct
from typing import Any

import numpy as np
from PIL import Image

from tests import images

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")


@dataclasses.dataclass(frozen=True)
class Seed:
    name: str
    format: str
    data: bytes


def _picture(mode: str, width: int = 48, height: int = 40) -> Image.Image:
    """Gradient plus noise (so encoders emit real data), converted to `mode`."""
    rgb = np.asarray(images.gradient(width, height)).astype(int)
    noisy = np.clip(rgb + np.asarray(images.noise(width, height, 7)) // 8, 0, 255)
    img = Image.fromarray(noisy.astype(np.uint8))
    if mode == "RGBA":
        img.putalpha(Image.fromarray(noisy[..., 0].astype(np.uint8)))
        return img
    if mode in ("I;16", "I"):
        return Image.fromarray((noisy[..., 0] * 257).astype(np.uint16)).convert(mode)
    if mode == "P":
        return img.quantize(16)
    return img.convert(mode)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _bmp_rle8(width: int = 40, height: int = 36) -> bytes:
    """An 8-bit run-length-encoded BMP (Pillow cannot write one): runs of colour,
    a delta escape, end of line and end of bitmap."""
    rows = []
    for y in range(height):
        row = b"".join(bytes([10, (x + y) % 4]) for x in range(0, width - 10, 10))
        rows.append(row + bytes([10, 3, 0, 0]))
    pixels = b"".join(rows[:-1]) + bytes([0, 2, 2, 1]) + rows[-1][:-2] + b"\x00\x01"
    palette = b"".join(
        bytes([b, g, r, 0]) for r, g, b in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9))
    )
    offset = 14 + 40 + len(palette)
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 4, 0)
    return (
        b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + header + palette + pixels
    )


@functools.cache
def seeds() -> tuple[Seed, ...]:
    """One valid file per format and mode worth telling apart (about 50 files)."""
    made = [Seed(name, fmt, _encoded(fmt, mode, options)) for name, fmt, mode, options in _SEEDS]
    return (*made, Seed("bmp-rle8", "BMP", _bmp_rle8()))


_SEEDS: list[tuple[str, str, str, dict[str, Any]]] = [
    *((f"png-{m}", "PNG", m, {}) for m in ("RGB", "RGBA", "L", "LA", "P", "I;16", "1")),
    ("png-P-transparent", "PNG", "P", {"transparency": 3}),
    ("png-exif", "PNG", "RGB", {"exif": "orientation 6"}),
    ("png-apng", "PNG", "RGBA", {"save_all": True}),
    *((f"jpeg-{m}", "JPEG", m, {}) for m in ("RGB", "L", "CMYK")),
    ("jpeg-progressive", "JPEG", "RGB", {"progressive": True}),
    ("jpeg-444", "JPEG", "RGB", {"subsampling": 0}),
    ("jpeg-exif-rotated", "JPEG", "RGB", {"exif": "orientation 6"}),
    ("jpeg-icc", "JPEG", "RGB", {"icc_profile": "sRGB"}),
    ("gif-still", "GIF", "P", {"interlace": False}),
    ("gif-transparent", "GIF", "P", {"transparency": 2}),
    ("gif-animated", "GIF", "P", {"save_all": True}),
    ("gif-interlaced", "GIF", "L", {"interlace": True}),
    ("webp-lossy", "WEBP", "RGB", {"quality": 80}),
    ("webp-lossy-RGBA", "WEBP", "RGBA", {"quality": 80}),
    ("webp-lossless-RGBA", "WEBP", "RGBA", {"lossless": True}),
    ("webp-animated", "WEBP", "RGB", {"save_all": True}),
    ("webp-exif", "WEBP", "RGB", {"exif": "orientation 8"}),
    *((f"tiff-{m}", "TIFF", m, {}) for m in ("RGB", "RGBA", "CMYK", "I;16", "I", "L", "LA")),
    *((f"tiff-{m}", "TIFF", m, {}) for m in ("P", "1", "F")),
    *(
        (f"tiff-{c}", "TIFF", "RGB", {"compression": c})
        for c in ("tiff_lzw", "tiff_adobe_deflate", "packbits", "jpeg")
    ),
    ("tiff-multipage", "TIFF", "RGB", {"save_all": True}),
    *((f"bmp-{m}", "BMP", m, {}) for m in ("RGB", "RGBA", "L", "P", "1")),
]
"""name, format, Pillow mode, save options. "save_all" makes three frames; "exif"
and "icc_profile" name what _encoded embeds."""


def _encoded(fmt: str, mode: str, options: dict[str, Any]) -> bytes:
    options = dict(options)
    if options.pop("save_all", False):
        first, *rest = [_picture(mode).rotate(angle) for angle in (0, 90, 180)]
        options.update(save_all=True, append_images=rest, duration=100, loop=0)
        return images.encode(first, fmt, **options)
    if "exif" in options:
        options["exif"] = _exif(int(options["exif"].split()[-1]))
    if "icc_profile" in options:
        options["icc_profile"] = _srgb()
    return images.encode(_picture(mode), fmt, **options)


@functools.cache
def _srgb() -> bytes:
    """An sRGB ICC profile, the same bytes in every process: LittleCMS stamps the
    time of creation into the header (bytes 24-36), which is fixed here."""
    from PIL import ImageCms

    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[24:36] = struct.pack(">6H", 2020, 1, 1, 0, 0, 0)
    profile[84:100] = bytes(16)  # profile ID: an MD5 over the header, 0 = not computed
    return bytes(profile)


def transparent_gif_on_a_large_canvas() -> bytes:
    """A 48x40 transparent GIF frame on an 8192x8192 logical screen: what the
    fuzzer's dimension mutation made, a full-size palette image with alpha."""
    frame = Image.new("P", (48, 40), 1)
    frame.putpalette([255, 0, 0, 0, 0, 255])
    frame.paste(0, (0, 0, 24, 40))  # the left half transparent
    data = bytearray(images.encode(frame, "GIF", transparency=0))
    data[6:10] = struct.pack("<HH", 8192, 8192)
    return bytes(data)


def sixteen_bit_png_of_64_megapixels() -> bytes:
    return images.encode(Image.fromarray(np.full((8192, 8192), 0x4000, np.uint16)), "PNG")


# The largest images the default max_pixels lets through, in the forms that once
# cost most: tests/test_decode.py checks their memory, bench/fuzz_decode.py their time.
LARGEST = {
    "transparent_gif_on_a_large_canvas": transparent_gif_on_a_large_canvas,
    "sixteen_bit_png_of_64_megapixels": sixteen_bit_png_of_64_megapixels,
}
