"""Safe image decoding: untrusted bytes in, an RGB image or a reasoned rejection out.

Every choice here is deliberate, because raw datasets hold everything:
- the declared pixel count and sides are checked before any pixel is decoded
  (decompression bombs declare gigapixels in a few hundred bytes);
- truncated files are rejected, never half-decoded (Pillow's
  LOAD_TRUNCATED_IMAGES stays off);
- animations contribute their first frame;
- the EXIF orientation is applied, so a phone photo stands the right way up (a
  corrupt EXIF block is ignored, as viewers ignore it);
- an embedded ICC profile is honoured (CMYK print files, wide-gamut RGB) by
  converting to sRGB;
- every mode becomes 8-bit RGB by a rule chosen for it: alpha (and a PNG's
  transparent palette entries or colour key) is composited onto a background
  colour, 16-bit samples are scaled (not clipped) to 8 bits;
- no input makes it raise anything but Rejected, or take more than about two
  full-size copies of the image in memory (tests/test_fuzz_decode.py fuzzes it).
"""

from __future__ import annotations

import functools
import io
import struct
import warnings

from PIL import ExifTags, Image, ImageCms, UnidentifiedImageError


class Rejected(Exception):
    """An input that cannot become a training image; `reason` is a short code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@functools.cache
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


MAX_SIDE = 65_535
"""The longest side accepted, whatever `max_pixels` allows. Pillow keeps a pointer
per row, so a 1 x 67,108,864 image costs half a gigabyte before its first pixel
(and each copy as much again), and a 67,108,864 x 1 one made it raise MemoryError.
65,535 is the most a JPEG or GIF can state; PNG, TIFF and BMP allow more, which
only corrupt or hostile files use."""

_DECODER_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    TypeError,
)
"""What Pillow raises on malformed input, as fuzzing found (tests/test_fuzz_decode.py):
OSError and ValueError from decoders, SyntaxError and struct.error from header
parsers, EOFError and IndexError from parsers that read past what a field promised,
TypeError from a TIFF tag of the wrong type (a strip offset stored as a double)."""

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transposition that stands the stored pixels upright."""


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

    Raises Rejected with reason `empty`, `not_an_image`, `too_many_pixels` (more
    than `max_pixels`, or a side longer than MAX_SIDE), `truncated` or
    `unsupported_mode`, and nothing else, whatever the bytes (tests/
    test_fuzz_decode.py holds it to that). Peak memory is about two full-size
    copies of the image at 4 bytes a pixel: 0.55 GB at 8192 x 8192.
    """
    if not data:
        raise Rejected("empty", "zero-byte file")
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        # Pillow's own bomb limit (89M pixels) would otherwise win over a larger
        # `max_pixels`; ours is checked before any pixel is decoded just the same.
        Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        # Pillow's warnings describe the input ("Corrupt EXIF data", "Truncated
        # File Read"): the outcome says what matters, and a dataset of millions
        # would bury the workers' logs in them. Its bomb warning (at 89M pixels)
        # becomes the same rejection as its bomb error, at twice that.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(data, max_pixels)
        width, height = img.size  # as declared: a JPEG may decode at a reduced scale
        _load(img, min_side)
        img, quarter_turn = _upright(img)
        # Toward RGB one conversion at a time, each result replacing the last,
        # so that at most two full-size images are alive at once.
        while (step := _unpack(img)) is not None:
            img = step
        img = _flatten(_managed(img), background)
    # Only pixels go on: the encoder would write a source's colour key or ICC
    # profile into the training PNG (or fail on a colour key it cannot store).
    img.info = {}
    return img, (height, width) if quarter_turn else (width, height)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open `data` and check what its headers declare, before any pixel is decoded."""
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise Rejected("too_many_pixels", str(e)) from None
    except UnidentifiedImageError:
        raise Rejected("not_an_image", "no image format recognises these bytes") from None
    except _DECODER_ERRORS as e:
        # A recognised format whose headers are cut short is a truncated file.
        reason = "truncated" if "truncated" in str(e).lower() else "not_an_image"
        raise Rejected(reason, str(e)) from None
    width, height = img.size
    if width * height > max_pixels:
        raise Rejected("too_many_pixels", f"{width}x{height} exceeds max_pixels={max_pixels}")
    if max(width, height) > MAX_SIDE:
        raise Rejected("too_many_pixels", f"{width}x{height}: a side exceeds {MAX_SIDE}")
    if not width or not height:
        raise Rejected("not_an_image", f"empty image {width}x{height}")
    if img.mode not in _SUPPORTED_MODES:
        raise Rejected("unsupported_mode", _unsupported(img.mode))
    return img


