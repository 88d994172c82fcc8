"""Benchmark: what DDP adds to a training step with 2 workers on this machine's
CPUs, against the cost model of docs/scaling.md.

For each template, the project's training step (`train_step`: EDM loss, backward,
clipping, Adam, EMA on rank 0; the network built as `jobs/train/worker.py` builds
it) runs at a fixed per-worker batch in four cases, one thread per process:
- `1 process`: no process group;
- `2 processes`: two independent copies at once (what sharing the two cores
  costs by itself);
- `2 processes, lockstep`: the same, plus a 4-byte all-reduce after each step,
  so each step waits for the slower worker, as under DDP;
- `2 processes, DDP`: DistributedDataParallel over gloo on 127.0.0.1.
What DDP adds is the DDP step minus the lockstep one (medians of rank 0's steps,
the cases alternating over rounds). The DDP workers then time, with nothing else
running: gloo all-reduces of 4 bytes (the latency, alpha), of the gradient as
one tensor (which gives the bandwidth, beta), of the gradient in DDP's own
buckets, and DDP's own passes over the buckets (gradients in, divide, out). The
prediction is the doc's model (`predicted_overhead`) for those buckets from
alpha and beta, with nothing hidden behind backward (each process computes on
its one core, so gloo's thread takes its time from the compute instead of
running beside it), plus the bucket passes, which a GPU makes at memory speed.

    flock /tmp/ray.lock /work/shared/bin/offline .venv/bin/python bench/ddp.py
    .venv/bin/python bench/ddp.py --scale     # only the doc's tables for 8/64/512 GPUs

Prints the measured table and the doc's tables, and writes
bench/results/ddp-cpu2.json (`--scale` prints its tables only). Torch only: no Ray
(the offline namespace keeps gloo on loopback).

Results on this 2-core machine (2026-12-02, bench/results/ddp-cpu2.json; medians
of rank 0's steps in ms; tiny 2 rounds of 30 steps, small 4 rounds of 4):

    template batch grad MB buckets  1 proc  2 indep  2 lockstep   2 DDP  DDP adds  predicted
    tiny        64     1.7       2    83.3     81.5        84.5   104.8      20.3        3.1
    small        2   153.3       7  1159.5   1064.3      1094.1  1281.8     187.7      165.1

For `small` the prediction held within 14% (188 ms measured, every round 151-291;
165 predicted: 117 of all-reduce from the fitted 0.29 ms latency and 1.34 GB/s,
49 of bucket passes). For `tiny` it did not: 20 ms against 3. Both carry a fixed
~20 ms per step the model lacks (likely gloo's thread waiting for a core that the
compute holds; not measured). Waiting for the slower worker cost 3 and 30 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import queue
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.maths.architecture import NATIVE_RESOLUTION, architecture  # noqa: E402
from pipeline.maths.counter import seed63  # noqa: E402
from pipeline.maths.edm import Precond, edm_loss  # noqa: E402
from pipeline.maths.ema import EMA  # noqa: E402
from pipeline.maths.train_step import fused_adam, train_step  # noqa: E402
from pipeline.maths.unet import UNet  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CASES = ("1 process", "2 processes", "2 processes, lockstep", "2 processes, DDP")
CLASSES = 10
"""Labelled data, as the digits: the network has its label embedding."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """One template's measurement."""

    template: str
    batch: int
    """Images per worker per step."""
    steps: int
    """Timed steps, after `warmup` untimed ones."""
    warmup: int
    repeats: int
    """Timed repeats of each all-reduce alone."""
    rounds: int = 2
    """Rounds of the four cases, one after another."""

    @property
    def resolution(self) -> int:
        return NATIVE_RESOLUTION[self.template]


DEFAULT_SPECS = (Spec("tiny", 64, 30, 5, 30, rounds=2), Spec("small", 2, 4, 2, 8, rounds=4))
"""About 5 minutes together here: tiny at 8 px (0.43M parameters), small at 32 px (38M),
whose steps vary by 20% from round to round here (other work on the 2 cores)."""


# --- the cost model (the doc's) ---------------------------------------------------------


