"""Sampler study: which sampler and settings, at most 35 network evaluations (NFE),
come closest to the 1000-step Euler ancestral sampler (the reference), and which
EMA length (issue 15). The default is chosen on one set of images and reported on
another, over three trained models per dataset.

Models. For each dataset and training seed (`--train_seeds`, 0 1 2) the `tiny`
UNet is trained in this process by `quality_data.train(data, images, seed)`, the
training step `tasks.train` runs (`pipeline.maths.train_step`, the same lr, batch
and EMA defaults), keeping the fixed EMA and EDM2's two power-function profiles
with a snapshot every 1/16 of training. Each model and its samples are kept in
bench/out/quality/<dataset>/seed<k>/; `--reuse` takes them back if the model was
trained on the same images for as long (else it trains again).

Datasets (bench/quality_data.py):

- `digits`: scikit-learn's 1,797 8x8 digits, split per class into halves A and
  B; the model trains on A. Pixel Frechet distance (FD) and sliced Wasserstein
  distance (SWD) against A, as `tasks.evaluate` computes them; label fidelity (a
  classifier trained on A); CAS (a classifier trained on the samples, tested on
  B) for the default and the reference. Samples are drawn for the ten classes in
  turn. FD is against A's fixed statistics, so n may exceed B; the floor is B
  (all 896 real images there are) against A, at that n.
- `mixture`: a Gaussian mixture whose law is drawn from `--mixture_seed` (its
  seed and the sha256 of its parameters are in the JSON): FD against the law's
  exact mean and covariance, SWD against 20,000 exact draws, the total variation
  between the share of samples nearest each component and the weights. The floor
  is n fresh exact draws. The evaluation is repeated with the exact denoiser D*
  (no network, the samplers' own error) on as many images as the models have.

Selection (per-image seeds `sample_generators(--selection_seed, range(512))`)
on every model, a fixed grid: Heun and DPM-Solver++(2M) at 25 and 35 NFE;
DPM-Solver++(2M) SDE with eta 0.25, 0.5, 0.75 and 1 at 35 NFE, 0.5 and 1 at 25;
Euler ancestral at 35; EDM's stochastic sampler at 35 NFE with S_churn 2, 4, 8,
S_tmin 0.5 at churn 4 and S_tmax 1 at churn 8; restart sampling at 35 NFE in
three settings; the reference. A case's score on a dataset is the mean over the
models of its FD / the reference's FD; the default is the case at <= 35 NFE whose
worse score over the datasets is least among those tasks.sample can run (`RULE`:
its config names a sampler and steps, so a case's settings must be the sampler's
own, `runnable`); each sampler family's best by the same rule over all its cases,
to show what settings the config cannot take would gain. To hold the whole run to
about an hour on 2 cores the grid is smaller than the first study's (which also
had 10, 17 and 63 NFE, S_noise and more EDM and restart variations, and nine EMA
lengths).

Evaluation (per-image seeds `sample_generators(--evaluation_seed, range(2048))`,
none shared with the selection): the reference, the default, each family's best,
Heun and DPM-Solver++(2M) at 35 NFE, on every model. Each row: FD, its ratio to
the reference's, and a 5-95% interval of that ratio (`INTERVAL`): 400 bootstrap
resamples of each model's images, the same indices for the case and the
reference (paired); per resample the mean over the models of the ratio; the 5th
and 95th percentiles. It is over images, given these models (three training
seeds are too few to resample; the JSON lists each model's ratio). Checked with
D* on 40 independent image sets of 768: the interval's width matched the spread
of the ratio over the sets (0.41, 0.40). Near the floor FD and its noise both
fall as 1/n, so there the ratio's spread hardly shrinks with n. The verdict:
where the interval excludes 1, "better" or "worse" by how much; else "equal
within X", X = max(|lo - 1|, |hi - 1|). Post-hoc EMA, on the first training seed:
the model rebuilt at five of EDM2's sigma_rel, scored with the default on the
evaluation images, beside the fixed EMA.

    .venv/bin/python bench/quality.py [--datasets digits mixture] [--train_seeds 0 1 2]
        [--samples 2048] [--selection_samples 512] [--guidance 1] [--reuse] [--quick]

Writes bench/results/quality-cpu2.json, every number in it (`--quick`: a run of
a few minutes to bench/out/quality-quick.json, models in bench/out/quality-quick/).
Every run ends with an estimate of the full default run's minutes from its own
timings (`estimate_full_run`). No Ray, no services: torch and numpy.

Results on this 2-core machine (2026-12-06, bench/results/quality-cpu2.json,
written whole by `.venv/bin/python bench/quality.py --reuse` in 3.3 min from the
models and samples earlier runs of this code kept; from nothing about 46-53 min by
its estimate). The default chosen: DPM-Solver++(2M) SDE, eta 0.5, 25 steps (25
NFE). On the evaluation seeds: digits FD ratio 1.000 [0.944, 1.058], equal within
0.058; mixture 1.424 [1.273, 1.578], worse by 0.424 (no setting at <= 35 NFE
reaches the 1000-step sampler there, which sits at the floor); with the exact
denoiser 1.085 [0.895, 1.349]. Restart sampling (t 0.1-1, one restart of 6 steps,
settings the config cannot take) is the only case better on the digits beyond the
noise: 0.929 [0.880, 0.992]. On 512 images the mixture's FD is mostly the floor's,
so the selection could not tell its samplers apart (ratios 0.95-1.35). README's
"Which sampler" has the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.maths.classifier import Recipe  # noqa: E402
from pipeline.maths.edm import Precond  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_cases import (  # noqa: E402
    BUDGET,
    RULE,
    Case,
    choose,
    evaluation_cases,
    sde,
    selection_cases,
)
from quality_data import Data, Trained, digits, kept_model, mixture, verdict  # noqa: E402
from quality_scoring import (  # noqa: E402
    EMA_LENGTHS,
    INTERVAL,
    Costs,
    Study,
    combine,
    ema_lengths,
    generate,
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much a run does: the full run's defaults, or `--quick`'s."""

    train_images: int
    samples: int
    """Images per model and case on the evaluation seeds."""
    selection_samples: int
    """Images per model and case on the selection seeds."""
    resamples: int
    """Bootstrap resamples of the images per model."""
    reference_steps: int
    """Steps of the Euler ancestral reference."""


