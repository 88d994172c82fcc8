"""Benchmark: training images/s fed by the real Ray Data stream, against the same
training fed from tensors already in memory.

Both cases run the same Ray Train worker: the model of the preset, DDP
preparation, the real training step (EDM loss, Adam, clipping, EMA). They differ
only in where each batch comes from: `stream` pulls this worker's split of the
preprocessed shards (read_webdataset, PNG decode, `to_training_batch` with
flips, `iter_torch_batches`), exactly as `tasks.train` does; `memory` reuses
one batch of random tensors already on the device. The ratio stream / memory is
what the data path costs training (goal on a GPU: at least 0.97). Each case is
timed after warm-up steps, the cases alternate, and medians are reported, with
the share of the stream case's time spent waiting for the next batch.

    infra/local/offline .venv/bin/python bench/train_ingest.py [--resolution 8] [--steps 60]

Prints a table and writes bench/results/train_ingest-<machine>-<resolution>px.json.

Results on this 2-core machine (2026-11-26, tiny preset, 8x8 digits, batch 64,
1 worker of 1 CPU, Ray Data on the other; medians of 3 alternating runs): see
bench/results/train_ingest-cpu2-8px.json and the analysis in the issue note.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PRESETS = {8: "tiny", 32: "small", 64: "base"}


def bench_loop(config: dict) -> None:
    """One Ray Train worker: `steps` training steps after `warmup` ones, timed."""
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.diffusion import Precond
    from pipeline.diffusion.step import step_generator, train_step
    from pipeline.ema import EMA
    from pipeline.model import build
    from pipeline.train_worker import _batches

    device = ray.train.torch.get_device()
    torch.manual_seed(0)
    denoiser = Precond(build(config["preset"], num_classes=10))
    ema = EMA(denoiser.to(device), 50_000)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-4)
    model = ray.train.torch.prepare_model(denoiser)
    size, resolution = config["batch"], config["resolution"]
    if config["source"] == "stream":
        batches = _batches(ray.train.get_dataset_shard("train"), size, device)
    else:
        fixed = {
            "image": torch.randn(size, 3, resolution, resolution, device=device),
            "label": torch.randint(0, 10, (size,), device=device),
        }
        batches = iter(lambda: fixed, None)
    bf16 = torch.bfloat16 if device.type == "cuda" else None
    waited, seen = 0.0, 0
    for step in range(config["warmup"] + config["steps"]):
        if step == config["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, waited = time.perf_counter(), 0.0
        t = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t
        train_step(
            model,
            optimizer,
            ema,
            [(batch["image"], batch["label"])],
            images_seen=seen,
            base_lr=1e-4,
            generator=step_generator(0, 0, seen, device),
            autocast_dtype=bf16,
            ema_model=denoiser,
        )
        seen += size
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    ray.train.report(
        {"images_per_second": config["steps"] * size / elapsed, "waiting": waited / elapsed}
    )


def digits_dataset(folder: Path, resolution: int) -> tuple[str, dict]:
    """The digits, preprocessed at `resolution` (upscaled beyond 8)."""
    from pipeline.config import PreprocessConfig
    from pipeline.data.digits import write_digits
    from pipeline.preprocess import preprocess

    raw, out = str(folder / "raw"), str(folder / f"digits-{resolution}")
    write_digits(raw)
    preprocess(
        PreprocessConfig(
            input=raw,
            output=out,
            resolution=resolution,
            small_images="upscale",
            validation_fraction=0.0,
        )
    )
    return out, json.loads(Path(out, "manifest.json").read_text())


def run_case(source: str, dataset: str, manifest: dict, args) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline import cluster
    from pipeline.training import training_data

    config = {
        "source": source,
        "preset": PRESETS[args.resolution],
        "batch": args.batch,
        "resolution": args.resolution,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    datasets = {}
    with cluster.data_settings():
        if source == "stream":
            datasets["train"] = training_data(dataset, manifest, True, hflip=True)
        trainer = TorchTrainer(
            bench_loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=1, use_gpu=args.gpu),
            run_config=RunConfig(
                name=f"bench-{source}-{time.time_ns()}", storage_path=args.storage
            ),
            datasets=datasets,
        )
        return trainer.fit().metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--resolution",
        type=int,
        default=8,
        choices=sorted(PRESETS),
        help="image side; picks the preset (8 tiny, 32 small, 64 base)",
    )
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case, alternating")
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(RESULTS),
        help="folder for the JSON (default: $OUT if set, else bench/results)",
    )
    args = parser.parse_args()

    import ray
    import torch

    args.gpu = torch.cuda.is_available()
    machine = (
        torch.cuda.get_device_name().split()[-1].lower() if args.gpu else (f"cpu{os.cpu_count()}")
    )
    with tempfile.TemporaryDirectory() as tmp:
        args.storage = str(Path(tmp, "runs"))
        ray.init(num_cpus=os.cpu_count())
        dataset, manifest = digits_dataset(Path(tmp), args.resolution)
        runs: dict[str, list[dict]] = {"memory": [], "stream": []}
        for _ in range(args.repeats):
            for source in runs:
                runs[source].append(run_case(source, dataset, manifest, args))
        ray.shutdown()

    rate = {s: statistics.median(r["images_per_second"] for r in runs[s]) for s in runs}
    waiting = statistics.median(r["waiting"] for r in runs["stream"])
    ratio = rate["stream"] / rate["memory"]
    print(f"\n{'case':<8} {'images/s (median)':>18} {'runs':>28}")
    for s in runs:
        each = ", ".join(f"{r['images_per_second']:.0f}" for r in runs[s])
        print(f"{s:<8} {rate[s]:>18.1f} {each:>28}")
    print(f"ratio stream / memory: {ratio:.3f}; stream waits for data {waiting:.1%} of its time")
    result = {
        "machine": machine,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "preset": PRESETS[args.resolution],
        "resolution": args.resolution,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "runs": runs,
        "median_images_per_second": rate,
        "ratio": ratio,
        "stream_waiting_share": waiting,
    }
    out = Path(args.out, f"train_ingest-{machine}-{args.resolution}px.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
