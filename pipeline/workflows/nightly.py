"""The nightly pipeline: new raw images -> a new dataset version (and its new
shards encoded, when training on latents) -> a model retrained from the champion
-> evaluated -> promoted if better -> generation.

Each step is the library call of its task, and each one skips what is already
done, so running the same night again changes nothing:
- preprocessing appends only the raw inputs that no version of the dataset holds
  yet, as new shards, and commits a new manifest version listing old and new;
- with an autoencoder, encoding appends the latents of the new shards only
  (`pipeline.jobs.encode`), and training runs on the latents;
- training is the run `<model_name>-<night>`: skipped when it finished, resumed
  when it was interrupted, and skipped when a version was already trained on
  this dataset version (a night without new data);
- evaluation skips a model already scored on this dataset version and settings;
  the champion is scored on the new version too, so the two are comparable;
- post-hoc EMA: the trained version's own weights (the fixed half-life EMA) and
  its weights reconstructed at each of `ema_lengths` are scored alike, and the
  best by the promotion metric is the candidate: a winning length is registered
  as a new version of the model (tagged `ema_length` and `ema_source_version`),
  found by those tags when the night runs again;
- promotion skips a candidate already decided against the same champion;
- generation (by the champion, into `samples/<night>/`) writes only missing shards.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.config import ConfigError
from pipeline.config.evaluate import HIGHER_IS_BETTER
from pipeline.config.nightly import NightlyConfig
from pipeline.edges import registry, tracking
from pipeline.jobs.promote import promote

if TYPE_CHECKING:
    from pipeline.jobs.evaluate import EvaluateResult

ALIAS = "champion"
EMA_LENGTH = "ema_length"
"""The version tag of the post-hoc EMA length of its weights (`fixed`: training's
fixed half-life EMA)."""
EMA_SOURCE = "ema_source_version"
"""The version tag of a reconstruction: the version whose snapshots it came from."""


@dataclasses.dataclass(frozen=True)
class NightResult:
    dataset_version: int
    candidate: int | None
    """Tonight's candidate: the version trained tonight, or its reconstruction at the
    post-hoc EMA length that scored best (None when there was nothing new to train
    on)."""
    champion: int | None
    promoted: bool
    samples: str | None
    """The manifest of tonight's generated images."""
    scores: dict[str, float] | None = None
    """Tonight's candidate's evaluation metrics (None without a candidate)."""


def nightly(cfg: NightlyConfig, say: Callable[[str], None] = print) -> NightResult:
    """Run the night `cfg` describes; see the module doc."""
    from pipeline.data.shards import load_dataset
    from pipeline.jobs.preprocess import preprocess

    uri, name = cfg.tracking_uri, cfg.model_name
    prepared = preprocess(cfg.preprocess_config(), append=True)
    say(f"nightly {cfg.night}: preprocess: {prepared.summary()}")
    manifest, digest = load_dataset(cfg.dataset, "nightly.dataset")
    if cfg.sample_guidance != 1 and not manifest.get("classes"):
        raise ConfigError(
            f"nightly.sample_guidance: guidance needs class labels, and {cfg.dataset} has "
            f"none (its inputs are not in class folders), got {cfg.sample_guidance}"
        )

    if cfg.autoencoder:
        from pipeline.jobs.encode import encode

        encoded = encode(cfg.encode_config())
        say(f"nightly {cfg.night}: encode: {encoded.summary()}")
        digest = load_dataset(cfg.latents, "nightly.latents")[1]
    trained = _train(cfg, digest, say)
    promoted, scores, candidate = False, None, None
    if trained is not None:
        champion = tracking.model_version(uri, name, alias=ALIAS)
        candidate, evaluations = _candidate(cfg, trained, say)
        if champion and champion["version"] not in evaluations:
            evaluations[champion["version"]] = _evaluate(cfg, champion["version"], say).results
        scores = evaluations[candidate]["metrics"]
        decision = promote(cfg.promote_config(candidate, evaluations[candidate]["key"]))
        promoted = decision.promoted and not decision.already_decided
        say(f"nightly {cfg.night}: promote: {decision.summary()}")
    champion = tracking.model_version(uri, name, alias=ALIAS)
    samples = None
    if cfg.sample_images and champion is not None:
        samples = _sample(cfg, champion["version"], say)
    return NightResult(
        manifest.get("version", 1),
        candidate,
        champion["version"] if champion else None,
        promoted,
        samples,
        scores,
    )