def ring_allreduce_s(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Seconds for a ring all-reduce of `nbytes` over `n` workers: 2(n-1) steps, each
    paying `latency`, moving 2(n-1)/n * nbytes over each worker's link of `bandwidth`
    bytes/s (one direction)."""
    if n == 1:
        return 0.0
    return 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / bandwidth


def predicted_overhead(
    buckets: list[float], n: int, bandwidth: float, latency: float, hideable_s: float
) -> float:
    """Step time DDP adds: its bucket all-reduces run one after another while the
    backward pass goes on, so up to `hideable_s` of them is hidden, but never the
    last bucket's (the first layers' gradients, ready only when backward ends)."""
    times = [ring_allreduce_s(b, n, bandwidth, latency) for b in buckets]
    return times[-1] + max(0.0, sum(times[:-1]) - hideable_s)


def ddp_buckets(grad_bytes: int, first: int = 1 << 20, cap: int = 25 << 20) -> list[float]:
    """DDP's default bucket sizes over `grad_bytes`, in the order they are reduced:
    1 MiB first, then 25 MiB ones (DDP closes a bucket once a whole parameter takes
    it past the cap, so real ones are a little larger; this keeps the total)."""
    sizes = [float(min(first, grad_bytes))]
    rest = grad_bytes - sizes[0]
    while rest > 0:
        sizes.append(float(min(cap, rest)))
        rest -= sizes[-1]
    return sizes


# --- one worker process ------------------------------------------------------------------


def worker(rank: int, world: int, case: str, spec: Spec, port: int, out: Any, start: Any) -> None:
    """Time `spec.steps` training steps of `case` (and, with DDP, the all-reduces alone);
    rank 0 puts its figures on `out`."""
    torch.set_num_threads(1)
    ddp, lockstep = case.endswith("DDP"), case.endswith("lockstep")
    if ddp or lockstep:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    torch.manual_seed(0)  # the same network on every worker, as jobs/train/worker.py
    net = UNet(architecture(spec.template, spec.resolution, num_classes=CLASSES))
    denoiser = Precond(net)
    optimizer = fused_adam(denoiser.parameters(), 1e-4)
    ema = EMA(denoiser, 500_000) if rank == 0 else None
    model: torch.nn.Module = DistributedDataParallel(denoiser) if ddp else denoiser
    data = torch.Generator().manual_seed(rank)
    side = spec.resolution
    x = torch.rand(spec.batch, 3, side, side, generator=data) * 2 - 1
    label = torch.randint(CLASSES, (spec.batch,), generator=data)

    times, images_seen = [], 0
    for step in range(spec.warmup + spec.steps):
        if step == spec.warmup:
            start.wait()  # independent processes time the same stretch of the machine
        began = time.perf_counter()
        train_step(
            denoiser=model,
            optimizer=optimizer,
            ema=ema,
            batches=[(x, label)],
            images_seen=images_seen,
            base_lr=1e-4,
            seeds=seed63(0, np.arange(spec.batch) + images_seen + rank * spec.batch),
            dropout_seed=images_seen + rank,
            ema_model=denoiser,
        )
        if lockstep:
            dist.all_reduce(torch.zeros(1))  # wait for the other worker, as DDP does
        times.append(time.perf_counter() - began)
        images_seen += spec.batch * world
    result: dict[str, Any] = {"step_times": times[spec.warmup :]}
    if ddp:
        assert isinstance(model, DistributedDataParallel)
        logged = model._get_ddp_logging_data()
        sizes = logged.get("rebuilt_bucket_sizes") or logged["bucket_sizes"]
        result |= allreduce_alone([int(s) for s in str(sizes).split(",")], spec.repeats)
    if ddp or lockstep:
        dist.destroy_process_group()
    if rank == 0:
        out.put(result)


def allreduce_alone(buckets: list[int], repeats: int) -> dict[str, Any]:
    """Median seconds of gloo all-reduces with no compute beside them: 4 bytes, all
    of `buckets` as one tensor, and `buckets` one after another (as DDP sends them);
    and of DDP's own passes over each bucket (gradients in, divide by the world
    size, gradients out), which a CPU pays on its one core."""
    tensors = [torch.ones(b // 4) for b in buckets]
    grads = [torch.ones(b // 4) for b in buckets]
    flat = torch.ones(sum(buckets) // 4)

    def copies() -> None:
        for bucket, grad in zip(tensors, grads, strict=True):
            bucket.copy_(grad).div_(dist.get_world_size())
            grad.copy_(bucket)

    def timed(fn: Any, times: int) -> float:
        fn()  # warm-up: connections, allocation
        samples = []
        for _ in range(times):
            dist.barrier()
            began = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - began)
        return statistics.median(samples)

    return {
        "bucket_bytes": buckets,
        "allreduce_4_bytes_s": timed(lambda: dist.all_reduce(torch.ones(1)), 50),
        "allreduce_flat_s": timed(lambda: dist.all_reduce(flat), repeats),
        "allreduce_buckets_s": timed(lambda: [dist.all_reduce(t) for t in tensors], repeats),
        "bucket_copies_s": timed(copies, repeats),
    }


def run_case(spec: Spec, case: str, port: int) -> dict[str, Any]:
    """Start the case's processes (spawned: a fresh interpreter each) and collect rank 0's
    figures; a worker that dies is an error, not a hang."""
    context = mp.get_context("spawn")
    world = 1 if case == "1 process" else 2
    out, start = context.Queue(), context.Barrier(world)
    procs = [
        context.Process(target=worker, args=(r, world, case, spec, port, out, start))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    while True:
        try:
            result = out.get(timeout=5)
            break
        except queue.Empty:
            if any(p.exitcode for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError(f"{spec.template}, {case}: a worker died") from None
    for p in procs:
        p.join()
    return dict(result)


def measure(spec: Spec, port: int) -> dict[str, Any]:
    """The four cases of one template, alternating for `spec.rounds` rounds (so a slow
    stretch of the machine hits every case), and the model's prediction for DDP."""
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    for _ in range(spec.rounds):
        for i, case in enumerate(CASES):
            runs[case].append(run_case(spec, case, port + i))
    step = {c: statistics.median(t for r in runs[c] for t in r["step_times"]) for c in CASES}
    ddp = runs["2 processes, DDP"]
    alone = {
        key: statistics.median(r[f"{key}_s"] for r in ddp)
        for key in ("allreduce_4_bytes", "allreduce_flat", "allreduce_buckets", "bucket_copies")
    }
    buckets = ddp[-1]["bucket_bytes"]
    alpha = alone["allreduce_4_bytes"]
    beta = sum(buckets) / max(alone["allreduce_flat"] - alpha, 1e-9)  # n = 2: 2(n-1)/n = 1
    lockstep = step["2 processes, lockstep"] - step["2 processes"]
    overhead = step["2 processes, DDP"] - step["2 processes, lockstep"]
    allreduce = predicted_overhead(buckets, 2, beta, alpha / 2, hideable_s=0.0)
    predicted = allreduce + alone["bucket_copies"]
    return {
        "template": spec.template,
        "resolution": spec.resolution,
        "batch_per_worker": spec.batch,
        "steps_per_case": spec.steps * spec.rounds,
        "parameters": sum(p.numel() for p in _network(spec.template).parameters()),
        "gradient_bytes": sum(buckets),
        "step_s": step,
        "step_s_by_round": {
            c: [statistics.median(r["step_times"]) for r in runs[c]] for c in CASES
        },
        "lockstep_cost_s": lockstep,
        "ddp_overhead_s": overhead,
        "ddp_overhead_share": overhead / step["2 processes, lockstep"],
        "alone_s": alone,
        "bucket_bytes": buckets,
        "fitted": {"latency_s": alpha, "bandwidth_bytes_per_s": beta},
        "predicted_allreduce_s": allreduce,
        "predicted_overhead_s": predicted,
        "measured_over_predicted": overhead / predicted,
    }


