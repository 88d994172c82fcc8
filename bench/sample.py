"""Benchmark: images/s of the whole sampling job against the bare sampler loop,
and against diffusers' DDIM and DDPM pipelines on a UNet of the same size at the
same number of network evaluations, in one run.

- `bare loop`: our sampler over batches of the same model, images kept in memory
  as uint8 tensors: no PNG, no shards, no Ray (the baseline; goal for the job:
  at least 0.9 of it);
- `job`: `pipeline.jobs.generate.sample` end to end with one actor into a local
  folder: model load, the actor, fixed-shape network calls, PNG encoding, tars,
  records, manifest (Ray itself is started before the clock); `job, running`:
  the same without its fixed costs (the time of a one-batch job subtracted);
- `diffusers DDIM` / `DDPM`: `DDIMPipeline` and `DDPMPipeline` with a
  `UNet2DModel` of about the same parameter count, `num_inference_steps` equal
  to our sampler's network evaluations, `output_type="np"`;
- `guided, one call` / `two calls`: the bare loop with classifier-free guidance
  (`--guidance`), each evaluation one network call over the batch twice (with
  and without labels, as the pipeline does) or two calls (the usual way), at
  the same batch; their ratio is `guidance_speedup`, and again at more batch
  sizes (`--guided_batches`, `guidance_speedup_by_batch`).
Everything runs on one thread on CPU (one actor holds one CPU), or the GPU.

    infra/local/offline .venv/bin/python bench/sample.py [--images 2048] [--steps 20]

Prints a table and writes bench/results/sample-<machine>.json. Needs the `bench`
extra (diffusers).

Results on this 2-core machine (2026-12-01, one run, bench/results/sample-cpu2.json;
tiny template 0.43M parameters against a UNet2DModel of the same layout, 0.40M;
2048 8x8 images, DPM-Solver++(2M) 20 steps = 20 evaluations, batch 64, one
thread, guidance 2):

    case                images/s  vs bare loop
    bare loop              129.8         1.000
    guided, one call        65.7         0.506
    guided, two calls       65.0         0.501
    job                     95.7         0.737
    diffusers DDIM         139.5         1.075
    diffusers DDPM         139.2         1.073
    job, running           136.7         1.053

    guided, by batch size   one call  two calls  speed-up
        1                        9.9        8.0      1.23
        4                       27.5       15.0      1.83
       16                       45.2       35.5      1.27
       64                       55.3       67.7      0.82   (1.01 in the rows above)

The whole job of 2,048 images reaches 0.74 of the bare loop (6.9 s of fixed
costs: Ray Data's start, the actor and its model load, the MLflow run, listing
the output); once running it keeps up with it (1.05: this machine's noise).

Guidance in one batched call is not faster than two calls at batch 64 on a CPU
(1.01, and 0.82 in the repeat): both do the same arithmetic, and at 64 rows a
call is compute-bound. Batching saves only the fixed cost of a call (about 3 ms
of Python and kernel launches for this network, one thread): with o that cost
and r the work of a row, the speed-up is 2(o + b r) / (o + 2 b r) for batch b,
near 2 only where o dominates (1.8x at batch 4 here, 1.3x at 16). That is the
regime of small batches on GPUs, where each kernel launch costs as much as the
work; no GPU was lent to measure it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def our_model(device):
    from pipeline.maths.edm import Precond
    from pipeline.maths.unet import build

    torch.manual_seed(0)
    return Precond(build("tiny", num_classes=10, dropout=0.0)).to(device).eval()


class TwoCalls:
    """The denoiser with classifier-free guidance done the usual way: one network
    call with the labels and one without (the baseline of `guidance_speedup`)."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def __call__(self, x, sigma, label=None):
        return self.denoiser(x, sigma, label)

    def guided(self, x, sigma, label, guidance):
        cond, uncond = self.denoiser(x, sigma, label), self.denoiser(x, sigma, None)
        return uncond + guidance * (cond - uncond)


def bare_loop(
    args, device, images: int, batch: int, guidance: float = 1.0, two_calls: bool = False
) -> float:
    """Seconds for `images` images with the sampler alone, `batch` at a time; with
    guidance, in one batched network call per step, or in two (`two_calls`)."""
    from pipeline.maths.reproducible import generate

    denoiser = our_model(device)
    if two_calls:
        denoiser = TwoCalls(denoiser)
    job = dict(
        seed=0,
        labels="uniform",
        steps=args.steps,
        sampler=args.sampler,
        guidance=guidance,
        resolution=8,
        num_classes=10,
    )
    generate(denoiser, list(range(batch)), device, **job)  # warm-up
    start = time.perf_counter()
    for first in range(0, images, batch):
        indices = list(range(first, min(first + batch, images)))
        generate(denoiser, indices, device, **job)
    return time.perf_counter() - start


def guided_speedups(args, device) -> dict[int, dict[str, float]]:
    """Per batch size: images/s of guided sampling in one batched call per step and
    in two calls, and their ratio (fewer images for small batches)."""
    out = {}
    for batch in sorted({*args.guided_batches, args.batch}):
        images = min(args.images, 64 * batch)
        one = images / bare_loop(args, device, images, batch, args.guidance)
        two = images / bare_loop(args, device, images, batch, args.guidance, two_calls=True)
        out[batch] = {"images": images, "one_call": one, "two_calls": two, "speedup": one / two}
    return out


