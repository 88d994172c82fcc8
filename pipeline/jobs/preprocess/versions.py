"""Versions of a dataset: what a committed dataset holds, and how the next one commits.

An append (`preprocess(cfg, append=True)`) adds the inputs that arrived since the
last version as new shards. Its base is the committed dataset:
- the inputs it holds: every input planned into one of its shards, written or
  rejected there (the shard records' `sources`), and every input it rejected as
  a whole (`rejects.jsonl`: duplicates, files outside class folders, ...);
- where each split's shards end, so the new ones continue the numbering;
- its manifest's bytes, whose sha256 the next version names as `previous`.
The newest version lists the inputs it holds in one object, `_inputs/<its
manifest's sha256>.json.gz`, written before its manifest (the list of the
version before is deleted once it is committed): an append reads that, one
request, not a record per shard (a request more every night). A version
committed before these lists existed is read shard by shard.
Old shards and their records are never rewritten. Before `manifest.json` (the
commit point) is replaced, the base's manifest and rejects are kept as
`manifests/{version:06d}.json` and `manifests/{version:06d}.rejects.jsonl`, so
every version stays readable, and a re-run after a crash between replacing
`rejects.jsonl` and `manifest.json` still finds the base's own rejects.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gzip
import json
from typing import Any

from pipeline.data import shards
from pipeline.edges import storage
from pipeline.jobs.preprocess import build

INPUTS = "_inputs"
"""Folder of each version's list of the inputs it holds (`write_inputs`)."""


@dataclasses.dataclass(frozen=True)
class Base:
    """The committed dataset an append builds on."""

    manifest: dict
    manifest_bytes: bytes
    rejects: list[dict]
    """Its rejects, as `rejects.jsonl` lists them."""
    rejects_bytes: bytes
    rejects_in_place: bool
    """Whether `rejects.jsonl` holds them (not so after an interrupted append)."""
    inputs: frozenset[str]
    """URIs (`InputItem.source`) of every input it holds, written or rejected."""

    @property
    def version(self) -> int:
        return self.manifest.get("version", 1)  # datasets from before versions are 1

    @property
    def digest(self) -> str:
        return shards.sha256(self.manifest_bytes)

    def next_index(self) -> dict[str, int]:
        """Per split, the index after its last shard."""
        last = {s: -1 for s in shards.SPLITS}
        for entry in self.manifest["shards"]:
            last[entry["split"]] = max(last[entry["split"]], shards.shard_index(entry["name"]))
        return {s: i + 1 for s, i in last.items()}


EMPTY = Base({"version": 0, "shards": [], "counts": {"inputs": 0}}, b"", [], b"", True, frozenset())
"""The base of a first build: version 0, holding nothing."""


def read_base(output: str, manifest_bytes: bytes) -> Base:
    """The dataset committed under `output` by `manifest_bytes` (its manifest.json)."""
    manifest = json.loads(manifest_bytes)
    rejects_bytes, in_place = _committed_rejects(output, manifest)
    rejects = [json.loads(line) for line in rejects_bytes.decode().splitlines()]
    inputs = _read_inputs(output, manifest_bytes)
    if inputs is None:  # a version committed before versions kept their inputs
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            per_shard = pool.map(lambda e: _shard_sources(output, e), manifest["shards"])
            inputs = {uri for uris in per_shard for uri in uris}
        inputs |= {r["uri"] for r in rejects}
    return Base(manifest, manifest_bytes, rejects, rejects_bytes, in_place, frozenset(inputs))


def inputs_uri(output: str, manifest_bytes: bytes) -> str:
    """Where the version committed by `manifest_bytes` lists the inputs it holds."""
    return storage.join(output, INPUTS, f"{shards.sha256(manifest_bytes)[:32]}.json.gz")


def write_inputs(
    output: str, manifest_bytes: bytes, base: Base, records: list[dict], rejects: list[dict]
) -> None:
    """List the inputs the next version holds (the base's, those planned into the
    new `records`' shards, and the new `rejects` as a whole), before its manifest
    is committed: the next append reads this one object, not a record per shard."""
    inputs = set(base.inputs) | {r["uri"] for r in rejects}
    for record in records:
        inputs.update(record["sources"])
    body = {"manifest_sha256": shards.sha256(manifest_bytes), "inputs": sorted(inputs)}
    data = gzip.compress(json.dumps(body).encode(), compresslevel=6, mtime=0)
    storage.write_bytes(inputs_uri(output, manifest_bytes), data)


def drop_old_inputs(output: str, manifest_bytes: bytes) -> None:
    """Delete the inputs lists of earlier versions, once `manifest_bytes` is
    committed: an append reads only the newest version's, so they would add
    up to a list per night of every input so far."""
    keep = inputs_uri(output, manifest_bytes)
    try:
        listed = storage.list_objects(storage.join(output, INPUTS))
    except storage.NotFound:  # a dataset from before the lists
        return
    for obj in listed:
        if obj.uri != keep:
            storage.delete(obj.uri)


def _read_inputs(output: str, manifest_bytes: bytes) -> set[str] | None:
    """The inputs `write_inputs` listed for this very version; None if it did not."""
    try:
        body = json.loads(gzip.decompress(storage.read_bytes(inputs_uri(output, manifest_bytes))))
    except storage.NotFound:
        return None
    if body.get("manifest_sha256") != shards.sha256(manifest_bytes):
        raise RuntimeError(
            f"{inputs_uri(output, manifest_bytes)}: lists the inputs of another version; "
            "the dataset was changed by something else"
        )
    return set(body["inputs"])