def _train(cfg: NightlyConfig, digest: str, say: Callable[[str], None]) -> int | None:
    """Tonight's model version: trained now, or found from an earlier run tonight;
    None when a version was already trained on exactly this dataset (a night
    without new data trains nothing, even after a candidate lost)."""
    from pipeline.jobs.train.driver import train

    uri, name = cfg.tracking_uri, cfg.model_name
    tonight = cfg.train_config("")
    run_name = tonight.run_name
    found = tracking.find_run(uri, tonight.experiment, run_name)
    if found is not None and found[1] == "FINISHED":
        version = tracking.run_model_version(uri, name, found[0])
        if version is not None:
            # The run's latest version may be its post-hoc EMA reconstruction.
            source = _tags(cfg, version).get(EMA_SOURCE)
            version = int(source) if source else version
            say(f"nightly {cfg.night}: train: run {run_name} finished earlier: version {version}")
            return version
    trained = tracking.versions_with_tag(uri, name, "dataset_digest", digest)
    if found is None and trained:
        say(
            f"nightly {cfg.night}: train: nothing new: version {trained[-1]} was trained on "
            f"this dataset version"
        )
        return None
    champion = tracking.model_version(uri, name, alias=ALIAS)
    if found is not None:
        # An interrupted run resumes from the model it started from.
        init_from = tracking.run_params(uri, found[0]).get("init_from", "")
    else:
        init_from = f"{name}/{champion['version']}" if champion else ""
    result = train(cfg.train_config(init_from))
    start = f"from {init_from}" if init_from else "from scratch"
    say(
        f"nightly {cfg.night}: train: {run_name} ({start}), {result.images_seen} images, "
        f"loss {result.loss:.4f}: version {result.model_version}"
    )
    return result.model_version


def _evaluate(
    cfg: NightlyConfig, version: int, say: Callable[[str], None], lengths: tuple[float, ...] = ()
) -> EvaluateResult:
    """Score `version` on tonight's dataset, and its weights at the post-hoc EMA
    `lengths`; returns the results of its own weights (`key`, `metrics`...)."""
    from pipeline.jobs.evaluate import evaluate

    result = evaluate(cfg.evaluate_config(version, lengths))
    for scored in (result, *result.lengths.values()):
        for line in scored.sampler_lines():
            say(f"nightly {cfg.night}: evaluate: {cfg.model_name}/{version}: {line}")
        say(f"nightly {cfg.night}: evaluate: {scored.summary()}")
    return result


