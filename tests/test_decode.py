"""Decoding, colour conversion and geometry of single images, against known pixels."""

import numpy as np
import pytest
from PIL import Image

from pipeline.data.decode import Rejected, decode_image
from pipeline.data.transforms import center_crop_resize, encode_png
from tests import images

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
