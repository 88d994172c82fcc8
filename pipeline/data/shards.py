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
FORMAT_VERSION = 1
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
    """A tar archive of (name, bytes) members, in the order given, reproducibly."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class TarMember:
    name: str
    offset: int
    """Byte offset of the member's data within the tar."""
    size: int


def tar_members(data: bytes) -> list[TarMember]:
    """The regular files in a tar, with where their bytes are. Raises tarfile.TarError."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [TarMember(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


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
