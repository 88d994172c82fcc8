"""Training on Ray Train: a TorchTrainer fed by Ray Data, tracked in MLflow.

The driver checks the config and the dataset before anything is written, finds
(or creates) the MLflow run by name, logs the config and the dataset, and runs a
`TorchTrainer` whose workers (`pipeline.jobs.train.worker`) stream the dataset's
train shards through Ray Data in the order the plan's `StreamPlan` decides
(`pipeline.data.order`). Re-running the same command with the same run
name resumes: Ray Train restores the latest checkpoint from `storage/run_name`,
and MLflow logs into the same run. Ray Train's FailureConfig restarts the
workers from the last checkpoint when a worker or node is lost. At the end the
EMA weights are registered as a new version of the model in MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError, TrainConfig, to_dict
from pipeline.config.records import (
    CheckpointState,
    DatasetRef,
    LatentSpace,
    ModelCard,
    StreamPlan,
    TrainingPlan,
    TrainShard,
)
from pipeline.data import latent_samples, shards
from pipeline.edges import autoencoders, cluster, storage, tracking

if TYPE_CHECKING:
    from pipeline.edges import registry

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training stopped on its own: the loss became NaN or infinite."""


class TrainingFailed(RuntimeError):
    """Ray Train gave up: a worker failed more often than `max_failures` allows."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    run_id: str
    images_seen: int
    loss: float
    checkpoint: str
    """Where the final checkpoint is."""
    model_name: str
    model_version: int


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or finish training) the run `cfg` describes; see the module doc."""
    manifest, digest = shards.load_dataset(cfg.dataset, "train.dataset")
    plan = _plan(cfg, manifest, digest)
    init = _init_model(cfg, plan)
    _check_storage(cfg)
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.jobs.train.worker import Stop, stopped_marker, train_loop_per_worker

    # MLflow first: a resumed run whose settings changed is refused before Ray starts.
    run_id = tracking.find_or_create_run(cfg.tracking_uri, cfg.experiment, cfg.run_name)
    plan = dataclasses.replace(plan, run_id=run_id)
    _log_inputs(cfg, plan, run_id)
    if init is not None:
        tags = {"init_from.model": init.describe(), "init_from.digest": init.lineage.digest}
        tracking.set_tags(cfg.tracking_uri, run_id, tags)
    tracking.set_running(cfg.tracking_uri, run_id)

    cluster.connect()
    cluster.warn_local_paths([("train.dataset", cfg.dataset), ("train.storage", cfg.storage)])
    _warn_rereads(cfg, plan)
    resources = ray.cluster_resources()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else resources.get("GPU", 0) > 0
    spare = resources.get("CPU", 0) - cfg.workers * cfg.cpus_per_worker
    if spare < 1:
        log.warning(
            "the cluster has %g CPUs: %d workers x %g CPUs leave %g for Ray Data's readers, "
            "which wait until the cluster grows (lower train.cpus_per_worker or add nodes)",
            resources.get("CPU", 0),
            cfg.workers,
            cfg.cpus_per_worker,
            max(spare, 0),
        )

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": to_dict(cfg),
            "plan": plan,
            "init_weights": ray.put(init.weights) if init else None,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=use_gpu,
            placement_strategy=cfg.placement,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=run_config(cfg.storage, cfg.run_name, cfg.max_failures, cfg.keep_checkpoints),
    )
    storage.delete(stopped_marker(cfg))
    try:
        with progress(cfg.tracking_uri, run_id, plan.images, "train"):
            result = trainer.fit()
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        tracking.end_run(cfg.tracking_uri, run_id, "KILLED" if interrupted else "FAILED")
        if interrupted or not isinstance(e, Exception):
            raise
        raise TrainingFailed(f"training failed (the last checkpoint is kept): {brief(e)}") from e
    metrics = result.metrics or {}
    final = result.checkpoint.path if result.checkpoint else None
    try:
        stop = Stop.from_dict(json.loads(storage.read_bytes(stopped_marker(cfg))))
    except storage.NotFound:
        stop = None
    if stop is not None:
        tracking.end_run(cfg.tracking_uri, run_id, status="FAILED")
        raise TrainingStopped(
            f"stopped at step {stop.step} ({stop.images_seen} images seen): "
            f"{stop.detail}; last good checkpoint: {_uri(cfg, final)}"
        )
    version = _register(cfg, plan, run_id, final)
    tracking.end_run(cfg.tracking_uri, run_id)
    return TrainResult(
        run_id,
        metrics["images_seen"],
        metrics["loss"],
        _uri(cfg, final),
        cfg.model_name or cfg.run_name,
        version,
    )


