"""A pixel dataset -> a latent dataset, on Ray Data.

Each shard of the pixel dataset becomes the latent shard of the same name
(`pipeline.data.latent_samples`): CPU tasks read and decode the pixel shard,
an actor pool of encoders (one autoencoder each, a GPU each when there are
GPUs) encodes it and writes the latent shard, then a record under `_records/`
holding its per-channel moments. When every shard has a record, the driver
merges the train split's moments into the statistics training normalises by
(`pipeline.maths.latents`) and writes `manifest.json`, the commit point, with
the autoencoder's identity, the statistics, the pixel dataset it came from and
the software that encoded it.

The contracts are preprocess's:
- exactly once and resumable per shard: a re-run after a crash encodes only
  the shards without a record of this plan, and the result is byte for byte
  the one an uninterrupted run gives; a re-run after success writes nothing;
- appendable: when the pixel dataset has grown (a later version of it, as the
  nightly's preprocess appends), encoding it again into the same output adds
  the new shards and commits the next version, the earlier manifests kept
  under `manifests/`; the statistics are those of the whole new version;
- every input accounted for: each pixel sample is encoded, or the job stops
  naming it (non-finite latents: an autoencoder broken at this precision).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
from collections.abc import Iterator
from typing import Any

from pipeline.config import ConfigError
from pipeline.config.encode import EncodeConfig
from pipeline.data import latent_samples, shards
from pipeline.edges import cluster, storage
from pipeline.jobs.encode import shard
from pipeline.jobs.encode.autoencoder import Autoencoder, resolve
from pipeline.maths.latents import ChannelMoments


@dataclasses.dataclass(frozen=True)
class EncodeResult:
    manifest_uri: str
    manifest: dict[str, Any]
    already_complete: bool
    """True when the output already held the latents of this dataset version."""
    reused_shards: int = 0
    """Shards an interrupted earlier run had finished, kept rather than encoded again."""
    added_shards: int = 0
    """Shards this call added (all of them for a first build)."""

    def summary(self) -> str:
        m = self.manifest
        c, (channels, h, w) = m["counts"], m["latent_shape"]
        splits = ", ".join(f"{s} {n}" for s, n in c["written_by_split"].items())
        head = "already complete: " if self.already_complete else ""
        if m.get("previous") and not self.already_complete:
            head = f"appended {self.added_shards} shards to version {m['version']}: "
        resumed = f" ({self.reused_shards} reused)" if self.reused_shards else ""
        return (
            f"{head}{c['written']} images ({splits}) -> latents {channels}x{h}x{w} in "
            f"{len(m['shards'])} shards{resumed}; manifest: {self.manifest_uri}"
        )


@dataclasses.dataclass(frozen=True)
class _Source:
    """The pixel dataset being encoded."""

    manifest: dict[str, Any]
    digest: str

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])


def encode(cfg: EncodeConfig, *, progress: bool = True) -> EncodeResult:
    """Encode (or finish encoding, or append to) the latent dataset `cfg` describes."""
    source = _load_source(cfg)
    autoencoder = resolve(cfg, source.resolution)
    identity = autoencoder.identity
    config = {
        "autoencoder": identity.digest,
        "precision": cfg.precision,
        "flips": cfg.flips,
        "chunk": cfg.chunk,
    }
    manifest_uri = storage.join(cfg.output, shards.MANIFEST)
    base, base_bytes = _committed(cfg, config, source)
    if base is not None and base["source"]["sha256"] == source.digest:
        return EncodeResult(manifest_uri, base, already_complete=True)
    kept = {e["name"]: e for e in (base or {}).get("shards", [])}
    autoencoder.keep()

    plans = [_plan(e, config) for e in source.manifest["shards"] if e["name"] not in kept]
    previous = shards.list_output(cfg.output, "encode.output")
    storage.remove_partial_writes(cfg.output)
    records = _finished_records(cfg.output, previous, plans)
    reused = len(records)
    todo = [p for p in plans if p["name"] not in records]
    total = sum(e["samples"] for e in source.manifest["shards"])
    done = total - sum(p["samples"] for p in todo)
    for record in _encode_shards(cfg, autoencoder, source, todo, done, total, progress):
        records[record["name"]] = record
    _remove_orphans(cfg.output, previous, set(kept) | {p["name"] for p in plans})

    entries = [kept.get(e["name"]) or _entry(records[e["name"]]) for e in source.manifest["shards"]]
    manifest = _manifest(cfg, config, autoencoder, source, entries, base, base_bytes)
    _check_shards(cfg.output, entries)
    if base is not None:  # keep the base's manifest before it is replaced
        stem = storage.join(cfg.output, shards.MANIFESTS, f"{base['version']:06d}")
        storage.write_bytes(f"{stem}.json", base_bytes)
    storage.write_bytes(manifest_uri, shards.dumps(manifest))
    return EncodeResult(manifest_uri, manifest, False, reused, added_shards=len(plans))


# --- the driver's side -----------------------------------------------------------------


def _load_source(cfg: EncodeConfig) -> _Source:
    manifest, digest = shards.load_dataset(cfg.dataset, "encode.dataset")
    if latent_samples.kind(manifest) != latent_samples.PIXELS:
        raise ConfigError(
            f"encode.dataset: {cfg.dataset} holds latents already; give the pixel dataset "
            f"they were encoded from ({manifest['source']['dataset']})"
        )
    return _Source(manifest, digest)


def _committed(
    cfg: EncodeConfig, config: dict, source: _Source
) -> tuple[dict[str, Any] | None, bytes]:
    """The latent dataset committed at the output, if any, and its bytes: it must be
    this config's, and encoded from an earlier version of this pixel dataset."""
    try:
        data = storage.read_bytes(storage.join(cfg.output, shards.MANIFEST))
        manifest = json.loads(data)
    except storage.NotFound:
        return None, b""
    except (storage.StorageError, ValueError) as e:
        raise ConfigError(f"encode.output: cannot read its manifest: {e}") from None
    if latent_samples.kind(manifest) != latent_samples.KIND:
        raise ConfigError(f"encode.output: {cfg.output} holds a pixel dataset; choose a new output")
    if manifest["config"] != config:
        changed = sorted(k for k in config if manifest["config"].get(k) != config[k])
        raise ConfigError(
            f"encode.output: {cfg.output} holds latents encoded with another "
            f"{', '.join(changed)}; choose a new output"
        )
    now = {e["name"]: e["sha256"] for e in source.manifest["shards"]}
    for entry in manifest["shards"]:
        if now.get(entry["name"]) != entry["source_sha256"]:
            raise ConfigError(
                f"encode.dataset: {cfg.dataset} is not a later version of the dataset "
                f"{cfg.output} holds the latents of ({entry['name']} "
                f"{'differs' if entry['name'] in now else 'is missing'}); choose a new output"
            )
    return manifest, data


