"""The sampler study's cases and how it chooses among them (bench/quality.py): the
selection grid, the rule that picks the default, the cases the evaluation scores."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import sample as sample_config  # noqa: E402
from pipeline.maths.solvers import SAMPLERS, network_evaluations  # noqa: E402

BUDGET = 35
"""The most network evaluations the default may take."""


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

    def row(self) -> dict[str, Any]:
        head = {"case": self.name, "sampler": self.sampler, "steps": self.steps}
        return {**head, "settings": dict(self.settings), "nfe": self.nfe}


def sde(steps: int, eta: float) -> Case:
    return Case("dpmpp_2m_sde", steps, (("eta", eta),))


def edm(churn: float, tmin: float = 0.05, tmax: float = 50.0) -> Case:
    settings = (("s_churn", churn), ("s_tmin", tmin), ("s_tmax", tmax), ("s_noise", 1.0))
    return Case("edm_stochastic", 18, settings)


def restart(tmin: float, tmax: float, k: int, steps: int) -> Case:
    """12 Heun steps (23 NFE) and k restarts of `steps` steps (2 NFE each): 35 NFE."""
    settings = {"restart_tmin": tmin, "restart_tmax": tmax, "restart_k": k, "restart_steps": steps}
    return Case("restart", 12, tuple(settings.items()))


def selection_cases(quick: bool) -> list[Case]:
    """The selection grid of the module doc (`quick`: one or two of each family)."""
    if quick:
        return [
            *[Case("heun", 18), Case("dpmpp_2m", 35), sde(35, 0.5), sde(35, 1.0)],
            *[Case("euler_ancestral", 35), edm(4.0), restart(0.1, 1.0, 2, 3)],
        ]
    return [
        *[Case("heun", s) for s in (13, 18)],
        *[Case("dpmpp_2m", s) for s in (25, 35)],
        *[sde(35, eta) for eta in (0.25, 0.5, 0.75, 1.0)],
        *[sde(25, eta) for eta in (0.5, 1.0)],
        Case("euler_ancestral", 35),
        *[edm(churn) for churn in (2.0, 4.0, 8.0)],
        *[edm(4.0, tmin=0.5), edm(8.0, tmax=1.0)],
        *[restart(0.06, 0.3, 2, 3), restart(0.1, 1.0, 2, 3), restart(0.1, 1.0, 1, 6)],
    ]


# --- choosing on the selection seeds, reporting on the evaluation seeds -------------------


@dataclasses.dataclass
class Choice:
    """The default and each family's best, chosen on the selection seeds."""

    scores: dict[str, dict[str, float]]
    """Case name -> dataset -> mean over training seeds of FD / reference FD."""
    default: Case
    family_best: dict[str, Case]

    def worst(self, case: Case) -> float:
        return worst(self.scores, case)


def worst(scores: Mapping[str, Mapping[str, float]], case: Case) -> float:
    """The worse of `case`'s scores over the datasets."""
    return max(scores[case.name].values())


RULE = (
    f"on the selection seeds, among the cases at <= {BUDGET} NFE that tasks.sample can run (a "
    "sampler and its steps, with the sampler's own settings), the one whose worse (over the "
    "datasets) mean over training seeds of FD / reference FD is least; a family's best by the "
    f"same rule over all its cases at <= {BUDGET} NFE, settings the config cannot take included"
)


def runnable(case: Case) -> bool:
    """Whether tasks.sample can run `case`: the config names a sampler and its steps
    only, so every setting must be the sampler's own default."""
    defaults = inspect.signature(SAMPLERS[case.sampler]).parameters
    return all(defaults[k].default == v for k, v in case.settings)


class Scored(Protocol):
    """A study of one model: the FD of each case it ran."""

    def fd(self, case: Case) -> float: ...


def choose(selection: Mapping[str, Sequence[Scored]], cases: list[Case], reference: Case) -> Choice:
    """The default of `RULE` among `cases`, all run on every study."""
    scores = {
        c.name: {
            name: float(np.mean([s.fd(c) / s.fd(reference) for s in studies]))
            for name, studies in selection.items()
        }
        for c in cases
    }
    candidates = [c for c in cases if c.nfe <= BUDGET]
    least = lambda among: min(among, key=lambda c: worst(scores, c))  # noqa: E731
    families = dict.fromkeys(c.sampler for c in candidates)
    best = {f: least([c for c in candidates if c.sampler == f]) for f in families}
    return Choice(scores, least([c for c in candidates if runnable(c)]), best)


def evaluation_cases(choice: Choice, reference: Case) -> dict[Case, list[str]]:
    """The cases scored on the evaluation seeds, with their roles."""
    roles: dict[Case, list[str]] = {reference: ["reference"], choice.default: ["default"]}
    for sampler, case in choice.family_best.items():
        roles.setdefault(case, []).append(f"best {sampler}")
    for case in (Case("heun", 18), Case("dpmpp_2m", 35)):
        roles.setdefault(case, []).append(f"{case.sampler} at 35 NFE")
    roles.setdefault(shipped(), []).append("tasks.sample's default")
    return roles


def shipped() -> Case:
    """The default `tasks.sample` ships: its sampler and steps, with the sampler's
    own settings (the config has no field for them), named as in the grid."""
    sampler, steps = sample_config.DEFAULT_SAMPLER, sample_config.DEFAULT_STEPS
    same = [
        c
        for c in selection_cases(quick=False)
        if (c.sampler, c.steps) == (sampler, steps) and runnable(c)
    ]
    return same[0] if same else Case(sampler, steps)
