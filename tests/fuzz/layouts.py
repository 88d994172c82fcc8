"""Where each format keeps the integers a decoder trusts, found by walking the file's
own structure: PNG chunks, JPEG segments, GIF blocks, the BMP headers, TIFF IFDs and
RIFF chunks. A mutation aims at these fields; truncations and splices aim at the
boundaries between structures."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

from tests.fuzz.seeds import Seed

Role = Literal["length", "dimension", "palette", "format"]
"""What a field says: a byte count, a width, height or offset, the size of a colour
table (for JPEG, of a Huffman table), or how samples are laid out (bit depth,
colour type, compression)."""


@dataclasses.dataclass(frozen=True)
class Field:
    """An integer a decoder reads: `size` bytes at `offset`, in `order`."""

    name: str
    role: Role
    offset: int
    size: int
    order: Literal["big", "little"]

    def read(self, data: bytes | bytearray) -> int:
        return int.from_bytes(data[self.offset : self.offset + self.size], self.order)

    def write(self, data: bytearray, value: int) -> None:
        value %= 1 << (8 * self.size)
        data[self.offset : self.offset + self.size] = value.to_bytes(self.size, self.order)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a file's fields are, and where its structures (chunks, segments,
    blocks, IFD entries) start: the places a truncation or a splice is most telling."""

    fields: tuple[Field, ...]
    boundaries: tuple[int, ...]


def layout(seed: Seed) -> Layout:
    """The fields and boundaries of a (valid) seed file."""
    return _layout(seed.format, seed.data)


@functools.cache
def _layout(fmt: str, data: bytes) -> Layout:
    fields: list[Field] = []
    bounds: list[int] = [0, len(data)]
    _PARSERS[fmt](data, fields, bounds)
    return Layout(tuple(fields), tuple(sorted(set(bounds))))


def _png(data: bytes, fields: list[Field], bounds: list[int]) -> None:
    pos = 8
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        name = kind.decode("latin-1")
        bounds.append(pos)
        role: Role = "palette" if kind in (b"PLTE", b"tRNS") else "length"
        fields.append(Field(f"{name} length", role, pos, 4, "big"))
        body = pos + 8
        if kind == b"IHDR":
            fields += [
                Field("IHDR width", "dimension", body, 4, "big"),
                Field("IHDR height", "dimension", body + 4, 4, "big"),
                Field("IHDR bit depth", "format", body + 8, 1, "big"),
                Field("IHDR colour type", "format", body + 9, 1, "big"),
                Field("IHDR interlace", "format", body + 12, 1, "big"),
            ]
        elif kind == b"acTL":
            fields.append(Field("acTL frames", "length", body, 4, "big"))
        elif kind == b"fcTL":  # an APNG frame: its size, place and how it is drawn
            fields += [
                Field("fcTL width", "dimension", body + 4, 4, "big"),
                Field("fcTL height", "dimension", body + 8, 4, "big"),
                Field("fcTL x", "dimension", body + 12, 4, "big"),
                Field("fcTL y", "dimension", body + 16, 4, "big"),
                Field("fcTL dispose", "format", body + 24, 1, "big"),
                Field("fcTL blend", "format", body + 25, 1, "big"),
            ]
        pos = body + length + 4
    bounds.append(pos)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(data: bytes, fields: list[Field], bounds: list[int]) -> None:
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        bounds.append(pos)
        name, body = f"FF{marker:02X}", pos + 4
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        fields.append(Field(f"{name} length", "length", pos + 2, 2, "big"))
        if marker in _SOF:
            fields += [
                Field("SOF precision", "format", body, 1, "big"),
                Field("SOF height", "dimension", body + 1, 2, "big"),
                Field("SOF width", "dimension", body + 3, 2, "big"),
                Field("SOF components", "format", body + 5, 1, "big"),
            ]
            for c in range(data[body + 5]):
                fields.append(Field(f"SOF sampling {c}", "format", body + 7 + 3 * c, 1, "big"))
                fields.append(Field(f"SOF table {c}", "format", body + 8 + 3 * c, 1, "big"))
        elif marker == 0xC4:  # Huffman tables: the 16 code counts size each table
            q = body
            while q + 17 <= end:
                fields.append(Field("DHT class/id", "format", q, 1, "big"))
                fields += [Field(f"DHT count {i}", "palette", q + i, 1, "big") for i in (1, 8, 16)]
                q += 17 + sum(data[q + 1 : q + 17])
        elif marker == 0xDB:  # quantisation tables: precision and id
            fields.append(Field("DQT precision/id", "format", body, 1, "big"))
        elif marker == 0xDA:  # start of scan: the entropy-coded data runs to the next marker
            fields.append(Field("SOS components", "format", body, 1, "big"))
            end = _next_jpeg_marker(data, end)
        elif marker == 0xDD:
            fields.append(Field("DRI interval", "length", body, 2, "big"))
        pos = end


