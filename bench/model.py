"""Benchmark: the `small` UNet against diffusers' DDPM CIFAR-10 UNet, training and
forward images/s at the same batch size, with FLOP per image and the ratio.

One script for both machines; it imports torch (and diffusers, for the baseline)
only. On CUDA it runs fp32, bf16 autocast, and bf16 with torch.compile and
channels_last, at the batch sizes of the issue's reference numbers, and reports
model FLOP utilisation (MFU) against a bf16 matmul peak it measures. Before
timing it checks correctness on the device: the samplers against the exact
Gaussian denoiser, and the network in bf16 and compiled against fp32 eager.

    python bench/model.py                         # CPU: fp32, both layouts, batch 8
    python bench/model.py --out "$OUT"            # CUDA: the reference cases
    python bench/model.py --modes bf16 --batch 256
    python bench/model.py --modes fp32+compile+channels_last   # CPU, ~6 min of builds

The two networks' calls take turns (`interleaved`), so that a machine shared with
other work weighs on both alike; the JSON's `ratios` are ours/diffusers per mode,
and `best_train` each network in its fastest mode. On a CPU each row also says
where the training step's time goes (`train_time_shares`, from torch.profiler):
what limits the ratio. Rows are printed, and the JSON (`model-<device>.json`)
rewritten, as each one finishes, so a run cut short keeps what it measured.

Latest run on this machine (2 cores, torch 2.13 CPU, fp32, batch 8, images/s,
7 steps each in turns, medians; 2026-12-02):

    mode                 ours train  diffusers train  ratio   forward ratio
    fp32                    3.8          4.1           0.94      0.99
    fp32+channels_last      4.0          3.9           1.02      1.01
    best mode each          4.0          4.1           0.97
    fp32+compile+cl         3.3          3.5           0.94      (not run)

The compiled row is two runs, one per network (a script beside this one, not
--modes): torch.compile (inductor, C++) is slower than eager for both on a CPU
(diffusers contiguous: 3.3); the convolutions stay oneDNN's, the fused rest is small.
Convolutions (the same 37.3 GFLOP per image for both) are 76-80% of our step's
CPU time and 71-74% of diffusers'; attention 4%; the rest (norms, SiLU, dropout's
draws, Adam) is memory-bound. With all of that rest gone our step would be only
~1.3x diffusers': the 1.3x goal is out of reach at the same size in fp32 here.
Earlier runs, one network after the other, gave 0.91-1.10 for the same code:
the spread that the turns remove.

diffusers is a `bench` extra; a GPU machine without network can be given it as a
folder carried with the working tree: `pip download --no-deps diffusers==0.42.1 -d bench/vendor`
(one pure-Python wheel, imported as a zip) or `pip install --target bench/vendor
--no-deps diffusers` (plus whatever of its dependencies that machine lacks); the
script looks there after the environment. Without diffusers the baseline is
skipped, with the reason printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "bench" / "vendor"
sys.path.insert(0, str(ROOT))
sys.path += [str(VENDOR), *map(str, sorted(VENDOR.glob("*.whl")))]  # after the environment's

from pipeline.maths import solvers as S  # noqa: E402
from pipeline.maths.analytic import GaussianDenoiser  # noqa: E402
from pipeline.maths.edm import Precond, edm_loss, karras_sigmas  # noqa: E402
from pipeline.maths.unet import build  # noqa: E402

CUDA_CASES = [("fp32", 128, 256), ("bf16", 512, 1024), ("bf16+compile+channels_last", 512, 1024)]
"""(mode, training batch, forward batch) on CUDA: the issue's reference settings."""
CPU_CASES = [("fp32", 8, 8), ("fp32+channels_last", 8, 8)]
"""On a CPU: both layouts, eager (compiled modes take minutes to build: `--modes`)."""


# --- the two networks, each with its own training loss --------------------------------------


def ours(device):
    net = Precond(build("small")).to(device)
    return net, (lambda m, x: edm_loss(m, x).mean()), (lambda m, x: m(x, _ones(x)))