def _load(img: Image.Image, min_side: int | None) -> None:
    """Decode the pixels of the first frame (at a reduced scale where the format can)."""
    if min_side:
        img.draft(None, (2 * min_side, 2 * min_side))
    try:
        img.seek(0)
        img.load()
    except _DECODER_ERRORS as e:
        raise Rejected("truncated", f"cannot decode pixels: {e}") from None


def _upright(img: Image.Image) -> tuple[Image.Image, bool]:
    """`img` turned as its EXIF orientation says, and whether that was a quarter
    turn. A missing, corrupt or out-of-range orientation leaves it as stored,
    which is how image viewers show such files."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODER_ERRORS:
        return img, False
    if not isinstance(orientation, int) or orientation not in _TRANSPOSE:
        return img, False
    return img.transpose(_TRANSPOSE[orientation]), orientation >= 5


def _unpack(img: Image.Image) -> Image.Image | None:
    """One conversion toward RGB, RGBA or CMYK (the modes _managed and _flatten
    take), or None when `img` is in one of them already."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return img.convert("I")
    if mode == "I":
        return _sixteen_to_grey(img)
    if mode == "P":
        return _palette_to_rgb(img)
    if mode in ("PA", "LA", "RGBa"):
        return img.convert("RGBA")
    if mode == "La":
        return img.convert("LA")
    if mode in ("1", "L", "RGB") and _colour_key(img) is not None:
        return img.convert("RGBA")  # pixels of the key colour become transparent
    return None


def _colour_key(img: Image.Image) -> int | tuple[int, ...] | None:
    """The colour a grey or RGB image declares transparent (a PNG tRNS chunk), if
    it is one this mode can hold."""
    key = img.info.get("transparency")
    if img.mode in ("1", "L") and isinstance(key, int) and 0 <= key < 256:
        return key
    if img.mode == "RGB" and isinstance(key, tuple) and len(key) == 3:
        if all(isinstance(c, int) and 0 <= c < 256 for c in key):
            return key
    return None


def _palette_to_rgb(img: Image.Image) -> Image.Image:
    """A palette image as RGBA when it has transparency, else RGB. Alphas for more
    entries than the palette holds are ignored, as libpng ignores such a tRNS
    chunk (Pillow raises on them), and so is a transparent index past 255."""
    transparency = img.info.get("transparency")
    entries = len(img.getpalette() or ()) // 3
    if isinstance(transparency, bytes) and len(transparency) <= entries:
        return img.convert("RGBA")
    if isinstance(transparency, int) and 0 <= transparency < 256:
        return img.convert("RGBA")
    return img.convert("RGB")


def _sixteen_to_grey(img: Image.Image) -> Image.Image:
    """32-bit integer grey (16-bit grey becomes it first): 0..65535 scaled to
    0..255, rounding, where Pillow's own convert() clips. One table lookup per
    pixel, in C: at 64M pixels a float copy would cost 0.5 GB and seconds."""
    grey = img.point(_sixteen_bit_table(), "L")
    # A 16-bit colour key names no 8-bit value: other values scale to it too.
    grey.info.pop("transparency", None)
    return grey


@functools.cache
def _sixteen_bit_table() -> list[int]:
    # round(v / 257) in integers: 257 is odd, so v / 257 is never a tie. Pillow
    # clips values outside 0..65535 to the table's ends.
    return [(v + 128) // 257 for v in range(65536)]


_DIRECT = frozenset({"RGB", "RGBX", "L", "1", "CMYK", "YCbCr", "LAB", "HSV"})
"""Modes Pillow's convert() turns into RGB as they should look."""

_SUPPORTED_MODES = _DIRECT | {
    *("RGBA", "P", "PA", "LA", "La", "RGBa"),
    *("I", "I;16", "I;16L", "I;16B", "I;16N"),
}
"""The modes _unpack, _managed and _flatten have a rule for."""


def _unsupported(mode: str) -> str:
    if mode == "F":
        return "32-bit float images have no agreed 8-bit range"
    return f"Pillow mode {mode!r}"


def _managed(img: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile (CMYK print files, wide-gamut RGB) to reach
    sRGB; a broken profile leaves the values as stored, which is what image viewers
    show for such files."""
    icc = img.info.get("icc_profile")
    if not isinstance(icc, bytes) or img.mode not in ("RGB", "RGBA", "CMYK"):
        return img
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(img, source, _srgb(), outputMode=out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return img
    return img if converted is None else converted


def _flatten(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB at last: alpha blended onto `background`, other modes converted."""
    if img.mode == "RGBA":
        # paste() with the alpha band as mask blends c*a + bg*(1-a) in place,
        # without alpha_composite's two extra RGBA copies.
        canvas = Image.new("RGB", img.size, background)
        canvas.paste(img, mask=img)
        return canvas
    if img.mode == "RGB":
        return img  # convert() would copy it
    if img.mode in _DIRECT:
        return img.convert("RGB")
    raise Rejected("unsupported_mode", _unsupported(img.mode))