def _candidate(
    cfg: NightlyConfig, trained: int, say: Callable[[str], None]
) -> tuple[int, dict[int, dict]]:
    """Tonight's candidate and the evaluations so far (by version): the trained
    version, or its reconstruction at the post-hoc EMA length that scores best by
    the promotion metric."""
    result = _evaluate(cfg, trained, say, cfg.ema_lengths)
    if not cfg.ema_lengths:
        return trained, {trained: result.results}
    scored = {"fixed": result.results}
    lengths = {f"{length:g}": length for length in result.lengths}
    scored.update({label: result.lengths[length].results for label, length in lengths.items()})
    values = {length: _metric(cfg, results) for length, results in scored.items()}
    pick = max if cfg.metric in HIGHER_IS_BETTER else min
    best = pick(values, key=values.__getitem__)
    shown = ", ".join(f"{length} {value:.5g}" for length, value in values.items())
    say(f"nightly {cfg.night}: ema: {cfg.metric} by EMA length: {shown}; {best} wins")
    if _tags(cfg, trained).get(EMA_LENGTH) != "fixed":
        tracking.set_version_tags(cfg.tracking_uri, cfg.model_name, trained, {EMA_LENGTH: "fixed"})
    if best == "fixed":
        return trained, {trained: result.results}
    candidate = _register_length(cfg, trained, lengths[best], say)
    # Promotion reads a version's tags: the length's scores become the new
    # version's own (the same weights and seeds would give the very same scores).
    from pipeline.jobs.evaluate import carry

    try:
        carried = carry(cfg.evaluate_config(candidate, ()), result.lengths[lengths[best]])
    except ValueError as e:  # not the weights that were scored (a version found by tag)
        say(f"nightly {cfg.night}: evaluate: {e}: scoring {cfg.model_name}/{candidate} itself")
        carried = _evaluate(cfg, candidate, say)
    else:
        say(
            f"nightly {cfg.night}: evaluate: {cfg.model_name}/{candidate}: the scores of "
            f"{cfg.model_name}/{trained} at EMA length {best}, carried; results at {carried.uri}"
        )
    return candidate, {trained: result.results, candidate: carried.results}


def _metric(cfg: NightlyConfig, results: dict) -> float:
    """The promotion metric of `results`; a config error when it was not computed."""
    if cfg.metric not in results["metrics"]:
        reason = results["not_computed"].get(cfg.metric, "not reported")
        raise ConfigError(f"nightly.metric: {cfg.metric} was not computed ({reason})")
    return float(results["metrics"][cfg.metric])


def _register_length(
    cfg: NightlyConfig, trained: int, length: float, say: Callable[[str], None]
) -> int:
    """The version holding `trained`'s weights reconstructed at the post-hoc EMA
    `length`: registered now with the same card, or found by its tags."""
    uri, name, tag = cfg.tracking_uri, cfg.model_name, f"{length:g}"
    for version in tracking.versions_with_tag(uri, name, EMA_SOURCE, str(trained)):
        if _tags(cfg, version).get(EMA_LENGTH) == tag:
            say(f"nightly {cfg.night}: ema: {name}/{trained} at length {tag} is version {version}")
            return version
    model = registry.load_model(f"{name}/{trained}", uri, "nightly.model_name")
    model = registry.at_ema_length(model, length, "nightly.ema_lengths")
    # The training tags, but its own: the weights come from the snapshots, not
    # the checkpoint, and its evaluations and promotion are still to come.
    tags = {
        k: v
        for k, v in _tags(cfg, trained).items()
        if not k.startswith(("eval.", "promotion.")) and k not in ("checkpoint", EMA_LENGTH)
    }
    tags.update({"snapshots": model.card.snapshots, EMA_LENGTH: tag, EMA_SOURCE: str(trained)})
    files = {
        "model.safetensors": model.weights,
        "model.json": json.dumps(model.card.to_dict(), indent=1, sort_keys=True).encode(),
    }
    assert model.lineage.run_id, f"{name}/{trained} was registered by its training run"
    version = tracking.register_model(
        uri, model.lineage.run_id, name, files, tags, artifact_path=f"model-ema-{tag}"
    )
    say(f"nightly {cfg.night}: ema: registered {name}/{trained} at length {tag}: version {version}")
    return version


def _tags(cfg: NightlyConfig, version: int) -> dict[str, str]:
    found = tracking.model_version(cfg.tracking_uri, cfg.model_name, version)
    assert found is not None, f"{cfg.model_name}/{version} is registered"
    tags: dict[str, str] = found["tags"]
    return tags


def _sample(cfg: NightlyConfig, champion: int, say: Callable[[str], None]) -> str:
    from pipeline.jobs.generate.job import sample

    result = sample(cfg.sample_config(champion))
    say(
        f"nightly {cfg.night}: sample: {cfg.model_name}/{champion}: {result.summary()}; "
        f"manifest at {result.manifest_uri}"
    )
    return result.manifest_uri
