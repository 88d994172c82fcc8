"""The nightly pipeline: new raw images -> a new dataset version -> a model
retrained from the champion -> evaluated -> promoted if better -> generation.

Each step is the library call of its task, and each one skips what is already
done, so running the same night again changes nothing:
- preprocessing appends only the raw inputs that no version of the dataset holds
  yet, as new shards, and commits a new manifest version listing old and new;
- training is the run `<model_name>-<night>`: skipped when it finished, resumed
  when it was interrupted, and skipped when the dataset has not changed since
  the champion was trained on it;
- evaluation skips a model already scored on this dataset version and settings;
  the champion is scored on the new version too, so the two are comparable;
- promotion skips a candidate already decided against the same champion;
- generation (by the champion, into `samples/<night>/`) writes only missing shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from pipeline import storage, tracking
from pipeline.config import (
    EvaluateConfig,
    PreprocessConfig,
    PromoteConfig,
    SampleConfig,
    TrainConfig,
)
from pipeline.config.evaluate import parse_sampler
from pipeline.config.nightly import NightlyConfig

EXPERIMENT = "nightly"
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


def nightly(cfg: NightlyConfig, say: Callable[[str], None] = print) -> NightResult:
    """Run the night `cfg` describes; see the module doc."""
    from pipeline.preprocess import preprocess
    from pipeline.training import load_dataset

    uri, name = cfg.tracking_uri, cfg.model_name
    prepared = preprocess(
        PreprocessConfig(input=cfg.raw, output=cfg.dataset, resolution=cfg.resolution,
                         small_images="upscale", validation_fraction=cfg.validation_fraction),
        append=True,
    )  # fmt: skip
    say(f"nightly {cfg.night}: preprocess: {prepared.summary()}")
    manifest, digest = load_dataset(cfg.dataset, "nightly.dataset")

    candidate = _train(cfg, digest, say)
    promoted = False
    if candidate is not None:
        champion = tracking.model_version(uri, name, alias=ALIAS)
        for version in sorted({candidate} | ({champion["version"]} if champion else set())):
            _evaluate(cfg, version, say)
        decision = _promote(cfg, candidate)
        promoted = decision.promoted and not decision.already_decided
        say(f"nightly {cfg.night}: promote: {decision.summary()}")
    champion = tracking.model_version(uri, name, alias=ALIAS)
    samples = None
    if cfg.sample_images and champion is not None:
        samples = _sample(cfg, champion["version"], say)
    return NightResult(manifest.get("version", 1), candidate,
                       champion and champion["version"], promoted, samples)  # fmt: skip


def _train(cfg: NightlyConfig, digest: str, say) -> int | None:
    """Tonight's model version: trained now, or found from an earlier run tonight;
    None when the champion was already trained on exactly this dataset."""
    from pipeline.training import train

    uri, name = cfg.tracking_uri, cfg.model_name
    run_name = f"{name}-{cfg.night}"
    found = tracking.find_run(uri, EXPERIMENT, run_name)
    if found is not None and found[1] == "FINISHED":
        version = tracking.run_model_version(uri, name, found[0])
        if version is not None:
            say(f"nightly {cfg.night}: train: run {run_name} finished earlier: version {version}")
            return version
    champion = tracking.model_version(uri, name, alias=ALIAS)
    if found is None and champion and champion["tags"].get("dataset_digest") == digest:
        say(f"nightly {cfg.night}: train: nothing new since the champion "
            f"(version {champion['version']}) was trained on this dataset")  # fmt: skip
        return None
    if found is not None:
        # An interrupted run resumes from the model it started from.
        init_from = tracking.run_params(uri, found[0]).get("init_from", "")
    else:
        init_from = f"{name}/{champion['version']}" if champion else ""
    result = train(TrainConfig(
        dataset=cfg.dataset, run_name=run_name, storage=cfg.storage, preset=cfg.preset,
        images=cfg.images, batch_size=cfg.batch_size, workers=cfg.workers, use_gpu=cfg.use_gpu,
        cpus_per_worker=cfg.cpus_per_worker, lr=cfg.lr, lr_rampup_images=cfg.lr_rampup_images,
        ema_halflife_images=cfg.ema_halflife_images,
        checkpoint_every_images=max(cfg.batch_size, cfg.images // 4),
        log_every_images=max(cfg.batch_size, cfg.images // 20), sample_every_images=0,
        tracking_uri=uri, experiment=EXPERIMENT, model_name=name, init_from=init_from,
    ))  # fmt: skip
    start = f"from {init_from}" if init_from else "from scratch"
    say(f"nightly {cfg.night}: train: {run_name} ({start}), {result.images_seen} images, "
        f"loss {result.loss:.4f}: version {result.model_version}")  # fmt: skip
    return result.model_version


def _evaluate(cfg: NightlyConfig, version: int, say) -> None:
    from pipeline.evaluation import evaluate

    result = evaluate(EvaluateConfig(
        model=f"{cfg.model_name}/{version}", dataset=cfg.dataset, output=cfg.evaluations,
        images=cfg.eval_images, sampler=cfg.eval_sampler, compare=cfg.eval_compare,
        batch_size=min(cfg.eval_images, 500), use_gpu=cfg.use_gpu, tracking_uri=cfg.tracking_uri,
    ))  # fmt: skip
    for line in result.sampler_lines():
        say(f"nightly {cfg.night}: evaluate: {cfg.model_name}/{version}: {line}")
    say(f"nightly {cfg.night}: evaluate: {result.summary()}")


def _promote(cfg: NightlyConfig, candidate: int):
    from pipeline.promotion import promote

    return promote(PromoteConfig(
        model_name=cfg.model_name, version=candidate, metric=cfg.metric, margin=cfg.margin,
        alias=ALIAS, tracking_uri=cfg.tracking_uri,
    ))  # fmt: skip


def _sample(cfg: NightlyConfig, champion: int, say) -> str:
    from pipeline.sampling import sample

    sampler, steps = parse_sampler(cfg.sample_sampler)
    result = sample(SampleConfig(
        model=f"{cfg.model_name}/{champion}", output=storage.join(cfg.samples, cfg.night),
        images=cfg.sample_images, sampler=sampler, steps=steps, use_gpu=cfg.use_gpu,
        tracking_uri=cfg.tracking_uri,
    ))  # fmt: skip
    say(f"nightly {cfg.night}: sample: {cfg.model_name}/{champion}: {result.summary()}; "
        f"manifest at {result.manifest_uri}")  # fmt: skip
    return result.manifest_uri