FULL = Sizes(128_000, samples=2048, selection_samples=512, resamples=400, reference_steps=1000)
QUICK = Sizes(4096, samples=256, selection_samples=128, resamples=100, reference_steps=100)


# --- the estimate of the full run ------------------------------------------------------


def step_seconds(denoiser: Callable[..., torch.Tensor], data: Data, n: int) -> float:
    """Seconds of one sampler step at a batch of n: a network call, the solver's
    arithmetic and a per-image noise draw (DPM-Solver++(2M) SDE, the fastest of
    three runs of 4 steps: the machine's speed when nothing else runs on it)."""
    case, times = sde(4, 1.0), []
    for _ in range(3):
        start = time.perf_counter()
        generate(denoiser, case, data, 1.0, 0, n)
        times.append(time.perf_counter() - start)
    return min(times) / case.steps


def classifier_steps(images: int) -> int:
    """Optimizer steps of a classifier trained on `images` (`classifier.Recipe`)."""
    recipe = Recipe()
    steps = math.ceil(recipe.epochs * images / recipe.batch_size)
    return min(recipe.max_steps, max(recipe.min_steps, steps))


def estimate_full_run(costs: Costs, network: Precond, data: Data, exact: Data) -> dict[str, float]:
    """Minutes of the full default run (two datasets, three training seeds, `FULL`):
    training at the fastest rate of this run's models (none trained: left out),
    sampling as its steps times the fastest time of one step at the full run's
    batches, so with the machine to itself; scoring, CAS and the bootstrap at this
    run's rates; the rest of this run's time as it was."""
    full, models = FULL, 2 * 3
    grid = selection_cases(quick=False)
    selection_nfe = full.reference_steps + sum(c.nfe for c in grid)
    evaluation_nfe = full.reference_steps + 8 * BUDGET  # at most 8 cases besides it
    ema_nfe = 2 * (1 + len(EMA_LENGTHS)) * BUDGET
    big, small = (
        step_seconds(network, data, full.samples),
        step_seconds(network, data, full.selection_samples),
    )
    work = {
        "score": models * (len(grid) + 1 + 9) + 9 + ema_nfe // BUDGET + 2,
        "cas": 3 * 2 * classifier_steps(full.samples),
        "bootstrap": full.resamples * 9 * (models + 1),
    }
    parts = {kind: costs.rate(kind) * units for kind, units in work.items()}
    if costs.train_rates:
        parts["train"] = min(costs.train_rates) * models * full.train_images
    parts["sample"] = models * (selection_nfe * small + evaluation_nfe * big) + ema_nfe * big
    assert exact.exact is not None
    parts["exact"] = evaluation_nfe * step_seconds(exact.exact, exact, 3 * full.samples)
    parts["rest"] = costs.seconds.get("rest", 0.0)
    total = sum(parts.values())
    return {k: round(v / 60, 1) for k, v in {**parts, "total": total}.items()}


