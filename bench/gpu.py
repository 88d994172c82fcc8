"""Benchmark for one GPU, torch only: the whole training step and the guided
sampling forward of the `small` and `base` UNets, with model FLOP utilisation.

On the GPU machine, from the repository root, one call (within 8 minutes on an
H100/H200; with `bench/vendor` carried, diffusers' rows run beside ours):

    PYTHONUNBUFFERED=1 python3 bench/gpu.py --out "$OUT"

Here, tiny sizes and no CUDA, to prove the script runs end to end (1-2 minutes on
these 2 cores, most of it tracing diffusers):

    python bench/gpu.py --device cpu --smoke

In order, each row printed and `gpu-<device>.json` rewritten as it finishes, so a
run cut short keeps what it measured:
1. Correctness: the solvers against the exact Gaussian denoiser; one training
   step in bf16, eager and compiled (channels_last), against fp32 eager; the
   guided call compiled, and replayed from CUDA graphs, against eager. A failed
   check is printed and makes the exit status 1; the timings still run.
2. A bf16 matmul's FLOP/s, measured on the spot: the peak that MFU divides by.
3. Training: `train_step` as the trainer calls it (EDM loss, backward, clipping,
   fused Adam, EMA, no host synchronisation) in bf16 autocast, channels_last,
   torch.compile, at batches 512 and 128.
4. Sampling: one guided call (classifier-free guidance, 2B rows in one network
   call), eager or compiled, each with and without a CUDA graph.
Cases run in order of priority, each timed for a few seconds; one that no
longer fits in `--budget-s` is skipped, and the reason recorded.

Latent diffusion's GPU cases (the training step on 8x8x4 latents against 64 px
pixels, and the share of generation spent decoding) are bench/latent.py's:
`python3 bench/latent.py --parts train decode --out "$OUT"` in the same call.

diffusers' UNet2DModel (DDPM's CIFAR-10 layout, mapped from each template) runs
in the same Precond and the same step as ours, when it imports: from the
environment, else from `bench/vendor`, which takes wheels (`pip download
--no-deps diffusers==0.42.1 -d bench/vendor`: 6 MB, pure Python, imported as a
zip; the GPU machine has its dependencies) or a `pip install --target` folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "bench" / "vendor"
sys.path.insert(0, str(ROOT))
sys.path += [str(VENDOR), *map(str, sorted(VENDOR.glob("*.whl")))]  # after the environment's

from model import check_samplers, flop_per_image, matmul_peak, sync  # noqa: E402

from pipeline.maths.architecture import UNetConfig, architecture, norm_groups  # noqa: E402
from pipeline.maths.counter import seed63  # noqa: E402
from pipeline.maths.edm import Precond  # noqa: E402
from pipeline.maths.ema import EMA  # noqa: E402
from pipeline.maths.solvers import guided  # noqa: E402
from pipeline.maths.train_step import fused_adam, train_step  # noqa: E402
from pipeline.maths.unet import UNet  # noqa: E402

NUM_CLASSES = 10
"""Class-conditional networks (CIFAR-10's classes), so the guided forward is real."""
GUIDANCE = 2.0


class Plan:
    """What a run measures, in order of priority: GPU sizes, or tiny ones (`--smoke`)."""

    def __init__(self, smoke: bool):
        big = "tiny" if smoke else "small"
        self.check_template, self.check_batch = big, 4 if smoke else 64
        self.cases: list[tuple[str, str, int]] = (
            [("train", "tiny", 4), ("sample", "tiny", 4)]
            if smoke
            else [  # (what, template, images): the anchor first (diffusers, batch
                # 512); smaller batches, where launches show, last
                ("train", "small", 512),
                ("sample", "small", 1024),
                ("train", "base", 512),
                ("sample", "base", 1024),
                ("train", "small", 128),
                ("train", "base", 128),
            ]
        )
        self.peak_n = 512 if smoke else 8192
        self.case_s = 1.0 if smoke else 5.0
        """Seconds of timed calls per case, after its first two."""
        self.compile_s = 10.0 if smoke else 60.0
        """Least budget left to start a case that compiles."""


# --- the networks: ours and diffusers', both as F(x, c_noise, label) ----------------------


class DiffusersNet(nn.Module):
    """diffusers' UNet2DModel behind our network's signature, so that Precond and
    `train_step` drive it exactly as they drive ours. Its layout is the template's
    (levels, widths, blocks, attention levels) in diffusers' blocks: for `small`,
    google/ddpm-cifar10-32's network, plus a class embedding."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        from diffusers import UNet2DModel

        levels = range(cfg.levels)
        self.null = cfg.num_classes
        self.unet = UNet2DModel(
            sample_size=cfg.resolution,
            block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult),
            layers_per_block=cfg.blocks,
            down_block_types=tuple(
                "AttnDownBlock2D" if i in cfg.attention else "DownBlock2D" for i in levels
            ),
            up_block_types=tuple(
                "AttnUpBlock2D" if i in cfg.attention else "UpBlock2D" for i in reversed(levels)
            ),
            attention_head_dim=None,  # DDPM's: one head
            norm_num_groups=norm_groups(cfg.channels),
            dropout=cfg.dropout,
            norm_eps=1e-6,
            flip_sin_to_cos=False,
            freq_shift=1,
            downsample_padding=0,
            num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None,
        )

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.null:
            null = torch.full_like(c_noise, self.null, dtype=torch.long)
            label = null if label is None else torch.where(label < 0, null, label)
        return self.unet(x, c_noise, class_labels=label, return_dict=False)[0]


def diffusers_importable() -> str | None:
    """None if diffusers imports, else why not."""
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        return f"diffusers cannot be imported ({e}): its rows are skipped"
    return None


def denoiser(make: Callable[[UNetConfig], nn.Module], cfg: UNetConfig, device) -> Precond:
    """The network in Precond on `device`, channels_last, its zero-initialised
    layers given small weights so that every output and gradient is non-trivial."""
    torch.manual_seed(0)
    net = Precond(make(cfg))
    for p in net.parameters():
        if not p.detach().abs().sum():
            nn.init.normal_(p, std=0.02)
    return net.to(device, memory_format=torch.channels_last)


# --- timing ------------------------------------------------------------------------------------


def seconds_per_call(fn: Callable[[], Any], device, budget_s: float) -> dict[str, float]:
    """Two calls (compiling, tuning, building kernels), one more to size the rounds,
    then rounds of about 0.5 s, synchronised at their ends only (as a loop with no
    host sync runs), 3 to 15 within `budget_s`: the median round's time per call."""
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    calls = max(1, int(0.5 / (time.perf_counter() - start)))
    rounds: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(rounds) < 3 or (time.perf_counter() < deadline and len(rounds) < 15):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        rounds.append((time.perf_counter() - start) / calls)
    return {"s_per_call": sorted(rounds)[len(rounds) // 2], "first_call_s": first, "calls": calls}


def compiled(fn, backend: str | None):
    """`fn` compiled for fixed shapes, or `fn` itself when `backend` is None."""
    if backend is None:
        return fn
    torch._dynamo.reset()  # a fresh cache per case: earlier cases' graphs do not count
    return torch.compile(fn, backend=backend, dynamic=False)


def cuda_graph(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn`, a fixed-shape call on fixed input tensors, captured once into a CUDA
    graph; the function returned replays it (and returns the same output tensor)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile, cuDNN's search) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def free(device) -> None:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the two calls measured --------------------------------------------------------------------


class TrainCase:
    """`train_step` as the trainer calls it, on fixed data, repeatable: fused Adam,
    an EMA, clipping at 1, a step generator per step, no host synchronisation."""

    def __init__(self, net: Precond, resolution: int, batch: int, device, backend: str | None):
        self.net, self.device = net, device
        self.model = compiled(net, backend)
        self.optimizer: torch.optim.Optimizer = fused_adam(net.parameters(), lr=1e-4)
        self.ema = EMA(net)
        torch.manual_seed(1)
        x = torch.randn(batch, 3, resolution, resolution, device=device)
        self.x = x.to(memory_format=torch.channels_last)
        self.label = torch.randint(NUM_CLASSES, (batch,), device=device)
        self.images_seen = 10_000_000  # past the ramp-ups: the steady state

    def __call__(self, autocast_dtype: torch.dtype | None = torch.bfloat16) -> Any:
        result = train_step(
            denoiser=self.model,
            optimizer=self.optimizer,
            ema=self.ema,
            batches=[(self.x, self.label)],
            images_seen=self.images_seen,
            base_lr=1e-4,
            # Per-image seeds from the images' positions, as tasks.train draws them.
            seeds=seed63(0, np.arange(self.images_seen, self.images_seen + len(self.x))),
            dropout_seed=self.images_seen,
            autocast_dtype=autocast_dtype,
            ema_model=self.net,
        )
        self.images_seen += len(self.x)
        return result


def guided_call(net: Precond, resolution: int, batch: int, device, backend: str | None):
    """One classifier-free-guided call on fixed inputs: B images, 2B network rows
    in one batch, bf16 autocast, no autograd."""
    torch.manual_seed(2)
    x = torch.randn(batch, 3, resolution, resolution, device=device) * 10
    x = x.to(memory_format=torch.channels_last)
    sigma = torch.full((batch,), 10.0, device=device)
    label = torch.randint(NUM_CLASSES, (batch,), device=device)

    def call(x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        # No cast cache: it would hold tensors made during a CUDA graph's capture
        # (each weight is cast once per call either way).
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            return guided(net, x, sigma, label, GUIDANCE)

    fn = compiled(call, backend)

    @torch.no_grad()
    def run() -> torch.Tensor:
        return fn(x, sigma, label)

    return run


# --- correctness -------------------------------------------------------------------------------


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_network(plan: Plan, device, backend: str) -> dict[str, float]:
    """Errors relative to the eager references (dropout off: compiled code draws
    other random numbers than eager)."""
    cfg = architecture(plan.check_template, num_classes=NUM_CLASSES, dropout=0.0)
    net = denoiser(UNet, cfg, device)
    out = check_train_step(net.train(), cfg.resolution, plan.check_batch, device, backend)
    out |= check_guided_call(net.eval(), cfg.resolution, plan.check_batch, device, backend)
    free(device)
    return out


def check_train_step(net: Precond, resolution: int, batch: int, device, backend: str) -> dict:
    """One training step's loss and update in bf16, eager and compiled, against fp32
    eager; with plain SGD, so that the update is the (clipped) gradient itself."""
    steps = {}
    for name, autocast, compile_with in (
        ("fp32_eager", None, None),
        ("bf16_eager", torch.bfloat16, None),
        ("bf16_compiled", torch.bfloat16, backend),
    ):
        copied = copy.deepcopy(net)
        step = TrainCase(copied, resolution, batch, device, compile_with)
        step.optimizer = torch.optim.SGD(copied.parameters(), lr=1.0)
        before = torch.cat([p.detach().flatten() for p in copied.parameters()])
        loss = float(step(autocast).loss)
        steps[name] = loss, torch.cat([p.detach().flatten() for p in copied.parameters()]) - before
    loss, update = steps["fp32_eager"]
    out = {}
    for name in ("bf16_eager", "bf16_compiled"):
        out[f"train_{name}_loss_error"] = abs(steps[name][0] / loss - 1)
        out[f"train_{name}_update_error"] = relative_error(steps[name][1], update)
    return out


def check_guided_call(net: Precond, resolution: int, batch: int, device, backend: str) -> dict:
    """The guided call compiled, and replayed from CUDA graphs, against eager."""
    reference = guided_call(net, resolution, batch, device, None)()
    fast = guided_call(net, resolution, batch, device, backend)
    out = {"guided_compiled_error": relative_error(fast(), reference)}
    if device.type == "cuda":
        eager = guided_call(net, resolution, batch, device, None)
        out["guided_cuda_graph_error"] = relative_error(cuda_graph(eager)(), reference)
        out["guided_compiled_cuda_graph_error"] = relative_error(cuda_graph(fast)(), reference)
    return out


LIMITS = {
    "train_bf16_eager_loss_error": 0.02,
    "train_bf16_eager_update_error": 0.15,
    "train_bf16_compiled_loss_error": 0.02,
    "train_bf16_compiled_update_error": 0.15,
    "guided_compiled_error": 0.03,
    "guided_cuda_graph_error": 0.01,  # the same kernels, replayed
    "guided_compiled_cuda_graph_error": 0.03,
}
"""Largest relative error each check passes with. bf16 rounds to 2^-8 relative,
and compiled code rounds at other places than eager (fused ops keep float32)."""


# --- the run -----------------------------------------------------------------------------------


class Run:
    """The run's settings, its budget, its JSON (rewritten after every row, so a run
    cut short keeps what it measured) and its failed checks."""

    def __init__(self, plan: Plan, device, backend: str, folder: Path, name: str, budget_s: float):
        self.plan, self.device, self.backend = plan, device, backend
        self.path = folder / f"gpu-{name}.json"
        self.deadline = time.perf_counter() + budget_s
        self.peak = float("nan")
        self.failed: list[str] = []
        self.data: dict[str, Any] = {
            "benchmark": "gpu",
            "device": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "processor": platform.processor(),
            "compile_backend": backend,
            "tf32": {
                "matmul": torch.backends.cuda.matmul.allow_tf32,
                "cudnn": torch.backends.cudnn.allow_tf32,
            },
            "checks": {},
            "train": [],
            "sample": [],
            "skipped": [],
        }

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")

    def fits(self, case: str, compiles: bool) -> bool:
        """Whether `case` can still start; if not, it is recorded as skipped."""
        need = self.plan.compile_s if compiles else 3 * self.plan.case_s
        if self.deadline - time.perf_counter() >= need:
            return True
        self.skip(case, f"out of budget (needs {need:.0f} s)")
        return False

    def skip(self, case: str, why: str) -> None:
        self.data["skipped"].append(f"{case}: {why}"[:500])
        self.save()
        print(f"{case}: skipped, {why[:300]}", flush=True)

    def row(self, kind: str, title: str, *parts: dict[str, Any]) -> None:
        row = {k: v for part in parts for k, v in part.items()}
        self.data[kind].append(row)
        self.save()
        rate = row.get("images_per_s") or row["evaluations_per_s"]
        unit = "img/s" if kind == "train" else "evaluations/s"
        print(
            f"{kind} {title}: {rate:,.1f} {unit}, {row['mfu']:.1%} MFU "
            f"(first call {row['first_call_s']:.1f} s)",
            flush=True,
        )


def check(run: Run) -> None:
    """The correctness checks, recorded; failures printed and kept for the exit."""
    checks = run.data["checks"]
    try:
        checks.update(check_samplers(run.device))
    except AssertionError as e:
        run.failed.append(f"solvers: {e}")
    try:
        checks.update(check_network(run.plan, run.device, run.backend))
    except Exception as e:  # a check that cannot run is a failed one; the timings still run
        run.failed.append(f"network checks: {type(e).__name__}: {e}")
    run.failed += [
        f"{name} {checks[name]:.3g} > {limit}"
        for name, limit in LIMITS.items()
        if name in checks and not checks[name] <= limit
    ]
    run.data["failed_checks"] = run.failed
    run.save()
    print("correctness: " + ", ".join(f"{k} {v:.2g}" for k, v in checks.items()), flush=True)
    for failure in run.failed:
        print(f"CHECK FAILED: {failure}", flush=True)


def measure_train(run: Run, model: str, make, template: str, batch: int) -> None:
    cfg = architecture(template, num_classes=NUM_CLASSES)
    net = denoiser(make, cfg, run.device).train()
    counted = TrainCase(copy.deepcopy(net), cfg.resolution, 2, run.device, None)
    flop = flop_per_image(lambda: counted(None), 2)
    timed = seconds_per_call(
        TrainCase(net, cfg.resolution, batch, run.device, run.backend), run.device, run.plan.case_s
    )
    rate = batch / timed["s_per_call"]
    run.row(
        "train",
        f"{model} {template}, batch {batch}",
        dict(model=model, template=template, batch=batch, mode="bf16+channels_last+compile"),
        dict(parameters=sum(p.numel() for p in net.parameters()), images_per_s=rate),
        dict(gflop_per_image=flop / 1e9, mfu=rate * flop / run.peak, **timed),
    )


SAMPLE_MODES = ("eager", "eager+cuda_graph", "compiled", "compiled+cuda_graph")


def measure_sample(run: Run, model: str, make, template: str, images: int) -> None:
    cfg = architecture(template, num_classes=NUM_CLASSES)
    net = denoiser(make, cfg, run.device).eval()
    # FLOP per network evaluation: a guided call of 2 images runs 4 rows.
    flop = flop_per_image(guided_call(net, cfg.resolution, 2, run.device, None), 4)
    calls = {}  # one compilation serves both compiled modes
    for mode in SAMPLE_MODES:
        case = f"sample {model} {template} {mode}"
        if "graph" in mode and run.device.type != "cuda":
            run.skip(case, "CUDA graphs need CUDA")
            continue
        compiles = mode.startswith("compiled")
        if not run.fits(case, compiles=compiles and not calls.get(compiles)):
            continue
        if compiles not in calls:
            backend = run.backend if compiles else None
            calls[compiles] = guided_call(net, cfg.resolution, images, run.device, backend)
        call = cuda_graph(calls[compiles]) if "graph" in mode else calls[compiles]
        timed = seconds_per_call(call, run.device, run.plan.case_s)
        rate = 2 * images / timed["s_per_call"]
        run.row(
            "sample",
            f"{model} {template}, {images} images, {mode}",
            dict(model=model, template=template, mode=mode, images=images),
            dict(evaluations_per_s=rate, gflop_per_evaluation=flop / 1e9),
            dict(mfu=rate * flop / run.peak, **timed),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: proves the script runs")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=360,
        help="seconds for the checks and cases; a case starts only if it fits (default 360)",
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="torch.compile backend (default inductor; aot_eager with --smoke on a CPU, "
        "where inductor's C++ builds take minutes)",
    )
    parser.add_argument("--no-diffusers", action="store_true", help="our network only")
    parser.add_argument(
        "--out", default=None, help="folder for the JSON (default: $OUT if set, else bench/results)"
    )
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # TF32 stays at PyTorch's defaults, recorded
    name = torch.cuda.get_device_name(device) if cuda else f"cpu{torch.get_num_threads()}"
    name = name.replace(" ", "-") + ("-smoke" if args.smoke else "")
    folder = Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "results")
    folder.mkdir(parents=True, exist_ok=True)
    backend = args.backend or ("aot_eager" if args.smoke and not cuda else "inductor")
    plan = Plan(args.smoke)
    run = Run(plan, device, backend, folder, name, args.budget_s)
    print(f"{name}, torch {torch.__version__}, torch.compile backend {backend}", flush=True)

    check(run)
    run.peak = run.data["bf16_matmul_peak_flop_per_s"] = matmul_peak(device, n=plan.peak_n)
    print(f"measured bf16 matmul peak: {run.peak / 1e12:.3g} TFLOP/s", flush=True)
    makers: dict[str, Callable[[UNetConfig], nn.Module]] = {"ours": UNet}
    why_not = "--no-diffusers given" if args.no_diffusers else diffusers_importable()
    if why_not:
        run.skip("diffusers", why_not)
    else:
        makers["diffusers"] = DiffusersNet
    for what, template, images in plan.cases:
        for model, make in makers.items():
            case = f"{what} {model} {template} {images}"
            if not run.fits(case, compiles=True):
                continue
            try:
                (measure_train if what == "train" else measure_sample)(
                    run, model, make, template, images
                )
            except Exception as e:  # one failed case (out of memory, say) must not end the run
                run.skip(case, f"{type(e).__name__}: {e}")
            free(device)
    print(f"wrote {run.path}")
    if run.failed:
        sys.exit(f"{len(run.failed)} correctness check(s) failed: {'; '.join(run.failed)}")


if __name__ == "__main__":
    main()
