"""Benchmark: the `small` UNet against diffusers' DDPM CIFAR-10 UNet, training and
forward images/s at the same batch size, with FLOP per image and the ratio.

One script for both machines. It imports torch (and diffusers, for the baseline)
only. On CUDA it also runs bf16 autocast, torch.compile and channels_last, and
reports model FLOP utilisation (MFU) against a bf16 matmul peak it measures.
Before timing it checks correctness on the device: the samplers against the
exact Gaussian denoiser, bf16 and compiled outputs against fp32 eager.

    python bench/model.py                      # CPU here: fp32, batch 8
    python bench/model.py --batch 128 512      # CUDA: every mode at each batch

diffusers is a `bench` extra. A GPU machine without network can get it as a
folder carried with the working tree:
`pip install --target bench/vendor --no-deps diffusers huggingface_hub safetensors`
(the script puts bench/vendor on its path). Without it the baseline is skipped.
Prints a table and writes bench/results/model-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "vendor")]

from pipeline import samplers as S  # noqa: E402
from pipeline.diffusion import Precond, edm_loss, karras_sigmas  # noqa: E402
from pipeline.diffusion.analytic import GaussianDenoiser  # noqa: E402
from pipeline.model import build  # noqa: E402

# --- the two networks, each with its own training loss --------------------------------


def ours(device):
    net = Precond(build("small")).to(device)
    return net, (lambda m, x: edm_loss(m, x).mean()), (lambda m, x: m(x, _sigma(x)))


def _sigma(x):
    return torch.full((x.shape[0],), 1.0, device=x.device)


def diffusers_unet(device):
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return None
    net = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ).to(device)
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device), 0)

    def loss(m, x):  # DDPM's epsilon-prediction loss
        t = torch.randint(0, 1000, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x)
        a = alphas[t].reshape(-1, 1, 1, 1)
        return torch.nn.functional.mse_loss(
            m(a.sqrt() * x + (1 - a).sqrt() * noise, t).sample, noise
        )

    def forward(m, x):
        return m(x, torch.full((x.shape[0],), 500, device=x.device)).sample

    return net, loss, forward


# --- measuring ------------------------------------------------------------------------------


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
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch


def matmul_peak(device, dtype=torch.bfloat16, n=8192) -> float:
    """Measured FLOP/s of a large square matmul: the reference for MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = seconds_per_call(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * n**3 / seconds


def measure(make, device, batch, mode, warmup, iters):
    """Training-step and forward images/s, and FLOP per image, of one network."""
    made = make(device)
    if made is None:
        return None
    net, loss_fn, forward_fn = made
    bf16 = "bf16" in mode
    layout = torch.channels_last if "channels_last" in mode else torch.contiguous_format
    net = net.to(memory_format=layout)
    model = torch.compile(net) if "compile" in mode else net
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=layout)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def train():
        with autocast():
            loss = loss_fn(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward():
        with autocast():
            forward_fn(model, x)

    # FLOPs are the model's, counted on the uncompiled model (the counter sees fewer
    # through a compiled graph); MFU then uses the same count for every mode.
    eager = model
    model = net
    net.train()
    train_flop = flop_per_image(train, batch)
    net.eval()
    forward_flop = flop_per_image(forward, batch)
    model = eager
    net.train()
    train_s = seconds_per_call(train, device, warmup, iters)
    net.eval()
    forward_s = seconds_per_call(forward, device, warmup, iters)
    return {
        "parameters": sum(p.numel() for p in net.parameters()),
        "train_images_per_s": batch / train_s,
        "forward_images_per_s": batch / forward_s,
        "train_gflop_per_image": train_flop / 1e9,
        "forward_gflop_per_image": forward_flop / 1e9,
    }


# --- correctness on the device -------------------------------------------------------------


def check_correctness(device) -> dict:
    """Samplers on the exact Gaussian denoiser; bf16 and compile against fp32 eager."""
    out = {}
    mean = torch.tensor([0.3, -0.5, 1.0, 0.0], device=device)
    g = GaussianDenoiser(mean, torch.tensor([0.5, 0.2, 1.0, 0.7], device=device))
    gens = S.sample_generators(0, range(8000), device=device)
    for name, steps in (("heun", 32), ("dpmpp_2m", 32), ("euler_ancestral", 256)):
        x = S.initial_noise((8000, 4), 80.0, gens, device=device)
        y = S.SAMPLERS[name](g, x, karras_sigmas(steps, device=device), generator=gens)
        out[f"{name}_mean_error"] = (y.mean(0) - mean).abs().max().item()
        out[f"{name}_std_ratio_error"] = (y.std(0) / g.std - 1).abs().max().item()
        assert out[f"{name}_mean_error"] < 0.05 and out[f"{name}_std_ratio_error"] < 0.06, out
    torch.manual_seed(0)
    net = Precond(build("small")).to(device).eval()
    for p in net.parameters():  # give the zero-initialised layers weights
        if not p.detach().abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(16, 3, 32, 32, device=device)
    with torch.no_grad():
        reference = net(x, _sigma(x))
        if device.type == "cuda":  # (on the CPU the unit tests cover bf16)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                low = net(x, _sigma(x))
            out["bf16_relative_error"] = ((low - reference).norm() / reference.norm()).item()
            compiled = torch.compile(net)(x, _sigma(x))
            out["compile_relative_error"] = (
                (compiled - reference).norm() / reference.norm()
            ).item()
            assert out["bf16_relative_error"] < 0.05 and out["compile_relative_error"] < 1e-3, out
    return out


# --- the run --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes (default: 8 on CPU, 128 and 512 on CUDA)",
    )
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=None,
        help="fp32, bf16, bf16+compile, bf16+compile+channels_last "
        "(default: all on CUDA, fp32 on CPU)",
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else f"cpu{torch.get_num_threads()}"
    batches = args.batch or ([128, 512] if cuda else [8])
    iters = args.iters or (20 if cuda else 3)
    modes = args.modes or (
        ["fp32", "bf16", "bf16+compile", "bf16+compile+channels_last"] if cuda else ["fp32"]
    )
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    correctness = check_correctness(device)
    peak = matmul_peak(device) if cuda else None
    rows = []
    for batch in batches:
        for mode in modes:
            for label, make in (("ours small", ours), ("diffusers DDPM", diffusers_unet)):
                result = measure(make, device, batch, mode, warmup=3 if cuda else 1, iters=iters)
                if result is None:
                    print(f"diffusers not installed: baseline skipped ({mode}, batch {batch})")
                    continue
                if peak:
                    result["train_mfu"] = (
                        result["train_images_per_s"] * result["train_gflop_per_image"] * 1e9 / peak
                    )
                    result["forward_mfu"] = (
                        result["forward_images_per_s"]
                        * result["forward_gflop_per_image"]
                        * 1e9
                        / peak
                    )
                rows.append({"model": label, "mode": mode, "batch": batch, **result})
    _print(name, rows, peak, correctness)
    out = ROOT / "bench" / "results" / f"model-{name.replace(' ', '-')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "model",
                "device": name,
                "torch": torch.__version__,
                "processor": platform.processor(),
                "bf16_matmul_peak_tflops": peak and peak / 1e12,
                "correctness": correctness,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