# --- the run ----------------------------------------------------------------------------


class Run:
    """One run of the study: its models, their samples and the report."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes):
        self.args, self.sizes, self.costs = args, sizes, Costs()
        self.reference = Case("euler_ancestral", sizes.reference_steps)
        self.cases = selection_cases(args.quick)
        self.keep = ROOT / "bench/out" / ("quality-quick" if args.quick else "quality")
        self.data: dict[str, Data] = {}
        self.models: dict[tuple[str, int], tuple[Trained, dict[str, torch.Tensor], Path]] = {}
        self.selection: dict[str, list[Study]] = {}
        settings = {**vars(args), **dataclasses.asdict(sizes), "out": str(args.out)}
        self.report: dict[str, Any] = {
            "settings": {**settings, "reference": self.reference.name, "budget_nfe": BUDGET},
            "seeds": {
                "training": args.train_seeds,
                "selection": {"base": args.selection_seed, "n": sizes.selection_samples},
                "evaluation": {"base": args.evaluation_seed, "n": sizes.samples},
                "note": "image i of a set is drawn with sample_generators(base, [i]); the two "
                "bases differ, so no image of the selection has the seed of an evaluation image",
            },
            "interval": INTERVAL,
            "datasets": {},
        }

    def study(
        self, name: str, seed: int, title: str, denoiser: Any, evaluation: bool, images: int = 0
    ) -> Study:
        """A study of `denoiser` kept with the model of (`name`, `seed`), on the
        evaluation or the selection seeds (`images`: other than their n)."""
        data, (_, cache, _) = self.data[name], self.models[name, seed]
        n = self.sizes.samples if evaluation else self.sizes.selection_samples
        return Study(
            denoiser,
            data,
            self.args.guidance if data.classes else 1.0,
            f"{name} seed{seed}{title}",
            self.args.evaluation_seed if evaluation else self.args.selection_seed,
            images or n,
            self.costs,
            cache,
            kind="exact" if denoiser is data.exact else "sample",
        )

    def keep_samples(self, name: str, seed: int) -> None:
        _, cache, keep = self.models[name, seed]
        torch.save(cache, keep / "samples.pt")

    def select_on(self, name: str, data: Data) -> None:
        """Train (or take back) the models of `name`; the selection grid on each."""
        self.data[name] = data
        entry: dict[str, Any] = {"floor": data.floor(), "training": []}
        self.report["datasets"][name] = entry
        if data.law is not None:
            self.report["mixture_law"] = data.law
        selection = entry["selection"] = {"n": self.sizes.selection_samples, "rows": {}}
        for seed in self.args.train_seeds:
            keep = self.keep / name / f"seed{seed}"
            start = time.perf_counter()
            trained, reused = kept_model(data, self.sizes.train_images, seed, keep, self.args.reuse)
            self.costs.add("train", start, 0 if reused else self.sizes.train_images)
            if not reused:
                self.costs.train_rates.append(trained.seconds / self.sizes.train_images)
            entry["training"].append({"seed": seed, "seconds": trained.seconds, "reused": reused})
            cached = reused and (keep / "samples.pt").exists()
            cache = torch.load(keep / "samples.pt", weights_only=True) if cached else {}
            self.models[name, seed] = (trained, cache, keep)
            study = self.study(name, seed, "", trained.ema, evaluation=False)
            study.run(self.reference, *self.cases)
            self.keep_samples(name, seed)
            self.selection.setdefault(name, []).append(study)
            selection["rows"][f"seed{seed}"] = study.ratios(self.reference)
            self.write()

    def choose(self) -> dict[Case, list[str]]:
        """The default and the evaluation cases, from the selection grid's scores."""
        choice = choose(self.selection, self.cases, self.reference)
        default = choice.default
        self.report["selection"] = {
            "rule": RULE,
            "scores": choice.scores,
            "worst": {c.name: choice.worst(c) for c in self.cases},
            "family_best": {k: c.name for k, c in choice.family_best.items()},
            "dpmpp_2m_sde_eta_at_35_nfe": {
                dict(c.settings)["eta"]: choice.scores[c.name]
                for c in self.cases
                if c.sampler == "dpmpp_2m_sde" and c.nfe == 35
            },
        }
        self.report["default"] = {
            **default.row(),
            "eta": dict(default.settings).get("eta"),
            "rule": RULE,
            "selection_scores": choice.scores[default.name],
        }
        print("\nselection: mean over training seeds of FD / reference FD")
        for case in sorted(self.cases, key=choice.worst):
            scores = ", ".join(f"{k} {v:.3f}" for k, v in choice.scores[case.name].items())
            print(f"  {case.name:<62} NFE {case.nfe:>3}  {scores}")
        print(f"default: {default.name}", flush=True)
        return evaluation_cases(choice, self.reference)

    def evaluate_on(self, name: str, roles: dict[Case, list[str]]) -> None:
        """The evaluation cases on every model of `name`; CAS, D*, EMA lengths."""
        data, entry, seeds = self.data[name], self.report["datasets"][name], self.args.train_seeds
        default = next(c for c, r in roles.items() if "default" in r)
        studies = [self.study(name, s, "", self.models[name, s][0].ema, True) for s in seeds]
        for seed, study in zip(seeds, studies, strict=True):
            study.run(*roles)
            self.keep_samples(name, seed)
        rows = combine(studies, seeds, roles, self.reference, self.sizes.resamples)
        entry["evaluation"] = {"n": self.sizes.samples, "rows": rows}
        self.verdict(name, rows)
        if data.cas is not None:
            start, labels = time.perf_counter(), data.labels_for(self.sizes.samples)
            assert labels is not None
            cas = {
                c.name: [data.cas(s.samples[c], labels) for s in studies]
                for c in (default, self.reference)
            }
            self.costs.add("cas", start, 2 * len(studies) * classifier_steps(self.sizes.samples))
            entry["evaluation"]["cas"] = {
                "default": float(np.mean(cas[default.name])),
                "reference": float(np.mean(cas[self.reference.name])),
                "per_seed": cas,
            }
        first = seeds[0]
        if data.exact is not None:
            # One denoiser: as many images as the models have together.
            images = len(seeds) * self.sizes.samples
            exact = self.study(name, first, " exact D*", data.exact, True, images)
            exact.run(*roles)
            rows = combine([exact], [0], roles, self.reference, self.sizes.resamples)
            note = "one denoiser, no training: ratios to D*'s reference; resamples from seed 0"
            entry["exact_denoiser"] = {"n": images, "note": note, "rows": rows}
            self.verdict(f"{name} exact D*", rows)

        def ema_study(model: Precond, title: str) -> Study:
            return self.study(name, first, f" {title}", model, evaluation=True)

        rows = ema_lengths(self.models[name, first][0], data, ema_study, default)
        entry["ema"] = {"training_seed": first, "case": default.name, "rows": rows}
        self.keep_samples(name, first)
        self.write()

    def verdict(self, title: str, rows: list[dict[str, Any]]) -> None:
        """Print the rows; the default's verdict into the report."""
        print(f"\n{title}: FD, FD / {self.reference.name}'s FD [5-95%], evaluation seeds")
        for row in rows:
            interval = f"[{row['fd_ratio_p05']:.3f}, {row['fd_ratio_p95']:.3f}]"
            print(
                f"  {row['case']:<62} {row['fd']:8.4f} {row['fd_ratio']:6.3f} {interval}  "
                + ", ".join(row["roles"])
            )
        row = next(r for r in rows if "default" in r["roles"])
        found = verdict(
            row["fd_ratio"], row["fd_ratio_p05"], row["fd_ratio_p95"], self.reference.name
        )
        self.report.setdefault("verdict", {})[title] = found
        print(f"{title}: the default is {found}", flush=True)

    def write(self) -> None:
        self.args.out.write_text(json.dumps(self.report, indent=1, default=float) + "\n")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--datasets", nargs="+", default=["digits", "mixture"], choices=["digits", "mixture"])
    add("--train_seeds", type=int, nargs="+", default=[0, 1, 2], help="a model per seed")
    add("--train_images", type=int, help=f"per model ({FULL.train_images}; --quick 4096)")
    add("--samples", type=int, help=f"per model and case, evaluation ({FULL.samples})")
    add("--selection_samples", type=int, help=f"the same, selection ({FULL.selection_samples})")
    add("--selection_seed", type=int, default=1, help="seed base of the selection images")
    add("--evaluation_seed", type=int, default=2, help="seed base of the evaluation images")
    add("--mixture_seed", type=int, default=0, help="the seed the mixture's law is drawn from")
    add("--guidance", type=float, default=1.0, help="classifier-free guidance (digits)")
    add("--quick", action="store_true", help="a smoke run: short training, few images and cases")
    add("--reuse", action="store_true", help="the models and samples kept by an earlier run")
    add("--out", type=Path, help="the JSON (default: bench/results/quality-cpu2.json)")
    args = parser.parse_args()
    if args.selection_seed == args.evaluation_seed:
        parser.error("--selection_seed and --evaluation_seed must differ (disjoint images)")
    if len(set(args.train_seeds)) != len(args.train_seeds):
        parser.error(f"--train_seeds must differ, got {args.train_seeds}")
    name = "bench/out/quality-quick.json" if args.quick else "bench/results/quality-cpu2.json"
    args.out = args.out or ROOT / name
    return args


