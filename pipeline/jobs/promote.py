"""Promotion: the `champion` alias moves to a candidate version only when the
candidate beats the champion on the configured metric by the configured margin.

Both versions must have been scored by `tasks.evaluate` with the same evaluation
key (same dataset version, seeds and settings), which it records as tags on each
version; a missing score is an error, never a silent promotion. The first
version of a model becomes champion. Every decision, with both numbers, is
recorded as tags on the candidate version and as a run in the MLflow experiment
`promotion`; deciding again on the same candidate and champion writes nothing.
"""

from __future__ import annotations

import dataclasses

from pipeline.config import ConfigError, to_dict
from pipeline.config.evaluate import HIGHER_IS_BETTER, PromoteConfig
from pipeline.edges import tracking

EXPERIMENT = "promotion"


@dataclasses.dataclass(frozen=True)
class Decision:
    model_name: str
    candidate: int
    champion: int | None
    """The version that held the alias before (None: there was none)."""
    promoted: bool
    metric: str
    candidate_value: float | None
    champion_value: float | None
    already_decided: bool = False
    copy_limit: float | None = None
    """Set when the candidate was refused for copying: the most allowed, beside its
    copy rate (`candidate_value`)."""

    def summary(self) -> str:
        head = "already decided: " if self.already_decided else ""
        name, m = self.model_name, self.metric
        if self.copy_limit is not None:
            return (
                f"{head}{name} version {self.candidate} refused: {self.candidate_value:.2%} of "
                f"its samples copy training images (at most {self.copy_limit:.2%})"
            )
        if self.champion is None:
            return f"{head}{name} version {self.candidate} is the first champion"
        if self.champion == self.candidate:
            return f"{head}{name} version {self.candidate} is the champion"
        verdict = "promoted over" if self.promoted else "did not beat"
        return (
            f"{head}{name} version {self.candidate} ({m} {self.candidate_value:.5g}) "
            f"{verdict} version {self.champion} ({m} {self.champion_value:.5g})"
        )


def promote(cfg: PromoteConfig) -> Decision:
    """Decide on the candidate `cfg` names; see the module doc."""
    uri, name = cfg.tracking_uri, cfg.model_name
    candidate = tracking.model_version(uri, name, cfg.version or None)
    if candidate is None:
        what = f"version {cfg.version}" if cfg.version else "versions"
        where = tracking.redact(uri)
        raise ConfigError(f"promote.version: model {name!r} has no {what} at {where}")
    champion = tracking.model_version(uri, name, alias=cfg.alias)
    version = candidate["version"]
    if champion is not None and champion["version"] == version:
        return Decision(name, version, version, False, cfg.metric, None, None, True)
    key = cfg.key or candidate["tags"].get("eval.key")
    if champion is not None and _decided(candidate, champion, cfg, key):
        return _recorded(cfg, candidate, champion)
    copies = _copy_rate(candidate, key, cfg, name)
    if copies is not None and copies > cfg.max_copy_rate:
        champ = None if champion is None else champion["version"]
        decision = Decision(
            name, version, champ, False, "copy_rate", copies, None,
            copy_limit=cfg.max_copy_rate,
        )  # fmt: skip
    elif champion is None:
        decision = Decision(name, version, None, True, cfg.metric, None, None)
    else:
        if key is None:
            raise ConfigError(
                f"promote.version: {name} version {version} has no evaluation "
                f"(run tasks.evaluate --model {name}/{version} first)"
            )
        cand_value = _score(candidate, key, cfg.metric, name)
        champ_value = _score(champion, key, cfg.metric, name)
        # The margin is relative to the champion's magnitude (KID can be negative).
        needed = cfg.margin * abs(champ_value)
        if cfg.metric in HIGHER_IS_BETTER:
            better = cand_value > champ_value + needed
        else:
            better = cand_value < champ_value - needed
        decision = Decision(
            name, version, champion["version"], better, cfg.metric, cand_value, champ_value
        )
    # The alias first: a crash before the record leaves a champion, and deciding
    # again finds the candidate holding the alias.
    if decision.promoted:
        tracking.set_alias(uri, name, cfg.alias, version)
    _record(cfg, decision, key)
    return decision


