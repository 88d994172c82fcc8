"""What the inputs of a dataset are, what they are called, and where they go.

An input is one image file, or one sample of a webdataset tar. Its identity is
its path relative to the input prefix (`relpath`, Unicode-normalized to NFC so
that a name spelled by macOS and by Linux is one name); everything else derives
from a SHA-256 of that path, so it never depends on which other inputs exist:
- its key: a readable slug of the path plus 16 hex digits of the hash, with no
  dots (webdataset splits keys from extensions at the first dot);
- its split: `validation` when the hash, read as a fraction, is below
  `validation_fraction`;
- its place in the shard order of its split.
A sample of one of our own datasets keeps the identity it had there.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import tarfile
import unicodedata
from collections.abc import Iterable
from typing import Any

from pipeline.data import shards
from pipeline.edges import storage

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm")
"""Extensions of image files and tar members, in order of preference."""


def looks_like_image(relpath: str) -> bool:
    return relpath.rpartition(".")[2].lower() in IMAGE_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class InputItem:
    """One input: where its bytes are, and what it is called."""

    uri: str
    """The object holding the bytes (an image file, or a tar)."""
    relpath: str
    """Path below the input prefix; the input's identity."""
    label: int | None = None
    """Class index, or None for unlabelled data."""
    offset: int = 0
    """Start of the bytes within `uri` (non-zero for a tar member)."""
    size: int | None = None
    """Length of the bytes within `uri`, or None for the whole object."""
    member: str | None = None
    """For a tar sample: its webdataset key within the tar."""

    @functools.cached_property
    def digest(self) -> str:
        # surrogateescape: a file name that is not UTF-8 still has stable bytes.
        name = unicodedata.normalize("NFC", self.relpath)
        return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()

    @property
    def key(self) -> str:
        name = unicodedata.normalize("NFC", self.relpath)
        slug = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[-80:]
        return f"{slug}-{self.digest[:16]}"

    def split(self, validation_fraction: float) -> str:
        return "validation" if int(self.digest[:16], 16) / 16**16 < validation_fraction else "train"

    @property
    def source(self) -> str:
        """The input's URI as recorded in metadata and rejects: `tar_uri#key` for a
        tar sample."""
        return self.uri if self.member is None else f"{self.uri}#{self.member}"

    def read(self) -> bytes:
        return storage.read_bytes(self.uri, self.offset, self.size)


def reject(uri: str, reason: str, detail: str = "") -> dict[str, str]:
    """One line of `rejects.jsonl`."""
    return {"uri": uri, "reason": reason, "detail": detail}


def file_inputs(
    objects: list[storage.ObjectInfo], labels: str, classes: list[str] | None = None
) -> tuple[list[InputItem], list[dict], list[str]]:
    """Image files as inputs: (items, rejects, class names).

    With class folders (`labels` is `folders`, or `auto` and every file with an
    image extension sits in a folder), the first folder of each path names its
    class; classes are numbered in sorted order. Given `classes` (an append to a
    dataset, whose label space is fixed), a file in any other folder is rejected
    as `unknown_class` rather than given a new index.
    """
    images = [o for o in objects if looks_like_image(o.relpath)]
    use_folders = labels == "folders" or (
        labels == "auto" and images and all("/" in o.relpath for o in images)
    )
    if not use_folders:
        return [InputItem(o.uri, o.relpath) for o in objects], [], []
    if classes is None:
        classes = sorted({o.relpath.split("/")[0] for o in objects if "/" in o.relpath})
    index = {name: i for i, name in enumerate(classes)}
    items, rejects = [], []
    for o in objects:
        folder = o.relpath.split("/")[0] if "/" in o.relpath else None
        if folder is None:
            rejects.append(
                reject(o.uri, "no_class_folder", "labels=folders needs class sub-folders")
            )
        elif folder not in index:
            detail = f"class folder {folder!r} is not one of the dataset's {len(classes)} classes"
            rejects.append(reject(o.uri, "unknown_class", detail))
        else:
            items.append(InputItem(o.uri, o.relpath, label=index[folder]))
    return items, rejects, list(classes)


