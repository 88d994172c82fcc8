"""Evaluation: how good a model is against the data it was trained for.

The model generates images from fixed seeds (the same seeds, labels and noise
for every model), and the samples are compared with the dataset's reference
images in pixel space: Frechet distance, sliced Wasserstein distance and k-NN
precision and recall (`pipeline.maths.metrics`); FID and KID on Inception features
when the user gives a local weights file. For a labelled dataset, label fidelity
and the Classification Accuracy Score say whether the samples would serve as
training data (`pipeline.maths.classifier`). The held-out denoising loss is EDM's
loss on the validation split at fixed noise levels with fixed noise, so two
models see exactly the same noisy images.

The reference (pixel features of a sample of the train split that does not grow
with it, the label judge and the CAS baseline) depends only on the dataset's
manifest, so it is computed once, by a Ray task beside the model's, and kept
beside the dataset (`reference/`, see `pipeline.data.reference`). The results go
to one JSON file per (model weights, dataset version, settings): its presence
means done, so a re-run writes nothing. They also go to MLflow: metrics on the
training run of the model version, and tags on the version (`eval.key`,
`eval.<key>.<metric>`) that `tasks.promote` reads.

With post-hoc EMA lengths (`evaluate.ema_length`), the model's weights are also
reconstructed at each length from the snapshots its training run stored
(`registry.at_ema_length`) and scored the same way (same seeds, same metrics),
each with its own results: the length is one of the settings of its key. The
version's `eval.key` stays that of its own weights, which promotion compares.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import ConfigError
from pipeline.config.evaluate import EvaluateConfig
from pipeline.data import latent_samples, reference
from pipeline.data.reference import (
    REFERENCE,
    SAMPLING,
    Split,
    kept_array,
    label_scores,
    pixel_features,
    reference_features,
)
from pipeline.data.shards import load_dataset
from pipeline.edges import autoencoders, cluster, registry, storage
from pipeline.jobs.evaluate import outputs
from pipeline.jobs.evaluate.results import (
    EvaluateResult,
    evaluation_settings,
    metric_prefix,
    record,
    recorded,
    results_location,
)
from pipeline.maths import metrics

if TYPE_CHECKING:
    from pipeline.maths.inception import InceptionFeatures


def evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Score the model `cfg` names, and its weights at each post-hoc EMA length of
    `cfg.ema_length` (`EvaluateResult.lengths`); see the module doc."""
    model = registry.load_model(cfg.model, cfg.tracking_uri, "evaluate.model")
    manifest, digest = load_dataset(cfg.dataset, "evaluate.dataset")
    if latent_samples.kind(manifest) == latent_samples.KIND:
        raise ConfigError(
            f"evaluate.dataset: {cfg.dataset} holds latents; models are scored on pixels: "
            f"give the dataset they were encoded from ({manifest['source']['dataset']})"
        )
    if manifest["resolution"] != model.card.image_side:
        raise ConfigError(
            f"evaluate.dataset: its images are {manifest['resolution']} px, the model's "
            f"{model.card.image_side} px, got {cfg.dataset!r}"
        )
    check_fits(cfg, model, manifest)
    _check_autoencoder(model)
    if cfg.ema_length:
        registry.require_snapshots(model, "evaluate.ema_length", cfg.ema_length)
    own = _evaluate_weights(cfg, model, manifest, digest, None)
    lengths = {
        length: _evaluate_weights(cfg, model, manifest, digest, length) for length in cfg.ema_length
    }
    return dataclasses.replace(own, lengths=lengths)