def _copy_rate(candidate: dict, key: str | None, cfg: PromoteConfig, name: str) -> float | None:
    """The candidate's copy rate when the gate is on (None: off); an error when the
    gate is on and the evaluation has none."""
    if cfg.max_copy_rate >= 1:
        return None
    value = None if key is None else candidate["tags"].get(f"eval.{key}.copy_rate")
    if value is None:
        raise ConfigError(
            f"promote.max_copy_rate: {name} version {candidate['version']} has no copy_rate "
            f"from evaluation {key} (evaluate it again), got {cfg.max_copy_rate:g}"
        )
    return float(value)


def _decided(candidate: dict, champion: dict, cfg: PromoteConfig, key: str | None) -> bool:
    """Whether this very question (same champion, metric, margin, evaluation) was
    decided before."""
    tags = candidate["tags"]
    asked = {
        "promotion.champion_version": str(champion["version"]),
        "promotion.metric": cfg.metric,
        "promotion.margin": str(cfg.margin),
        "promotion.key": str(key),
        "promotion.max_copy_rate": str(cfg.max_copy_rate),
    }
    return "promotion.decision" in tags and all(tags.get(k) == v for k, v in asked.items())


def _score(version: dict, key: str, metric: str, name: str) -> float:
    """The version's `metric` under evaluation `key`; an error naming what is missing."""
    value = version["tags"].get(f"eval.{key}.{metric}")
    if value is None:
        raise ConfigError(
            f"promote.metric: {name} version {version['version']} has no {metric} from "
            f"evaluation {key} (evaluate it with the same dataset and settings as the "
            f"candidate), got {metric!r}"
        )
    return float(value)


def _record(cfg: PromoteConfig, d: Decision, key: str | None) -> None:
    """The decision and both numbers: tags on the candidate, and a run."""
    if d.copy_limit is not None:
        verdict = "refused_copies"
    elif d.champion is None:
        verdict = "first_champion"
    else:
        verdict = "promoted" if d.promoted else "kept_champion"
    tags = {
        "promotion.decision": verdict,
        "promotion.metric": cfg.metric,
        "promotion.margin": cfg.margin,
        "promotion.champion_version": d.champion,
        "promotion.candidate_value": d.candidate_value,
        "promotion.champion_value": d.champion_value,
        "promotion.key": key,
        "promotion.max_copy_rate": cfg.max_copy_rate,
    }
    run_id = tracking.find_or_create_run(
        cfg.tracking_uri, EXPERIMENT, f"{d.model_name}-v{d.candidate}-vs-v{d.champion}"
    )
    tracking.log_params(cfg.tracking_uri, run_id, tracking.flatten(to_dict(cfg)))
    values = {"candidate": d.candidate_value, "champion": d.champion_value}
    numbers = {k: v for k, v in values.items() if v is not None}
    if numbers:
        tracking.log_metrics(cfg.tracking_uri, run_id, numbers, step=0)
    tracking.set_tags(
        cfg.tracking_uri,
        run_id,
        {
            "decision": verdict,
            "model_name": d.model_name,
            "candidate_version": str(d.candidate),
            "champion_version": str(d.champion),
        },
    )
    tracking.end_run(cfg.tracking_uri, run_id)
    tracking.set_version_tags(cfg.tracking_uri, d.model_name, d.candidate, tags)


def _recorded(cfg: PromoteConfig, candidate: dict, champion: dict | None) -> Decision:
    tags = candidate["tags"]

    def number(key: str) -> float | None:
        value = tags.get(key)
        return None if value in (None, "None") else float(value)

    return Decision(
        cfg.model_name,
        candidate["version"],
        champion["version"] if champion else None,
        tags["promotion.decision"] not in ("kept_champion", "refused_copies"),
        tags["promotion.metric"],
        number("promotion.candidate_value"),
        number("promotion.champion_value"),
        already_decided=True,
        copy_limit=number("promotion.max_copy_rate")
        if tags["promotion.decision"] == "refused_copies"
        else None,
    )
