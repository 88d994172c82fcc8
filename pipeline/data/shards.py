"""The on-storage dataset format: webdataset tar shards and the manifest.

A dataset is a prefix holding `{split}-{index:06d}.tar` shards, `rejects.jsonl`
and `manifest.json`. The manifest is written last and is the commit point: a
prefix without one holds no dataset, whatever else is there. A dataset grows by
versions (`pipeline.jobs.preprocess.versions`): each appends shards, and the manifest and
rejects of every earlier version stay readable under `manifests/`. Shards follow
webdataset conventions (members `{key}.png`, `{key}.json`, `{key}.cls`, keys
without dots) and are byte-for-byte reproducible: members carry no times,
owners or permissions of the machine that wrote them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import struct
import tarfile
from collections.abc import Iterable
from typing import Any

from pipeline.config import ConfigError
from pipeline.edges import storage

MANIFEST = "manifest.json"
RECORDS = "_records"
"""Folder of per-shard records: what a finished shard holds, so a re-run can skip it."""
REJECTS = "rejects.jsonl"
MANIFESTS = "manifests"
"""Folder of the manifests (and rejects) of a dataset's earlier versions."""
FORMAT = "diffusion-pipeline.dataset"
FORMAT_VERSION = 2
"""Bumped whenever the same input and config can give other shard bytes.
1: the first format.
2: the decoder's fixes from fuzzing change some samples' bytes: colour-keyed
   inputs (a PNG tRNS chunk) are composited onto the background, and no PNG
   carries its source's ICC profile or colour key any more (version 1 wrote them
   beside pixels already converted). The members, the tar layout and the
   manifest are as in version 1, and no reader looks at the number: readers read
   both alike. The manifest names the version of its newest shards; each shard's
   record (`software.format_version`) its own."""
SPLITS = ("train", "validation")