def main() -> None:
    args = arguments()
    base = QUICK if args.quick else FULL
    sizes = dataclasses.replace(
        base,
        train_images=args.train_images or base.train_images,
        samples=args.samples or base.samples,
        selection_samples=args.selection_samples or base.selection_samples,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run = Run(args, sizes)
    loaders = {"digits": digits, "mixture": lambda: mixture(args.mixture_seed, sizes.samples)}
    for name in args.datasets:
        run.select_on(name, loaders[name]())
    roles = run.choose()
    for name in args.datasets:
        run.evaluate_on(name, roles)
    wall = time.perf_counter() - start
    run.costs.seconds["rest"] = wall - sum(run.costs.seconds.values())
    name = args.datasets[0]
    model = run.models[name, args.train_seeds[0]][0].ema
    exact = run.data.get("mixture") or mixture(args.mixture_seed, 16)
    estimate = estimate_full_run(run.costs, model, run.data[name], exact)
    run.report["seconds"] = round(wall, 1)
    run.report["seconds_by_kind"] = run.costs.seconds
    run.report["full_run_estimate_minutes"] = estimate
    run.write()
    shown = ", ".join(f"{k} {v}" for k, v in estimate.items())
    print(f"\nthis run {wall / 60:.1f} min; the full default run, estimated: {shown} (minutes)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
