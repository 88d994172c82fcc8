"""Images with known content, for tests: patterns, a mixed-size folder, a bad corpus."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def pixels_of(data: bytes) -> np.ndarray:
    """The decoded pixels of an encoded image (the file is closed again)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def gradient(width: int, height: int) -> Image.Image:
    """R rises linearly with x from 0 to 255, G with y, B is 0."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.zeros_like(x)], -1)
    return Image.fromarray(np.rint(rgb).astype(np.uint8))


def expected_gradient(width: int, height: int, resolution: int) -> np.ndarray:
    """What center-crop + resize to `resolution` must give for `gradient(width, height)`:
    a symmetric resampling filter reproduces a linear ramp, so output pixel j is
    the ramp's value at the source point its footprint is centred on."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    centres = (np.arange(resolution) + 0.5) * side / resolution - 0.5
    r = (left + centres) * 255 / (width - 1)
    g = (top + centres) * 255 / (height - 1)
    return np.stack([r[None, :].repeat(resolution, 0), g[:, None].repeat(resolution, 1)], -1)


def checkerboard(width: int, height: int, square: int) -> Image.Image:
    """Black and white squares of `square` pixels, white at the top-left."""
    yy, xx = np.mgrid[:height, :width]
    white = ((xx // square + yy // square) % 2 == 0) * 255
    return Image.fromarray(np.stack([white] * 3, -1).astype(np.uint8))


def png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG that declare `width` x `height` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def mixed_folder(root: Path, count: int, classes: int = 4, seed: int = 0) -> list[Path]:
    """`count` images of random sizes (24..160 a side) and formats, in class folders;
    each is a flat colour with a little noise, so files stay small."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(24, 161, 2))
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(colour + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        fmt = ("PNG", "JPEG")[i % 2]
        path = root / f"class{i % classes}" / f"img{i:05d}.{fmt.lower().replace('jpeg', 'jpg')}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(Image.fromarray(pixels), fmt))
        paths.append(path)
    return paths


# --- the bad-input corpus: every kind of file a raw dataset holds -----------------------


def _near(colour, tol=4):
    def check(pixels: np.ndarray) -> None:
        centre = pixels[pixels.shape[0] // 2, pixels.shape[1] // 2].astype(int)
        assert np.abs(centre - colour).max() <= tol, f"centre {centre.tolist()}, expected {colour}"

    return check


def _halves(left, right):
    def check(pixels: np.ndarray) -> None:
        n = pixels.shape[1]
        assert (pixels[:, : n // 4] == left).all(), pixels[0, 0].tolist()
        assert (pixels[:, -n // 4 :] == right).all(), pixels[0, -1].tolist()

    return check


def _marker_top_right(pixels: np.ndarray) -> None:
    n = pixels.shape[0]
    top_right, top_left = pixels[n // 8, -n // 8].astype(int), pixels[n // 8, n // 8].astype(int)
    assert top_right[0] > 200 and top_right[1:].max() < 60, f"top-right {top_right.tolist()}"
    assert top_left.max() < 40, f"top-left {top_left.tolist()}"


def bad_corpus() -> dict[str, tuple[bytes, str, object]]:
    """file name -> (bytes, "rejected" or "written", reason or pixel check), for
    preprocessing at resolution 32 with small images rejected."""
    jpeg = encode(noise(96, 96, 1), "JPEG", quality=95)
    png = encode(noise(64, 64, 2), "PNG")
    sixteen = np.full((64, 64), 0x4000, np.uint16)
    sixteen[:, 32:] = 0xC000  # 16384/257 -> 64 and 49152/257 -> 191 when scaled
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 32, 64))  # left half: index 1, which is transparent
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
    stored = Image.new("RGB", (64, 64), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 32, 32))  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: marker at the top-right
    return {
        "empty.png": (b"", "rejected", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) * 6 // 10], "rejected", "truncated"),
        "truncated.png": (png[: len(png) // 2], "rejected", "truncated"),
        "notes.jpg": (b"not an image, just text\n" * 20, "rejected", "not_an_image"),
        "random.png": (np.random.default_rng(3).bytes(4096), "rejected", "not_an_image"),
        "bomb.png": (png_declaring(50_000, 50_000), "rejected", "too_many_pixels"),
        "declares-81M.png": (png_declaring(9000, 9000), "rejected", "too_many_pixels"),
        "tiny.png": (encode(noise(16, 16, 4), "PNG"), "rejected", "too_small"),
        "float.tif": (
            encode(Image.new("F", (64, 64), 0.5), "TIFF"),
            "rejected",
            "unsupported_mode",
        ),
        "cmyk.jpg": (
            encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95),
            "written",
            _near((255, 0, 0)),
        ),
        "sixteen-bit.png": (encode(Image.fromarray(sixteen), "PNG"), "written", _halves(64, 191)),
        "palette-transparent.png": (
            encode(palette, "PNG", transparency=1),
            "written",
            _halves(255, (255, 0, 0)),
        ),
        "rgba.png": (
            encode(Image.new("RGBA", (64, 64), (255, 0, 0, 128)), "PNG"),
            "written",
            _near((255, 127, 127), tol=1),
        ),
        "grey-alpha.png": (
            encode(Image.new("LA", (64, 64), (0, 0)), "PNG"),
            "written",
            _near((255, 255, 255), tol=0),
        ),
        "grey.png": (
            encode(Image.new("L", (64, 64), 100), "PNG"),
            "written",
            _near((100, 100, 100), tol=0),
        ),
        "animated.gif": (gif.getvalue(), "written", _near((255, 0, 0), tol=2)),
        "exif-rotated.jpg": (
            encode(stored, "JPEG", quality=95, exif=exif.tobytes()),
            "written",
            _marker_top_right,
        ),
        "my holiday.photo v2.final.png": (
            encode(Image.new("RGB", (80, 64), (0, 160, 0)), "PNG"),
            "written",
            _near((0, 160, 0), tol=0),
        ),
    }
