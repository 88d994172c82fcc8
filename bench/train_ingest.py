"""Benchmark: training images/s fed by the real Ray Data stream, against the same
training fed from tensors already in memory.

All cases run the same Ray Train worker: the model of the preset, DDP
preparation, the real training step (EDM loss, Adam, clipping, EMA). They differ
only in where each batch comes from:
- `memory`: one batch of random tensors already on the device, reused (the
  baseline: training with no data path at all);
- `stream`: this worker's split of the preprocessed shards (read_webdataset, PNG
  decode, `to_training_batch` with flips, `iter_torch_batches`), exactly as
  `tasks.train` builds it: one stream covering the whole run;
- `one-pass`: the same, but a stream of one pass over the data that restarts at
  its end (what `tasks.train` did first).
The ratio stream / memory is what the data path costs training (goal on a GPU:
at least 0.97). Each case is timed after warm-up steps, the cases alternate, and
medians are reported, with the time spent waiting for a batch.

    infra/local/offline .venv/bin/python bench/train_ingest.py [--resolution 8] [--steps 60]

Prints a table and writes bench/results/train_ingest-<machine>-<resolution>px.json.

Results on this 2-core machine (2026-11-26; tiny preset, 8x8 digits, batch 64,
one worker of 1 CPU, Ray Data on the other; 60 timed steps, 2.1 passes over the
1,610 training images; medians of 3 alternating runs, one invocation):

    case       images/s  ratio  stalls  stalled   runs
    memory        604.5  1.000       0     0.0%   605, 736, 541
    stream        561.9  0.929       1     1.6%   580, 479, 562
    one-pass      461.0  0.762       2    11.7%   480, 461, 429

(stalls: waits for a batch over 50 ms.) The stream reaches 0.93 here, not the
0.97 goal; this machine has no GPU to measure the goal's case. Where the time goes:
1. Restarting the stream. When a worker's stream ends, Ray Data starts the next
   execution from scratch and training waits about 0.4 s; with one pass per
   stream that is 12% of the time on the digits (a pass is 2.7 s of training).
   `tasks.train` now builds one stream of up to 100 passes, so the wait comes
   once per run: 0.76 -> 0.93, 1.22x in the same run.
2. Two cores shared: Ray Data's reading, PNG decoding and flipping run on the
   core beside the training process, and Ray's own processes on both; waiting
   for batches is only 1.9% of the time, so most of the remaining 7% is
   contention, which a GPU node (training on the GPU, data on many CPUs) avoids.
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

    from pipeline.jobs.train.worker import _batches
    from pipeline.maths.edm import Precond
    from pipeline.maths.ema import EMA
    from pipeline.maths.train_step import step_generator, train_step
    from pipeline.maths.unet import build

    device = ray.train.torch.get_device()
    torch.manual_seed(0)
    denoiser = Precond(build(config["preset"], config["resolution"], num_classes=10))
    ema = EMA(denoiser.to(device), 50_000)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-4)
    model = ray.train.torch.prepare_model(denoiser)
    size, resolution = config["batch"], config["resolution"]
    if config["source"] in ("stream", "one-pass"):
        batches = _batches(ray.train.get_dataset_shard("train"), size, device)
    else:
        fixed = {
            "image": torch.randn(size, 3, resolution, resolution, device=device),
            "label": torch.randint(0, 10, (size,), device=device),
        }
        batches = iter(lambda: fixed, None)
    bf16 = torch.bfloat16 if device.type == "cuda" else None
    waited, seen, stalls = 0.0, 0, []
    for step in range(config["warmup"] + config["steps"]):
        if step == config["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, waited = time.perf_counter(), 0.0
        t = time.perf_counter()
        batch = next(batches)
        wait = time.perf_counter() - t
        waited += wait
        if step >= config["warmup"] and wait > 0.05:
            stalls.append(wait)
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
    metrics = {
        "images_per_second": config["steps"] * size / elapsed,
        "waiting": waited / elapsed,
        "stalls": len(stalls),
        "stalled": sum(stalls) / elapsed,
        "epochs": config["steps"] * size / config["train_images"],
    }
    # Ray Train V2 returns the metrics of the latest checkpoint only: attach one.
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def digits_dataset(folder: Path, resolution: int) -> tuple[str, dict]:
    """The digits, preprocessed at `resolution` (upscaled beyond 8)."""
    from pipeline.config import PreprocessConfig
    from pipeline.data.digits import write_digits
    from pipeline.jobs.preprocess import preprocess

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

    from pipeline.edges import cluster
    from pipeline.jobs.train.driver import training_data

    config = {
        "source": source,
        "preset": PRESETS[args.resolution],
        "batch": args.batch,
        "resolution": args.resolution,
        "steps": args.steps,
        "warmup": args.warmup,
        "train_images": manifest["counts"]["written_by_split"]["train"],
    }
    datasets = {}
    with cluster.data_settings():
        if source == "one-pass":  # restarted at the end of each pass
            datasets["train"] = training_data(dataset, manifest, True, True, passes=1)
        if source == "stream":
            images = (args.warmup + args.steps) * args.batch
            passes = -(-images // config["train_images"])
            datasets["train"] = training_data(dataset, manifest, True, True, passes)
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
        runs: dict[str, list[dict]] = {"memory": [], "stream": [], "one-pass": []}
        for _ in range(args.repeats):
            for source in runs:
                runs[source].append(run_case(source, dataset, manifest, args))
                print(f"{source}: {runs[source][-1]}", flush=True)
        ray.shutdown()

    rate = {s: statistics.median(r["images_per_second"] for r in runs[s]) for s in runs}
    waiting = statistics.median(r["waiting"] for r in runs["stream"])
    stalled = {s: statistics.median(r["stalled"] for r in runs[s]) for s in runs}
    stalls = {s: statistics.median(r["stalls"] for r in runs[s]) for s in runs}
    ratio = rate["stream"] / rate["memory"]
    epochs = runs["stream"][0]["epochs"]
    print(f"\n{epochs:.1f} passes over the data timed per run; ratio against memory; stalls:")
    print("waits for a batch over 50 ms, and their share of the time")
    print(f"{'case':<9} {'images/s':>9} {'ratio':>6} {'stalls':>7} {'stalled':>8}   runs")
    for s in runs:
        each = ", ".join(f"{r['images_per_second']:.0f}" for r in runs[s])
        print(
            f"{s:<9} {rate[s]:>9.1f} {rate[s] / rate['memory']:>6.3f} {stalls[s]:>7.0f} "
            f"{stalled[s]:>8.1%}   {each}"
        )
    print(f"ratio stream / memory: {ratio:.3f}; the stream waits for data {waiting:.1%} of it")
    result = {
        "machine": machine,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "preset": PRESETS[args.resolution],
        "resolution": args.resolution,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "train_images": manifest["counts"]["written_by_split"]["train"],
        "runs": runs,
        "median_images_per_second": rate,
        "ratio": ratio,
        "stream_waiting_share": waiting,
        "stalled_share": stalled,
    }
    out = Path(args.out, f"train_ingest-{machine}-{args.resolution}px.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
