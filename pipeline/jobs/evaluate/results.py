"""A model's evaluation results: what decides them (`evaluation_settings`, whose
hash is the evaluation key), where they go (one JSON file per model weights,
dataset version and settings), how they reach MLflow (`track`: metrics on the
training run, tags on the version for `tasks.promote`), and `carry`, which gives
a version the results of the very weights it was registered with."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pipeline.config import ConfigError, to_dict
from pipeline.config.evaluate import EvaluateConfig, parse_sampler
from pipeline.data.reference import SAMPLING
from pipeline.data.shards import load_dataset
from pipeline.edges import registry, storage, tracking


def metric_prefix(position: int, sampler: str) -> str:
    """Metrics of the first sampler have plain names (`fd_pixel`), the compared
    ones the sampler's (`euler_ancestral_1000.fd_pixel`)."""
    name, steps = parse_sampler(sampler)
    return "" if position == 0 else f"{name}_{steps}."


@dataclasses.dataclass(frozen=True)
class EvaluateResult:
    uri: str
    """The JSON file of the results."""
    results: dict[str, Any]
    already_complete: bool
    lengths: dict[float, EvaluateResult] = dataclasses.field(default_factory=dict)
    """The scores of the weights at each post-hoc EMA length (`evaluate.ema_length`)."""

    def sampler_lines(self) -> list[str]:
        """Per sampler: its network evaluations, the pixel Frechet distance, and the
        label fidelity and CAS where computed."""
        from pipeline.maths.solvers import network_evaluations

        settings, m, lines = self.results["settings"], self.results["metrics"], []
        guidance = "" if settings["guidance"] == 1 else f", guidance {settings['guidance']:g}"
        length = settings.get("ema_length")
        weights = "" if length is None else f"EMA length {length:g}: "
        for i, text in enumerate([settings["sampler"], *settings["compare"]]):
            sampler, steps = parse_sampler(text)
            prefix = metric_prefix(i, text)
            found = [f"pixel Frechet distance {m[prefix + 'fd_pixel']:.4f}"]
            if prefix + "label_fidelity" in m:
                ceiling = m.get("label_fidelity_ceiling")
                real = "" if ceiling is None else f" (real images {ceiling:.3f})"
                found.append(f"label fidelity {m[prefix + 'label_fidelity']:.3f}{real}")
            if prefix + "cas" in m:
                found.append(f"CAS {m[prefix + 'cas']:.3f}")
            lines.append(
                f"{weights}{sampler} {steps} steps ({network_evaluations(sampler, steps)} network "
                f"evaluations{guidance}): {', '.join(found)} over "
                f"{settings['images']} images"
            )
        return lines

    def summary(self) -> str:
        m = self.results["metrics"]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in m.items() if "sigma" not in k)
        head = "already evaluated: " if self.already_complete else ""
        return f"{head}{self.results['model_ref']}: {shown}; results at {self.uri}"


def evaluation_settings(cfg: EvaluateConfig, dataset_digest: str) -> dict[str, Any]:
    """What decides the scores besides the model: two models are comparable when
    these are equal (their hash is the evaluation key)."""
    settings = to_dict(cfg)
    # The lengths are not settings of the model's own scores: each length's
    # evaluation adds its own (`_evaluate_weights`).
    skipped = (
        "model",
        "output",
        "batch_size",
        "use_gpu",
        "tracking_uri",
        "inception",
        "ema_length",
    )
    for field in skipped:
        settings.pop(field)
    settings["dataset"] = dataset_digest
    settings["reference_sampling"] = SAMPLING  # not comparable with another sample
    settings["inception"] = _file_digest(cfg.inception) if cfg.inception else None
    return settings


def _slug(model: registry.Model) -> str:
    if model.lineage.name is not None:
        return f"{model.lineage.name}-v{model.lineage.version}"
    return "checkpoint"


def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(storage.read_bytes(path)).hexdigest()
    except storage.StorageError as e:
        raise ConfigError(f"evaluate.inception: cannot read {path} ({e})") from None


