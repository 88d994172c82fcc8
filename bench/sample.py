"""Benchmark: images/s of the whole sampling job against the bare sampler loop,
and against diffusers' DDIM and DDPM pipelines on a UNet of the same size at the
same number of network evaluations, in one run.

- `bare loop`: our sampler over batches of the same model, images kept in memory
  as uint8 tensors: no PNG, no shards, no Ray (the baseline; goal for the job:
  at least 0.9 of it);
- `job`: `pipeline.jobs.generate.job.sample` end to end with one actor into a local
  folder: model load, the MLflow run (a new sqlite store), the actor, fixed-shape
  network calls, PNG encoding, tars, records, manifest. Each job runs on a Ray
  started for it before the clock, as `tasks.sample` starts a local one (the
  actor then takes a worker process Ray started with it); `job, second on a
  Ray`: the same job again on that Ray, its actor starting a new process, as a
  job's does on a long-lived cluster; `job, running`: the job without its fixed
  costs (the time of a one-batch job subtracted);
- the crossover: the job at more image counts (`--job_images`), each against
  the bare loop's rate, and the smallest count at which it reaches 0.9 of it
  (`crossover_images`; `crossover_images_fitted` from a line through the times);
- `diffusers DDIM` / `DDPM`: `DDIMPipeline` and `DDPMPipeline` with a
  `UNet2DModel` of about the same parameter count, `num_inference_steps` equal
  to our sampler's network evaluations, `output_type="np"`;
- `guided, one call` / `two calls`: the bare loop with classifier-free guidance
  (`--guidance`), each evaluation one network call over the batch twice (with
  and without labels, as the pipeline does) or two calls (the usual way), at
  the same batch; their ratio is `guidance_speedup`, and at more batch sizes
  (`--guided_batches`, `guidance_speedup_by_batch`).
Everything runs on one thread on CPU (one actor holds one CPU), or the GPU.

    infra/local/offline .venv/bin/python bench/sample.py [--images 2048] [--steps 20]
        [--job_images 256 512 1024 4096]

Prints a table and writes bench/results/sample-<machine>.json. Needs the `bench`
extra (diffusers).

Results on this 2-core machine (2026-12-06, one whole run of 4m2s on the final
code of issue 26, bench/results/sample-cpu2.json; tiny template 0.43M parameters
against a UNet2DModel of the same layout, 0.40M; 2048 8x8 images,
DPM-Solver++(2M) 20 steps = 20 evaluations, batch 64, one thread, guidance 2,
shards of 256):

    case                    images/s  vs bare loop
    bare loop                  240.1         1.000
    guided, one call           126.9         0.528
    guided, two calls          123.9         0.516
    job, second on a Ray       198.6         0.827
    job                        191.7         0.798
    diffusers DDIM             251.2         1.046
    diffusers DDPM             253.6         1.056
    job, running               265.2         1.104

    guided, by batch size   one call  two calls  speed-up
        1                       20.5       18.0      1.14
        4                       58.7       37.4      1.57
       16                      106.9       80.7      1.33
       64                      126.9      123.9      1.02

    job, by images   seconds  vs bare loop
       256              3.18         0.335
       512              4.54         0.470
      1024              6.39         0.668
      2048             10.68         0.798
      4096             20.00         0.853

The whole job of 2,048 images is at 0.80 of the bare loop (goal 0.9), 0.85 at
4,096; no count measured reaches 0.9 (`crossover_images`: null; a line through
them: 7,317). The one-batch job took 3.2 s. The default sampler, now
DPM-Solver++(2M) SDE at 25 evaluations, made 177.8 images/s and the 1000-step
Euler ancestral sampler 4.48: speedup_vs_1000_steps 39.7. (The run before, at 35
evaluations, 4m10s: the job at 0.78 and 0.89, the speed-up 27.6; the run of
2026-12-02, on a slower hour: 0.68 and 0.76, the speed-up 31.4.)
Profiled then on its own (a second job of 512 images on one Ray), the
first shard started 4.3 s after the call (5.3-6.1 s before): the MLflow run
(1.3-1.9 s, most of it creating the sqlite store) is opened on a thread
while the actor starts, and the actor no longer imports MLflow (1.2 s less).
What is left is the actor's own start: a Ray worker process and Ray Data (2.4 s),
torch and the model (1.6 s). With fixed costs F and the running rate at the bare
loop's R, the job reaches 0.9 of it at 9 R F images.

Preloading torch and Ray Data in Ray's idle workers (`preload_python_modules`)
was tried and left out: it cuts the actor's constructor from 1.4-1.8 s to
0.15-0.2 s, but only the first job's actor takes a worker Ray prestarted; a later
job's actor gets a new process (Ray's log: idle workers of the same job stay
unused), which then imports torch before the constructor instead of in it, while
the idle workers (~280 MB more RSS each) import it too on the same two cores:
second jobs of 512 images took 10.4 and 9.8 s with it, 7.9 and 7.3 s without.

`--speedup_only` (2026-12-02, bench/results/sample_speedup-cpu2.json; 512 and 64
images, batch 64, one thread, the machine shared with a test run): the default
sampler, DPM-Solver++(2M) SDE at 35 evaluations, 41.9 images/s; the 1000-step
Euler ancestral sampler 1.33 images/s: speedup_vs_1000_steps 31.4 (28.6 from
the evaluation counts alone; the ancestral sampler also draws each image's
noise at every one of its 1000 steps).

Guidance in one batched call is not faster than two calls at batch 64 on a CPU
(1.02 here, 1.07, 0.95, 1.01 and 0.82 before): both do the same arithmetic,
and at 64 rows a call is compute-bound. Batching saves only the fixed cost of a call (about 3 ms
of Python and kernel launches for this network, one thread): with o that cost
and r the work of a row, the speed-up is 2(o + b r) / (o + 2 b r) for batch b,
near 2 only where o dominates (1.57x at batch 4 in the last run, 1.33x at 16). That is the
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

import numpy as np
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


def speedup_vs_1000_steps(args, device) -> dict[str, float | str | int]:
    """images/s of `tasks.sample`'s default sampler against the 1000-step Euler
    ancestral sampler, each in the bare loop at the same batch (the 1000-step one
    on `--reference_images` images: its rate does not depend on the count)."""
    from pipeline.config.sample import SampleConfig
    from pipeline.maths.solvers import network_evaluations

    default = argparse.Namespace(sampler=SampleConfig.sampler, steps=SampleConfig.steps)
    reference = argparse.Namespace(sampler="euler_ancestral", steps=1000)
    default_rate = args.images / bare_loop(default, device, args.images, args.batch)
    count = args.reference_images
    reference_rate = count / bare_loop(reference, device, count, args.batch)
    return {
        "default": f"{default.sampler}:{default.steps}",
        "default_nfe": network_evaluations(default.sampler, default.steps),
        "default_images_per_second": default_rate,
        "reference": "euler_ancestral:1000",
        "reference_images_per_second": reference_rate,
        "speedup_vs_1000_steps": default_rate / reference_rate,
    }


def guided_speedups(args, device) -> dict[int, dict[str, float]]:
    """Per batch size: images/s of guided sampling in one batched call per step and
    in two calls, and their ratio (fewer images for small batches)."""
    out = {}
    for batch in sorted(set(args.guided_batches) - {args.batch}):
        images = min(args.images, 64 * batch)
        one = images / bare_loop(args, device, images, batch, args.guidance)
        two = images / bare_loop(args, device, images, batch, args.guidance, two_calls=True)
        out[batch] = {"images": images, "one_call": one, "two_calls": two, "speedup": one / two}
    return out


def job(args, tmp: Path, images: int) -> float:
    """Seconds for the whole job of `images` images (Ray already started)."""
    from safetensors.torch import save

    from pipeline.config import SampleConfig
    from pipeline.config.records import CheckpointState, DatasetRef
    from pipeline.edges import checkpoint
    from pipeline.jobs.generate.job import sample

    tmp = Path(tempfile.mkdtemp(prefix=f"{images}-", dir=tmp))
    folder = tmp / "checkpoint"
    folder.mkdir()
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
        samples_per_shard=args.samples_per_shard,
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


def jobs_on_a_fresh_ray(args, tmp: Path, counts: list[int]) -> tuple[dict[int, float], float]:
    """Seconds of the job of each of `counts` images, each on a Ray started for it
    before the clock; and of the job of `args.images` again on the same Ray."""
    import ray

    seconds, second = {}, float("nan")
    for images in counts:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        try:
            seconds[images] = job(args, tmp, images)
            if images == args.images:
                second = job(args, tmp, images)
        finally:
            ray.shutdown()
    return seconds, second


def crossover(counts: dict[int, float], bare_rate: float, goal: float = 0.9) -> tuple:
    """The smallest of the counts whose job reaches `goal` of the bare loop's rate,
    and where a line through (images, seconds) reaches it (None where it never does)."""
    reached = [n for n in sorted(counts) if n / counts[n] >= goal * bare_rate]
    n, t = zip(*sorted(counts.items()), strict=True)
    per_image, fixed = np.polyfit(n, t, 1)  # t = fixed + n * per_image
    # n / (fixed + n * per_image) = goal * bare_rate, solved for n
    room = 1 / (goal * bare_rate) - per_image
    return (reached[0] if reached else None), (fixed / room if room > 0 else None)


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
    parser.add_argument(
        "--samples_per_shard", type=int, default=256, help="images per shard of the job"
    )
    parser.add_argument(
        "--job_images",
        type=int,
        nargs="+",
        default=[256, 512, 1024, 4096],
        help="more image counts of the job, for the crossover (with --images)",
    )
    parser.add_argument(
        "--reference_images",
        type=int,
        default=128,
        help="images of the 1000-step sampler in speedup_vs_1000_steps",
    )
    parser.add_argument(
        "--speedup_only",
        action="store_true",
        help="only speedup_vs_1000_steps (to sample_speedup-<machine>.json)",
    )
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
    vs_1000 = speedup_vs_1000_steps(args, device)
    print(
        f"{vs_1000['default']} ({vs_1000['default_nfe']} NFE) "
        f"{vs_1000['default_images_per_second']:.1f} images/s, euler_ancestral:1000 "
        f"{vs_1000['reference_images_per_second']:.2f} images/s: speedup_vs_1000_steps "
        f"{vs_1000['speedup_vs_1000_steps']:.1f}"
    )
    if args.speedup_only:
        out = Path(args.out, f"sample_speedup-{machine}.json")
        out.write_text(json.dumps({"machine": machine, "batch": args.batch, **vs_1000}, indent=1))
        print(f"wrote {out}")
        return
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
    by_batch[args.batch] = {
        "images": args.images,
        "one_call": args.images / seconds["guided, one call"],
        "two_calls": args.images / seconds["guided, two calls"],
        "speedup": seconds["guided, two calls"] / seconds["guided, one call"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        # One batch first: the fixed costs, and this process's first imports.
        counts = sorted({args.batch, *args.job_images, args.images})
        jobs, seconds["job, second on a Ray"] = jobs_on_a_fresh_ray(args, Path(tmp), counts)
    start_up = jobs.pop(args.batch)
    seconds["job"] = jobs[args.images]
    for kind in ("DDIM", "DDPM"):
        seconds[f"diffusers {kind}"] = diffusers_pipeline(kind, args, device, nfe)

    rate = {k: args.images / s for k, s in seconds.items()}
    # The job's rate once running: its extra time over a one-batch job.
    rate["job, running"] = (args.images - args.batch) / (seconds["job"] - start_up)
    bare = rate["bare loop"]
    by_count = {n: {"seconds": t, "ratio_to_bare_loop": n / t / bare} for n, t in jobs.items()}
    reached, fitted = crossover(jobs, bare)
    print(
        f"\n{args.images} images, {args.sampler} {args.steps} steps = {nfe} network "
        f"evaluations each, batch {args.batch}, {device}; parameters: {params}"
    )
    print(f"{'case':<22} {'images/s':>9} {'vs bare loop':>13}")
    for k in rate:
        print(f"{k:<22} {rate[k]:>9.1f} {rate[k] / rate['bare loop']:>13.3f}")
    guided = rate["guided, one call"] / rate["guided, two calls"]
    print(f"\nguidance {args.guidance:g}, images/s by batch size:")
    print(f"{'batch':>5} {'one call':>9} {'two calls':>10} {'speed-up':>9}")
    for batch, row in by_batch.items():
        print(
            f"{batch:>5} {row['one_call']:>9.1f} {row['two_calls']:>10.1f} {row['speedup']:>9.2f}"
        )
    print(f"at batch {args.batch}, one batched call is {guided:.2f}x two calls")
    print(f"\njob (one-batch job: {start_up:.2f} s), by images:")
    print(f"{'images':>6} {'seconds':>8} {'vs bare loop':>13}")
    for n, row in by_count.items():
        print(f"{n:>6} {row['seconds']:>8.2f} {row['ratio_to_bare_loop']:>13.3f}")
    line = "never" if fitted is None else f"{fitted:.0f}"
    print(f"0.9 of the bare loop from {reached} of these counts (a line through them: {line})")
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
        "samples_per_shard": args.samples_per_shard,
        "job_by_images": by_count,
        "crossover_images": reached,
        "crossover_images_fitted": fitted,
        "images_per_second": rate,
        "ratios_to_bare_loop": {k: rate[k] / rate["bare loop"] for k in rate},
        "guidance": args.guidance,
        "guidance_speedup": guided,
        "guidance_speedup_by_batch": by_batch,
        **vs_1000,
    }
    out = Path(args.out, f"sample-{machine}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