def _ones(x):
    return torch.ones(x.shape[0], device=x.device)


def diffusers_unet(device):
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        print(f"diffusers cannot be imported ({e}): baseline skipped", flush=True)
        return None
    # google/ddpm-cifar10-32's configuration, with DDPM's CIFAR-10 dropout of 0.1.
    net = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        dropout=0.1,
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
    ).to(device)
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device), 0)

    def loss(m, x):  # DDPM's epsilon-prediction loss
        t = torch.randint(0, 1000, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x)
        a = alphas[t].reshape(-1, 1, 1, 1)
        predicted = m(a.sqrt() * x + (1 - a).sqrt() * noise, t).sample
        return torch.nn.functional.mse_loss(predicted, noise)

    def forward(m, x):
        return m(x, torch.full((x.shape[0],), 500, device=x.device)).sample

    return net, loss, forward


# --- measuring ---------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flop_per_image(fn, batch: int) -> float:
    """FLOP per image of `fn`, attention included: counted through the math SDPA
    backend, since the counter sees no FLOPs inside some fused kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        fn()
    return counter.get_total_flops() / batch


def matmul_peak(device, dtype=torch.bfloat16, n=8192) -> float:
    """Measured FLOP/s of a large square matmul: the reference for MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / seconds_per_call(lambda: a @ b, device, warmup=3, iters=10)


def prepare(make, device, mode, batch, forward_batch) -> dict | None:
    """One network in one mode: its training step and forward, ready to time, and
    their FLOP per image (None without the network)."""
    made = make(device)
    if made is None:
        return None
    net, loss_fn, forward_fn = made
    layout = torch.channels_last if "channels_last" in mode else torch.contiguous_format
    net = net.to(memory_format=layout)
    compiled = torch.compile(net, dynamic=False) if "compile" in mode else net
    model = net  # FLOPs are counted on the uncompiled model; the counter sees fewer in graphs
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=layout)
    x_fwd = torch.randn(forward_batch, 3, 32, 32, device=device).to(memory_format=layout)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=device.type == "cuda")

    def precision():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in mode)

    def train():
        net.train()
        with precision():
            loss = loss_fn(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward():
        net.eval()
        with precision():
            forward_fn(model, x_fwd)

    flops = {
        "train_gflop_per_image": flop_per_image(train, batch) / 1e9,
        "forward_gflop_per_image": flop_per_image(forward, forward_batch) / 1e9,
    }
    model = compiled
    parameters = sum(p.numel() for p in net.parameters())
    return {"train": train, "forward": forward, "parameters": parameters, **flops}


def interleaved(fns, device, warmup: int, iters: int) -> list[float]:
    """Median seconds per call of each of `fns`, their calls taking turns, so that
    a machine that slows down or speeds up weighs on each alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            sync(device)
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def measure(device, mode, batch, forward_batch, warmup, iters) -> list[tuple[str, dict]]:
    """Both networks in one mode, timed in turns: (label, result) for each."""
    torch._dynamo.reset()  # each mode compiles its own graphs at its own batch size
    cases = [
        (label, case)
        for label, make in (("ours small", ours), ("diffusers DDPM", diffusers_unet))
        if (case := prepare(make, device, mode, batch, forward_batch)) is not None
    ]
    train_s = interleaved([c["train"] for _, c in cases], device, warmup, iters)
    forward_s = interleaved([c["forward"] for _, c in cases], device, warmup, iters)
    results = []
    for (label, case), train, forward in zip(cases, train_s, forward_s, strict=True):
        shares = time_shares(case["train"]) if device.type == "cpu" else {}
        result = {k: v for k, v in case.items() if k not in ("train", "forward")}
        result |= {
            "forward_batch": forward_batch,
            "train_images_per_s": batch / train,
            "forward_images_per_s": forward_batch / forward,
            **shares,
        }
        results.append((label, result))
    return results


KERNEL_KINDS = {
    "convolution": ("convolution",),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "flash_attention"),
}
"""The compute-bound kernels, by substrings of their profiler names; everything else
(norms, activations, copies, dropout, the optimizer) is memory-bound on a CPU."""


def time_shares(fn) -> dict:
    """Where one call of `fn` spends its CPU time: each kind of kernel's share of
    the self time of all operators, and the six costliest operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in ops)
    shares = {
        kind: sum(t for name, t in ops if any(part in name for part in parts)) / total
        for kind, parts in KERNEL_KINDS.items()
    }
    shares["other"] = 1 - sum(shares.values())
    top = sorted(ops, key=lambda op: -op[1])[:6]
    return {
        "train_time_shares": shares,
        "train_top_ops_ms": {name: round(t / 1e3, 1) for name, t in top},
    }


