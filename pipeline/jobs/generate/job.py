"""Batch generation: a registered model (or a checkpoint) -> webdataset shards.

The unit of work is a shard: shard i holds the images of seeds [i*S, (i+1)*S),
and image k comes from its own generator seeded from (job seed, k), its label
too. The network always runs on calls of `network_batch` images, aligned to the
shard, so an image's pixels depend on neither the batch size nor the number of
actors nor retries. Each shard is written atomically, then a small record of it;
a re-run lists the records and generates only the missing shards, over a Ray
Data actor pool (one actor per GPU, or CPU actors). The manifest is written
last. Per image the shard holds `{key}.png`, `{key}.json` (seed, label,
guidance, sampler, steps, the model's name, version and weights digest) and
`{key}.cls` when labelled.

The fixed costs of a job are kept off its path: the MLflow run is opened on a
thread while the actors start (a process, torch, the model: seconds), and the
actors get the weights from one copy in Ray's object store. The actors' side,
one shard per call, is `sampler.py`: it imports neither MLflow nor this module.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import math

import numpy as np

from pipeline.config import ConfigError, SampleConfig, to_dict
from pipeline.config.evaluate import HELDOUT_IMAGES, REFERENCE_IMAGES
from pipeline.config.records import GenerationJob
from pipeline.data import shards
from pipeline.edges import autoencoders, cluster, registry, storage, tracking
from pipeline.jobs.generate import card as cards
from pipeline.jobs.generate import gate as gates
from pipeline.jobs.generate.sampler import ShardRecord, ShardSampler, shard_seeds

log = logging.getLogger(__name__)

FORMAT = "diffusion-pipeline.samples"
JOB = "_job.json"
"""Written before the first shard: the job's identity, so that a re-run with
other settings is refused instead of mixing two jobs' shards."""


@dataclasses.dataclass(frozen=True)
class SampleResult:
    written: int
    """Shards written by this run (the others were already complete)."""
    shards: int
    images: int
    manifest_uri: str
    run_id: str
    card: dict | None = None
    """The dataset card (`card.py`), when this run wrote the manifest."""

    def summary(self) -> str:
        head = (
            f"{self.images} images in {self.shards} shards ({self.written} written now, "
            f"{self.shards - self.written} already complete)"
        )
        return head + ("" if self.card is None else f"; {cards.headline(self.card)}")


def sample(cfg: SampleConfig) -> SampleResult:
    """Generate the images `cfg` describes; see the module doc. A finished job run
    again writes nothing, to the output or to MLflow."""
    model = registry.load_model(cfg.model, cfg.tracking_uri, "sample.model")
    autoencoder = _autoencoder(cfg, model)
    gate, trained = gates.resolve(cfg, model)
    job = _job(cfg, model, gate)
    names = [shards.shard_name("train", i) for i in range(_shard_count(cfg))]
    manifest_uri = storage.join(cfg.output, shards.MANIFEST)
    done = _check_output(cfg, job)
    missing = [i for i, name in enumerate(names) if name not in done]
    if not missing:
        found = tracking.find_run(cfg.tracking_uri, cfg.experiment, _run_name(cfg))
        if found and found[1] == "FINISHED":
            if _committed(manifest_uri) == _manifest(cfg, model, job, names, done):
                return SampleResult(0, len(names), cfg.images, manifest_uri, found[0])
    elif not storage.exists(storage.join(cfg.output, JOB)):
        storage.write_bytes(storage.join(cfg.output, JOB), shards.dumps(job.to_dict()))

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as mlflow_thread:
        run = mlflow_thread.submit(_open_run, cfg, model)
        if missing:
            done.update(_generate(cfg, model, job, missing, run, autoencoder, gate, trained))
        run_id = run.result()
    manifest = _manifest(cfg, model, job, names, done)
    card = None
    if _committed(manifest_uri) != manifest:
        card = manifest["card"] = _card(cfg, model, job, gate, trained, manifest, run_id)
        storage.write_bytes(manifest_uri, shards.dumps(manifest))
    tracking.log_metrics(
        cfg.tracking_uri, run_id, {"images": cfg.images, "shards": len(names)}, step=0
    )
    tracking.end_run(cfg.tracking_uri, run_id)
    return SampleResult(len(missing), len(names), cfg.images, manifest_uri, run_id, card)


