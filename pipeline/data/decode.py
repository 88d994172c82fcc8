"""Safe image decoding: untrusted bytes in, an RGB image or a reasoned rejection out.

Every choice here is deliberate, because raw datasets hold everything:
- the declared pixel count is checked before any pixel is decoded (decompression
  bombs declare gigapixels in a few hundred bytes);
- truncated files are rejected, never half-decoded (Pillow's
  LOAD_TRUNCATED_IMAGES stays off);
- animations contribute their first frame;
- the EXIF orientation is applied, so a phone photo stands the right way up;
- an embedded ICC profile is honoured (CMYK print files, wide-gamut RGB) by
  converting to sRGB;
- every mode becomes 8-bit RGB by a rule chosen for it: alpha is composited
  onto a background colour, 16-bit samples are scaled (not clipped) to 8 bits.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError


class Rejected(Exception):
    """An input that cannot become a training image; `reason` is a short code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@functools.cache
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    background: tuple[int, int, int] = (255, 255, 255),
    min_side: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `data` to an 8-bit RGB image, upright; also return its original
    (width, height) as displayed, after the EXIF orientation.

    With `min_side`, formats that can decode at a reduced scale (JPEG's DCT
    scaling) do so, keeping both sides at least twice `min_side` so the final
    antialiased resize still has detail to work with.

    Raises Rejected with reason `empty`, `not_an_image`, `too_many_pixels`,
    `truncated` or `unsupported_mode`.
    """
    if not data:
        raise Rejected("empty", "zero-byte file")
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        # Pillow's own bomb limit (89M pixels) would otherwise win over a larger
        # `max_pixels`; ours is checked before any pixel is decoded just the same.
        Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        # Pillow warns at 89M pixels and raises at twice that; we check our own
        # limit first, and turn its warning into the same rejection.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img: Image.Image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise Rejected("too_many_pixels", str(e)) from None
        except UnidentifiedImageError:
            raise Rejected("not_an_image", "no image format recognises these bytes") from None
        except (OSError, SyntaxError, ValueError) as e:
            # A recognised format whose headers are cut short is a truncated file.
            reason = "truncated" if "truncated" in str(e).lower() else "not_an_image"
            raise Rejected(reason, str(e)) from None
        width, height = img.size
        if width * height > max_pixels:
            raise Rejected("too_many_pixels", f"{width}x{height} exceeds max_pixels={max_pixels}")
        if min_side:
            img.draft(None, (2 * min_side, 2 * min_side))
        try:
            img.seek(0)  # first frame of an animation
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise Rejected("truncated", f"cannot decode pixels: {e}") from None
    if not width or not height:
        raise Rejected("not_an_image", f"empty image {width}x{height}")
    if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
        width, height = height, width  # rotated by a quarter turn
    img = ImageOps.exif_transpose(img)
    return to_rgb(img, background), (width, height)


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB by a rule chosen for that mode."""
    icc = img.info.get("icc_profile")
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: scale 0..65535 to 0..255. Pillow's own convert() clips.
        grey = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        raise Rejected("unsupported_mode", "32-bit float images have no agreed 8-bit range")
    if mode == "P":
        mode = "RGBA" if "transparency" in img.info else "RGB"
        img = img.convert(mode)
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if icc and mode in ("RGB", "RGBA", "CMYK"):
        img = _to_srgb(img, icc)
        mode = img.mode
    if mode in ("LA", "La", "RGBa", "RGBA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode in ("RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    raise Rejected("unsupported_mode", f"Pillow mode {img.mode!r}")


def _to_srgb(img: Image.Image, icc: bytes) -> Image.Image:
    """Apply the embedded ICC profile; a broken profile leaves the values as stored,
    which is what image viewers show for such files."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(img, source, _srgb(), outputMode=out_mode)
        return img if converted is None else converted
    except (ImageCms.PyCMSError, OSError, ValueError):
        return img
