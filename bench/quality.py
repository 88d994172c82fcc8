"""Sampler study: which sampler and settings, at 10 to 63 network evaluations (NFE),
come closest to the 1000-step ancestral sampler, and which EMA length (issue 15).

For each dataset it trains the `tiny` UNet in this process with the training
step `tasks.train` runs (`pipeline.maths.train_step`, the same lr, batch and EMA
defaults), keeping the fixed EMA and EDM2's two power-function profiles
(`pipeline.maths.phema`), with a snapshot of them every 1/16 of training. Then
it samples the same seeds (the same starting noise, the same per-image
generators) with every setting and scores the samples:

- `digits`: scikit-learn's 1,797 8x8 digits, split per class into two halves:
  the model trains on half A; pixel Frechet distance (FD) and sliced Wasserstein
  distance (SWD) against A, as `tasks.evaluate` computes them; label fidelity
  (a classifier trained on A); CAS (a classifier trained on the samples, tested
  on B) for the chosen default and the reference. The floor is half B (real
  digits the model never saw, the same number as the samples) against A.
- `mixture`: images drawn from a Gaussian mixture whose law is known exactly
  (`pipeline.maths.analytic.MixtureDenoiser`): FD against the law's exact mean
  and covariance (no reference sample), SWD against 20,000 exact draws, and the
  total variation between the share of samples nearest each component and the
  component weights. The floor is a fresh exact sample of the same size. The
  same sweep with the exact denoiser D* (`exact D*` rows) shows the samplers'
  discretisation error without the network's.

The sweep: Heun; DPM-Solver++(2M); DPM-Solver++(2M) SDE; EDM's stochastic
sampler with S_churn swept at 35 NFE, then S_tmin, S_tmax and S_noise around
the best churn, then the best at the other budgets; restart sampling with
intervals and repeats swept at 35 NFE, the best at the other budgets; the
1000-step Euler ancestral sampler (the reference) and Euler ancestral at the
same budgets. The default chosen is the setting at <= 35 NFE with the smallest
worst ratio of FD to the reference over the datasets. Post-hoc EMA: the model
reconstructed at several lengths (EDM2's sigma_rel) from the snapshots, each
scored with the chosen default, against the fixed EMA.

    .venv/bin/python bench/quality.py [--datasets digits mixture] [--train_images 128000]
        [--guidance 1] [--quick]

Prints the tables and writes bench/results/quality-cpu2.json (`--quick`: a
smoke run of a few minutes, to bench/out/). No Ray, no services: torch and numpy.
`--reuse` takes the models and samples kept in bench/out/quality/ by an earlier
run; `--final_only CASE...` scores only the reference and those cases.

Results on this 2-core machine (2026-12-02, bench/results/quality-cpu2.json; the
machine was shared, so seconds mean little). Pixel FD, and its ratio to the
1000-step Euler ancestral sampler, guidance 1:

    digits (n=896, floor 0.767, 1000 steps 1.344)   mixture (n=1000, floor 0.109, 1000 steps 0.146)
    sampler              17    25    35    63        17    25    35    63   NFE
    heun               1.24  1.03  1.00  0.99      3.38  1.61  1.32  1.21
    dpmpp_2m           1.01  1.00  0.99  0.99      1.29  1.23  1.21  1.19
    dpmpp_2m_sde eta 1 1.02  0.90  1.02  1.04      1.08  1.06  0.87  0.76
    dpmpp_2m_sde eta .5             0.97                        0.90
    edm_stochastic best             1.00                        0.98
    restart best                    0.95                        1.17
    euler_ancestral                 1.36  1.20                  0.97  0.74

The default, DPM-Solver++(2M) SDE with eta 0.5 at 35 steps, has the least worse
ratio of the two (0.973, 0.901). A paired bootstrap of its FD difference to the
1000-step sampler spans zero on both (digits -0.05 [-0.28, 0.21]; mixture, eta
1: -0.01 [-0.08, 0.06]): as good, not measurably better. With the mixture's exact
denoiser the ODE solvers win (DPM-Solver++(2M) 1.11, eta 0.5 1.41): the SDE's
noise corrects the network's errors. CAS: 0.973 (default) and 0.971 (1000
steps). Post-hoc EMA, FD with the default: digits fixed EMA 1.308, best length
0.05 1.294; mixture (eta 1) fixed 0.128, best 0.05 0.119. The mixture run's
component weights came from an unseeded generator (fixed since), so a rerun
draws another law: see the JSON's note.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config.train import TrainConfig  # noqa: E402
from pipeline.maths.counter import seed63  # noqa: E402
from pipeline.maths.edm import Precond, edm_loss, karras_sigmas  # noqa: E402
from pipeline.maths.ema import EMA  # noqa: E402
from pipeline.maths.phema import PostHocEMA, reconstruct  # noqa: E402
from pipeline.maths.solvers import (  # noqa: E402
    SAMPLERS,
    initial_noise,
    network_evaluations,
    sample_generators,
)
from pipeline.maths.train_step import fused_adam, train_step  # noqa: E402
from pipeline.maths.unet import build  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_data import Data, digits, mixture  # noqa: E402

EMA_LENGTHS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25)
"""EDM2's sigma_rel of the reconstructed averages (the profiles' exponent stays
positive below about 0.289)."""
HELDOUT_SIGMAS = (0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)
"""`tasks.evaluate`'s held-out noise levels."""


