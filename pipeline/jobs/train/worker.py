"""What each Ray Train worker runs: ordinary PyTorch between `get_checkpoint()` and
`report()`.

Every worker builds the same network (same seed), restores the latest
checkpoint if there is one, and steps through its lanes of the training stream
(`ingest.batches`: the plan of `data.order`, read by Ray Data from the
checkpoint's images seen on) in lockstep with the others (DDP all-reduces the
gradients). Progress is counted in images seen by all workers together; every
image's flip, noise and label dropout come from its position in the stream, so
a resumed run trains on what an uninterrupted one would. Rank 0 alone keeps the averages (the EMA
that sampling uses, and EDM2's post-hoc EMA profiles), writes the checkpoints,
stores the profiles' snapshots beside them and logs to MLflow; every rank calls
`report()` at the same points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from safetensors.torch import load as load_weights

from pipeline.config import TrainConfig, from_dict
from pipeline.config.records import CheckpointState, TrainingPlan, check_fields
from pipeline.data import shards
from pipeline.data.autoencode import Decoder
from pipeline.data.order import Order
from pipeline.data.stream import Reading
from pipeline.data.transforms import tile
from pipeline.edges import checkpoint, snapshots, storage, tracking
from pipeline.jobs.train import ingest
from pipeline.maths.edm import Precond, karras_sigmas
from pipeline.maths.ema import EMA
from pipeline.maths.latents import draw_latents
from pipeline.maths.phema import PostHocEMA
from pipeline.maths.solvers import initial_noise, sample_generators, sample_heun
from pipeline.maths.train_step import (
    NonFiniteLoss,
    StepLog,
    Steps,
    fused_adam,
    keep_fused,
    train_step,
)
from pipeline.maths.unet import UNet


def train_loop_per_worker(config: dict) -> None:
    cfg: TrainConfig = from_dict(TrainConfig, config["train"])
    plan: TrainingPlan = config["plan"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    if cfg.deterministic:
        deterministic(device)
    # The same network on every worker, then the latest checkpoint over it.
    # A warm start begins from another model's weights, its average too.
    torch.manual_seed(cfg.seed)
    layout = torch.channels_last if on_gpu(cfg.channels_last, device) else torch.contiguous_format
    net = UNet(plan.model).to(device)
    net.to(memory_format=layout)  # type: ignore[call-overload]  # torch's stubs lack it
    restored = ray.train.get_checkpoint()
    if restored is None and config.get("init_weights") is not None:
        net.load_state_dict(load_weights(ray.get(config["init_weights"])))
    denoiser = Precond(net)
    optimizer = fused_adam(denoiser.parameters(), cfg.lr)
    ema = EMA(denoiser, cfg.ema_halflife_images, cfg.ema_rampup_ratio) if rank == 0 else None
    phema: PostHocEMA[Precond] | None = None
    images_seen = 0
    if restored is not None:
        with restored.as_directory() as folder:
            state = checkpoint.load(Path(folder), net, ema.module.net if ema else None, optimizer)
            if rank == 0:
                phema = _restore_profiles(Path(folder), denoiser)
        keep_fused(optimizer)
        images_seen = state.images_seen
    elif rank == 0:
        phema = PostHocEMA(denoiser)
    averages = None if ema is None or phema is None else (ema, phema)  # rank 0's
    node = ray.get_runtime_context().get_node_id()[:12]
    print(
        f"train worker {rank} of {world} on node {node} ({device}) starts at "
        f"{images_seen} images seen",
        flush=True,
    )
    model: torch.nn.Module = ray.train.torch.prepare_model(denoiser)  # DDP if world > 1
    if on_gpu(cfg.compile, device):
        # On a module, torch.compile returns a module (OptimizedModule).
        model = typing.cast(torch.nn.Module, torch.compile(model))
    bf16 = torch.bfloat16 if cfg.bf16 and device.type == "cuda" else None

    order = Order(plan.stream)
    prefix = plan.dataset.uri.removesuffix("/" + shards.MANIFEST)
    latent_channels = 0 if plan.latents is None else plan.latents.channels
    reading = Reading(
        prefix,
        rank,
        world,
        images_seen,
        plan.images,
        plan.resolution,
        plan.num_classes > 0,
        latent_channels,
    )
    batches = ingest.batches(plan.stream, reading, cfg.readers, pin=device.type == "cuda")
    steps_taken = StepLog()
    snapshot_every = cfg.snapshot_interval(plan.images)
    last_checkpoint = images_seen
    with _Rank0Log(cfg, plan, images_seen) if rank == 0 else contextlib.nullcontext() as log:
        while images_seen < plan.images:
            # One optimizer step over this worker's part of the global batch. It
            # does not wait for the device: its results are read at log points.
            batch = next(batches)
            x = _inputs(batch, plan, order, device).contiguous(memory_format=layout)
            micro = _micro_batches(x, batch.label, device, cfg.micro_batch or cfg.per_worker_batch)
            result = train_step(
                model,
                optimizer,
                averages,
                micro,
                images_seen=images_seen,
                base_lr=cfg.lr,
                lr_rampup_images=cfg.lr_rampup_images,
                max_grad_norm=cfg.max_grad_norm,
                seeds=order.noise_seeds(batch.position),
                dropout_seed=order.dropout_seed(images_seen // cfg.batch_size, rank),
                label_dropout=plan.model.label_dropout,
                autocast_dtype=bf16,
                ema_model=denoiser,
                ema_images=cfg.batch_size,
            )
            steps_taken.add(images_seen, result, checksum=int(batch.check.sum()))
            before, images_seen = images_seen, images_seen + cfg.batch_size
            done = images_seen >= plan.images
            at_log = _crossed(before, images_seen, cfg.log_every_images) or done
            at_checkpoint = _crossed(before, images_seen, cfg.checkpoint_every_images) or done
            at_samples = done or (
                cfg.sample_every_images > 0
                and _crossed(before, images_seen, cfg.sample_every_images)
            )
            if not (at_log or at_checkpoint or at_samples):
                continue

            # Log, sample and checkpoint points, at fixed image counts on every rank:
            # read the steps since the last log point, all ranks together. A step
            # that was not finite (it changed nothing) stops the run here, before
            # anything after it is logged or saved, and without Ray Train's retries,
            # which would meet it again.
            steps = _over_ranks(steps_taken.read(), world, device)
            try:
                steps.check()
            except NonFiniteLoss as e:
                if rank == 0:
                    stop = Stop(e.images_seen // cfg.batch_size, e.images_seen, str(e))
                    storage.write_bytes(stopped_marker(cfg), json.dumps(stop.to_dict()).encode())
                return
            if at_log:
                steps_taken.clear()
                if log:
                    log.metrics(images_seen, steps, result.learning_rate)
            if log and at_samples:
                assert ema is not None  # rank 0 keeps the average and logs
                log.samples(images_seen, ema.module, device)
            if at_checkpoint:
                if log:
                    log.flush()  # the run's metrics are complete up to its checkpoint
                state = CheckpointState(
                    images_seen=images_seen,
                    step=images_seen // cfg.batch_size,
                    run_id=plan.run_id,
                    model=plan.model,
                    config={**config["train"], "tracking_uri": tracking.redact(cfg.tracking_uri)},
                    dataset=plan.dataset,
                    seed=cfg.seed,
                    snapshots=snapshots.location(cfg.storage, cfg.run_name),
                    latents=plan.latents,
                )
                metrics = {"loss": steps.mean_loss, "learning_rate": result.learning_rate}
                snapshot = done or _crossed(last_checkpoint, images_seen, snapshot_every)
                _report_checkpoint(rank, state, net, averages, optimizer, metrics, done, snapshot)
                last_checkpoint = images_seen


def deterministic(device: torch.device) -> None:
    """torch's deterministic algorithms (warning where an op has none) and, on
    GPUs, cuDNN's deterministic kernels and the cuBLAS workspace they need."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def on_gpu(setting: bool | None, device: torch.device) -> bool:
    """A setting that is true, false, or None for "on GPUs only", on this device."""
    return device.type == "cuda" if setting is None else setting