def _card(
    cfg: SampleConfig,
    model: registry.Model,
    job: GenerationJob,
    gate: gates.Gate | None,
    trained: dict | None,
    manifest: dict,
    run_id: str,
) -> dict:
    """The dataset card (`card.py`): written as `card.md` and `grid.png` beside the
    manifest, logged to MLflow; its fields, for the manifest."""
    found: dict[str, float] = {}
    if gate is not None and gate.judge is not None and trained is not None:
        import ray

        cluster.connect()
        task = ray.remote(num_cpus=1)(cards.scores)
        found = ray.get(
            task.remote(cfg.output, manifest, gate, trained, REFERENCE_IMAGES, HELDOUT_IMAGES, 1)
        )
    tallies = [entry["tally"] for entry in manifest["shards"]]
    fields = cards.card(job, model.card, gate, tallies, found)
    files = {
        cards.GRID: cards.png(preview(cfg.output, manifest=manifest)),
        cards.CARD: cards.markdown(fields, cfg.output).encode(),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(cfg.output, name), data)
    tracking.log_files(cfg.tracking_uri, run_id, files, "card")
    tracking.log_metrics(cfg.tracking_uri, run_id, cards.metrics(fields), step=0)
    return fields


def _committed(uri: str) -> dict | None:
    """The manifest at `uri` without its card (None: none yet)."""
    data = _read_or_none(uri)
    if data is None:
        return None
    manifest = json.loads(data)
    manifest.pop("card", None)
    return manifest


def _autoencoder(cfg: SampleConfig, model: registry.Model) -> str | None:
    """Where a latent model's autoencoder is (None for a pixel model); a config
    error when it is not the one its latents are of."""
    space = model.card.latents
    if space is None:
        if cfg.autoencoder:
            raise ConfigError("sample.autoencoder: the model makes pixels; it takes none")
        return None
    uri = cfg.autoencoder or space.autoencoder
    try:
        autoencoders.check(uri, space.digest)
    except autoencoders.AutoencoderError as e:
        raise ConfigError(f"sample.autoencoder: {e}") from None
    return uri


def _open_run(cfg: SampleConfig, model: registry.Model) -> str:
    """The job's MLflow run, found or created, marked running, with the config as
    params and the model's lineage as tags; its id."""
    run_id = tracking.find_or_create_run(cfg.tracking_uri, cfg.experiment, _run_name(cfg))
    tracking.set_running(cfg.tracking_uri, run_id)
    tracking.log_params(cfg.tracking_uri, run_id, tracking.flatten(to_dict(cfg)))
    tracking.set_tags(
        cfg.tracking_uri,
        run_id,
        {
            "model_name": str(model.lineage.name),
            "model_version": str(model.lineage.version),
            "model_digest": model.lineage.digest,
            "output": cfg.output,
        },
    )
    return run_id


def _manifest(
    cfg: SampleConfig,
    model: registry.Model,
    job: GenerationJob,
    names: list[str],
    done: dict[str, ShardRecord],
) -> dict:
    return json.loads(
        shards.dumps(
            {
                "format": FORMAT,
                "format_version": 1,
                "job": job.to_dict(),
                "output": cfg.output,
                "resolution": model.card.image_side,
                "classes": None if model.card.classes is None else list(model.card.classes),
                "counts": {
                    "images": cfg.images,
                    "shards": len(names),
                    "written_by_split": {"train": cfg.images},
                },
                "shards": [done[name].to_dict() for name in names],
            }
        )
    )