@dataclasses.dataclass(frozen=True)
class Case:
    """A sampler, its steps and its settings."""

    sampler: str
    steps: int
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def nfe(self) -> int:
        return network_evaluations(self.sampler, self.steps, **dict(self.settings))

    @property
    def name(self) -> str:
        shown = ",".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.settings
        )
        return f"{self.sampler}:{self.steps}" + (f" {shown}" if shown else "")

    @classmethod
    def parse(cls, name: str) -> Case:
        """The case `name` names (`sampler:steps k=v,k=v`)."""
        head, _, shown = name.partition(" ")
        sampler, steps = head.split(":")
        settings = []
        for pair in filter(None, shown.split(",")):
            key, value = pair.split("=")
            for kind in (int, float, str):
                try:
                    settings.append((key, kind(value)))
                    break
                except ValueError:
                    continue
        return cls(sampler, int(steps), tuple(settings))

    def with_settings(self, **changes: Any) -> Case:
        return Case(self.sampler, self.steps, tuple({**dict(self.settings), **changes}.items()))

    def at(self, steps: int) -> Case:
        return Case(self.sampler, steps, self.settings)


REFERENCE = Case("euler_ancestral", 1000)


def edm(churn: float, tmin: float = 0.05, tmax: float = 50.0, noise: float = 1.0) -> Case:
    return Case(
        "edm_stochastic",
        18,
        (("s_churn", churn), ("s_tmin", tmin), ("s_tmax", tmax), ("s_noise", noise)),
    )


def restart(steps: int, tmin: float, tmax: float, k: int, restart_steps: int) -> Case:
    settings = (
        ("restart_tmin", tmin),
        ("restart_tmax", tmax),
        ("restart_k", k),
        ("restart_steps", restart_steps),
    )
    return Case("restart", steps, settings)


# --- training -----------------------------------------------------------------------


@dataclasses.dataclass
class Trained:
    ema: Precond
    """The fixed EMA (TrainConfig's half-life), what `tasks.train` registers."""
    snapshots: list[tuple[int, float, dict[str, torch.Tensor]]]
    """(images seen, sigma_rel, weights) of the two power-function profiles."""
    seconds: float


