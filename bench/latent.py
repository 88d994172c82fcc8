"""Benchmark: latent diffusion's costs, each against its baseline in the same run.

1. encode: tasks.encode's pipeline (Ray Data: decode tasks, an actor pool of
   encoders, one a core, shards written) against a bare loop of the same
   autoencoder over the same images already in memory (one process, all cores),
   images/s; the goal is a ratio of 0.9 or more. Beside it, the same-work loop:
   the actors' own calls (read and decode a shard, encode it, write it) in one
   process, which says what Ray Data itself costs. Random 64 px images at two
   sizes with the small autoencoder (the two give the pipeline's marginal rate
   and its fixed seconds a run), and likewise with SD's VAE architecture
   (AUTOENCODERS). Needs Ray (CPU machines).
2. train: the training step's cost per image at 64 px, the same UNet template
   (tiny) on pixels [3, 64, 64] and on latents [4, 8, 8] (f = 8), the latents'
   draw and normalisation included: what training on latents saves.
3. decode: the share of a latent model's generation time spent decoding: the
   sampler (DPM-Solver++(2M) SDE, 35 steps, the default when it was run) on
   8x8x4 latents, then the autoencoder's decode to 64 px.

Parts 2 and 3 use the small autoencoder (channels 16,32,32,32, f = 8; random
weights everywhere: cost does not depend on them) and import torch (and
diffusers for 3) only, so they run on a GPU machine too; part 1 is skipped
where Ray is missing. On a GPU machine (diffusers from `bench/vendor`, as
bench/gpu.py takes it): `python3 bench/latent.py --parts train decode --out "$OUT"`.

    infra/local/offline .venv/bin/python bench/latent.py [--images 1024 4096 32768]
        [--sd_images 128 512] [--parts encode train decode]

Prints a table per part and writes bench/results/latent-<device>.json.

The recorded run (bench/results/latent-cpu2.json: 2 cores, 2026-12-06, medians
of 3, 9 minutes). The pipeline's marginal rate between its two largest runs
against the bare loop (the autoencoder alone over decoded images in memory, one
process on both cores) and against the same-work loop (the actors' calls, shard
by shard, in one process). Every encoder process, the loops' included, keeps
its freed memory (pipeline.edges.host), so the comparison is like for like:
- SD's VAE architecture, 128 and 512 images: 28.5 images/s, 1.10 of the bare
  loop (25.9) and 1.08 of the same-work loop; fixed 5.4 s a run. Whole runs:
  0.53 and 0.85 of the bare loop.
- the small autoencoder, 4,096 and 32,768 images: 1,863 images/s, 1.055 of the
  bare loop (1,766) and 1.19 of the same-work loop (1,567): two one-thread
  actors, each decoding while the other encodes, against one process whose two
  threads wait for each other. Whole runs at 1,024, 4,096 and 32,768 images:
  0.11, 0.35, 0.84 of the bare loop (fixed 4.5 s: Ray Data's start, the actors
  importing diffusers).
- train, the tiny template, batch 32: 33.2 ms an image on 64 px pixels, 0.75 ms
  on 8x8x4 latents (draw and normalisation included): 44x.
- decode, 64 images: sampling 35 steps on latents 0.33 s, decoding 0.07 s: 18%
  of generation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT / "bench" / "vendor"
sys.path[:0] = [str(ROOT)]
sys.path += [str(VENDOR), *map(str, sorted(VENDOR.glob("*.whl")))]  # after the environment's

from pipeline.maths.edm import Precond  # noqa: E402
from pipeline.maths.latents import LatentStats, draw_latents  # noqa: E402
from pipeline.maths.reproducible import generate  # noqa: E402
from pipeline.maths.train_step import fused_adam, train_step  # noqa: E402
from pipeline.maths.unet import build  # noqa: E402

SIDE = 64
AUTOENCODERS = {
    # name: (block_out_channels, layers_per_block, norm_num_groups)
    "small": ((16, 32, 32, 32), 1, 16),
    "sd": ((128, 256, 512, 512), 2, 32),
}
"""The encode part's autoencoders, f = 8 and 4 latent channels both: `small`, twice
the width of the quickstart's (8,16,16,16), and `sd`, Stable Diffusion's VAE
architecture (34 M encoder parameters). Their per-image cost differs by about
100x, and so does the share of the pipeline's own work (decoding PNGs, writing
shards) in a run."""


def autoencoder(folder: Path, size: str = "small") -> str:
    from diffusers import AutoencoderKL

    channels, layers, groups = AUTOENCODERS[size]
    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
    ).save_pretrained(folder)
    return str(folder)


def write_images(root: Path, count: int) -> None:
    """`count` random 64 px RGB PNGs in ten class folders (the encoder's cost does
    not depend on what the images show, and the digits are only 1,797)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")