def run_config(storage_uri: str, run_name: str, max_failures: int, keep: int) -> Any:
    """Ray Train's RunConfig of a run kept under `storage_uri/run_name`: restarted
    from its last checkpoint up to `max_failures` times, keeping `keep` of them."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    fs, path = storage.arrow_filesystem(storage_uri)
    return RunConfig(
        name=run_name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=keep),
        # Train V2's RunConfig (ray.train.v2) takes logging_config; ray's static
        # types still describe V1's (ray.air.config.RunConfig).
        logging_config=cluster.train_logging(),  # type: ignore[call-arg]
    )


def brief(e: BaseException) -> str:
    """Ray Train's error in one line, for the task's verdict: its first line (what
    failed) and its last (the cause); the tracebacks between stay in the log."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[:1] + lines[1:][-1:])


@contextlib.contextmanager
def progress(uri: str, run_id: str, images: int, what: str) -> Iterator[None]:
    """A progress bar of images seen while training runs, from the `images_seen`
    that rank 0 logs to MLflow at each log point (polled)."""
    from tqdm import tqdm

    start = int(tracking.latest_metric(uri, run_id, "images_seen") or 0)
    bar = tqdm(total=images, initial=start, unit="img", desc=what, dynamic_ncols=True)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(2.0):
            # Only a progress bar: a failed query waits for the next one.
            with contextlib.suppress(Exception):
                seen = int(tracking.latest_metric(uri, run_id, "images_seen") or 0)
                bar.update(max(0, seen - bar.n))

    thread = threading.Thread(target=poll, name=f"{what}-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def _init_model(cfg: TrainConfig, plan: TrainingPlan) -> registry.Model | None:
    """The model a warm start begins from (None without one); it must be the very
    network this run trains (dropout aside)."""
    if not cfg.init_from:
        return None
    from pipeline.edges import registry

    init = registry.load_model(cfg.init_from, cfg.tracking_uri, "train.init_from")
    theirs, ours = init.card.latents, plan.latents
    if (theirs and theirs.digest) != (ours and ours.digest):
        raise ConfigError(
            f"train.init_from: {init.describe()} makes {_space(theirs)}, this run "
            f"{_space(ours)}, got {cfg.init_from!r}"
        )
    differences = init.architecture().differences(plan.model, ignore=("dropout", "label_dropout"))
    if differences:
        raise ConfigError(
            f"train.init_from: {init.describe()} is another network than this run's "
            f"(its vs this run's: {', '.join(differences)}), got {cfg.init_from!r}"
        )
    return init


def _space(latents: LatentSpace | None) -> str:
    return "pixels" if latents is None else f"the latents of {latents.digest[:12]}..."


READS_PER_PASS = 4
"""More workers than this reading each shard per pass is worth a warning."""


def _warn_rereads(cfg: TrainConfig, plan: TrainingPlan) -> None:
    """Warn when the shuffle window is too small for the workers: each worker reads
    the shards of its part of a window, M / W images, so a shard of S images is
    read by about 1 + S W / M workers per pass (docs/architecture.md)."""
    largest = max(s.samples for s in plan.stream.shards)
    share = min(plan.stream.window, plan.stream.train_images) // cfg.workers
    reads = 1 + math.ceil(largest / share)
    if reads > READS_PER_PASS:
        log.warning(
            "train.shuffle_window: %d workers take %d images each of a window of %d, so "
            "each shard (up to %d images) is read by up to %d of them per pass; a window "
            "of %d or more reads each about once",
            cfg.workers,
            share,
            plan.stream.window,
            largest,
            reads,
            largest * cfg.workers,
        )


def _check_storage(cfg: TrainConfig) -> None:
    """A run's storage in a bucket that does not exist (or cannot be reached) is a
    config error, found before anything is written."""
    if not storage.is_s3(cfg.storage):
        return  # a local folder is created
    try:
        storage.list_objects(storage.join(cfg.storage, cfg.run_name))
    except storage.StorageError as e:
        raise ConfigError(f"train.storage: {e}") from None


def _plan(cfg: TrainConfig, manifest: dict, digest: str) -> TrainingPlan:
    """What the workers need beyond the config: derived sizes, the whole network."""
    latents = _latent_space(cfg, manifest)
    resolution = manifest["resolution"] if latents is None else latents.side
    train_images = manifest["counts"]["written_by_split"]["train"]
    if train_images < cfg.batch_size:
        raise ConfigError(
            f"train.batch_size: larger than the dataset's {train_images} "
            f"training images, got {cfg.batch_size}"
        )
    images = cfg.images if cfg.epochs is None else math.ceil(cfg.epochs * train_images)
    images = math.ceil(images / cfg.batch_size) * cfg.batch_size  # whole global batches
    num_classes = len(manifest.get("classes") or [])
    source = "the dataset's images of " if latents is None else "the dataset's latents of "
    channels = 3 if latents is None else latents.channels
    network = cfg.model.resolve(
        resolution, num_classes, cfg.label_dropout, "train.model", source, channels
    )
    classes = manifest.get("classes")
    stream = StreamPlan(
        seed=cfg.seed,
        dataset_digest=digest,
        shards=tuple(
            TrainShard(s["name"], s["samples"], s["sha256"])
            for s in manifest["shards"]
            if s["split"] == "train"
        ),
        batch_size=cfg.batch_size,
        window=math.ceil(cfg.shuffle_window / cfg.batch_size) * cfg.batch_size,
        hflip=cfg.hflip,
    )
    return TrainingPlan(
        images=images,
        num_classes=num_classes,
        model=network,
        resolution=resolution,
        dataset=DatasetRef(storage.join(cfg.dataset, shards.MANIFEST), digest, train_images),
        classes=None if classes is None else tuple(classes),
        stream=stream,
        latents=latents,
    )


def _latent_space(cfg: TrainConfig, manifest: dict) -> LatentSpace | None:
    """A latent dataset's autoencoder and statistics (None for pixels); hflip is
    refused unless each image's mirrored latent was encoded."""
    if latent_samples.kind(manifest) != latent_samples.KIND:
        return None
    latents = LatentSpace.of_dataset(manifest)
    try:  # found now, not at the first sample grid hours in
        autoencoders.check(latents.autoencoder, latents.digest)
    except autoencoders.AutoencoderError as e:
        raise ConfigError(f"train.dataset: its autoencoder: {e}") from None
    if cfg.hflip and not latents.flips:
        raise ConfigError(
            f"train.hflip: {cfg.dataset} holds latents encoded without flips (a flipped "
            "image's latent is not its latent flipped); encode with --flips true, or "
            "train with --hflip false"
        )
    return latents


RESUMABLE_CHANGES = (
    "images",
    "epochs",
    "workers",
    "micro_batch",
    "use_gpu",
    "cpus_per_worker",
    "placement",
    "compile",
    "channels_last",
    "checkpoint_every_images",
    "snapshot_every_images",
    "keep_checkpoints",
    "log_every_images",
    "sample_every_images",
    "max_failures",
    "deterministic",
    "readers",
    "tracking_uri",
    "plan.images",
)
"""Params a resumed run may change (how long, on what, how often); any other
change is refused, since the checkpoint would continue a different run."""


def _log_inputs(cfg: TrainConfig, plan: TrainingPlan, run_id: str) -> None:
    params = tracking.flatten(to_dict(cfg))
    params.update(
        {
            "plan.images": plan.images,
            "plan.num_classes": plan.num_classes,
            "plan.resolution": plan.resolution,
            "plan.dataset_digest": plan.dataset.digest,
        }
    )
    params.update(tracking.flatten(plan.model.to_dict(), "architecture."))
    try:
        tracking.log_params(cfg.tracking_uri, run_id, params, RESUMABLE_CHANGES)
    except tracking.ParamConflict as e:
        key, (was, now) = next(iter(e.changes.items()))
        field = key.replace("plan.dataset_digest", "dataset")
        raise ConfigError(
            f"train.{field}: run {cfg.run_name!r} was started with {key}={was}, now {now}; "
            f"resume it with the same value, or start a new train.run_name"
        ) from None
    tracking.log_dataset(
        cfg.tracking_uri,
        run_id,
        plan.dataset.uri,
        plan.dataset.digest,
        name=cfg.dataset.rstrip("/").split("/")[-1],
    )
    tracking.set_tags(
        cfg.tracking_uri,
        run_id,
        {
            "dataset_digest": plan.dataset.digest,
            "dataset_uri": plan.dataset.uri,
            "template": cfg.model.template,
            "hflip": str(cfg.hflip),
        },
    )


def _register(cfg: TrainConfig, plan: TrainingPlan, run_id: str, final: str | None) -> int:
    """Register the final checkpoint's EMA weights as a new model version."""
    from pipeline.edges import checkpoint

    folder = _uri(cfg, final)
    state = CheckpointState.from_dict(
        json.loads(storage.read_bytes(storage.join(folder, checkpoint.STATE)))
    )
    card = ModelCard(
        template=cfg.model.template,
        model=plan.model,
        resolution=plan.resolution,
        classes=plan.classes,
        sigma_data=0.5,
        images_seen=state.images_seen,
        dataset=plan.dataset,
        run_id=run_id,
        augmentation={"hflip": cfg.hflip},
        snapshots=state.snapshots,
        latents=plan.latents,
    )
    files = {
        "model.safetensors": storage.read_bytes(storage.join(folder, checkpoint.EMA_WEIGHTS)),
        "model.json": json.dumps(card.to_dict(), indent=1, sort_keys=True).encode(),
    }
    tags = {
        "dataset_digest": plan.dataset.digest,
        "dataset_uri": plan.dataset.uri,
        "run_id": run_id,
        "images_seen": str(state.images_seen),
        "checkpoint": folder,
        "template": cfg.model.template,
        "hflip": str(cfg.hflip),
        **({"autoencoder_digest": plan.latents.digest} if plan.latents else {}),
    }
    return tracking.register_model(
        cfg.tracking_uri, run_id, cfg.model_name or cfg.run_name, files, tags
    )


def _uri(cfg: TrainConfig, path: str | None) -> str:
    """A checkpoint path as Ray Train gives it (no scheme) back as a URI."""
    if path is None:
        return "(none)"
    return f"s3://{path}" if storage.is_s3(cfg.storage) else path