def _network(template: str, resolution: int | None = None) -> UNet:
    return UNet(architecture(template, resolution, num_classes=CLASSES))


# --- the doc's tables: 8, 64 and 512 GPUs -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Link:
    """What a ring all-reduce runs over (assumptions: see docs/scaling.md)."""

    name: str
    bandwidth: float
    """Bytes/s into each ring step's slowest hop: NVLink per GPU and direction in a
    node; across nodes, the node's NICs together (NCCL runs one ring per NIC)."""
    latency: float
    """Seconds per ring step."""


NVLINK = Link("NVLink", 450e9, 2e-6)  # H100/H200 SXM: 900 GB/s both directions
INFINIBAND = Link("InfiniBand", 400e9, 5e-6)  # 8 x 400 Gb/s NDR (or EFA 3,200 Gb/s) a node
ETHERNET = Link("Ethernet", 12.5e9, 20e-6)  # one 100 Gb/s NIC a node
SCALES = ((8, NVLINK), (64, INFINIBAND), (512, INFINIBAND), (64, ETHERNET), (512, ETHERNET))

PEAK_BF16 = 989e12
"""H100/H200 SXM dense bf16 peak, FLOP/s (NVIDIA's datasheets: 1,979 with sparsity)."""
ANCHOR_RATE = 5377 * 37.32e9
"""FLOP/s reached in training, from the issue's H200 figure (diffusers' UNet at batch
512, bf16 + compile: 5,377 img/s) times the 37.32 GFLOP per training image counted for
that network in bench/results/model-cpu2.json: 20.3% of PEAK_BF16."""
GOAL_RATE = 0.45 * PEAK_BF16
"""The issue's training goal, 45% MFU (taken of the datasheet peak: shorter steps,
so communication shows more)."""
GPU_TEMPLATES = ("small", "base", "base64")
"""The templates meant for GPUs (tiny is the CPU tests' and the digits')."""
BACKWARD_SHARE = 2 / 3
"""Backward's share of a training step's FLOPs (2x the forward's)."""


