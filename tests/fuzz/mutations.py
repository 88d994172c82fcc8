"""Mutations aimed at a seed's fields and structure, and the cases of a fuzzing run.

A mutation takes its choices from a `Draw`: `RandomDraw`, seeded per case, so case
*i* of a run is the same file on every machine, or `HypothesisDraw`, which lets
Hypothesis choose, push values to their boundaries and shrink a failure to a small
reproducer.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from hypothesis import strategies as st

from pipeline.config import PreprocessConfig
from tests.fuzz.layouts import Field, Role, layout
from tests.fuzz.seeds import FORMATS, Seed, seeds

T = TypeVar("T")


class Draw(Protocol):
    """Where a mutation's choices come from."""

    def integer(self, low: int, high: int) -> int: ...
    def choice(self, options: Sequence[T]) -> T: ...
    def binary(self, max_size: int) -> bytes: ...


class RandomDraw:
    def __init__(self, seed: str):
        self._rng = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        return self._rng.randint(low, high)

    def choice(self, options: Sequence[T]) -> T:
        return options[self._rng.randrange(len(options))]

    def binary(self, max_size: int) -> bytes:
        return self._rng.randbytes(self._rng.randint(0, max_size))


class HypothesisDraw:
    def __init__(self, data: st.DataObject):
        self._data = data

    def integer(self, low: int, high: int) -> int:
        return self._data.draw(st.integers(low, high))

    def choice(self, options: Sequence[T]) -> T:
        return self._data.draw(st.sampled_from(options))

    def binary(self, max_size: int) -> bytes:
        return self._data.draw(st.binary(max_size=max_size))


MAX_PIXELS: int = PreprocessConfig.max_pixels
"""PreprocessConfig's default `max_pixels`, which the fuzzed build runs with."""

KINDS = ("length", "dimension", "palette", "format", "truncate", "bitflip", "splice", "stack")
"""The mutation kinds: the first four set one field of their role to a value
decoders find hard (0, 1, a power of two, all ones, one off the original, ...)."""

# Sizes that pass the pixel limit but make a decoder allocate (or loop over) a lot:
# where a time or memory limit would break, if anything does.
_LARGE_SIZES = ((8192, 8192), (65535, 1024), (1024, 65535), (16384, 4096), (1, MAX_PIXELS))

Mutation = Callable[[bytearray, Seed, Draw], bytearray]