# --- correctness on the device -----------------------------------------------------------------


def check_correctness(device) -> dict:
    """Samplers on the exact Gaussian denoiser; on CUDA also the network F in bf16
    and compiled against fp32 eager (on the CPU the unit tests cover those)."""
    out = check_samplers(device)
    if device.type == "cuda":
        out.update(_check_network(device))
    return out


def check_samplers(device) -> dict:
    """Heun, DPM++ 2M and Euler ancestral on the exact denoiser of a Gaussian: the
    samples' mean and standard deviation against the law's. Asserts them."""
    out = {}
    mean = torch.tensor([0.3, -0.5, 1.0, 0.0], device=device)
    g = GaussianDenoiser(mean, torch.tensor([0.5, 0.2, 1.0, 0.7], device=device))
    gens = S.sample_generators(0, range(4000), device=device)
    for name, steps in (("heun", 32), ("dpmpp_2m", 32), ("euler_ancestral", 128)):
        x = S.initial_noise((4000, 4), 80.0, gens, device=device)
        y = S.SAMPLERS[name](g, x, karras_sigmas(steps), generator=gens)
        out[f"{name}_mean_error"] = (y.mean(0) - mean).abs().max().item()
        out[f"{name}_std_ratio_error"] = (y.std(0) / g.std - 1).abs().max().item()
        assert out[f"{name}_mean_error"] < 0.06 and out[f"{name}_std_ratio_error"] < 0.1, out
    return out


def _check_network(device) -> dict:
    torch.manual_seed(0)
    net = build("small").to(device).eval()
    for p in net.parameters():  # give the zero-initialised layers weights
        if not p.detach().abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    x, c = torch.randn(64, 3, 32, 32, device=device), torch.zeros(64, device=device)
    with torch.no_grad():
        reference = net(x, c)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = net(x, c)
        fast = torch.compile(net, dynamic=False)(x, c)
    out = {
        "bf16_relative_error": ((low.float() - reference).norm() / reference.norm()).item(),
        "compile_relative_error": ((fast - reference).norm() / reference.norm()).item(),
    }
    assert out["bf16_relative_error"] < 0.05 and out["compile_relative_error"] < 1e-3, out
    torch._dynamo.reset()
    return out