def keep(output: str, base: Base) -> None:
    """Keep the base's manifest and rejects under `manifests/`, before the next
    version replaces `rejects.jsonl` and `manifest.json`."""
    if not base.version:
        return
    stem = storage.join(output, shards.MANIFESTS, f"{base.version:06d}")
    storage.write_bytes(f"{stem}.json", base.manifest_bytes)
    storage.write_bytes(f"{stem}.rejects.jsonl", base.rejects_bytes)


def restore_rejects(output: str, base: Base) -> None:
    """Put the base's rejects back in `rejects.jsonl` if an interrupted append
    replaced them (and then found nothing left to add)."""
    if not base.rejects_in_place:
        storage.write_bytes(storage.join(output, shards.REJECTS), base.rejects_bytes)


def next_manifest(
    base: Base,
    config: dict,
    input_: dict,
    classes: list[str],
    rejects: list[dict],
    records: list[dict],
    added: int,
) -> tuple[dict[str, Any], bytes]:
    """The manifest of the base's next version, and its `rejects.jsonl`: the base's
    shards unchanged, then those of the new `records`; the base's rejects with the
    new ones (`rejects`: those rejected as a whole; the records' own); counts over
    all. `added`: how many new inputs, to check that each one is accounted for."""
    rejects = base.rejects + rejects + [r for record in records for r in record["rejects"]]
    rejects.sort(key=lambda r: r["uri"])
    rejects_bytes = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rejects)
    entries = base.manifest["shards"] + [
        {k: r[k] for k in ("name", "split", "samples", "bytes", "sha256")} for r in records
    ]
    written = sum(e["samples"] for e in entries)
    by_split: collections.Counter[str] = collections.Counter()
    for e in entries:
        by_split[e["split"]] += e["samples"]
    # What built the newest shards; each shard's record names its own.
    newest = records[0]["software"] if records else base.manifest.get("software")
    manifest = {
        "format": shards.FORMAT,
        "format_version": shards.FORMAT_VERSION,
        "config": config,
        "input": input_,
        "software": newest or build.software(),
        "resolution": config["resolution"],
        "classes": classes,
        "counts": {
            "inputs": written + len(rejects),
            "written": written,
            "written_by_split": {s: by_split[s] for s in shards.SPLITS},
            "rejected": len(rejects),
            "rejected_by_reason": dict(
                sorted(collections.Counter(r["reason"] for r in rejects).items())
            ),
        },
        "shards": entries,
        "rejects": {
            "name": shards.REJECTS,
            "sha256": shards.sha256(rejects_bytes),
            "count": len(rejects),
        },
        **_successor(base),
    }
    if manifest["counts"]["inputs"] != base.manifest["counts"]["inputs"] + added:
        raise AssertionError("an input was neither written nor rejected")
    return manifest, rejects_bytes


def _successor(base: Base) -> dict:
    """The next version's number, and the base it names as `previous` (none for a
    first build)."""
    if not base.version:
        return {"version": 1}
    return {
        "version": base.version + 1,
        "previous": {"version": base.version, "sha256": base.digest},
    }


def _committed_rejects(output: str, manifest: dict) -> tuple[bytes, bool]:
    """The bytes of the rejects `manifest` committed, and whether `rejects.jsonl`
    still holds them; else they are the copy `keep` made before the crash."""
    want = manifest["rejects"]["sha256"]
    in_place = storage.join(output, shards.REJECTS)
    kept = storage.join(output, shards.MANIFESTS, f"{manifest.get('version', 1):06d}.rejects.jsonl")
    for uri in (in_place, kept):
        try:
            data = storage.read_bytes(uri)
        except storage.NotFound:
            continue
        if shards.sha256(data) == want:
            return data, uri == in_place
    raise RuntimeError(
        f"{in_place}: does not hold the rejects its manifest commits (sha256 {want}), "
        f"nor does {kept}; the dataset was changed by something else"
    )


def _shard_sources(output: str, entry: dict) -> list[str]:
    """The inputs planned into one committed shard: from its record, or (a shard
    written before records listed them) from the `source` of each sample's `.json`
    in the shard, and the record's rejects."""
    try:
        record = json.loads(
            storage.read_bytes(storage.join(output, shards.RECORDS, f"{entry['name']}.json"))
        )
    except storage.NotFound:
        record = None
    if record is not None and record.get("sha256") != entry["sha256"]:
        raise RuntimeError(
            f"{storage.join(output, shards.RECORDS, entry['name'])}.json: describes another "
            f"shard than the committed {entry['name']}; the dataset was changed by something else"
        )
    if record is not None and "sources" in record:
        return record["sources"]
    data = storage.read_bytes(storage.join(output, entry["name"]))
    if shards.sha256(data) != entry["sha256"]:
        raise RuntimeError(f"{storage.join(output, entry['name'])}: not the committed shard")
    found = [r["uri"] for r in record["rejects"]] if record is not None else []
    for m in shards.tar_members(data):
        if shards.split_member_name(m.name)[1] == "json":
            found.append(json.loads(data[m.offset : m.offset + m.size])["source"])
    return found