def _interesting(field: Field, original: int, draw: Draw) -> int:
    """A value for `field` near a boundary: of its width, of its old value, of
    what decoders allocate for."""
    top = (1 << (8 * field.size)) - 1
    if field.role == "format" and draw.integer(0, 1):
        # Bit depths, colour types, sample counts, compressions: small enumerations,
        # where the neighbours of a valid value are other valid-looking ones.
        return draw.choice([*range(9), 12, 16, 24, 32, 64, original ^ 1, original ^ 0x80]) & top
    values = [0, 1, 2, 3, 7, 8, 15, 16, 255, 256, 4096, 8192, 8193, 65535, 65536]
    values += [original - 1, original + 1, original * 2, original // 2, original + 256]
    values += [top, top - 1, top >> 1, (top >> 1) + 1, draw.integer(0, top)]
    return draw.choice(values) & top


def _set_field(data: bytearray, seed: Seed, draw: Draw, role: Role) -> bytearray:
    fields = [f for f in layout(seed).fields if f.role == role and f.offset + f.size <= len(data)]
    if not fields:  # cut off by an earlier truncation in a stack
        return data
    field = draw.choice(fields)
    if role == "dimension" and draw.integer(0, 3) == 0:
        partner = _partner(field, fields)
        if partner is not None:  # a large but allowed size: both sides at once
            width, height = draw.choice(_LARGE_SIZES)
            field.write(data, width)
            partner.write(data, height)
            return data
    field.write(data, _interesting(field, field.read(data), draw))
    return data


def _partner(field: Field, fields: Sequence[Field]) -> Field | None:
    """The height of a width field (or the width of a height) in the same structure."""
    swap = {"width": "height", "height": "width"}
    word = next((w for w in swap if w in field.name), None)
    if word is None:
        return None
    want = field.name.replace(word, swap[word])
    near = [f for f in fields if f.name == want]
    return min(near, key=lambda f: abs(f.offset - field.offset), default=None)


def _length(data: bytearray, seed: Seed, draw: Draw) -> bytearray:
    return _set_field(data, seed, draw, "length")


def _dimension(data: bytearray, seed: Seed, draw: Draw) -> bytearray:
    return _set_field(data, seed, draw, "dimension")


def _format(data: bytearray, seed: Seed, draw: Draw) -> bytearray:
    return _set_field(data, seed, draw, "format")


def _palette(data: bytearray, seed: Seed, draw: Draw) -> bytearray:
    """PNG: rewrite PLTE or tRNS with another number of entries (CRC kept valid);
    elsewhere: set a colour-table flag or count."""
    chunks = []
    if seed.format == "PNG":
        chunks = [c for c in (_png_chunk(data, k) for k in (b"PLTE", b"tRNS")) if c is not None]
    if chunks and draw.integer(0, 1):
        start, end = draw.choice(chunks)
        kind, body = bytes(data[start + 4 : start + 8]), bytes(data[start + 8 : end - 4])
        size = draw.choice([0, 1, 2, 3, 4, 255, 256, 257, 767, 768, 769, 771, 1024, len(body) + 3])
        body = (body + draw.binary(2048) + bytes(size))[:size]
        data[start:end] = _png_chunk_bytes(kind, body)
        return data
    return _set_field(data, seed, draw, "palette")


def _truncate(data: bytearray, seed: Seed, draw: Draw) -> bytearray:
    if draw.integer(0, 1):
        cut = draw.choice(layout(seed).boundaries) + draw.integer(-4, 4)
    else:
        cut = draw.integer(0, len(data))
    return data[: max(0, cut)]


def _bitflip(data: bytearray, seed: Seed, draw: Draw) -> bytearray:
    if not data:
        return data
    # Headers hold what decoders trust most: half the flips land in the first 64 bytes.
    span = draw.choice([min(64, len(data)), len(data)])
    for _ in range(draw.integer(1, 16)):
        bit = draw.integer(0, 8 * span - 1)
        data[bit // 8] ^= 1 << (bit % 8)
    return data


def _splice(data: bytearray, seed: Seed, draw: Draw) -> bytearray:
    """Insert or overwrite with a span of another seed (often of the same format),
    or repeat a span of this file: foreign chunks, duplicated frames, glued files."""
    same = [s for s in seeds() if s.format == seed.format]
    donor = draw.choice([draw.choice(same), draw.choice(seeds()), seed])
    start = draw.choice([*layout(donor).boundaries, draw.integer(0, len(donor.data))])
    span = donor.data[start : start + draw.integer(1, len(donor.data))]
    at = min(len(data), draw.choice([*layout(seed).boundaries, draw.integer(0, len(data))]))
    if draw.integer(0, 1):
        data[at:at] = span
    else:
        data[at : at + len(span)] = span
    return data


_SIMPLE: dict[str, Mutation] = {
    "length": _length,
    "dimension": _dimension,
    "palette": _palette,
    "format": _format,
    "truncate": _truncate,
    "bitflip": _bitflip,
    "splice": _splice,
}


def applies(kind: str, seed: Seed) -> bool:
    """Whether `kind` has something to aim at in `seed` (a WEBP has no palette field)."""
    if kind in ("length", "dimension", "palette", "format"):
        return any(f.role == kind for f in layout(seed).fields)
    return True


def mutate(seed: Seed, kind: str, draw: Draw) -> bytes:
    """`seed`'s bytes changed by a mutation of `kind`; then, by a drawn choice, the
    format's checks made to pass again (PNG CRCs, the RIFF size), so a mutation
    reaches the code behind them instead of stopping at the first check."""
    data = bytearray(seed.data)
    if kind == "stack":
        # Each step aims by the seed's layout: after an insertion or a cut, later
        # steps land beside their fields, which is fuzzing too.
        for _ in range(draw.integer(2, 4)):
            step = draw.choice([k for k in _SIMPLE if applies(k, seed)])
            data = _SIMPLE[step](data, seed, draw)
    else:
        data = _SIMPLE[kind](data, seed, draw)
    if seed.format in ("PNG", "WEBP") and draw.integer(0, 1):
        data = repair(seed.format, data)
    return bytes(data)


def repair(fmt: str, data: bytearray) -> bytearray:
    """Recompute what a format checksums: every PNG chunk's CRC (following the chunk
    lengths as they now read), or the RIFF size of a WEBP."""
    if fmt == "WEBP" and len(data) >= 8:
        data[4:8] = struct.pack("<I", len(data) - 8)
    elif fmt == "PNG":
        pos = 8
        while pos + 12 <= len(data):
            end = pos + 8 + int.from_bytes(data[pos : pos + 4], "big")
            if end + 4 > len(data):
                break
            data[end : end + 4] = struct.pack(">I", zlib.crc32(data[pos + 4 : end]))
            pos = end + 4
    return data


def _png_chunk(data: bytearray, kind: bytes) -> tuple[int, int] | None:
    """(start, end) of the first chunk of `kind`, CRC included."""
    pos = 8
    while pos + 12 <= len(data):
        end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == kind:
            return pos, end
        pos = end
    return None


def _png_chunk_bytes(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@dataclasses.dataclass(frozen=True)
class Case:
    """One fuzzed input and how it was made."""

    seed: str
    format: str
    kind: str
    data: bytes
    upscale: bool
    """Build with small images upscaled (else rejected): small and zero sizes then
    reach the resize and the PNG encoder too."""


@functools.cache
def cells() -> tuple[tuple[str, str], ...]:
    """Every (format, kind) with a seed to aim at: case i of a run takes cell i mod n,
    so a run of any length spreads evenly over formats and kinds."""
    return tuple(
        (fmt, kind)
        for fmt in FORMATS
        for kind in KINDS
        if any(s.format == fmt and applies(kind, s) for s in seeds())
    )


def make_case(cell: tuple[str, str], draw: Draw) -> Case:
    fmt, kind = cell
    seed = draw.choice([s for s in seeds() if s.format == fmt and applies(kind, s)])
    data = mutate(seed, kind, draw)
    return Case(seed.name, fmt, kind, data, upscale=bool(draw.integer(0, 1)))


def case(index: int, run_seed: int) -> Case:
    """Case `index` of the run seeded `run_seed`: the same bytes on every machine."""
    table = cells()
    return make_case(table[index % len(table)], RandomDraw(f"{run_seed}:{index}"))
