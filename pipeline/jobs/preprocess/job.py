"""Raw images -> webdataset shards, on Ray Data.

The unit of work is a shard. The driver lists the inputs, plans which inputs go
into which shard (see `pipeline.data.sources`), and hands the shards not yet
built to a Ray Data pipeline; each task reads its inputs, decodes, crops,
resizes and encodes them, writes the shard atomically, then writes a small
record of what it did under `_records/`. When every shard has a record, the
driver writes `rejects.jsonl` and, last, `manifest.json`.

So a re-run after a crash rebuilds only the shards without a record (their
bytes are deterministic, so the result is the one an uninterrupted run gives),
and a re-run after success finds the manifest and writes nothing.

With `append=True` (the nightly job), a committed dataset grows instead: the
inputs it does not hold yet (see `pipeline.jobs.preprocess.versions`) go into new shards
numbered after its last ones, read exactly as its own were (same format, same
label space: an input of a class it lacks is rejected as `unknown_class`), and
the next version of the manifest lists its shards unchanged, then the new ones.
The same resume rules hold, and with nothing new an append writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from pipeline.config import ConfigError, PreprocessConfig, to_dict
from pipeline.data import shards, sources
from pipeline.data.sources import InputItem, ShardPlan
from pipeline.edges import cluster, storage
from pipeline.jobs.preprocess import build, versions


@dataclasses.dataclass(frozen=True)
class PreprocessResult:
    manifest_uri: str
    manifest: dict[str, Any]
    already_complete: bool
    """True when the output already held this dataset and nothing was written."""
    reused_shards: int = 0
    """Shards an interrupted earlier run had finished, kept rather than rebuilt."""
    added_inputs: int = 0
    """Inputs this call added to the dataset, written or rejected (all of them for
    a first build; only the new ones for an append)."""
    added_shards: int = 0
    """Shards this call added to the dataset."""

    def summary(self) -> str:
        c = self.manifest["counts"]
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(c["rejected_by_reason"].items()))
        splits = ", ".join(f"{s} {n}" for s, n in c["written_by_split"].items())
        resumed = f" ({self.reused_shards} reused)" if self.reused_shards else ""
        head = "already complete: " if self.already_complete else ""
        if self.manifest.get("previous") and not self.already_complete:
            head = (
                f"appended {self.added_inputs} new inputs in {self.added_shards} shards"
                f"{resumed} to version {self.manifest['version']}: "
            )
            resumed = ""
        n_shards = len(self.manifest["shards"])
        return (
            f"{head}{c['inputs']} inputs -> {c['written']} written ({splits}) in "
            f"{n_shards} shards{resumed}, {c['rejected']} rejected"
            f"{f' ({reasons})' if reasons else ''}; manifest: {self.manifest_uri}"
        )


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """What the driver found under the input prefix."""

    items: list[InputItem]
    rejects: list[dict]
    classes: list[str]
    format: str
    """`files` or `webdataset`, as decided."""
    labels: str
    """Where labels came from: `folders`, `cls` or `none`."""


def preprocess(
    cfg: PreprocessConfig, *, progress: bool = True, append: bool = False
) -> PreprocessResult:
    """Build (or finish building) the dataset `cfg` describes; with `append`, add
    the inputs that arrived since its last version. See the module doc."""
    config = to_dict(cfg)
    manifest_uri = storage.join(cfg.output, shards.MANIFEST)
    committed = _committed_manifest(cfg, config)
    if committed is not None and not append:
        versions.drop_old_inputs(cfg.output, committed)  # a run killed after its commit
        return PreprocessResult(manifest_uri, json.loads(committed), already_complete=True)
    # Without a committed dataset, an append is the first build: it adds to nothing.
    base = versions.EMPTY if committed is None else versions.read_base(cfg.output, committed)

    objects, unreadable = _list_inputs(cfg)
    previous = shards.list_output(cfg.output, "preprocess.output")
    with _ray_data(cfg):
        planned = _plan_inputs(cfg, objects, base)
        planned = dataclasses.replace(planned, rejects=unreadable + planned.rejects)
        found, taken = _new_inputs(planned, base)
        if base.version and not found.items and not found.rejects:
            versions.restore_rejects(cfg.output, base)
            versions.drop_old_inputs(cfg.output, base.manifest_bytes)
            return PreprocessResult(manifest_uri, base.manifest, already_complete=True)
        storage.remove_partial_writes(cfg.output)
        items, duplicates = sources.unique_keys(found.items, taken)
        plans = sources.plan_shards(
            items, cfg.validation_fraction, cfg.samples_per_shard, base.next_index()
        )
        digests = {p.name: p.digest(config) for p in plans}
        records = _finished_records(cfg.output, previous, digests)
        reused = len(records)
        todo = [p for p in plans if p.name not in records]
        done = sum(r["inputs"] for r in records.values())
        for record in _build(cfg, todo, digests, done, len(items), progress):
            records[record["name"]] = record
    # The base's shards are part of what is kept, whatever the plan.
    kept = set(digests) | {e["name"] for e in base.manifest["shards"]}
    _remove_orphans(cfg.output, previous, kept)
    ordered = [records[p.name] for p in plans]
    added = len(found.items) + len(found.rejects)
    manifest, rejects_bytes = versions.next_manifest(
        base,
        config,
        {"format": found.format, "labels": found.labels},
        found.classes,
        found.rejects + duplicates,
        ordered,
        added,
    )
    _check_shards(cfg.output, manifest["shards"], ordered)

    manifest_bytes = shards.dumps(manifest)
    versions.write_inputs(cfg.output, manifest_bytes, base, ordered, found.rejects + duplicates)
    versions.keep(cfg.output, base)  # before anything of the base is replaced
    storage.write_bytes(storage.join(cfg.output, shards.REJECTS), rejects_bytes)
    storage.write_bytes(manifest_uri, manifest_bytes)
    versions.drop_old_inputs(cfg.output, manifest_bytes)
    return PreprocessResult(
        manifest_uri,
        manifest,
        already_complete=False,
        reused_shards=reused,
        added_inputs=added,
        added_shards=len(plans),
    )


# --- the driver's side -----------------------------------------------------------------


def _committed_manifest(cfg: PreprocessConfig, config: dict) -> bytes | None:
    """The bytes of the output's manifest if it holds this very dataset; an error
    if another."""
    try:
        data = storage.read_bytes(storage.join(cfg.output, shards.MANIFEST))
        existing = json.loads(data)
    except storage.NotFound:
        return None
    except (storage.StorageError, ValueError) as e:
        raise ConfigError(f"preprocess.output: cannot read its manifest: {e}") from None
    if existing.get("config") != config:
        changed = sorted(k for k in config if existing.get("config", {}).get(k) != config[k])
        raise ConfigError(
            f"preprocess.output: {cfg.output} already holds a dataset built with another "
            f"config (differs in {', '.join(changed)}); choose a new output"
        )
    return data


def _list_inputs(cfg: PreprocessConfig) -> tuple[list[storage.ObjectInfo], list[dict]]:
    """The objects under the input prefix, and a reject for each other entry there
    (a broken link, a FIFO, a folder it may not list, ...): one bad entry costs
    one input, not the job. Only a prefix that is missing, or may not be listed
    at all, is a config error."""
    try:
        objects, unreadable = storage.list_inputs(cfg.input)
    except storage.StorageError as e:
        raise ConfigError(f"preprocess.input: cannot list {e}") from None
    if not objects and not unreadable:
        raise ConfigError(f"preprocess.input: no files under {cfg.input}")
    return objects, [sources.reject(u.uri, u.reason, u.detail) for u in unreadable]


def _plan_inputs(
    cfg: PreprocessConfig, objects: list[storage.ObjectInfo], base: versions.Base = versions.EMPTY
) -> _Inputs:
    """The inputs under `cfg.input`, the rejected ones, and the classes.

    `auto` reads webdataset when the prefix holds `.tar` files and no image
    files. A prefix holding one of our datasets (a committed manifest) is read
    as webdataset through it: its inputs are the samples of the listed shards.
    Given a `base` dataset to append to, the inputs are read as its own were:
    the same format, labels and classes (the model's label space).
    """
    if base.version:
        return _plan_like(cfg, objects, base.manifest)
    fmt, ours = cfg.input_format, False
    if fmt != "files":
        dataset = _load_input_manifest(cfg.input)
        if dataset is not None:
            names = {s["name"] for s in dataset["shards"]}
            objects, fmt, ours = [o for o in objects if o.relpath in names], "webdataset", True
    if fmt == "auto":
        has_tars = any(o.relpath.endswith(".tar") for o in objects)
        has_images = any(sources.looks_like_image(o.relpath) for o in objects)
        fmt = "webdataset" if has_tars and not has_images else "files"
    if fmt == "files":
        items, rejects, classes = sources.file_inputs(objects, cfg.labels)
        return _Inputs(items, rejects, classes, fmt, "folders" if classes else "none")
    if cfg.labels == "folders":
        raise ConfigError(
            "preprocess.labels: 'folders' needs image files; "
            "webdataset samples carry their labels in .cls members"
        )
    tars = [o for o in objects if o.relpath.endswith(".tar")]
    rejects = [
        sources.reject(o.uri, "not_a_tar", "input_format=webdataset reads .tar files")
        for o in objects
        if not o.relpath.endswith(".tar")
    ]
    items, tar_rejects = _index_tars(tars, cfg.labels, ours) if tars else ([], [])
    classes = sources.tar_classes(items)
    return _Inputs(items, rejects + tar_rejects, classes, fmt, "cls" if classes else "none")


def _plan_like(cfg: PreprocessConfig, objects: list[storage.ObjectInfo], base: dict) -> _Inputs:
    """`_plan_inputs` for an append: decided as the base decided, not afresh (one
    new file outside a class folder must not switch class folders off)."""
    fmt, labels, classes = base["input"]["format"], base["input"]["labels"], base["classes"]
    if fmt == "files":
        items, rejects, _ = sources.file_inputs(objects, labels, classes)
        return _Inputs(items, rejects, classes, fmt, labels)
    found = _plan_inputs(dataclasses.replace(cfg, input_format="webdataset"), objects)
    items, unknown = sources.known_labels(found.items, classes)
    return _Inputs(items, found.rejects + unknown, classes, fmt, labels)


def _new_inputs(found: _Inputs, base: versions.Base) -> tuple[_Inputs, list[InputItem]]:
    """The inputs (and rejects) of `found` that `base` does not hold yet, and the
    ones it holds (whose keys are taken)."""
    if not base.inputs:
        return found, []
    new = [i for i in found.items if i.source not in base.inputs]
    taken = [i for i in found.items if i.source in base.inputs]
    rejects = [r for r in found.rejects if r["uri"] not in base.inputs]
    return dataclasses.replace(found, items=new, rejects=rejects), taken


def _load_input_manifest(prefix: str) -> dict | None:
    try:
        return shards.load_manifest(prefix)
    except (storage.StorageError, ValueError) as e:
        raise ConfigError(f"preprocess.input: cannot read its manifest: {e}") from None


@contextlib.contextmanager
def _ray_data(cfg: PreprocessConfig) -> Iterator[None]:
    """Ray, and the Ray Data settings of this job (restored afterwards)."""
    cluster.connect()
    cluster.warn_local_paths([("preprocess.input", cfg.input), ("preprocess.output", cfg.output)])
    # The job is a single map operator: reserving a share of the CPUs for each
    # operator only holds it below the CPUs it has (measured: one task at a time
    # on 2 CPUs for much of the run, 1.4x slower; see bench/preprocess.py).
    with cluster.data_settings(op_resource_reservation_enabled=False):
        yield


def _finished_records(
    output: str, previous: list[storage.ObjectInfo], digests: dict[str, str]
) -> dict[str, dict]:
    """Records of shards a previous run finished with exactly this plan and software."""
    present = {o.relpath for o in previous}
    here = build.software()
    done = {}
    for name, digest in digests.items():
        record_path = f"{shards.RECORDS}/{name}.json"
        if record_path not in present or name not in present:
            continue
        record = json.loads(storage.read_bytes(storage.join(output, record_path)))
        if record.get("plan_sha256") == digest and record.get("software") == here:
            done[name] = record
    return done


def _remove_orphans(output: str, previous: list[storage.ObjectInfo], planned: set[str]) -> None:
    """Delete shards (and records) an interrupted run with another plan left behind."""
    for o in previous:
        name = o.relpath.removeprefix(f"{shards.RECORDS}/").removesuffix(".json")
        if shards.is_shard_name(name) and name not in planned:
            storage.delete(o.uri)


def _check_shards(output: str, entries: list[dict], records: list[dict]) -> None:
    """Before committing: every shard is there, as its entry describes it, and the
    ones built now were built by the same software (else they would not be
    reproducible)."""
    # With every input rejected there are no shards, and maybe no output folder.
    sizes = {o.relpath: o.size for o in storage.list_objects(output)} if entries else {}
    for r in entries:
        if sizes.get(r["name"]) != r["bytes"]:
            raise RuntimeError(
                f"{storage.join(output, r['name'])}: changed while the job ran (expected "
                f"{r['bytes']} bytes, found {sizes.get(r['name'])}); is another job writing here?"
            )
    builds = {json.dumps(r["software"], sort_keys=True) for r in records}
    if len(builds) > 1:
        raise RuntimeError(f"workers built shards with different software: {sorted(builds)}")


def _index_tars(
    objects: list[storage.ObjectInfo], labels: str, ours: bool
) -> tuple[list[InputItem], list]:
    """Read every tar's member list on the cluster; inputs are their samples."""
    import ray

    rows = [{"uri": o.uri, "relpath": o.relpath, "size": o.size} for o in objects]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        functools.partial(build.index_tars, labels=labels, ours=ours), batch_size=1
    )
    items, rejects = [], []
    for row in ds.iter_rows():
        items += [InputItem(**d) for d in json.loads(row["items"])]
        rejects += json.loads(row["rejects"])
    for failure in (r for r in rejects if "error" in r):
        raise storage.StorageError(failure["error"])
    return items, rejects


def _build(
    cfg: PreprocessConfig,
    todo: list[ShardPlan],
    digests: dict[str, str],
    done_inputs: int,
    total_inputs: int,
    progress: bool,
) -> Iterator[dict]:
    """Build the shards in `todo` on Ray Data, yielding each one's record."""
    if not todo:
        return
    import ray

    rows = [
        {
            "split": p.split,
            "index": p.index,
            "plan_sha256": digests[p.name],
            "items": build.items_json(p.items),
        }
        for p in todo
    ]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        functools.partial(build.build_shards, cfg=cfg), batch_size=1, num_cpus=1
    )
    with tqdm(
        total=total_inputs,
        initial=done_inputs,
        unit="img",
        desc="preprocess",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            if "error" in record:
                raise storage.StorageError(record["error"])
            bar.update(record["inputs"])
            yield record