def train_flop_per_image(template: str) -> float:
    """FLOP of the EDM loss's forward and backward for one image at the template's
    resolution, counted with attention through the math SDPA backend (as bench/model.py)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    denoiser = Precond(_network(template))
    side = NATIVE_RESOLUTION[template]
    x, label = torch.zeros(1, 3, side, side), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        edm_loss(denoiser, x, label).sum().backward()
    return counter.get_total_flops()


def scale_rows() -> list[dict[str, Any]]:
    """Per template and scale: all-reduce time, and what DDP adds at the anchor rate
    and the goal rate, for per-GPU batches of 512 and 64 (fp32 gradients, DDP's
    default buckets)."""
    rows = []
    for template in GPU_TEMPLATES:
        params = sum(p.numel() for p in _network(template).parameters())
        flop = train_flop_per_image(template)
        buckets = ddp_buckets(4 * params)
        for n, link in SCALES:
            row: dict[str, Any] = {
                "template": template,
                "parameters": params,
                "train_gflop_per_image": flop / 1e9,
                "gpus": n,
                "link": link.name,
                "allreduce_s": sum(
                    ring_allreduce_s(b, n, link.bandwidth, link.latency) for b in buckets
                ),
                "allreduce_latency_s": len(buckets) * ring_allreduce_s(0, n, 1.0, link.latency),
            }
            for rate_name, rate in (("anchor", ANCHOR_RATE), ("goal", GOAL_RATE)):
                for batch in (512, 64):
                    row[f"compute_s_{rate_name}_b{batch}"] = batch * flop / rate
                    row[f"overhead_{rate_name}_b{batch}"] = added_share(
                        buckets, n, link, flop / rate, batch
                    )
                # The smallest per-GPU batch (a power of 2) at which DDP adds <= 10%.
                row[f"batch_for_10pct_{rate_name}"] = next(
                    (
                        b
                        for b in (2**k for k in range(17))
                        if added_share(buckets, n, link, flop / rate, b) <= 0.10
                    ),
                    None,
                )
            rows.append(row)
    return rows


def added_share(buckets: list[float], n: int, link: Link, image_s: float, batch: int) -> float:
    """What DDP adds to a step of `batch` images of `image_s` compute each, as a share
    of the compute (backward, 2/3 of it, hides the all-reduces)."""
    compute = batch * image_s
    hideable = BACKWARD_SHARE * compute
    return predicted_overhead(buckets, n, link.bandwidth, link.latency, hideable) / compute


def print_scale(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'template':8} {'params':>7} {'GFLOP/img':>9} {'GPUs':>5} {'link':10} "
        f"{'all-reduce ms':>13} {'of it latency':>13} "
        f"{'step ms b512':>12} {'DDP adds b512':>13} {'step ms b64':>11} {'DDP adds b64':>13} "
        f"{'batch for 10%':>13}"
    )
    for r in rows:
        print(
            f"{r['template']:8} {r['parameters'] / 1e6:6.2f}M {r['train_gflop_per_image']:9.2f} "
            f"{r['gpus']:5d} {r['link']:10} {1e3 * r['allreduce_s']:13.2f} "
            f"{1e3 * r['allreduce_latency_s']:13.2f} "
            f"{1e3 * r['compute_s_anchor_b512']:12.1f} "
            f"{r['overhead_anchor_b512']:6.1%}/{r['overhead_goal_b512']:<6.1%} "
            f"{1e3 * r['compute_s_anchor_b64']:11.1f} "
            f"{r['overhead_anchor_b64']:6.1%}/{r['overhead_goal_b64']:<6.1%} "
            f"{r['batch_for_10pct_anchor']!s:>6}/{r['batch_for_10pct_goal']!s:<6}"
        )
    print(
        "(step ms: compute at the anchor rate; DDP adds: share of the compute step, at the "
        "anchor / the goal rate; batch for 10%: smallest per-GPU batch at which DDP adds <= 10%)"
    )


# --- main ---------------------------------------------------------------------------------


def print_measured(rows: list[dict[str, Any]]) -> None:
    """Step medians per case, then what lockstep and DDP add, against the model."""
    short = ("1 proc", "2 indep", "2 lockstep", "2 DDP")
    print(
        f"{'template':8} {'batch':>5} {'grad MB':>7} {'buckets':>7} "
        + " ".join(f"{c + ' ms':>13}" for c in short)
        + f" {'lockstep +ms':>12} {'DDP +ms':>8} {'all-reduce ms':>13} {'copies ms':>9} "
        f"{'predicted ms':>12} {'DDP/predicted':>13}"
    )
    for r in rows:
        steps = " ".join(f"{1e3 * r['step_s'][c]:13.1f}" for c in CASES)
        print(
            f"{r['template']:8} {r['batch_per_worker']:5d} {r['gradient_bytes'] / 1e6:7.1f} "
            f"{len(r['bucket_bytes']):7d} {steps} {1e3 * r['lockstep_cost_s']:12.1f} "
            f"{1e3 * r['ddp_overhead_s']:8.1f} {1e3 * r['alone_s']['allreduce_buckets']:13.1f} "
            f"{1e3 * r['alone_s']['bucket_copies']:9.1f} {1e3 * r['predicted_overhead_s']:12.1f} "
            f"{r['measured_over_predicted']:13.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--templates", nargs="+", default=[s.template for s in DEFAULT_SPECS])
    parser.add_argument("--steps", type=int, help="timed steps per case and round")
    parser.add_argument("--rounds", type=int, help="rounds of the four cases (default: 2)")
    parser.add_argument("--port", type=int, default=29517, help="first of 4 gloo ports")
    parser.add_argument("--scale", action="store_true", help="only print the doc's tables")
    parser.add_argument("--output", type=Path, default=RESULTS / "ddp-cpu2.json")
    args = parser.parse_args()
    if args.scale:
        print_scale(scale_rows())
        return
    specs = {s.template: s for s in DEFAULT_SPECS}
    measured = []
    for template in args.templates:
        spec = specs.get(template) or Spec(template, 2, 4, 1, 4)
        if args.steps:
            spec = dataclasses.replace(spec, steps=args.steps)
        if args.rounds:
            spec = dataclasses.replace(spec, rounds=args.rounds)
        measured.append(measure(spec, args.port))
        print_measured(measured[-1:])
    print()
    print_measured(measured)
    print()
    scale = scale_rows()
    print_scale(scale)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "ddp",
        "machine": "cpu2",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads_per_process": 1,
        "measured": measured,
        "scale": scale,
    }
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