def bench_encode(sizes: dict[str, list[int]], repeats: int, work: Path) -> dict:
    """tasks.encode against a bare loop of Encoder over the decoded images, for each
    autoencoder of `sizes` at each of its numbers of images; from its two largest,
    the pipeline's marginal rate (its steady state) and the fixed seconds a run
    pays on top of it."""
    import ray

    from pipeline.edges import cluster

    cluster.quiet()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    # One encoder a core (each runs torch on one thread), against the bare loop's
    # one process on every core.
    actors = os.cpu_count() or 1
    result: dict = {"actors": actors, "goal": 0.9}
    for size, counts in sizes.items():
        vae = autoencoder(work / f"vae-{size}", size)
        cases = [_encode_case(n, vae, actors, repeats, work) for n in sorted(counts)]
        result[size] = {"sizes": cases}
        if len(cases) >= 2:
            small, large = cases[-2], cases[-1]
            t_small = statistics.median(small["pipeline_seconds"])
            t_large = statistics.median(large["pipeline_seconds"])
            marginal = (large["images"] - small["images"]) / (t_large - t_small)
            result[size]["steady_state"] = {
                "pipeline_images_per_s": round(marginal, 1),
                "ratio": round(marginal / large["bare_loop_images_per_s"], 3),
                "ratio_to_same_work": round(marginal / large["same_work_loop_images_per_s"], 3),
                "fixed_seconds": round(t_large - large["images"] / marginal, 1),
            }
    ray.shutdown()
    return result