# --- the run -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="one batch size for every case, training and forward "
        "(default: 8 on CPU; on CUDA the reference settings)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=None,
        help="fp32 or bf16, with any of +compile and +channels_last: fp32, "
        "fp32+compile+channels_last, bf16+channels_last, ... (default: fp32 and "
        "fp32+channels_last on CPU; on CUDA fp32, bf16, bf16+compile+channels_last)",
    )
    parser.add_argument("--iters", type=int, default=None, help="timed calls per measurement")
    parser.add_argument(
        "--out", default=None, help="folder for the JSON (default: $OUT if set, else bench/results)"
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else f"cpu{torch.get_num_threads()}"
    cases = CUDA_CASES if cuda else CPU_CASES
    if args.modes:
        cases = [(mode, cases[-1][1], cases[-1][2]) for mode in args.modes]
    if args.batch:
        cases = [(mode, args.batch, args.batch) for mode, _, _ in cases]
    iters = args.iters or (20 if cuda else 7)
    if cuda:
        torch.backends.cudnn.benchmark = True  # TF32 stays at PyTorch's defaults, recorded below
    folder = Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "results")
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"model-{name.replace(' ', '-')}.json"
    report = {
        "benchmark": "model",
        "device": name,
        "torch": torch.__version__,
        "processor": platform.processor(),
        "tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        },
        "rows": [],
        "ratios": {},
    }

    report["correctness"] = check_correctness(device)
    summary = ", ".join(f"{k} {v:.2g}" for k, v in report["correctness"].items())
    print(f"{name}; correctness: {summary}", flush=True)
    peak = matmul_peak(device) if cuda else None
    report["bf16_matmul_peak_tflops"] = peak and peak / 1e12
    if peak:
        print(f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s", flush=True)
    print(HEADER + ("  MFU tr, fwd" if peak else ""), flush=True)
    for mode, batch, forward_batch in cases:
        for label, result in measure(device, mode, batch, forward_batch, 3 if cuda else 1, iters):
            if peak:
                for kind in ("train", "forward"):
                    rate = result[f"{kind}_images_per_s"] * result[f"{kind}_gflop_per_image"]
                    result[f"{kind}_mfu"] = rate * 1e9 / peak
            report["rows"].append({"model": label, "mode": mode, "batch": batch, **result})
            print(_line(report["rows"][-1], report["rows"], peak), flush=True)
            report["ratios"] = ratios(report["rows"])
            out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    for row in report["rows"]:
        if "train_time_shares" in row:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in row["train_time_shares"].items())
            print(f"training step's CPU time, {row['model']}, {row['mode']}: {shares}")
    best = report["ratios"].get("best_train")
    if best:
        print(f"training step, ours/diffusers, each in its fastest mode: {best:.2f}")


def ratios(rows: list[dict]) -> dict:
    """ours/diffusers images/s per mode and batch, training and forward; and the
    training step with each network in its fastest mode."""
    out: dict = {}
    best: dict[str, float] = {}
    for row in rows:
        best[row["model"]] = max(best.get(row["model"], 0.0), row["train_images_per_s"])
        if row["model"] != "diffusers DDPM":
            continue
        mine = _ours_row(row, rows)
        if mine:
            out[f"{row['mode']} batch {row['batch']}"] = {
                kind: mine[f"{kind}_images_per_s"] / row[f"{kind}_images_per_s"]
                for kind in ("train", "forward")
            }
    if len(best) == 2:
        out["best_train"] = best["ours small"] / best["diffusers DDPM"]
    return out


def _ours_row(row: dict, rows: list[dict]) -> dict | None:
    """Our row of the same mode and batch as `row`."""
    return next(
        (
            r
            for r in rows
            if r["model"] == "ours small"
            and r["mode"] == row["mode"]
            and r["batch"] == row["batch"]
        ),
        None,
    )


HEADER = (
    f"{'model':<16}{'mode':<28}{'batch':>6}{'params':>9}{'train img/s':>13}"
    f"{'fwd img/s':>11}{'GFLOP/img tr,fwd':>18}   ours/diffusers tr, fwd"
)


def _line(row: dict, rows: list[dict], peak) -> str:
    line = (
        f"{row['model']:<16}{row['mode']:<28}{row['batch']:>6}{row['parameters'] / 1e6:>8.1f}M"
        f"{row['train_images_per_s']:>13.1f}{row['forward_images_per_s']:>11.1f}"
        f"{row['train_gflop_per_image']:>10.1f},{row['forward_gflop_per_image']:>6.1f}"
    )
    ours_row = _ours_row(row, rows)
    if row["model"] == "diffusers DDPM" and ours_row:
        train = ours_row["train_images_per_s"] / row["train_images_per_s"]
        forward = ours_row["forward_images_per_s"] / row["forward_images_per_s"]
        line += f"   {train:.2f}, {forward:.2f}"
    else:
        line += " " * 14
    if peak:
        line += f"  {row['train_mfu']:>5.1%}, {row['forward_mfu']:>5.1%}"
    return line


if __name__ == "__main__":
    main()