def tar_inputs(
    tar: storage.ObjectInfo, labels: str, ours: bool = False
) -> tuple[list[InputItem], list[dict]]:
    """The samples of one webdataset tar as inputs, each pointing at its image's bytes.

    With `ours` (the tar is a shard of one of our datasets), a sample keeps the
    identity (`relpath`) its `.json` records, and so its key and split.
    """
    data = storage.read_bytes(tar.uri)
    try:
        members = shards.tar_members(data)
    except tarfile.TarError as e:
        return [], [reject(tar.uri, "bad_tar", str(e))]
    samples: dict[str, dict[str, shards.TarMember]] = {}
    doubled = set()
    for m in members:
        key, ext = shards.split_member_name(m.name)
        if ext in samples.setdefault(key, {}):
            doubled.add(key)
        samples[key][ext] = m

    def text(member: shards.TarMember) -> bytes:
        return data[member.offset : member.offset + member.size]

    items, rejects = [], []
    for key, parts in samples.items():
        uri = f"{tar.uri}#{key}"
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if key in doubled:
            rejects.append(reject(uri, "duplicate_member", "a member name occurs twice"))
            continue
        if image is None:
            rejects.append(reject(uri, "no_image_member", f"members: {', '.join(sorted(parts))}"))
            continue
        label = None
        if "cls" in parts and labels != "none":
            try:
                label = int(text(parts["cls"]).decode().strip())
                if label < 0:
                    raise ValueError(label)
            except ValueError:
                rejects.append(reject(uri, "bad_label", f".cls holds {text(parts['cls'])[:20]!r}"))
                continue
        relpath = f"{tar.relpath}/{key}"
        if ours and "json" in parts:
            try:
                relpath = json.loads(text(parts["json"]))["relpath"]
            except (ValueError, KeyError, TypeError):
                pass  # written by an older version: the tar path is its identity
        items.append(InputItem(tar.uri, relpath, label, image.offset, image.size, key))
    return items, rejects


def tar_classes(items: Iterable[InputItem]) -> list[str]:
    """Class names for `.cls` labels: the indices themselves, 0..max."""
    top = max((i.label for i in items if i.label is not None), default=None)
    return [] if top is None else [str(i) for i in range(top + 1)]


def known_labels(items: list[InputItem], classes: list[str]) -> tuple[list[InputItem], list[dict]]:
    """Split `.cls`-labelled inputs into those within a fixed class list and rejects
    (`unknown_class`) for the others; unlabelled inputs pass, as in a build."""
    kept, rejects = [], []
    for item in items:
        if item.label is not None and item.label >= len(classes):
            detail = f"label {item.label} is outside the dataset's {len(classes)} classes"
            rejects.append(reject(item.source, "unknown_class", detail))
        else:
            kept.append(item)
    return kept, rejects


def unique_keys(
    items: list[InputItem], taken: Iterable[InputItem] = ()
) -> tuple[list[InputItem], list[dict]]:
    """Keep one input per key (the first by path); reject the others. Distinct paths
    share a key only when they differ in Unicode normalization alone, or when 64
    bits of SHA-256 collide. The keys of `taken` (inputs already in the dataset)
    are never given to an input of `items`."""

    def order(i: InputItem) -> tuple[str, str]:
        return i.relpath, i.source

    owner: dict[str, InputItem] = {}
    for item in sorted(taken, key=order):
        owner.setdefault(item.key, item)
    kept, rejects = [], []
    for item in sorted(items, key=order):
        first = owner.setdefault(item.key, item)
        if first is item:
            kept.append(item)
        else:
            rejects.append(reject(item.source, "duplicate_key", f"same key as {first.source}"))
    return kept, rejects


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Which inputs go into one shard."""

    split: str
    index: int
    items: tuple[InputItem, ...]

    @property
    def name(self) -> str:
        return shards.shard_name(self.split, self.index)

    def digest(self, config: dict[str, Any]) -> str:
        """Hash of everything the shard's bytes depend on."""
        payload = {"config": config, "items": [dataclasses.asdict(i) for i in self.items]}
        return shards.sha256(shards.dumps(payload))


def plan_shards(
    items: list[InputItem],
    validation_fraction: float,
    per_shard: int,
    first_index: dict[str, int] | None = None,
) -> list[ShardPlan]:
    """Inputs of each split in hash order, cut into shards of `per_shard`, numbered
    from `first_index[split]` (0 by default; an append continues after the last
    shard of each split)."""
    plans = []
    for split in shards.SPLITS:
        members = sorted(
            (i for i in items if i.split(validation_fraction) == split), key=lambda i: i.digest
        )
        first = (first_index or {}).get(split, 0)
        for n, start in enumerate(range(0, len(members), per_shard)):
            plans.append(ShardPlan(split, first + n, tuple(members[start : start + per_shard])))
    return plans