_SHARD_NAME = re.compile(r"^(train|validation)-\d{6}\.tar$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def is_shard_name(name: str) -> bool:
    return bool(_SHARD_NAME.match(name))


def shard_index(name: str) -> int:
    """The index in a shard's name: 3 for `train-000003.tar`."""
    assert is_shard_name(name), name
    return int(name.rpartition("-")[2].removesuffix(".tar"))


def dumps(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, so equal data gives equal bytes."""
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tar(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar archive of (name, bytes) members, in the order given, reproducibly:
    the bytes `tarfile` writes in PAX format for members with no time, owner or
    group and mode 0644 (tests/test_build.py holds the two equal)."""
    parts: list[bytes] = []
    for name, data in members:
        parts += (_member_header(name, len(data)), data, bytes(-len(data) % tarfile.BLOCKSIZE))
    end = sum(len(part) for part in parts) + 2 * tarfile.BLOCKSIZE
    # Two zero blocks end the archive; tarfile pads it to a whole record.
    parts.append(bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
    return b"".join(parts)


_USTAR_FIELDS = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
"""The 512 bytes of a ustar header: name, mode, uid, gid, size, mtime, checksum,
type, link name, magic, owner and group names, device numbers, name prefix."""


def _member_header(name: str, size: int) -> bytes:
    """The header `tarfile` writes for a regular file `name` of `size` bytes with
    mtime 0, mode 0644 and no owner. A short ASCII name gets the plain ustar block,
    built here at a tenth of tarfile's cost (a third of a shard's non-image work);
    any other name gets tarfile's own, with a PAX record holding the name."""
    if not name.isascii() or len(name) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    fields = [name.encode(), b"0000644", b"0000000", b"0000000", b"%011o" % size, b"0" * 11]
    fields += [b" " * 8, tarfile.REGTYPE, b"", tarfile.POSIX_MAGIC, b"", b"", b"", b"", b""]
    block = _USTAR_FIELDS.pack(*fields)
    # The checksum is the sum of the header's bytes with its own field as spaces.
    return block[:148] + b"%06o\0" % sum(block) + block[155:]


@dataclasses.dataclass(frozen=True)
class TarMember:
    name: str
    offset: int
    """Byte offset of the member's data within the tar."""
    size: int


def tar_members(data: bytes) -> list[TarMember]:
    """The regular files in a tar, with where their bytes are, as `tarfile` reads
    them. Raises tarfile.TarError. A tar of plain ustar headers (what `write_tar`
    writes for short ASCII names) is indexed here, at a fifth of tarfile's cost
    (a tenth of encoding a shard's images with a small autoencoder); anything else,
    and anything out of the ordinary in one, is left to tarfile."""
    plain = _plain_members(data)
    if plain is not None:
        return plain
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [TarMember(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


def _plain_members(data: bytes) -> list[TarMember] | None:
    """`tar_members` of a tar whose headers are all plain POSIX ustar headers of
    regular files (no PAX or GNU records, no name prefix, no base-256 numbers),
    each whole, its checksum right and its data inside `data`, ended by a zero
    block; None for any other tar, so that tarfile reads it (and says what is
    wrong with it)."""
    members: list[TarMember] = []
    offset, block = 0, tarfile.BLOCKSIZE
    while True:
        header = data[offset : offset + block]
        if len(header) < block:
            return None  # truncated, or no end-of-archive block: tarfile's case
        if header == _ZERO_BLOCK:
            return members if offset else None  # an empty archive: tarfile's case
        fields = _USTAR_FIELDS.unpack(header)
        name, kind, magic, prefix = fields[0], fields[7], fields[9], fields[14]
        if kind not in (tarfile.REGTYPE, tarfile.AREGTYPE) or magic != tarfile.POSIX_MAGIC:
            return None
        # mode, uid, gid, size, mtime, checksum, devmajor, devminor: tarfile
        # refuses a header where any of them is not a number.
        numbers = [_octal(fields[i]) for i in (1, 2, 3, 4, 5, 6, 12, 13)]
        size, checksum = numbers[3], numbers[5]
        if None in numbers or prefix[:1] != b"\0":
            return None
        try:
            text = name.split(b"\0", 1)[0].decode("utf-8")
        except UnicodeDecodeError:
            return None
        if checksum != sum(header[:148]) + 256 + sum(header[156:]) or text.endswith("/"):
            return None
        assert size is not None
        start = offset + block
        if start + size > len(data):
            return None
        members.append(TarMember(text, start, size))
        offset = start + size + (-size % block)


def _octal(field: bytes) -> int | None:
    """A ustar number field as tarfile reads it (up to the first NUL, blanks
    stripped, empty is 0); None for anything else, base-256 numbers included."""
    text = field.split(b"\0", 1)[0].strip(b" \t\n\r\x0b\x0c")
    if text.translate(None, b"01234567"):
        return None  # not only octal digits
    return int(text, 8) if text else 0


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's (key, extension): the extension starts at the first dot of the
    file name; the key keeps any folders."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def load_manifest(prefix: str) -> dict[str, Any] | None:
    """The committed manifest under `prefix`, or None when there is none."""
    try:
        return json.loads(storage.read_bytes(storage.join(prefix, MANIFEST)))
    except storage.NotFound:
        return None


def load_dataset(prefix: str, field: str) -> tuple[dict, str]:
    """The committed manifest of the dataset at `prefix` and its digest (sha256 of
    its bytes); a config error naming `field` (say `train.dataset`) if there is none."""
    uri = storage.join(prefix, MANIFEST)
    try:
        data = storage.read_bytes(uri)
    except storage.NotFound:
        raise ConfigError(
            f"{field}: no committed dataset at {prefix} "
            f"({MANIFEST} is missing: run tasks.preprocess)"
        ) from None
    except storage.StorageError as e:
        raise ConfigError(f"{field}: cannot read {e}") from None
    try:
        manifest = json.loads(data)
    except ValueError:
        raise ConfigError(f"{field}: {uri} is not valid JSON") from None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{field}: {uri} is not a manifest written by tasks.preprocess")
    return manifest, hashlib.sha256(data).hexdigest()


def list_output(prefix: str, field: str) -> list[storage.ObjectInfo]:
    """What a job's output prefix holds now (nothing for a local folder not made
    yet); a config error naming `field` (say `encode.output`) for a missing bucket
    or a listing that fails."""
    try:
        return storage.list_objects(prefix)
    except storage.NotFound as e:
        if storage.is_s3(prefix):
            raise ConfigError(f"{field}: {e}") from None
        return []
    except storage.StorageError as e:
        raise ConfigError(f"{field}: cannot list {e}") from None