def _encode_case(n: int, vae: str, actors: int, repeats: int, work: Path) -> dict:
    """One autoencoder on a pixel dataset of `n` random images: `repeats` runs of
    tasks.encode and of the bare loop, in turns."""
    from pipeline.config import PreprocessConfig
    from pipeline.config.encode import EncodeConfig
    from pipeline.data import shards
    from pipeline.data.autoencode import Encoder
    from pipeline.data.reference import read_split
    from pipeline.edges import autoencoders
    from pipeline.jobs.encode import encode
    from pipeline.jobs.encode.job import _plan
    from pipeline.jobs.encode.shard import ShardEncoder, read_shards
    from pipeline.jobs.preprocess import preprocess

    pixels = str(work / f"pixels{n}")
    if not (work / f"raw{n}").exists():
        write_images(work / f"raw{n}", n)
        preprocess(
            PreprocessConfig(
                input=str(work / f"raw{n}"),
                output=pixels,
                resolution=SIDE,
                validation_fraction=0.0,
                # An actor encodes a shard whole: 8 or more, so every actor has work.
                samples_per_shard=min(128, max(1, n // 8)),
            ),
            progress=False,
        )
    manifest, _ = shards.load_dataset(pixels, "pixels")
    data, _ = read_split(pixels, manifest, "train", n)
    assert data is not None and len(data) == n
    digest = autoencoders.identity_of(autoencoders.read_folder(vae)).digest
    config = {"autoencoder": digest, "precision": "fp32", "flips": False, "chunk": 16}
    plans = [json.dumps(_plan(e, config)) for e in manifest["shards"]]
    pipeline_s, loop_s, same_s = [], [], []
    for _ in range(repeats):  # in turns, so that a busy moment weighs on both
        start = time.perf_counter()
        out = tempfile.mkdtemp(dir=work)
        cfg = EncodeConfig(dataset=pixels, output=out, autoencoder=vae, actors=actors)
        encode(cfg, progress=False)
        pipeline_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        Encoder(vae, device="cpu")({"image": data})
        loop_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        encoder = ShardEncoder(vae, digest, tempfile.mkdtemp(dir=work), SIDE, "fp32", 16, False)
        for plan in plans:  # the actors' work, shard by shard, in this one process
            encoder(read_shards({"plan": np.array([plan], dtype=object)}, pixels, SIDE))
        same_s.append(time.perf_counter() - start)
    pipe, loop = n / statistics.median(pipeline_s), n / statistics.median(loop_s)
    same = n / statistics.median(same_s)
    return {
        "images": n,
        "shards": len(manifest["shards"]),
        "pipeline_images_per_s": round(pipe, 2),
        "bare_loop_images_per_s": round(loop, 2),
        "ratio": round(pipe / loop, 3),
        "same_work_loop_images_per_s": round(same, 2),
        "ratio_to_same_work": round(pipe / same, 3),
        "pipeline_seconds": [round(s, 2) for s in pipeline_s],
        "bare_loop_seconds": [round(s, 2) for s in loop_s],
        "same_work_loop_seconds": [round(s, 2) for s in same_s],
    }


def bench_train(device: torch.device, batch: int, iters: int) -> dict:
    """Seconds per training image, the tiny template on 64 px pixels and on
    8x8x4 latents (drawn and normalised each step, as the worker does)."""
    stats = LatentStats((0.1, -0.2, 0.3, 0.0), (1.1, 0.9, 1.0, 1.2))
    cases = {"pixels 3x64x64": (3, SIDE), "latents 4x8x8": (4, SIDE // 8)}
    nets = {}
    for name, (channels, side) in cases.items():
        torch.manual_seed(0)
        net = build("tiny", side, in_channels=channels, out_channels=channels).to(device)
        denoiser = Precond(net)
        nets[name] = (denoiser, fused_adam(denoiser.parameters(), 1e-3), channels, side)
    times: dict[str, list[float]] = {name: [] for name in cases}
    rng = np.random.default_rng(0)
    for i in range(iters + 1):
        for name, (denoiser, optimizer, channels, side) in nets.items():
            seeds = rng.integers(0, 2**62, batch)
            start = time.perf_counter()
            if channels == 3:
                x = torch.rand(batch, 3, side, side, device=device) * 2 - 1
            else:
                mean = torch.randn(batch, channels, side, side, device=device)
                std = torch.rand(batch, channels, side, side, device=device) + 0.1
                x = stats.normalise(draw_latents(mean, std, seeds))
            train_step(denoiser, optimizer, None, [(x, None)], images_seen=i * batch,
                       base_lr=1e-3, seeds=seeds)  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first is warm-up
                times[name].append((time.perf_counter() - start) / batch)
    per_image = {name: statistics.median(t) for name, t in times.items()}
    pixels, latents = per_image.values()
    return {
        "template": "tiny",
        "batch": batch,
        "steps": iters,
        "seconds_per_image": {k: round(v, 6) for k, v in per_image.items()},
        "pixels_over_latents": round(pixels / latents, 2),
    }


def bench_decode(device: torch.device, images: int, repeats: int, work: Path) -> dict:
    """The share of a latent model's generation spent in the autoencoder's decode:
    denormalised, then decoded in calls of 16 (as `data.autoencode.Decoder` does;
    here without the storage layer, so that it runs where only torch is)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(autoencoder(work / "vae-decode")).to(device).eval()
    stats = LatentStats((0.1, -0.2, 0.3, 0.0), (1.1, 0.9, 1.0, 1.2))
    torch.manual_seed(0)
    net = build("tiny", 8, in_channels=4, out_channels=4).to(device).eval()
    denoiser = Precond(net)

    def decode(x: torch.Tensor) -> torch.Tensor:
        z = stats.denormalise(x)
        with torch.no_grad():
            return torch.cat([vae.decode(z[i : i + 16]).sample for i in range(0, len(z), 16)])

    sampling_s, decoding_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(denoiser, list(range(images)), device, seed=0, labels="none",
                 sampler="dpmpp_2m_sde", steps=35, guidance=1.0, resolution=8,
                 num_classes=0, channels=4)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        sampled = time.perf_counter()
        decode(torch.randn(images, 4, 8, 8, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        sampling_s.append(sampled - start)
        decoding_s.append(time.perf_counter() - sampled)
    sample, decoded = statistics.median(sampling_s), statistics.median(decoding_s)
    return {
        "images": images,
        "sampler": "dpmpp_2m_sde:35",
        "sampling_seconds": round(sample, 3),
        "decoding_seconds": round(decoded, 3),
        "decode_share": round(decoded / (sample + decoded), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images",
        type=int,
        nargs="+",
        default=[1024, 4096, 32768],
        help="images of the encode runs with the small autoencoder (part 1); the two "
        "largest give the steady state (32,768: about 2 minutes a run on 2 cores)",
    )
    parser.add_argument(
        "--sd_images",
        type=int,
        nargs="*",
        default=[128, 512],
        help="images of the encode runs with Stable Diffusion's VAE architecture (none: "
        "skipped; 3 to 25 images/s on 2 cores); two or more give its steady state",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (medians)")
    parser.add_argument("--parts", nargs="+", default=["encode", "train", "decode"])
    parser.add_argument(
        "--out", default=None, help="folder for the JSON (default: $OUT or bench/results)"
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name().replace(" ", "-") if cuda else f"cpu{os.cpu_count()}"
    report: dict = {
        "benchmark": "latent",
        "device": name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "processor": platform.processor(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "encode" in args.parts:
            try:
                import ray  # noqa: F401
            except ImportError:
                report["encode"] = {"skipped": "no Ray on this machine"}
            else:
                sizes = {"small": args.images, "sd": args.sd_images}
                sizes = {k: v for k, v in sizes.items() if v}
                report["encode"] = bench_encode(sizes, args.repeats, work)
            print_part("encode", report["encode"])
        if "train" in args.parts:
            report["train"] = bench_train(device, 32 if not cuda else 256, 5 if not cuda else 30)
            print_part("train", report["train"])
        if "decode" in args.parts:
            report["decode"] = bench_decode(device, 64 if not cuda else 1024, args.repeats, work)
            print_part("decode", report["decode"])
    folder = Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "results")
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"latent-{name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def print_part(title: str, values: dict, indent: str = "") -> None:
    print(f"\n{indent}{title}")
    for key, value in values.items():
        if isinstance(value, dict):
            print_part(key, value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for case in value:
                print(f"{indent}  {key}: " + ", ".join(f"{k} {v}" for k, v in case.items()))
        else:
            print(f"{indent}  {key:<28}{value}")


if __name__ == "__main__":
    main()