def stopped_marker(cfg: TrainConfig) -> str:
    """Where rank 0 records that the loss became NaN or infinite (a `Stop`)."""
    return storage.join(cfg.storage, cfg.run_name, "stopped.json")


@dataclasses.dataclass(frozen=True)
class Stop:
    """Training stopped itself: the loss became NaN or infinite at this step."""

    step: int
    images_seen: int
    """Images seen before the step (the step's own batch not counted)."""
    detail: str
    """What was not finite (`NonFiniteLoss`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Stop:
        check_fields("stop marker", data, cls)
        return cls(**data)


def _restore_profiles(folder: Path, denoiser: Precond) -> PostHocEMA[Precond]:
    """The post-hoc EMA profiles of the checkpoint in `folder`. One written before
    they were kept has none: they start from the restored model, which then stands
    for the whole average of the training before it."""
    phema = PostHocEMA(denoiser)
    if not checkpoint.load_profiles(folder, _profile_nets(phema)):
        print(
            f"the checkpoint holds no post-hoc EMA profiles (written before they were "
            f"kept): profiles {', '.join(map(str, phema.stds))} start from the restored model",
            flush=True,
        )
    return phema


def _profile_nets(phema: PostHocEMA[Precond]) -> dict[float, torch.nn.Module]:
    """The raw networks of the profiles, by width: what checkpoints and snapshots hold."""
    return {p.std: p.module.net for p in phema.profiles}


def _report_checkpoint(
    rank: int,
    state: CheckpointState,
    net: torch.nn.Module,
    averages: tuple[EMA[Precond], PostHocEMA[Precond]] | None,
    optimizer: torch.optim.Optimizer,
    measured: dict[str, float],
    done: bool,
    snapshot: bool,
) -> None:
    """Every rank reports; rank 0 attaches the checkpoint it just wrote, after
    storing its post-hoc EMA snapshot when `snapshot` (`train.snapshot_every_images`;
    always at the end), which outlives the checkpoint (Ray Train keeps the
    newest few)."""
    metrics = {
        "status": "done" if done else "running",
        "images_seen": state.images_seen,
        "step": state.step,
        **measured,
    }
    name = f"checkpoint-{state.images_seen:012d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    assert averages is not None  # rank 0 keeps the averages
    ema, phema = averages
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save(Path(folder), net, ema.module.net, optimizer, state, _profile_nets(phema))
        if snapshot:
            data = (Path(folder) / checkpoint.PHEMA).read_bytes()
            snapshots.write(state.snapshots, state.images_seen, data)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=name,
        )


def _inputs(
    batch: ingest.Batch, plan: TrainingPlan, order: Order, device: torch.device
) -> torch.Tensor:
    """What the network learns to make, on the device: images in [-1, 1], or for a
    latent dataset a latent drawn from each posterior with the seed of its
    position (`Order.latent_seeds`), normalised by the dataset's statistics."""
    if plan.latents is None:
        assert batch.image is not None
        return batch.image.to(device, non_blocking=True).float() / 127.5 - 1.0
    assert batch.posterior is not None
    posterior = batch.posterior.to(device, non_blocking=True)
    z = draw_latents(posterior[:, 0], posterior[:, 1], order.latent_seeds(batch.position))
    return plan.latents.stats.normalise(z)