def _plan(entry: dict, config: dict) -> dict[str, Any]:
    """What encoding one pixel shard depends on; its digest names the plan."""
    plan = {
        "name": entry["name"],
        "split": entry["split"],
        "samples": entry["samples"],
        "source_sha256": entry["sha256"],
    }
    digest = shards.sha256(shards.dumps({**plan, "config": config}))
    return {**plan, "plan_sha256": digest}


def _finished_records(
    output: str, previous: list[storage.ObjectInfo], plans: list[dict]
) -> dict[str, dict]:
    """Records of shards a previous run finished with exactly these plans and software."""
    sizes = {o.relpath: o.size for o in previous}
    here = shard.software()
    wanted = [p for p in plans if f"{shards.RECORDS}/{p['name']}.json" in sizes]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        found = pool.map(
            lambda p: json.loads(
                storage.read_bytes(storage.join(output, shards.RECORDS, f"{p['name']}.json"))
            ),
            wanted,
        )
        records = dict(zip((p["name"] for p in wanted), found, strict=True))
    return {
        p["name"]: records[p["name"]]
        for p in wanted
        if records[p["name"]].get("plan_sha256") == p["plan_sha256"]
        and records[p["name"]].get("software") == here
        and sizes.get(p["name"]) == records[p["name"]]["bytes"]
    }


def _remove_orphans(output: str, previous: list[storage.ObjectInfo], planned: set[str]) -> None:
    """Delete shards (and records) an interrupted run with another plan left behind."""
    for o in previous:
        name = o.relpath.removeprefix(f"{shards.RECORDS}/").removesuffix(".json")
        if shards.is_shard_name(name) and name not in planned:
            storage.delete(o.uri)


def _entry(record: dict) -> dict[str, Any]:
    keys = ("name", "split", "samples", "bytes", "sha256", "source_sha256", "moments")
    return {k: record[k] for k in keys}


