"""The sampler study's sampling and scoring (bench/quality.py): a case's samples
from fixed per-image seeds, their scores, the paired bootstrap interval of a ratio
to the reference, and the post-hoc EMA lengths."""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.maths.edm import Precond, karras_sigmas  # noqa: E402
from pipeline.maths.phema import reconstruct  # noqa: E402
from pipeline.maths.solvers import SAMPLERS, initial_noise, sample_generators  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_cases import Case  # noqa: E402
from quality_data import Data, Trained, bootstrap_picks, heldout_loss, ratio_interval  # noqa: E402

EMA_LENGTHS = (0.02, 0.05, 0.1, 0.15, 0.2)
"""EDM2's sigma_rel of the reconstructed averages (the profiles' exponent stays
positive below about 0.289)."""
SCORES = ("fd", "swd", "label_fidelity", "mode_tv")
"""The scores of a row that are averaged over training seeds."""
INTERVAL = (
    "5-95% interval of the mean over training seeds of FD(case) / FD(reference): the "
    "resampled ratios' 5th and 95th percentiles, moved by the estimate minus their median "
    "(resamples repeat images, which pulls both FDs up and the ratio toward 1). "
    "For training seed k, `resamples` rows of n image indices drawn with replacement by "
    "numpy's default_rng(k), the same rows for every case and for the reference (paired); "
    "per row, FD(case) / FD(reference) of each seed's model, averaged over the seeds. Over "
    "images, given these models: training seeds are not resampled (see fd_ratio_per_seed)."
)


@dataclasses.dataclass
class Costs:
    """Seconds this run spent and the work done in them, by kind (sampling: images x
    NFE; scoring: calls; bootstrap: FDs; CAS: classifier steps)."""

    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    work: dict[str, float] = dataclasses.field(default_factory=dict)
    train_rates: list[float] = dataclasses.field(default_factory=list)
    """Seconds per training image of each model trained (the first pays the warm-up)."""

    def add(self, kind: str, start: float, work: float) -> None:
        """Count the seconds since `start` (`time.perf_counter`) as `work` of `kind`."""
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - start
        self.work[kind] = self.work.get(kind, 0.0) + work

    def rate(self, kind: str) -> float:
        return self.seconds.get(kind, 0.0) / max(1.0, self.work.get(kind, 0.0))


def generate(
    denoiser: Callable[..., torch.Tensor],
    case: Case,
    data: Data,
    guidance: float,
    seed: int,
    n: int,
) -> torch.Tensor:
    """n samples of `case` from the per-image seeds (seed, 0..n-1): the same start
    and the same generators for every case, whatever the batch."""
    generators = sample_generators(seed, range(n))
    dtype = data.train.dtype
    sigmas = karras_sigmas(case.steps, dtype=dtype)
    x = initial_noise((n, *data.train.shape[1:]), float(sigmas[0]), generators).to(dtype)
    return SAMPLERS[case.sampler](
        denoiser,
        x,
        sigmas,
        label=data.labels_for(n),
        guidance=guidance,
        generator=generators,
        **dict(case.settings),
    )


@dataclasses.dataclass
class Study:
    """The scored cases of one denoiser on one dataset and one set of sample seeds."""

    denoiser: Callable[..., torch.Tensor]
    data: Data
    guidance: float
    title: str
    seed: int
    """The seed base of the images (`generate`)."""
    n: int
    costs: Costs
    cache: dict[str, torch.Tensor]
    """Samples by key, kept with the model for `--reuse`."""
    kind: str = "sample"
    """The cost kind of its sampling ("exact": the exact denoiser)."""
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    samples: dict[Case, torch.Tensor] = dataclasses.field(default_factory=dict)

    def run(self, *cases: Case) -> None:
        for case in cases:
            if case in self.samples:
                continue
            key = f"{self.title}: {case.name}, seeds {self.seed}:{self.n}, guidance {self.guidance}"
            start = time.perf_counter()
            x = self.cache.get(key)
            if x is None:
                x = generate(self.denoiser, case, self.data, self.guidance, self.seed, self.n)
                self.cache[key] = x
                self.costs.add(self.kind, start, self.n * case.nfe)
                seconds: float | None = round(time.perf_counter() - start, 2)
            else:
                seconds = None  # an earlier run's
            self.samples[case] = x
            scoring = time.perf_counter()
            scores = self.data.score(x, self.data.labels_for(self.n))
            self.costs.add("score", scoring, 1)
            self.rows.append({**case.row(), "seconds": seconds, **scores})
            took = "kept" if seconds is None else f"{seconds:.1f} s"
            print(f"  {self.title} {case.name}: NFE {case.nfe}, FD {scores['fd']:.4f}, {took}")

    def fd(self, case: Case) -> float:
        return next(r["fd"] for r in self.rows if r["case"] == case.name)

    def ratios(self, reference: Case) -> list[dict[str, Any]]:
        """The rows, each with its FD over the reference's."""
        return [{**r, "fd_ratio": r["fd"] / self.fd(reference)} for r in self.rows]


def combine(
    studies: Sequence[Study],
    seeds: Sequence[int],
    roles: dict[Case, list[str]],
    reference: Case,
    resamples: int,
) -> list[dict[str, Any]]:
    """Each case's scores, their means over the models (`studies`, of training seeds
    `seeds`), and the paired bootstrap interval of its FD ratio (`INTERVAL`)."""
    start = time.perf_counter()
    picks = [bootstrap_picks(s.n, resamples, seed) for s, seed in zip(studies, seeds, strict=True)]
    resampled = {
        case: [s.data.resampled_fd(s.samples[case], p) for s, p in zip(studies, picks, strict=True)]
        for case in roles
    }
    rows = []
    for case, what in roles.items():
        per_seed = [next(r for r in s.rows if r["case"] == case.name) for s in studies]
        means = {k: float(np.mean([r[k] for r in per_seed])) for k in SCORES if k in per_seed[0]}
        ratios = [s.fd(case) / s.fd(reference) for s in studies]
        lo, hi = ratio_interval(float(np.mean(ratios)), resampled[case], resampled[reference])
        rows.append(
            {
                **case.row(),
                "roles": what,
                **means,
                "fd_per_seed": [r["fd"] for r in per_seed],
                "fd_ratio": float(np.mean(ratios)),
                "fd_ratio_per_seed": ratios,
                "fd_ratio_p05": lo,
                "fd_ratio_p95": hi,
            }
        )
    studies[0].costs.add("bootstrap", start, resamples * len(roles) * len(studies))
    return rows


def ema_lengths(
    trained: Trained, data: Data, study: Callable[[Precond, str], Study], default: Case
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
        scored = study(model, f"EMA {name}")
        scored.run(default)
        scores = {k: v for k, v in scored.rows[0].items() if k in SCORES}
        rows.append({"ema_length": name, "heldout_loss": heldout_loss(model, data), **scores})
    return rows