def recorded(uri: str) -> EvaluateResult | None:
    """The results already at `uri` (a re-run writes nothing); None if absent."""
    try:
        return EvaluateResult(uri, json.loads(storage.read_bytes(uri)), already_complete=True)
    except storage.NotFound:
        return None


def record(
    cfg: EvaluateConfig, model: registry.Model, uri: str, results: dict[str, Any]
) -> EvaluateResult:
    """Track `results` in MLflow (`track`), then write them to `uri`: its presence
    means done."""
    track(cfg, model, results)
    storage.write_bytes(uri, json.dumps(results, indent=1, sort_keys=True).encode())
    return EvaluateResult(uri, results, already_complete=False)


def carry(cfg: EvaluateConfig, scored: EvaluateResult) -> EvaluateResult:
    """The results of the model `cfg` names, taken from `scored`: the evaluation of
    another version's weights at a post-hoc EMA length, which `cfg.model` was
    registered with. Same weights (their sha256 is checked), same settings, same
    seeds: the same scores, so nothing is generated again. Written and tracked as
    `evaluate` would (`carried_from` names the source). A ValueError when the
    weights or the settings differ."""
    model = registry.load_model(cfg.model, cfg.tracking_uri, "evaluate.model")
    _, digest = load_dataset(cfg.dataset, "evaluate.dataset")
    settings = evaluation_settings(cfg, digest)
    source = scored.results
    if source["model"]["digest"] != model.lineage.digest:
        raise ValueError(f"{scored.uri}: scored other weights than {model.describe()}'s")
    if {k: v for k, v in source["settings"].items() if k != "ema_length"} != settings:
        raise ValueError(f"{scored.uri}: scored with other settings than {cfg}")
    key, uri = results_location(cfg, model, settings)
    done = recorded(uri)
    if done is not None:
        return done
    results = {
        **source,
        "model_ref": model.describe(),
        "model": model.lineage.to_dict(),
        "key": key,
        "settings": settings,
        "carried_from": scored.uri,
    }
    return record(cfg, model, uri, results)


def results_location(
    cfg: EvaluateConfig, model: registry.Model, settings: dict[str, Any]
) -> tuple[str, str]:
    """The evaluation key of `settings` and where `model`'s results under it go."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return key, storage.join(cfg.output, f"{_slug(model)}-{model.lineage.digest[:12]}-{key}.json")


# --- MLflow -----------------------------------------------------------------------------


def track(cfg: EvaluateConfig, model: registry.Model, results: dict) -> None:
    """Metrics on the model's training run (step: the dataset's version), and for a
    registered model, tags on its version for `tasks.promote`. The scores of a
    post-hoc EMA length are metrics `eval.ema_length_<length>.*` and tags
    `eval.<key>.*`, but never the version's `eval.key`: promotion compares the
    version's own weights."""
    scores, key = results["metrics"], results["key"]
    length = results["settings"].get("ema_length")
    run_id, name, version = model.lineage.run_id, model.lineage.name, model.lineage.version
    if name is not None and version is not None:
        # The version's tags are written last: present, they say a run that crashed
        # before writing the JSON logged the metrics already.
        found = tracking.model_version(cfg.tracking_uri, name, version)
        assert found is not None, f"{name}/{version} was loaded, so it is registered"
        tags = found["tags"]
        if f"eval.{key}.dataset" in tags:
            run_id = None
    if run_id:
        prefix = "eval." if length is None else f"eval.ema_length_{length:g}."
        tracking.log_metrics(
            cfg.tracking_uri,
            run_id,
            {prefix + k: v for k, v in scores.items()},
            step=results["dataset"]["version"],
        )
    if name is not None and version is not None:
        tags = {f"eval.{key}.{k}": f"{v:.8g}" for k, v in scores.items()}
        if length is None:
            tags["eval.key"] = key
        else:
            tags[f"eval.{key}.ema_length"] = f"{length:g}"
        tags[f"eval.{key}.dataset"] = results["dataset"]["digest"]
        tracking.set_version_tags(cfg.tracking_uri, name, version, tags)