def train(data: Data, images: int, seed: int = 0) -> Trained:
    """The tiny UNet trained as `tasks.train` trains it, on one process."""
    cfg = TrainConfig(dataset="unused", storage="unused")
    torch.manual_seed(seed)
    classes = 0 if data.labels is None else int(data.labels.max()) + 1
    net = build("tiny", 8, num_classes=classes, label_dropout=cfg.label_dropout if classes else 0.0)
    denoiser = Precond(net)
    optimizer = fused_adam(denoiser.parameters(), cfg.lr)
    ema = EMA(denoiser, cfg.ema_halflife_images, cfg.ema_rampup_ratio)
    profiles = PostHocEMA(denoiser)
    snapshot_every = max(cfg.batch_size, images // 16)
    order = torch.Generator().manual_seed(seed)
    snapshots, seen, start, batches = [], 0, time.perf_counter(), iter(())
    while seen < images:
        index = next(batches, None)
        if index is None:  # a new pass in a new order
            batches = iter(torch.randperm(len(data.train), generator=order).split(cfg.batch_size))
            index = next(batches)
        label = None if data.labels is None else data.labels[index]
        train_step(
            denoiser,
            optimizer,
            None,
            [(data.train[index], label)],
            images_seen=seen,
            base_lr=cfg.lr,
            lr_rampup_images=cfg.lr_rampup_images,
            max_grad_norm=cfg.max_grad_norm,
            seeds=seed63(seed, np.arange(seen, seen + len(index))),
            dropout_seed=seen,
            label_dropout=cfg.label_dropout if classes else 0.0,
        )
        # The averages as tasks.train's rank 0 updates them (every step is finite here).
        ema.update(denoiser, seen, len(index))
        profiles.update(denoiser, seen, len(index))
        before, seen = seen, seen + len(index)
        if seen // snapshot_every > before // snapshot_every or seen >= images:
            for profile in profiles.profiles:
                state = {k: v.clone() for k, v in profile.module.state_dict().items()}
                snapshots.append((seen, profile.std, state))
    return Trained(ema.module.eval(), snapshots, time.perf_counter() - start)


def _trained(data: Data, images: int, keep: Path, reuse: bool) -> Trained:
    """The model of `data`: trained now and kept in `keep`, or (`reuse`) read from it."""
    path = keep / "model.pt"
    if reuse and path.exists():
        saved = torch.load(path, weights_only=True)
        classes = 0 if data.labels is None else int(data.labels.max()) + 1
        model = Precond(build("tiny", 8, num_classes=classes)).eval().requires_grad_(False)
        model.load_state_dict(saved["ema"])
        snapshots = [(int(i), float(std), state) for i, std, state in saved["snapshots"]]
        return Trained(model, snapshots, float(saved.get("seconds", 0.0)))
    trained = train(data, images)
    keep.mkdir(parents=True, exist_ok=True)
    state = {
        "ema": trained.ema.state_dict(),
        "snapshots": trained.snapshots,
        "seconds": trained.seconds,
    }
    torch.save(state, path)
    return trained


def heldout_loss(denoiser: Callable[..., torch.Tensor], data: Data) -> float:
    """EDM's loss on the held-out images at `HELDOUT_SIGMAS`, fixed noise."""
    x = data.heldout
    label = data.heldout_labels
    generator = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for s in HELDOUT_SIGMAS:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            sigma = torch.full((len(x),), s, dtype=x.dtype)
            losses.append(float(edm_loss(denoiser, x, label, sigma=sigma, noise=noise).mean()))
    return float(np.mean(losses))


# --- sampling and scoring -------------------------------------------------------------


def generate(
    denoiser: Callable[..., torch.Tensor], case: Case, data: Data, guidance: float
) -> torch.Tensor:
    """Samples of `case` from seeds 0..n-1: the same start for every case."""
    n = len(data.heldout)
    generators = sample_generators(0, range(n))
    dtype = data.heldout.dtype
    sigmas = karras_sigmas(case.steps, dtype=dtype)
    x = initial_noise((n, *data.heldout.shape[1:]), float(sigmas[0]), generators).to(dtype)
    label = data.heldout_labels
    return SAMPLERS[case.sampler](
        denoiser,
        x,
        sigmas,
        label=label,
        guidance=guidance,
        generator=generators,
        **dict(case.settings),
    )


class Study:
    """The scored cases of one denoiser on one dataset, in order."""

    def __init__(
        self, denoiser: Callable[..., torch.Tensor], data: Data, guidance: float, title: str
    ):
        self.denoiser, self.data, self.guidance, self.title = denoiser, data, guidance, title
        self.rows: list[dict[str, Any]] = []
        self.samples: dict[Case, torch.Tensor] = {}
        self.cached: dict[str, torch.Tensor] = {}
        """Samples of an earlier run of the same model (`--reuse`), by case name."""

    def run(self, *cases: Case) -> None:
        for case in cases:
            if case in self.samples:
                continue
            start = time.perf_counter()
            x = self.cached.get(case.name)
            if x is None:
                x = generate(self.denoiser, case, self.data, self.guidance)
            seconds = time.perf_counter() - start
            self.samples[case] = x
            row = {
                "case": case.name,
                "sampler": case.sampler,
                "steps": case.steps,
                "settings": dict(case.settings),
                "nfe": case.nfe,
                "seconds": round(seconds, 2),
                **self.data.score(x),
            }
            self.rows.append(row)
            print(
                f"  {self.title:>18} {case.name:<62} NFE {case.nfe:>4}  FD {row['fd']:.4f}  "
                f"{seconds:6.1f} s",
                flush=True,
            )

    def fd(self, case: Case) -> float:
        return next(r["fd"] for r in self.rows if r["case"] == case.name)

    def best(self, cases: list[Case]) -> Case:
        self.run(*cases)
        return min(cases, key=self.fd)


BUDGETS = {  # steps per sampler for about 10, 17, 25, 35 and 63 NFE
    "heun": (6, 9, 13, 18, 32),
    "one_call": (10, 17, 25, 35, 63),  # one evaluation per step
}


def sweep(study: Study, quick: bool) -> None:
    """The sampler sweep, in the order of the module doc."""
    heun = [Case("heun", s) for s in BUDGETS["heun"]]
    one = BUDGETS["one_call"]
    if quick:
        study.run(
            REFERENCE.at(100),
            Case("heun", 18),
            Case("dpmpp_2m_sde", 35),
            restart(12, 0.1, 1.0, 2, 3),
        )
        study.run(edm(2.0))
        return
    study.run(REFERENCE, *heun)
    study.run(*[Case("dpmpp_2m", s) for s in one])
    sde = Case("dpmpp_2m_sde", 35)
    study.run(
        *[sde.at(s) for s in one], sde.with_settings(eta=0.5), sde.with_settings(solver_type="heun")
    )
    study.run(*[Case("euler_ancestral", s) for s in (35, 63)])
    best = study.best([edm(c) for c in (0.5, 1, 2, 4, 8)])
    settings = dict(best.settings)
    churn = settings["s_churn"]
    variations = [edm(churn, tmin=t) for t in (0.01, 0.2, 0.5)]
    variations += [edm(churn, tmax=t) for t in (1.0, 5.0)]
    variations += [edm(churn, noise=v) for v in (1.003, 1.007)]
    best = study.best([best, *variations])
    study.run(*[best.at(s) for s in BUDGETS["heun"]])
    # Restart: 12 Heun steps (23 NFE) plus k restarts of j steps (2 NFE each): 35.
    restarts = [
        restart(12, 0.06, 0.3, 2, 3),
        restart(12, 0.1, 1.0, 2, 3),
        restart(12, 0.05, 2.0, 2, 3),
        restart(12, 0.1, 1.0, 1, 6),
        restart(12, 0.1, 1.0, 3, 2),
        restart(12, 0.3, 2.0, 3, 2),
    ]
    best = study.best(restarts)
    study.run(*[best.at(s) for s in (3, 6, 26)])  # about 11, 17 and 63 NFE


# --- post-hoc EMA --------------------------------------------------------------------


def ema_lengths(
    trained: Trained, data: Data, default: Case, guidance: float
) -> list[dict[str, Any]]:
    """The default sampler's scores and the held-out loss of the fixed EMA and of
    the average reconstructed at each of `EMA_LENGTHS`."""
    rows = []
    models: list[tuple[str, Precond]] = [("fixed", trained.ema)]
    for length in EMA_LENGTHS:
        model = copy.deepcopy(trained.ema)
        model.load_state_dict(reconstruct(trained.snapshots, length))
        models.append((f"{length:g}", model.eval()))
    for name, model in models:
        x = generate(model, default, data, guidance)
        row = {"ema_length": name, "heldout_loss": heldout_loss(model, data), **data.score(x)}
        rows.append(row)
        print(
            f"  EMA {name:>6}: FD {row['fd']:.4f}  held-out loss {row['heldout_loss']:.4f}",
            flush=True,
        )
    return rows


# --- the run ----------------------------------------------------------------------------


def choose(studies: dict[str, Study], budget: int = 35) -> tuple[str, dict[str, float]]:
    """The setting at <= `budget` NFE whose worst FD ratio to the reference is least."""
    ratios: dict[str, dict[str, float]] = {}
    for name, study in studies.items():
        reference = study.rows[0]["fd"]
        for row in study.rows[1:]:
            if row["nfe"] <= budget:
                ratios.setdefault(row["case"], {})[name] = row["fd"] / reference
    complete = {c: r for c, r in ratios.items() if len(r) == len(studies)}
    best = min(complete, key=lambda c: max(complete[c].values()))
    return best, complete[best]


def table(study: Study, floor: dict[str, float]) -> None:
    reference = study.rows[0]["fd"]
    print(
        f"\n{study.title}: FD floor (real vs real, n={len(study.data.heldout)}) {floor['fd']:.4f}"
    )
    extra = [k for k in ("swd", "label_fidelity", "mode_tv") if k in floor]
    print(
        f"  {'case':<62} {'NFE':>5} {'FD':>8} {'vs 1000':>8} " + " ".join(f"{k:>14}" for k in extra)
    )
    for row in sorted(study.rows, key=lambda r: (r["sampler"], r["nfe"])):
        print(
            f"  {row['case']:<62} {row['nfe']:>5} {row['fd']:>8.4f} {row['fd'] / reference:>8.3f} "
            + " ".join(f"{row[k]:>14.4f}" for k in extra)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets", nargs="+", default=["digits", "mixture"], choices=["digits", "mixture"]
    )
    parser.add_argument(
        "--train_images", type=int, default=128_000, help="images each model trains on"
    )
    parser.add_argument(
        "--guidance", type=float, default=1.0, help="classifier-free guidance (digits)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: short training, few cases"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="models and samples of an earlier run (bench/out/quality/)",
    )
    parser.add_argument(
        "--final_only",
        metavar="CASE",
        nargs="+",
        help="no sweep: the reference and these cases, the first the default (scores, EMA)",
    )
    parser.add_argument(
        "--rows_from",
        nargs="+",
        type=lambda text: tuple(text.split("=", 1)),
        help="DATASET=JSON: the sweep rows of an earlier run (with --final_only)",
    )
    parser.add_argument("--sweep_only", action="store_true", help="no default, no EMA lengths")
    parser.add_argument("--out", type=Path, default=None, help="the JSON (default: bench/results/)")
    args = parser.parse_args()
    args.rows_from = dict(args.rows_from or ())
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = args.out or (
        ROOT / ("bench/out/quality-quick.json" if args.quick else "bench/results/quality-cpu2.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    images = 4096 if args.quick else args.train_images
    loaders = {"digits": digits, "mixture": mixture}
    report: dict[str, Any] = {"settings": {**vars(args), "out": str(out)}, "datasets": {}}
    studies, trained = {}, {}
    for name in args.datasets:
        data = loaders[name]()
        if args.quick:  # 200 samples per case
            data.heldout = data.heldout[:200]
            if data.heldout_labels is not None:
                data.heldout_labels = data.heldout_labels[:200]
        print(f"{name}: training on {len(data.train)} images for {images} images", flush=True)
        keep = ROOT / "bench/out/quality" / name
        trained[name] = _trained(data, images, keep, args.reuse)
        print(f"{name}: trained in {trained[name].seconds:.0f} s", flush=True)
        floor = data.floor()
        study = studies[name] = Study(
            trained[name].ema, data, args.guidance if data.labels is not None else 1.0, name
        )
        if args.reuse and (keep / "samples.pt").exists():
            study.cached = torch.load(keep / "samples.pt", weights_only=True)
        if args.final_only:
            study.run(REFERENCE, *map(Case.parse, args.final_only))
        else:
            sweep(study, args.quick)
        torch.save({c.name: x for c, x in study.samples.items()}, keep / "samples.pt")
        entry = report["datasets"][name] = {
            "floor": floor,
            "n": len(data.heldout),
            "rows": study.rows,
            "train_seconds": trained[name].seconds,
        }
        if args.rows_from:  # the sweep of an earlier run of the same model
            earlier = json.loads(Path(args.rows_from[name]).read_text())["datasets"][name]
            entry["rows_here"], entry["rows"] = study.rows, earlier["rows"]
            for key in ("exact_denoiser_rows", "train_seconds"):
                if key in earlier:
                    entry[key] = earlier[key]
            study.rows = earlier["rows"]
            # Shown, not assumed: the same model gives the same reference samples.
            entry["reference_fd_here_and_earlier"] = [
                entry["rows_here"][0]["fd"],
                study.rows[0]["fd"],
            ]
        elif data.exact is not None:
            exact = Study(data.exact, data, 1.0, f"{name} exact D*")
            sweep(exact, args.quick)
            entry["exact_denoiser_rows"] = exact.rows
            table(exact, floor)
        table(study, floor)
        out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    if args.sweep_only:
        return
    default, ratios = choose(studies)
    if args.final_only:
        default = args.final_only[0]
    ratios = {
        n: next(r["fd"] for r in s.rows if r["case"] == default) / s.rows[0]["fd"]
        for n, s in studies.items()
    }
    report["default"] = {"case": default, "fd_ratio_to_1000_steps": ratios}
    print(
        f"\ndefault: {default}; FD / 1000-step FD: "
        + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
    )
    case = next(c for s in studies.values() for c in s.samples if c.name == default)
    reference = REFERENCE if not args.quick else REFERENCE.at(100)
    for name, study in studies.items():
        entry = report["datasets"][name]
        entry["default_vs_reference"] = study.data.compare(
            study.samples[case], study.samples[reference]
        )
        if study.data.cas is not None:
            entry["cas"] = {
                "default": study.data.cas(study.samples[case], study.data.heldout_labels),
                "reference": study.data.cas(study.samples[reference], study.data.heldout_labels),
            }
        print(
            f"{name}: default vs 1000 steps: {entry['default_vs_reference']}, "
            f"CAS {entry.get('cas')}",
            flush=True,
        )
        entry["ema"] = ema_lengths(trained[name], study.data, case, study.guidance)
        out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
