"""The pipeline end to end on embedded defaults: a local Ray, a local folder as
the object store. Today: write the example digits, preprocess them, train a
small model on them (tracked in a local MLflow database).

    python -m tasks.quickstart [--workdir quickstart]

Running it again reuses what is done: the shards, and the finished training run.
"""

import sys

from pipeline import storage
from pipeline.config import PreprocessConfig, QuickstartConfig, TrainConfig
from pipeline.config.data import QUICKSTART_PRESETS
from tasks.cli import run_task


def main(cfg: QuickstartConfig) -> None:
    from pipeline.data.digits import write_digits
    from pipeline.preprocess import preprocess
    from pipeline.training import train

    raw = storage.join(cfg.workdir, "raw", "digits")
    print(f"quickstart: wrote {write_digits(raw)} example digits under {raw}")
    dataset = storage.join(cfg.workdir, "datasets", f"digits-{cfg.resolution}")
    result = preprocess(
        PreprocessConfig(
            input=raw,
            output=dataset,
            resolution=cfg.resolution,
            small_images="upscale",
            validation_fraction=0.1,
        )
    )
    print(f"quickstart: {result.summary()}")
    print(f"quickstart: shards in {dataset}/, manifest at {result.manifest_uri}")

    tracking_uri = cfg.tracking_uri
    if not tracking_uri and not storage.is_s3(cfg.workdir):
        tracking_uri = f"sqlite:///{storage.join(cfg.workdir, 'mlflow.db')}"
    preset = QUICKSTART_PRESETS[cfg.resolution]
    trained = train(
        TrainConfig(
            dataset=dataset,
            run_name=f"quickstart-digits-{cfg.resolution}",
            storage=storage.join(cfg.workdir, "runs"),
            preset=preset,
            images=cfg.images,
            batch_size=64,
            workers=cfg.workers,
            lr=2e-3,
            lr_rampup_images=1_000,
            ema_halflife_images=2_000,
            checkpoint_every_images=cfg.images // 4,
            log_every_images=640,
            sample_every_images=cfg.images // 2,
            tracking_uri=tracking_uri,
            experiment="quickstart",
        )
    )
    print(
        f"quickstart: trained {preset} on {trained.images_seen} images, loss "
        f"{trained.loss:.3f}; checkpoint {trained.checkpoint}; registered "
        f"{trained.model_name} version {trained.model_version}"
    )
    tracking = TrainConfig(dataset=dataset, tracking_uri=tracking_uri).tracking_uri
    if tracking.startswith("sqlite:"):
        print(f"quickstart: see the run in MLflow: mlflow ui --backend-store-uri {tracking}")
    else:
        print(f"quickstart: see the run in MLflow at {tracking} (experiment quickstart)")


if __name__ == "__main__":
    sys.exit(run_task("tasks.quickstart", QuickstartConfig, main))
