"""The nightly pipeline end to end on embedded defaults: a local Ray, a local
folder as the object store, an sqlite MLflow. It writes the example digits as the
night's raw images, then runs `tasks.nightly`: preprocess, train, evaluate
(Heun against the 1000-step stochastic sampler), promote, generate 1,000 images.

    python -m tasks.quickstart [--workdir quickstart]

Running it again changes nothing (another `--night` without new digits trains
nothing either: the champion was trained on this very dataset).
"""

import sys

from pipeline import storage
from pipeline.config import NightlyConfig, QuickstartConfig
from pipeline.config.data import QUICKSTART_PRESETS
from tasks.cli import run_task


def main(cfg: QuickstartConfig) -> None:
    from pipeline.data.digits import write_digits
    from pipeline.nightly import nightly

    raw = storage.join(cfg.workdir, "raw", "digits")
    print(f"quickstart: {write_digits(raw)} example digits under {raw}")
    tracking_uri = cfg.tracking_uri
    if not tracking_uri and not storage.is_s3(cfg.workdir):
        tracking_uri = f"sqlite:///{storage.join(cfg.workdir, 'mlflow.db')}"
    night = NightlyConfig(
        raw=raw, dataset=storage.join(cfg.workdir, "datasets", f"digits-{cfg.resolution}"),
        storage=storage.join(cfg.workdir, "runs"),
        evaluations=storage.join(cfg.workdir, "evaluations"),
        samples=storage.join(cfg.workdir, "samples"), model_name=f"digits-{cfg.resolution}",
        night=cfg.night, resolution=cfg.resolution, preset=QUICKSTART_PRESETS[cfg.resolution],
        images=cfg.images, workers=cfg.workers, eval_images=cfg.eval_images,
        eval_compare=cfg.compare, sample_images=cfg.sample_images, tracking_uri=tracking_uri,
    )  # fmt: skip
    result = nightly(night, say=lambda line: print(f"quickstart: {line}", flush=True))
    print(f"quickstart: the dataset (version {result.dataset_version}) is in {night.dataset}/, "
          f"checkpoints in {night.storage}/, evaluations in {night.evaluations}/")  # fmt: skip
    if result.samples:
        print(f"quickstart: {cfg.sample_images} generated digits: {result.samples}")
    if night.tracking_uri.startswith("sqlite:"):
        print(f"quickstart: see the runs in MLflow: mlflow ui --backend-store-uri "
              f"{night.tracking_uri}")  # fmt: skip
    else:
        from pipeline.tracking import redact

        print(f"quickstart: see the runs in MLflow at {redact(night.tracking_uri)} "
              "(experiment nightly)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(run_task("tasks.quickstart", QuickstartConfig, main))