def job(args, device, tmp: Path, images: int) -> float:
    """Seconds for the whole job of `images` images (Ray already started)."""
    from safetensors.torch import save

    from pipeline.config import SampleConfig
    from pipeline.config.records import CheckpointState, DatasetRef
    from pipeline.edges import checkpoint
    from pipeline.jobs.generate import sample

    tmp = tmp / str(images)
    folder = tmp / "checkpoint"
    folder.mkdir(parents=True)
    net = our_model("cpu").net
    (folder / checkpoint.EMA_WEIGHTS).write_bytes(save(net.state_dict()))
    state = CheckpointState(
        images_seen=0,
        step=0,
        run_id=None,
        model=net.cfg,
        config={"model": {"template": "tiny"}},
        dataset=DatasetRef("(none)", "0" * 64, 0),
        seed=0,
    )
    (folder / checkpoint.STATE).write_text(json.dumps(state.to_dict()))
    cfg = SampleConfig(
        model=str(folder),
        output=str(tmp / "out"),
        images=images,
        samples_per_shard=max(args.batch, args.images // 8),
        sampler=args.sampler,
        steps=args.steps,
        batch_size=args.batch,
        network_batch=args.batch,
        actors=1,
        tracking_uri=f"sqlite:///{tmp}/mlflow.db",
    )
    start = time.perf_counter()
    sample(cfg)
    return time.perf_counter() - start


def diffusers_unet(device):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    # The `tiny` preset's layout: 24 and 48 channels, one block per level, attention
    # (one 48-channel head) at 4x4: 0.40M parameters against our 0.43M.
    return (
        UNet2DModel(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(24, 48),
            norm_num_groups=8,
            attention_head_dim=48,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )
        .to(device)
        .eval()
    )


def diffusers_pipeline(kind: str, args, device, nfe: int) -> float:
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    unet = diffusers_unet(device)
    if kind == "DDIM":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=args.batch, num_inference_steps=nfe, output_type="np")  # warm-up
    start = time.perf_counter()
    for first in range(0, args.images, args.batch):
        n = min(args.batch, args.images - first)
        pipe(batch_size=n, num_inference_steps=nfe, output_type="np")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048, help="images per case")
    parser.add_argument("--batch", type=int, default=64, help="images per batch")
    parser.add_argument("--sampler", default="dpmpp_2m", help="our sampler")
    parser.add_argument("--steps", type=int, default=20, help="our sampler's steps")
    parser.add_argument("--guidance", type=float, default=2.0, help="guidance of the guided cases")
    parser.add_argument(
        "--guided_batches",
        type=int,
        nargs="+",
        default=[1, 4, 16],
        help="more batch sizes of the guided comparison",
    )
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(RESULTS),
        help="folder for the JSON (default: $OUT if set, else bench/results)",
    )
    args = parser.parse_args()

    import ray

    from pipeline.maths.solvers import network_evaluations
    from pipeline.maths.unet import build

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    machine = (
        torch.cuda.get_device_name().split()[-1].lower()
        if device.type == "cuda"
        else (f"cpu{os.cpu_count()}")
    )
    nfe = network_evaluations(args.sampler, args.steps)
    params = {
        "ours (tiny)": sum(p.numel() for p in build("tiny", num_classes=10).parameters()),
        "diffusers UNet2DModel": sum(p.numel() for p in diffusers_unet("cpu").parameters()),
    }
    seconds = {"bare loop": bare_loop(args, device, args.images, args.batch)}
    # Classifier-free guidance at the same batch: one batched call against two.
    seconds["guided, one call"] = bare_loop(args, device, args.images, args.batch, args.guidance)
    seconds["guided, two calls"] = bare_loop(
        args, device, args.images, args.batch, args.guidance, two_calls=True
    )
    by_batch = guided_speedups(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        start_up = job(args, device, Path(tmp), args.batch)  # one batch: the fixed costs
        seconds["job"] = job(args, device, Path(tmp), args.images)
        ray.shutdown()
    for kind in ("DDIM", "DDPM"):
        seconds[f"diffusers {kind}"] = diffusers_pipeline(kind, args, device, nfe)

    rate = {k: args.images / s for k, s in seconds.items()}
    # The job's rate once running: its extra time over a one-batch job.
    rate["job, running"] = (args.images - args.batch) / (seconds["job"] - start_up)
    print(
        f"\n{args.images} images, {args.sampler} {args.steps} steps = {nfe} network "
        f"evaluations each, batch {args.batch}, {device}; parameters: {params}"
    )
    print(f"{'case':<18} {'images/s':>9} {'vs bare loop':>13}")
    for k in rate:
        print(f"{k:<18} {rate[k]:>9.1f} {rate[k] / rate['bare loop']:>13.3f}")
    speedup = rate["guided, one call"] / rate["guided, two calls"]
    print(f"\nguidance {args.guidance:g}, images/s by batch size:")
    print(f"{'batch':>5} {'one call':>9} {'two calls':>10} {'speed-up':>9}")
    for batch, row in by_batch.items():
        print(
            f"{batch:>5} {row['one_call']:>9.1f} {row['two_calls']:>10.1f} {row['speedup']:>9.2f}"
        )
    print(f"at batch {args.batch}, one batched call is {speedup:.2f}x two calls")
    result = {
        "machine": machine,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "images": args.images,
        "batch": args.batch,
        "sampler": args.sampler,
        "steps": args.steps,
        "nfe": nfe,
        "parameters": params,
        "seconds": seconds,
        "job_start_up_seconds": start_up,
        "images_per_second": rate,
        "ratios_to_bare_loop": {k: rate[k] / rate["bare loop"] for k in rate},
        "guidance": args.guidance,
        "guidance_speedup": speedup,
        "guidance_speedup_by_batch": by_batch,
    }
    out = Path(args.out, f"sample-{machine}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