def _read_or_none(uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except storage.NotFound:
        return None


def _job(cfg: SampleConfig, model: registry.Model, gate: gates.Gate | None) -> GenerationJob:
    """What decides the pixels: a re-run must match it to continue a job."""
    classes = model.card.model.num_classes
    if cfg.labels == "uniform":
        labels: str | int = "uniform" if classes else "none"
    elif cfg.labels == "none":
        labels = "none"
    else:
        names = list(model.card.classes or [str(c) for c in range(classes)])
        if cfg.labels not in names:
            raise ConfigError(
                f"sample.labels: the model's classes are {', '.join(names) or 'none'}, "
                f"got {cfg.labels!r}"
            )
        labels = names.index(cfg.labels)
    if labels == "none" and cfg.guidance != 1.0:
        raise ConfigError(f"sample.guidance: needs class labels, got {cfg.guidance}")
    return GenerationJob(
        model=model.lineage,
        images=cfg.images,
        samples_per_shard=cfg.samples_per_shard,
        sampler=cfg.sampler,
        steps=cfg.steps,
        guidance=cfg.guidance,
        labels=labels,
        seed=cfg.seed,
        network_batch=cfg.network_batch,
        template=model.card.template,
        checks=None if gate is None else gate.settings(),
    )


def _shard_count(cfg: SampleConfig) -> int:
    return math.ceil(cfg.images / cfg.samples_per_shard)


def _run_name(cfg: SampleConfig) -> str:
    return "sample-" + hashlib.sha256(cfg.output.encode()).hexdigest()[:12]


def _check_output(cfg: SampleConfig, job: GenerationJob) -> dict[str, ShardRecord]:
    """The records of the shards already complete; a config error when the output
    holds another job (or cannot be listed)."""
    try:
        existing = storage.read_bytes(storage.join(cfg.output, JOB))
    except storage.NotFound:
        existing = None
    except storage.StorageError as e:
        raise ConfigError(f"sample.output: {e}") from None
    if existing is not None and json.loads(existing) != json.loads(shards.dumps(job.to_dict())):
        raise ConfigError(
            f"sample.output: {cfg.output} holds another job's images (other model or "
            "settings); use another output, or the same settings to continue it"
        )
    try:
        records = storage.list_objects(storage.join(cfg.output, shards.RECORDS))
    except storage.NotFound as e:
        if storage.is_s3(cfg.output) and existing is None:
            try:
                storage.list_objects(cfg.output)
            except storage.NotFound:
                raise ConfigError(f"sample.output: {e}") from None
        records = []
    # One read per record, in parallel: a large job has thousands.
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        found = pool.map(storage.read_bytes, [obj.uri for obj in records])
        done = [ShardRecord.from_dict(json.loads(data)) for data in found]
    return {record.name: record for record in done}


def _generate(
    cfg: SampleConfig,
    model: registry.Model,
    job: GenerationJob,
    missing: list[int],
    run: concurrent.futures.Future[str],
    autoencoder: str | None,
    gate: gates.Gate | None,
    trained: dict | None,
) -> dict[str, ShardRecord]:
    """Generate the `missing` shards over an actor pool; their records by name.
    `run` is the MLflow run being opened meanwhile: its error stops the job at the
    next finished shard rather than after the last."""
    import ray
    from ray.data import ActorPoolStrategy
    from tqdm import tqdm

    cluster.connect()
    cluster.warn_local_paths([("sample.output", cfg.output)])
    if gate is not None and trained is not None and gates.missing(gate):
        # Once per dataset version: the judge and the copy index, on the cluster.
        ray.get(ray.remote(num_cpus=1)(gates.prepare).remote(gate, trained, REFERENCE_IMAGES))
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    items = [{"shard": i} for i in missing]
    total = sum(stop - start for start, stop in (shard_seeds(job, i) for i in missing))
    records = {}
    with cluster.data_settings():
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardSampler,
            batch_size=1,
            # Two calls at once per actor: one writes the shard it sampled while the
            # other samples the next (ShardSampler runs the network for one at a time).
            # No more are sent to an actor, or the first one started takes them all
            # (Ray Data's default sends it twice its calls).
            compute=ActorPoolStrategy(
                size=cluster.actor_count(cfg.actors, use_gpu, len(items)),
                max_concurrent_calls_per_actor=2,
                max_tasks_in_flight_per_actor=2,
                enable_true_multi_threading=True,
            ),
            num_gpus=1 if use_gpu else 0,
            fn_constructor_kwargs={
                "card": model.card,
                # By reference: one copy in the object store for all actors.
                "weights": ray.put(model.weights),
                "job": job,
                "output": cfg.output,
                "batch_size": cfg.batch_size,
                "autoencoder": autoencoder,
                "gate": gate,
            },
        )
        with tqdm(total=total, unit="img", desc="sample", dynamic_ncols=True) as bar:
            for row in ds.iter_rows():
                data = json.loads(row["record"])
                if "error" in data:
                    raise storage.StorageError(data["error"])
                record = ShardRecord.from_dict(data)
                records[record.name] = record
                bar.update(record.samples)
                if run.done():
                    run.result()  # raises the MLflow run's error, if it had one
    return records


def preview(
    output: str, per_class: int = 10, count: int = 100, manifest: dict | None = None
) -> np.ndarray:
    """A grid (uint8 HxWx3) of a finished job's first images: `per_class` of each
    class, a row per class, when labelled; else the first `count`, 10 a row.
    `manifest`: the job's (default: read from the output)."""

    from PIL import Image

    from pipeline.data.transforms import tile

    if manifest is None:
        manifest = json.loads(storage.read_bytes(storage.join(output, shards.MANIFEST)))
    classes = len(manifest.get("classes") or [])
    rows: dict[int | None, list[np.ndarray]] = {}
    for entry in manifest["shards"]:
        data = storage.read_bytes(storage.join(output, entry["name"]))
        members = {m.name: data[m.offset : m.offset + m.size] for m in shards.tar_members(data)}
        for name in sorted(n for n in members if n.endswith(".png")):
            label = json.loads(members[name.replace(".png", ".json")])["label"]
            row = rows.setdefault(label if classes else None, [])
            if len(row) < (per_class if classes else count):
                row.append(np.asarray(Image.open(io.BytesIO(members[name])).convert("RGB")))
        if sum(map(len, rows.values())) >= (classes * per_class if classes else count):
            break
    if classes:
        blank = np.zeros_like(next(iter(rows.values()))[0])
        picked = [(rows.get(c, []) + [blank] * per_class)[:per_class] for c in range(classes)]
        return tile(np.stack([image for row in picked for image in row]), per_class)
    return tile(np.stack(rows[None]), 10)