def _manifest(
    cfg: EncodeConfig,
    config: dict,
    autoencoder: Autoencoder,
    source: _Source,
    entries: list[dict],
    base: dict | None,
    base_bytes: bytes,
) -> dict[str, Any]:
    identity = autoencoder.identity
    moments = ChannelMoments(identity.latent_channels)
    for e in entries:
        if e["split"] == "train":
            moments = moments.merge(ChannelMoments.from_dict(e["moments"]))
    try:
        stats = moments.stats()
    except ValueError as error:
        raise ConfigError(f"encode.dataset: {cfg.dataset}: {error} (its train split)") from None
    by_split: collections.Counter[str] = collections.Counter()
    for e in entries:
        by_split[e["split"]] += e["samples"]
    written = sum(by_split.values())
    assert written == source.manifest["counts"]["written"], "a pixel sample was not encoded"
    version: dict[str, Any] = {"version": 1}
    if base is not None:
        previous = {"version": base["version"], "sha256": shards.sha256(base_bytes)}
        version = {"version": base["version"] + 1, "previous": previous}
    return {
        "format": shards.FORMAT,
        "format_version": latent_samples.FORMAT_VERSION,
        "kind": latent_samples.KIND,
        "config": config,
        "source": {
            "dataset": cfg.dataset,
            "sha256": source.digest,
            "version": source.manifest.get("version", 1),
        },
        "autoencoder": {
            "uri": autoencoder.uri,
            "registered": autoencoder.registered,
            "digest": identity.digest,
            "class": identity.cls,
            "scaling_factor": identity.scaling_factor,
            "shift_factor": identity.shift_factor,
            "latent_channels": identity.latent_channels,
            "downsample": identity.downsample,
            "input_range": list(identity.input_range),
        },
        "latent_shape": list(identity.latent_shape(source.resolution)),
        "dtype": "float32",
        "precision": cfg.precision,
        "flips": cfg.flips,
        "stats": {
            "raw_mean": list(stats.raw_mean),
            "raw_std": list(stats.raw_std),
            "final_std": stats.final_std,
            "values": moments.values,
        },
        "software": shard.software(),
        "resolution": source.resolution,
        "classes": source.manifest["classes"],
        "counts": {
            "inputs": written,
            "written": written,
            "written_by_split": {s: by_split[s] for s in shards.SPLITS},
            "rejected": 0,
            "rejected_by_reason": {},
        },
        "shards": entries,
        **version,
    }


def _check_shards(output: str, entries: list[dict]) -> None:
    """Before committing: every shard is there, as its entry describes it."""
    sizes = {o.relpath: o.size for o in storage.list_objects(output)} if entries else {}
    for e in entries:
        if sizes.get(e["name"]) != e["bytes"]:
            raise RuntimeError(
                f"{storage.join(output, e['name'])}: changed while the job ran (expected "
                f"{e['bytes']} bytes, found {sizes.get(e['name'])}); is another job writing here?"
            )


def _encode_shards(
    cfg: EncodeConfig,
    autoencoder: Autoencoder,
    source: _Source,
    todo: list[dict],
    done: int,
    total: int,
    progress: bool,
) -> Iterator[dict]:
    """Encode the shards in `todo` on Ray Data, yielding each one's record."""
    if not todo:
        return
    import ray
    from ray.data import ActorPoolStrategy
    from tqdm import tqdm

    cluster.connect()
    cluster.warn_local_paths(
        [("encode.dataset", cfg.dataset), ("encode.output", cfg.output)]
        + [("encode.autoencoder", autoencoder.uri)]
    )
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    rows = [{"plan": json.dumps(p)} for p in todo]
    with cluster.data_settings():
        ds = (
            ray.data.from_items(rows, override_num_blocks=len(rows))
            .map_batches(
                functools.partial(
                    shard.read_shards, dataset=cfg.dataset, resolution=source.resolution
                ),
                batch_size=1,
                num_cpus=1,
            )
            .map_batches(
                shard.ShardEncoder,
                batch_size=1,
                # A shard at a time per actor, and the next one queued: no more, or the
                # first actor started takes every shard of a small dataset.
                compute=ActorPoolStrategy(
                    size=cluster.actor_count(cfg.actors, use_gpu, len(rows)),
                    max_tasks_in_flight_per_actor=2,
                ),
                num_gpus=1 if use_gpu else 0,
                fn_constructor_kwargs={
                    "autoencoder": autoencoder.uri,
                    "digest": autoencoder.identity.digest,
                    "output": cfg.output,
                    "resolution": source.resolution,
                    "precision": cfg.precision,
                    "chunk": cfg.chunk,
                    "flips": cfg.flips,
                },
            )
        )
        with tqdm(
            total=total, initial=done, unit="img", desc="encode", disable=not progress
        ) as bar:
            for row in ds.iter_rows():
                record = json.loads(row["record"])
                if "error" in record:
                    raise RuntimeError(f"encode: {record['error']}")
                bar.update(record["samples"])
                yield record
