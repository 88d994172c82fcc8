"""Benchmark: what generation's gate costs against generation alone, in one run.

The actors' own work (`ShardSampler.shard`, one process, no Ray), on the 8 px
digits with a tiny class-conditional model trained briefly here (300 steps, as
tests/test_gate.py trains it), the default sampler (dpmpp_2m_sde, 35 steps):

1. generation alone (no gate);
2. with the copy check (each image's nearest training image among the 1,400
   train digits, and Carlini's ratio) and the judge's confidence: nothing rejected;
3. 2 plus the label filter at --min_label_confidence 0.7 and 0.9: rejected
   images drawn again, so the cost also counts the draws.

First, the copy ratios behind the default --max_copy_ratio (0.2): real digits
that are not copies, and exact, mirrored and shifted copies. Last, the copy
lookup alone, against indexes of random training features of 8 px
(192 values) and 64 px (768, the features' 16 px) images of 1k to 1M images:
the search's cost per generated image as the training set grows.

    .venv/bin/python bench/gate.py [--images 256] [--repeats 3]

Prints a table and writes bench/results/gate-<device>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
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
sys.path[:0] = [str(ROOT)]

from pipeline.config.evaluate import REFERENCE_IMAGES  # noqa: E402
from pipeline.config.records import GenerationJob, Lineage, ModelCard  # noqa: E402
from pipeline.data import reference, shards  # noqa: E402
from pipeline.data.digits import load_digits  # noqa: E402
from pipeline.data.transforms import encode_png  # noqa: E402
from pipeline.edges import storage  # noqa: E402
from pipeline.jobs.generate import gate as gates  # noqa: E402
from pipeline.jobs.generate.sampler import ShardSampler  # noqa: E402
from pipeline.maths import copies  # noqa: E402
from pipeline.maths.classifier import input_side  # noqa: E402
from pipeline.maths.counter import seed63  # noqa: E402
from pipeline.maths.edm import Precond  # noqa: E402
from pipeline.maths.ema import EMA  # noqa: E402
from pipeline.maths.train_step import train_step  # noqa: E402
from pipeline.maths.unet import build  # noqa: E402


def digits_dataset(folder: str) -> tuple[dict, str, np.ndarray, np.ndarray]:
    """The digits as a dataset (train 1,400 in one shard): manifest, digest, and the
    train images and labels."""
    from PIL import Image

    images, labels = load_digits()
    rgb = np.repeat(images[..., None], 3, axis=-1)
    train = np.random.default_rng(0).permutation(len(rgb))[:1400]
    members = []
    for i, k in enumerate(train):
        members += [
            (f"train{i:05d}.png", encode_png(Image.fromarray(rgb[k]))),
            (f"train{i:05d}.cls", str(int(labels[k])).encode()),
        ]
    data = shards.write_tar(members)
    name = shards.shard_name("train", 0)
    storage.write_bytes(storage.join(folder, name), data)
    entry = {"name": name, "split": "train", "samples": 1400, "sha256": shards.sha256(data)}
    manifest = {
        "format": shards.FORMAT,
        "resolution": 8,
        "classes": [str(c) for c in range(10)],
        "shards": [entry],
    }
    storage.write_bytes(storage.join(folder, shards.MANIFEST), shards.dumps(manifest))
    return manifest, shards.sha256(shards.dumps(manifest)), rgb[train], labels[train]


def trained(images: np.ndarray, labels: np.ndarray | None, steps: int = 300) -> torch.nn.Module:
    """A tiny UNet trained on uint8 gray-as-RGB `images` (with `labels`: class-
    conditional) for `steps` batches of 64, as tests/test_learns.py trains it: its
    EMA, a `Precond`. tests/test_gate.py trains its models with it too."""
    x = torch.tensor(images[..., 0], dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 127.5 - 1
    y = None if labels is None else torch.tensor(labels)
    torch.manual_seed(0)
    denoiser = Precond(build("tiny", num_classes=0 if y is None else 10))
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=2e-3)
    ema = EMA(denoiser, halflife_images=5_000)
    pick = torch.Generator().manual_seed(1)
    for step in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=pick)
        train_step(
            denoiser, optimizer, ema, [(x[batch], None if y is None else y[batch])],
            images_seen=64 * step, base_lr=2e-3, lr_rampup_images=10_000,
            seeds=seed63(0, np.arange(64 * step, 64 * (step + 1))),
        )  # fmt: skip
    return ema.module.eval()


def bench_generation(images: int, repeats: int, work: Path) -> dict:
    from safetensors.torch import save

    folder = str(work / "digits")
    manifest, digest, train_images, train_labels = digits_dataset(folder)
    net = trained(train_images, train_labels).net
    weights = save({k: v.contiguous() for k, v in net.state_dict().items()})
    card = ModelCard("tiny", net.cfg, 8, classes=tuple(str(c) for c in range(10)))
    gate = gates.Gate(
        folder, digest, reference.copy_index_uri(folder, digest),
        reference.judge_uri(folder, manifest, digest, REFERENCE_IMAGES), 10, input_side(8),
        0.2, False, 0.0, 64,
    )  # fmt: skip
    gates.prepare(gate, manifest, REFERENCE_IMAGES)
    cases = {
        "generation alone": None,
        "+ copy check and judge": gate,
        "+ label filter 0.7": dataclasses.replace(gate, min_label_confidence=0.7),
        "+ label filter 0.9": dataclasses.replace(gate, min_label_confidence=0.9),
    }
    job = GenerationJob(
        model=Lineage("tiny", 1, "r", hashlib.sha256(weights).hexdigest()),
        images=images, samples_per_shard=images, sampler="dpmpp_2m_sde", steps=35,
        guidance=1.0, labels="uniform", seed=0, network_batch=16, template="tiny",
        checks=None,
    )  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    drawn: dict[str, int] = {}
    for _ in range(repeats):  # in turns, so that a busy moment weighs on all
        for name, g in cases.items():
            sampler = ShardSampler(card, weights, job, tempfile.mkdtemp(dir=work), 64, gate=g)
            start = time.perf_counter()
            record = sampler.shard(0)
            seconds[name].append(time.perf_counter() - start)
            drawn[name] = record.tally["drawn"]
    alone = statistics.median(seconds["generation alone"])
    return {
        "images": images,
        "sampler": "dpmpp_2m_sde:35",
        "train_images": 1400,
        "cases": [
            {
                "case": name,
                "seconds": round(statistics.median(s), 3),
                "ms_per_kept_image": round(1000 * statistics.median(s) / images, 3),
                "drawn": drawn[name],
                "ratio_to_generation": round(statistics.median(s) / alone, 3),
                "all_seconds": [round(x, 3) for x in s],
            }
            for name, s in seconds.items()
        ],
    }


def bench_threshold() -> dict:
    """Where the default --max_copy_ratio comes from: the copy ratios of real digits
    that are not copies (each of the 1,797 against the other nine tenths), of exact,
    mirrored and shifted copies (the first 200 train digits against the 1,400)."""
    images, _ = load_digits()
    rgb = np.repeat(images[..., None], 3, axis=-1)
    folds = np.arange(len(rgb)) % 10
    real = np.zeros(len(rgb))
    for k in range(10):
        index = copies.features(rgb[folds != k])
        real[folds == k] = copies.nearest(rgb[folds == k], index).ratio
    train = rgb[np.random.default_rng(0).permutation(len(rgb))[:1400]]
    index = copies.features(train)
    up = train.repeat(8, 1).repeat(8, 2)  # 64 px
    up_index = copies.features(up)

    def found(generated: np.ndarray, index: np.ndarray) -> dict:
        f = copies.nearest(generated, index)
        return {
            "median_ratio": round(float(np.median(f.ratio)), 4),
            "max_ratio": round(float(f.ratio.max()), 4),
            "flagged_at_0.2": round(float(np.mean(f.ratio < 0.2)), 4),
            "nearest_is_the_source": round(float(np.mean(f.index == np.arange(200))), 4),
        }

    return {
        "real_digits": {
            "count": len(real),
            "quantiles": {
                str(q): round(float(np.quantile(real, q)), 4) for q in (0, 0.001, 0.01, 0.05, 0.5)
            },
            "below_0.2": float(np.mean(real < 0.2)),
        },
        "exact_copies_8px": found(train[:200], index),
        "mirrored_copies_8px": found(train[:200, :, ::-1], index),
        "shifted_1px_8px": found(np.roll(train[:200], 1, axis=2), index),
        "shifted_2px_64px": found(np.roll(up[:200], 2, axis=2), up_index),
        "shifted_4px_64px": found(np.roll(up[:200], 4, axis=2), up_index),
    }


def bench_lookup(sizes: list[int], queries: int, repeats: int) -> list[dict]:
    """The copy search alone: ms per generated image against an index of `size`
    random training features."""
    rng = np.random.default_rng(0)
    out = []
    for side, dims in [(8, 8 * 8 * 3), (64, 16 * 16 * 3)]:
        generated = rng.integers(0, 256, (queries, side, side, 3), dtype=np.uint8)
        for size in sizes:
            index = rng.uniform(-1, 1, (size, dims)).astype(np.float32)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for lo in range(0, queries, gates.COPY_BATCH):
                    copies.nearest(generated[lo : lo + gates.COPY_BATCH], index)
                times.append(time.perf_counter() - start)
            out.append({
                "image_side": side, "features": dims, "index_images": size,
                "index_mib": round(size * dims * 2 / 2**20, 1),  # float16, as kept
                "ms_per_image": round(1000 * statistics.median(times) / queries, 3),
            })  # fmt: skip
            print(f"  lookup {side:>2} px, index {size:>9,}: {out[-1]['ms_per_image']} ms/image")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images generated per case")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (medians)")
    parser.add_argument(
        "--index_sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000],
        help="training images of the lookup-alone cases",
    )  # fmt: skip
    parser.add_argument(
        "--out", default=None, help="folder for the JSON (default: $OUT or bench/results)"
    )
    args = parser.parse_args()
    name = f"cpu{os.cpu_count()}"
    report: dict = {
        "benchmark": "gate",
        "device": name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "processor": platform.processor(),
    }
    report["threshold"] = bench_threshold()
    print("copy ratios (the default --max_copy_ratio is 0.2):")
    for case, values in report["threshold"].items():
        print(f"  {case:<22}{values}")
    with tempfile.TemporaryDirectory() as tmp:
        report["generation"] = bench_generation(args.images, args.repeats, Path(tmp))
    print(f"\n{args.images} images, dpmpp_2m_sde:35, tiny model on the 8 px digits")
    print(f"{'case':<26}{'s':>8}{'ms/image':>10}{'drawn':>7}{'x alone':>9}")
    for c in report["generation"]["cases"]:
        print(f"{c['case']:<26}{c['seconds']:>8}{c['ms_per_kept_image']:>10}"
              f"{c['drawn']:>7}{c['ratio_to_generation']:>9}")  # fmt: skip
    print("\ncopy lookup alone (random features)")
    report["lookup"] = bench_lookup(args.index_sizes, 256, args.repeats)
    folder = Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "results")
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"gate-{name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