def _print(name, rows, peak, correctness):
    print(f"\n{name}; correctness: " + ", ".join(f"{k} {v:.2g}" for k, v in correctness.items()))
    if peak:
        print(f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s")
    head = (
        f"{'model':<16}{'mode':<28}{'batch':>6}{'params':>9}{'train img/s':>13}"
        f"{'fwd img/s':>11}{'GFLOP/img tr,fwd':>18}"
    )
    print(head + ("  MFU tr, fwd" if peak else "") + "   ratio ours/diffusers tr, fwd")
    base = {(r["mode"], r["batch"]): r for r in rows if r["model"] == "diffusers DDPM"}
    for r in rows:
        line = (
            f"{r['model']:<16}{r['mode']:<28}{r['batch']:>6}{r['parameters'] / 1e6:>8.1f}M"
            f"{r['train_images_per_s']:>13.1f}{r['forward_images_per_s']:>11.1f}"
            f"{r['train_gflop_per_image']:>10.1f},{r['forward_gflop_per_image']:>6.1f}"
        )
        if peak:
            line += f"  {r['train_mfu']:>5.1%}, {r['forward_mfu']:>5.1%}"
        other = base.get((r["mode"], r["batch"]))
        if other and r["model"] == "ours small":
            line += (
                f"   {r['train_images_per_s'] / other['train_images_per_s']:.2f},"
                f" {r['forward_images_per_s'] / other['forward_images_per_s']:.2f}"
            )
        print(line)


if __name__ == "__main__":
    main()
