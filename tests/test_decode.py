"""Decoding, colour conversion and geometry of single images, against known pixels."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.decode import Rejected, decode_image
from pipeline.data.transforms import center_crop_resize, encode_png
from tests import images
from tests.fuzz import run, seeds

RES = 32


def process(data: bytes, upscale: bool = False) -> np.ndarray:
    img, _ = decode_image(data, max_pixels=8192 * 8192, min_side=RES)
    return np.asarray(center_crop_resize(img, RES, upscale=upscale))


@pytest.mark.parametrize("name", sorted(images.bad_corpus()))
def test_corpus_file_is_written_right_or_rejected_with_its_reason(name):
    data, outcome, expected = images.bad_corpus()[name]
    if outcome == "rejected":
        with pytest.raises(Rejected) as err:
            process(data)
        assert err.value.reason == expected, err.value
    else:
        pixels = process(data)
        assert pixels.shape == (RES, RES, 3) and pixels.dtype == np.uint8
        expected(pixels)


@pytest.mark.parametrize("size", [(320, 160), (160, 320), (97, 203), (64, 64)])
def test_gradient_is_center_cropped_and_resampled_exactly(size):
    w, h = size
    out = process(images.encode(images.gradient(w, h), "PNG")).astype(float)
    want = images.expected_gradient(w, h, RES)
    # Away from the border, where the filter is whole, a linear ramp survives
    # resampling up to the rounding of input and output (at most 1 level).
    inner = slice(4, RES - 4)
    assert np.abs(out[inner, inner, :2] - want[inner, inner]).max() <= 1.0
    assert (out[..., 2] == 0).all()


def test_checkerboard_squares_keep_their_colour_inside():
    # 512x384: the centre 384x384 crop starts at x=64, one square in, so it starts
    # on a black square. Resized by 4 the 64-pixel squares become 16 pixels, and
    # the Lanczos filter (radius 3 output pixels) sees one colour only in each
    # square's middle.
    board = images.checkerboard(512, 384, 64)
    img, _ = decode_image(images.encode(board, "PNG"), max_pixels=10**8)
    out = np.asarray(center_crop_resize(img, 96, upscale=False))[..., 0]
    for row in range(6):
        for col in range(6):
            middle = out[row * 16 + 3 : row * 16 + 13, col * 16 + 3 : col * 16 + 13]
            assert (middle == (255 if (row + col) % 2 == 1 else 0)).all(), (row, col)


def test_downscaling_is_antialiased():
    # A one-pixel checkerboard has mean 127.5 and no structure above Nyquist
    # after an 8x reduction: an antialiased resize gives flat grey, a nearest-
    # neighbour resize would give black or white.
    out = process(images.encode(images.checkerboard(256, 256, 1), "PNG"))
    assert np.abs(out.astype(int) - 128).max() <= 2


def test_small_image_is_upscaled_when_asked():
    # Upscaling 24x20 to 32: the ramp is reproduced away from the border too.
    out = process(images.encode(images.gradient(24, 20), "PNG"), upscale=True).astype(float)
    want = images.expected_gradient(24, 20, RES)
    inner = slice(4, RES - 4)
    assert np.abs(out[inner, inner, :2] - want[inner, inner]).max() <= 1.0


def test_exif_rotation_swaps_the_reported_size():
    exif = Image.Exif()
    exif[0x0112] = 8
    data = images.encode(Image.new("RGB", (90, 40)), "JPEG", exif=exif.tobytes())
    img, original = decode_image(data, max_pixels=10**6)
    assert original == (40, 90) and img.size == (40, 90)


def test_jpeg_draft_decoding_keeps_twice_the_target_resolution():
    data = images.encode(images.noise(1000, 800, 0), "JPEG")
    img, original = decode_image(data, max_pixels=10**8, min_side=RES)
    assert original == (1000, 800)
    assert min(img.size) >= 2 * RES and img.size[0] < 1000  # decoded at a reduced scale


def test_png_encoding_is_deterministic_and_lossless():
    img = images.noise(33, 17, 5)
    a, b = encode_png(img), encode_png(img.copy())
    assert a == b
    assert (images.pixels_of(a) == np.asarray(img)).all()


def test_max_pixels_above_pillows_own_limit_takes_effect():
    # 95M declared pixels: over Pillow's default bomb limit (89.5M) but under
    # ours, so the file gets as far as decoding (and is then found truncated).
    data = images.png_declaring(10_000, 9_500)
    with pytest.raises(Rejected) as err:
        decode_image(data, max_pixels=100_000_000)
    assert err.value.reason == "truncated", err.value
    with pytest.raises(Rejected) as err:
        decode_image(data, max_pixels=90_000_000)
    assert err.value.reason == "too_many_pixels", err.value


def test_icc_tagged_images_go_through_colour_management():
    # An sRGB-tagged image converts to itself; a corrupt profile leaves the stored
    # values, as image viewers show them. (No non-sRGB RGB profile can be built
    # offline, so a real gamut conversion is not checked here.)
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for icc in (srgb, b"not a profile" * 10):
        data = images.encode(Image.new("RGB", (64, 64), (200, 50, 50)), "PNG", icc_profile=icc)
        img, _ = decode_image(data, max_pixels=10**6)
        assert img.mode == "RGB" and (np.asarray(img) == (200, 50, 50)).all()


# --- found by fuzzing (tests/test_fuzz_decode.py, bench/fuzz_decode.py): each of these
# inputs made decode_image raise something other than Rejected, or cost too much.


def _exif_with_a_broken_header() -> bytes:
    """EXIF asking for a quarter turn, its TIFF header damaged as a bit flip would."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes().replace(b"MM\x00*", b"MM@*", 1)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_a_corrupt_exif_block_leaves_the_image_as_stored(fmt):
    # Was: SyntaxError from Pillow's EXIF parser. Viewers ignore such a block.
    stored = Image.new("RGB", (64, 32), (0, 0, 200))
    data = images.encode(stored, fmt, exif=_exif_with_a_broken_header())
    img, original = decode_image(data, max_pixels=10**6)
    assert original == (64, 32) and img.size == (64, 32)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_alphas_for_more_entries_than_the_palette_holds_are_ignored():
    # Was: ValueError("palette index out of range"). libpng ignores such a tRNS chunk,
    # so the image is opaque: red and blue halves, not blended with the background.
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.paste(1, (32, 0, 64, 64))
    png = images.encode(palette, "PNG")
    idat = png.index(b"IDAT") - 4
    data = png[:idat] + _png_chunk(b"tRNS", bytes(769)) + png[idat:]
    pixels = process(data)
    assert (pixels[:, :8] == (255, 0, 0)).all() and (pixels[:, -8:] == (0, 0, 255)).all()