def _micro_batches(
    x: torch.Tensor, label: torch.Tensor | None, device: torch.device, size: int
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The batch cut into micro-batches, labels beside."""
    label = None if label is None else label.to(device, non_blocking=True)
    return [
        (x[i : i + size], None if label is None else label[i : i + size])
        for i in range(0, len(x), size)
    ]


def _crossed(before: int, after: int, every: int) -> bool:
    return before // every != after // every


def _over_ranks(steps: Steps, world: int, device: torch.device) -> Steps:
    """The steps of every rank together (one all-gather of six numbers each)."""
    if world == 1:
        return steps
    mine = steps.to_tensor(device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(gathered, mine)
    return Steps.over_ranks([Steps.from_tensor(row) for row in torch.stack(gathered).cpu()])


class _Rank0Log:
    """Rank 0's MLflow logging: metrics, images/s, sample grids, system metrics.
    A thread of its own makes the calls (`tracking.BackgroundLog`), so the
    training thread only queues them. Used as a context: on leaving it, every
    queued call has been made (a failed one is raised, unless another error is
    already on its way out)."""

    def __init__(self, cfg: TrainConfig, plan: TrainingPlan, images_seen: int):
        assert plan.run_id is not None, "the driver gives the workers a plan with its run"
        self.plan, self.seed = plan, cfg.seed
        self.system = tracking.SystemMetrics(cfg.tracking_uri, plan.run_id).__enter__()
        self.queue = tracking.BackgroundLog(cfg.tracking_uri, plan.run_id)
        self.clock, self.images = time.perf_counter(), images_seen
        self.decoder: Decoder | None = None

    def __enter__(self) -> _Rank0Log:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.system.__exit__(None, None, None)
        try:
            self.queue.close()
        except tracking.LoggingFailed as e:
            if kind is None:
                raise
            print(f"also: {e}", flush=True)  # the error on its way out says more

    def metrics(self, images_seen: int, steps: Steps, learning_rate: float) -> None:
        """Queue the metrics of a log point (`steps`: those since the last one)."""
        now = time.perf_counter()
        rate = (images_seen - self.images) / max(now - self.clock, 1e-9)
        self.clock, self.images = now, images_seen
        values = {
            "loss": steps.mean_loss,
            "learning_rate": learning_rate,
            "grad_norm": steps.grad_norm,
            "images_per_second": rate,
            "images_seen": images_seen,
            # What the steps since the last log point trained on (`Steps.checksum`):
            # a resumed run logs the values of an uninterrupted one.
            "stream_checksum": steps.checksum,
        }
        self.queue.log_metrics(values, step=images_seen)

    def flush(self) -> None:
        """Wait until every queued call is made."""
        self.queue.flush()

    def _decoder(self, device: torch.device) -> Decoder:
        """The latent dataset's autoencoder, loaded at the first grid."""
        if self.decoder is None:
            latents = self.plan.latents
            assert latents is not None
            self.decoder = Decoder(
                latents.autoencoder, latents.digest, latents.stats, device=device
            )
        return self.decoder

    def samples(
        self, images_seen: int, ema_denoiser: Precond, device: torch.device, count: int = 64
    ) -> None:
        """A grid of EMA samples from fixed seeds (and labels cycling through the
        classes), so the grids of a run show the same noise becoming images."""
        classes = self.plan.model.num_classes
        shape = (self.plan.model.in_channels, self.plan.resolution, self.plan.resolution)
        generators = sample_generators(self.seed, range(count), device)
        x = initial_noise((count, *shape), 80.0, generators, device)
        label = torch.arange(count, device=device) % classes if classes else None
        images = sample_heun(ema_denoiser, x, karras_sigmas(18), label=label)
        if self.plan.latents is not None:
            images = self._decoder(device)(images)
        self.queue.log_image(grid(images), key="samples", step=images_seen)
        self.clock = time.perf_counter()  # sampling time is not training time


def grid(images: torch.Tensor, columns: int = 8) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> one uint8 HxWx3 image (see `transforms.tile`)."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return tile(pixels.transpose(0, 2, 3, 1), columns)