def _next_jpeg_marker(data: bytes, pos: int) -> int:
    while pos + 1 < len(data):
        if data[pos] == 0xFF and data[pos + 1] not in (0x00, *range(0xD0, 0xD8)):
            return pos
        pos += 1
    return len(data)


def _gif(data: bytes, fields: list[Field], bounds: list[int]) -> None:
    fields += [
        Field("screen width", "dimension", 6, 2, "little"),
        Field("screen height", "dimension", 8, 2, "little"),
        Field("global colour table flags", "palette", 10, 1, "little"),
    ]
    pos = 13 + _gif_table_size(data[10])
    while pos < len(data):
        bounds.append(pos)
        if data[pos] == 0x21:  # extension: label, then sub-blocks
            if data[pos + 1] == 0xF9:
                fields.append(Field("GCE flags", "format", pos + 3, 1, "little"))
                fields.append(Field("GCE transparent index", "palette", pos + 6, 1, "little"))
            pos += 2
        elif data[pos] == 0x2C:  # image descriptor, local colour table, LZW code size
            fields += [
                Field("frame left", "dimension", pos + 1, 2, "little"),
                Field("frame top", "dimension", pos + 3, 2, "little"),
                Field("frame width", "dimension", pos + 5, 2, "little"),
                Field("frame height", "dimension", pos + 7, 2, "little"),
                Field("local colour table flags", "palette", pos + 9, 1, "little"),
            ]
            pos += 10 + _gif_table_size(data[pos + 9])
            fields.append(Field("LZW code size", "format", pos, 1, "little"))
            pos += 1
        else:
            return  # the trailer
        while pos < len(data):  # sub-blocks, each led by its length, ended by 0
            fields.append(Field("sub-block length", "length", pos, 1, "little"))
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break


def _gif_table_size(flags: int) -> int:
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _bmp(data: bytes, fields: list[Field], bounds: list[int]) -> None:
    def le(name: str, role: Role, offset: int, size: int = 4) -> Field:
        return Field(name, role, offset, size, "little")

    header = int.from_bytes(data[14:18], "little")
    pixels = int.from_bytes(data[10:14], "little")
    fields += [
        le("file size", "length", 2),
        le("pixel offset", "length", 10),
        le("header size", "length", 14),
        le("width", "dimension", 18),
        le("height", "dimension", 22),
        le("planes", "format", 26, 2),
        le("bits per pixel", "format", 28, 2),
        le("compression", "format", 30),
        le("image size", "length", 34),
        le("colours used", "palette", 46),
        le("colours important", "palette", 50),
    ]
    bounds += [14, 14 + header, pixels, (pixels + len(data)) // 2]


_TIFF_ROLES: dict[int, tuple[str, Role]] = {
    256: ("ImageWidth", "dimension"),
    257: ("ImageLength", "dimension"),
    258: ("BitsPerSample", "format"),
    259: ("Compression", "format"),
    262: ("Photometric", "format"),
    266: ("FillOrder", "format"),
    273: ("StripOffsets", "length"),
    274: ("Orientation", "format"),
    277: ("SamplesPerPixel", "format"),
    278: ("RowsPerStrip", "length"),
    279: ("StripByteCounts", "length"),
    284: ("PlanarConfiguration", "format"),
    317: ("Predictor", "format"),
    320: ("ColorMap", "palette"),
    338: ("ExtraSamples", "format"),
    339: ("SampleFormat", "format"),
}
_TIFF_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8}