def _evaluate_weights(
    cfg: EvaluateConfig,
    model: registry.Model,
    manifest: dict,
    digest: str,
    ema_length: float | None,
) -> EvaluateResult:
    """Score `model`'s own weights (`ema_length` None) or its weights reconstructed
    at the post-hoc EMA length `ema_length`: each has its own results, keyed by
    the settings with the length in them, so a re-run finds them before any
    reconstruction."""
    settings = evaluation_settings(cfg, digest)
    if ema_length is not None:
        settings["ema_length"] = ema_length
    key, uri = results_location(cfg, model, settings)
    done = recorded(uri)
    if done is not None:
        return done
    model_ref = model.describe()
    if ema_length is not None:
        model_ref += f" at EMA length {ema_length:g}"
        model = registry.at_ema_length(model, ema_length, "evaluate.ema_length")
    inception = _inception(cfg)

    train = Split(cfg.dataset, manifest, "train", cfg.reference_images)
    validation = Split(cfg.dataset, manifest, "validation", cfg.heldout_images)
    heldout, labels = validation.read()
    if not model.card.model.num_classes:
        labels = None  # an unconditional model of a labelled dataset
    # The judge and the CAS baseline when the model's samples have labels.
    cas_images = cfg.images if model.card.model.num_classes else None
    outputs = _model_outputs(cfg, model, heldout, labels, (train, digest, cas_images))
    real = reference_features(train, digest)  # kept by the cluster's task
    samplers = [cfg.sampler, *cfg.compare]
    prefixes = {name: metric_prefix(i, name) for i, name in enumerate(samplers)}
    scores, not_computed = {}, {}
    real_inception = None
    if inception is not None:
        real_inception = _reference_inception(cfg, train, settings, inception)
    for name, prefix in prefixes.items():
        fake = pixel_features(outputs["samples"][name])
        scores.update({prefix + k: v for k, v in _pixel_scores(real, fake, cfg).items()})
        if inception is None or real_inception is None:
            not_computed[prefix + "fid"] = not_computed[prefix + "kid"] = (
                "no Inception weights file given (evaluate.inception)"
            )
        else:
            from pipeline.maths.inception import fid_kid

            found = fid_kid(real_inception, inception.features(outputs["samples"][name]))
            scores.update({prefix + k: v for k, v in found.items()})
    for name, rate in outputs.get("copy_rates", {}).items():
        scores[prefixes[name] + "copy_rate"] = rate
    found, missing = label_scores(
        train, validation, digest, outputs["samples"], outputs["labels"], prefixes
    )
    scores.update(found)
    not_computed.update(missing)
    if outputs["heldout"] is None:
        not_computed["heldout_loss"] = "the dataset has no validation images"
    else:
        for sigma, loss in zip(cfg.heldout_sigmas, outputs["heldout"], strict=True):
            scores[f"heldout_loss.sigma_{sigma:g}"] = loss
        scores["heldout_loss"] = float(np.mean(outputs["heldout"]))

    results = {
        "model_ref": model_ref,
        "model": model.lineage.to_dict(),
        "key": key,
        "dataset": {"uri": cfg.dataset, "digest": digest, "version": manifest.get("version", 1)},
        "settings": settings,
        "metrics": scores,
        "not_computed": not_computed,
        "evaluated_at": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    return record(cfg, model, uri, results)


def check_fits(cfg: EvaluateConfig, model: registry.Model, manifest: dict) -> None:
    """The model can be scored on this dataset; a config error naming what differs."""
    classes = model.card.model.num_classes
    names = None if model.card.classes is None else list(model.card.classes)
    if classes and len(manifest.get("classes") or []) != classes:
        raise ConfigError(
            f"evaluate.dataset: the model has {classes} classes, the dataset "
            f"{len(manifest.get('classes') or [])}, got {cfg.dataset!r}"
        )
    if names and manifest.get("classes") and names != manifest["classes"]:
        raise ConfigError(
            f"evaluate.dataset: the model's classes are {names}, the dataset's "
            f"{manifest['classes']}, got {cfg.dataset!r}"
        )
    if cfg.neighbours >= min(cfg.images, cfg.reference_images):
        raise ConfigError(
            f"evaluate.neighbours: must be below images and reference_images, got {cfg.neighbours}"
        )


def _check_autoencoder(model: registry.Model) -> None:
    """A latent model's autoencoder is where its card says, and is its own: found
    now, in one line, not in the Ray task that decodes."""
    space = model.card.latents
    if space is None:
        return
    try:
        autoencoders.check(space.autoencoder, space.digest)
    except autoencoders.AutoencoderError as e:
        raise ConfigError(f"evaluate.model: {model.describe()}'s autoencoder: {e}") from None


def _inception(cfg: EvaluateConfig) -> InceptionFeatures | None:
    if not cfg.inception:
        return None
    from pipeline.maths.inception import InceptionFeatures

    try:
        return InceptionFeatures(cfg.inception)
    except ValueError as e:
        raise ConfigError(f"evaluate.inception: {e}") from None


def _reference_inception(
    cfg: EvaluateConfig, train: Split, settings: dict, inception: InceptionFeatures
) -> np.ndarray:
    """Inception features of the same reference images, kept per weights file."""

    def compute() -> np.ndarray:
        images, _ = train.read()
        assert images is not None  # evaluate() refuses a dataset without train images
        return inception.features(images)

    name = (
        f"inception-{settings['dataset'][:16]}-{cfg.reference_images}-{SAMPLING}-"
        f"{settings['inception'][:12]}.npz"
    )
    return kept_array(storage.join(cfg.dataset, REFERENCE, name), compute)


def _pixel_scores(reference: np.ndarray, fake: np.ndarray, cfg: EvaluateConfig) -> dict:
    precision, recall = metrics.precision_recall(reference, fake, k=cfg.neighbours)
    return {
        "fd_pixel": metrics.frechet_distance(reference, fake),
        "swd_pixel": metrics.sliced_wasserstein(reference, fake, seed=cfg.seed),
        "precision": precision,
        "recall": recall,
    }


# --- the model side, on the cluster ------------------------------------------------


def _model_outputs(
    cfg: EvaluateConfig,
    model: registry.Model,
    heldout: np.ndarray | None,
    labels: np.ndarray | None,
    references: tuple[Split, str, int | None],
) -> dict:
    """Samples of every sampler and the held-out losses, computed by one Ray task
    (on a GPU when the cluster has one); before it, when the dataset version has
    none kept yet, its references (`reference.prepare`: the pixel features, the
    judge and the CAS baseline of `references`, (train split, manifest digest,
    CAS images)) by another, so that the driver only reads them."""
    import ray

    cluster.connect()
    cluster.warn_local_paths([("evaluate.dataset", cfg.dataset)])
    use_gpu = cfg.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    # On CPUs, all of the largest node's (the task runs on one node).
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
    node_cpus = max(1, int(largest))
    cpus = 1 if use_gpu else node_cpus
    train, digest, cas_images = references
    prepared = None
    if reference.missing(train, digest, cas_images):
        # On CPUs: the classifiers are small, a GPU would wait on the PNG decoding.
        prepare = ray.remote(reference.prepare).options(num_cpus=node_cpus)
        prepared = prepare.remote(
            cfg.dataset, train.manifest, digest, train.limit, cas_images, node_cpus
        )
    task = ray.remote(outputs.model_outputs).options(num_cpus=cpus, num_gpus=1 if use_gpu else 0)
    samplers = [cfg.sampler, *cfg.compare]
    job = outputs.EvaluationJob(
        images=cfg.images,
        guidance=cfg.guidance,
        seed=cfg.seed,
        labels="uniform" if model.card.model.num_classes else "none",
        sigmas=tuple(cfg.heldout_sigmas),
        batch_size=cfg.batch_size,
        threads=cpus,
    )
    try:
        found = ray.get(task.remote(model.card, model.weights, samplers, job, heldout, labels))
        if prepared is not None:
            ray.get(prepared)
    finally:
        if prepared is not None:
            ray.cancel(prepared)  # a no-op once it finished; frees its CPUs if not
    found = dict(found)
    if train.count():
        # Each sample's nearest training image, against the whole train split.
        rates = ray.remote(reference.copy_rates).options(num_cpus=node_cpus)
        found["copy_rates"] = ray.get(
            rates.remote(cfg.dataset, train.manifest, digest, found["samples"],
                         cfg.max_copy_ratio, node_cpus)
        )  # fmt: skip
    return found