@pytest.mark.parametrize("mode", ["1", "L", "RGB"])
def test_a_colour_key_is_composited_and_not_passed_on(mode):
    # Was: ValueError ("transparency for RGB must be list or tuple") from the PNG
    # encoder for a 1-bit PNG with a tRNS chunk: the key travelled with the image
    # (L and RGB ones were written into the training PNG as a key).
    white = {"1": 1, "L": 255, "RGB": (255, 255, 255)}[mode]
    stored = Image.new(mode, (64, 64), 0)
    stored.paste(white, (0, 0, 32, 64))  # the left half has the key colour
    data = images.encode(stored, "PNG", transparency=255 if mode == "1" else white)
    img, _ = decode_image(data, max_pixels=10**6, background=(0, 128, 0))
    assert img.info == {}
    pixels = images.pixels_of(encode_png(center_crop_resize(img, RES, upscale=False)))
    assert (pixels[:, :8] == (0, 128, 0)).all() and (pixels[:, -8:] == 0).all()


def _tiff_with_tag_value(img: Image.Image, tag: int, *, kind: int | None = None, value=None):
    """`img` as a TIFF whose IFD entry `tag` is given another type or inline value."""
    data = bytearray(images.encode(img, "TIFF"))
    ifd = int.from_bytes(data[4:8], "little")
    for entry in range(ifd + 2, ifd + 2 + 12 * int.from_bytes(data[ifd : ifd + 2], "little"), 12):
        if int.from_bytes(data[entry : entry + 2], "little") == tag:
            if kind is not None:
                data[entry + 2 : entry + 4] = kind.to_bytes(2, "little")
            if value is not None:
                data[entry + 8 : entry + 10] = value.to_bytes(2, "little")
    return bytes(data)


def test_a_tiff_strip_offset_of_the_wrong_type_is_rejected():
    # Was: TypeError ("'float' object cannot be interpreted as an integer"): a bit
    # flip made StripOffsets (273) a DOUBLE (type 12).
    data = _tiff_with_tag_value(Image.new("RGB", (48, 40)), 273, kind=12)
    with pytest.raises(Rejected) as err:
        decode_image(data, max_pixels=10**6)
    assert err.value.reason == "truncated", err.value


def test_grey_with_premultiplied_alpha_is_composited():
    # Was: ValueError ("conversion from La to L not supported"). ExtraSamples (338)
    # = 1 marks the alpha as associated: a stored 100 at alpha 128 is a 199 grey
    # half covering white: 100 + 255 * 127 / 255 = 227.
    data = _tiff_with_tag_value(Image.new("LA", (48, 40), (100, 128)), 338, value=1)
    assert Image.open(io.BytesIO(data)).mode == "La"
    pixels = process(data)
    assert np.abs(pixels.astype(int) - 227).max() <= 1


def _bmp_declaring(width: int, height: int) -> bytes:
    """A BMP header declaring `width` x `height` 32-bit pixels, and 16 bytes of them."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 32, 0, 0, 0, 0, 0, 0)
    offset = 14 + len(info)
    return b"BM" + struct.pack("<IHHI", offset + 16, 0, 0, offset) + info + bytes(16)


@pytest.mark.parametrize("size", [(1 << 26, 1), (1, 1 << 26), (70_000, 10)])
def test_a_side_longer_than_max_side_is_rejected_before_decoding(size):
    # Within max_pixels, yet: 67M x 1 made Pillow raise MemoryError, and 1 x 67M
    # took 0.5 GB of row pointers before finding the file truncated.
    data = _bmp_declaring(*size) if size[0] != 70_000 else images.png_declaring(*size)
    with pytest.raises(Rejected) as err:
        decode_image(data, max_pixels=8192 * 8192)
    assert err.value.reason == "too_many_pixels" and "a side exceeds" in err.value.detail


@pytest.mark.parametrize("name", seeds.LARGEST)
def test_the_largest_images_allowed_are_written_in_under_1_gib(name):
    # At max_pixels (64M pixels) these took 1.4 GB (alpha compositing's RGBA
    # copies) and 1.7 GB (16-bit samples scaled in float64); now about two
    # full-size copies at most. Measured in a fresh process. Their time is
    # bench/fuzz_decode.py's to measure: a timed test fails on a busy machine.
    outcome = run.measure(seeds.LARGEST[name]())
    assert outcome.result == "written", outcome
    assert outcome.peak_rss < 1 << 30, outcome