def _tiff(data: bytes, fields: list[Field], bounds: list[int]) -> None:
    order: Literal["big", "little"] = "little" if data[:2] == b"II" else "big"

    def read(offset: int, size: int) -> int:
        return int.from_bytes(data[offset : offset + size], order)

    fields.append(Field("first IFD offset", "length", 4, 4, order))
    ifd, seen = read(4, 4), set()
    while 0 < ifd < len(data) - 2 and ifd not in seen:
        seen.add(ifd)
        bounds.append(ifd)
        count = read(ifd, 2)
        fields.append(Field("IFD entry count", "length", ifd, 2, order))
        for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(data) - 11), 12):
            bounds.append(entry)
            tag, kind, n = read(entry, 2), read(entry + 2, 2), read(entry + 4, 4)
            name, role = _TIFF_ROLES.get(tag, (f"tag {tag}", "length"))
            fields.append(
                Field(f"{name} count", "palette" if tag == 320 else "length", entry + 4, 4, order)
            )
            size = _TIFF_TYPE_SIZE.get(kind, 1)
            values = entry + 8 if size * n <= 4 else read(entry + 8, 4)
            if size * n > 4:
                fields.append(Field(f"{name} offset", "length", entry + 8, 4, order))
            if tag in _TIFF_ROLES and kind in (3, 4):
                for i in range(min(n, 4)):
                    fields.append(Field(f"{name}[{i}]", role, values + i * size, size, order))
                    if tag in (273, 279) and values + (i + 1) * size <= len(data):
                        bounds.append(read(values + i * size, size) if tag == 273 else 0)
        next_at = ifd + 2 + 12 * count
        fields.append(Field("next IFD offset", "length", next_at, 4, order))
        ifd = read(next_at, 4)


def _webp(data: bytes, fields: list[Field], bounds: list[int]) -> None:
    fields.append(Field("RIFF size", "length", 4, 4, "little"))
    _riff_chunks(data, 12, len(data), fields, bounds)


def _riff_chunks(data: bytes, pos: int, end: int, fields: list[Field], bounds: list[int]) -> None:
    def le(name: str, role: Role, offset: int, size: int) -> Field:
        return Field(name, role, offset, size, "little")

    while pos + 8 <= end:
        kind, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        name, body = kind.decode("latin-1").strip(), pos + 8
        bounds.append(pos)
        fields.append(le(f"{name} size", "length", pos + 4, 4))
        if kind == b"VP8X":
            fields += [
                le("VP8X flags", "format", body, 1),
                le("VP8X canvas width", "dimension", body + 4, 3),
                le("VP8X canvas height", "dimension", body + 7, 3),
            ]
        elif kind == b"VP8 ":  # frame tag (key frame, version, first partition size), size
            fields += [
                le("VP8 frame tag", "length", body, 3),
                le("VP8 width", "dimension", body + 6, 2),
                le("VP8 height", "dimension", body + 8, 2),
            ]
        elif kind == b"VP8L":  # 14-bit width-1 and height-1, packed with alpha and version
            fields += [le("VP8L signature", "format", body, 1)]
            fields += [le("VP8L width and height", "dimension", body + 1, 4)]
        elif kind == b"ANMF":
            fields += [
                le("ANMF x", "dimension", body, 3),
                le("ANMF y", "dimension", body + 3, 3),
                le("ANMF width", "dimension", body + 6, 3),
                le("ANMF height", "dimension", body + 9, 3),
                le("ANMF flags", "format", body + 15, 1),
            ]
            _riff_chunks(data, body + 16, min(body + size, end), fields, bounds)
        elif kind == b"ALPH":
            fields.append(le("ALPH flags", "format", body, 1))
        pos = body + size + (size & 1)


_PARSERS: dict[str, Callable[[bytes, list[Field], list[int]], None]] = {
    "PNG": _png,
    "JPEG": _jpeg,
    "GIF": _gif,
    "BMP": _bmp,
    "TIFF": _tiff,
    "WEBP": _webp,
}
