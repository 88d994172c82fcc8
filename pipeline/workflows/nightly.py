"""The nightly pipeline: new raw images -> a new dataset version -> a model
retrained from the champion -> evaluated -> promoted if better -> generation.

Each step is the library call of its task, and each one skips what is already
done, so running the same night again changes nothing:
- preprocessing appends only the raw inputs that no version of the dataset holds
  yet, as new shards, and commits a new manifest version listing old and new;
- training is the run `<model_name>-<night>`: skipped when it finished, resumed
  when it was interrupted, and skipped when a version was already trained on
  this dataset version (a night without new data);
- evaluation skips a model already scored on this dataset version and settings;
  the champion is scored on the new version too, so the two are comparable;
- promotion skips a candidate already decided against the same champion;
- generation (by the champion, into `samples/<night>/`) writes only missing shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from pipeline.config import ConfigError
from pipeline.config.nightly import NightlyConfig
from pipeline.edges import tracking
from pipeline.jobs.promote import promote

ALIAS = "champion"


@dataclasses.dataclass(frozen=True)
class NightResult:
    dataset_version: int
    candidate: int | None
    """The version trained tonight (None when there was nothing new to train on)."""
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

    candidate = _train(cfg, digest, say)
    promoted, scores = False, None
    if candidate is not None:
        champion = tracking.model_version(uri, name, alias=ALIAS)
        evaluations = {}
        for version in sorted({candidate} | ({champion["version"]} if champion else set())):
            evaluations[version] = _evaluate(cfg, version, say)
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


def _evaluate(cfg: NightlyConfig, version: int, say: Callable[[str], None]) -> dict:
    """Score `version` on tonight's dataset; returns the results (`key`, `metrics`...)."""
    from pipeline.jobs.evaluate import evaluate

    result = evaluate(cfg.evaluate_config(version))
    for line in result.sampler_lines():
        say(f"nightly {cfg.night}: evaluate: {cfg.model_name}/{version}: {line}")
    say(f"nightly {cfg.night}: evaluate: {result.summary()}")
    return result.results


def _sample(cfg: NightlyConfig, champion: int, say: Callable[[str], None]) -> str:
    from pipeline.jobs.generate.job import sample

    result = sample(cfg.sample_config(champion))
    say(
        f"nightly {cfg.night}: sample: {cfg.model_name}/{champion}: {result.summary()}; "
        f"manifest at {result.manifest_uri}"
    )
    return result.manifest_uri
