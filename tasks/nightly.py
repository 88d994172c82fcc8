"""The nightly pipeline: preprocess the raw images that arrived, retrain from the
champion, evaluate, promote if better, generate with the champion.

    python -m tasks.nightly --raw s3://bucket/raw/digits --dataset s3://bucket/datasets/digits \\
        --storage s3://bucket/runs --evaluations s3://bucket/evaluations \\
        --samples s3://bucket/samples --model_name digits
    ray job submit --working-dir . -- python -m tasks.nightly --config nightly.yaml

Running the same night again (same --night, default today in UTC) changes nothing.
"""

import sys

from pipeline.config import NightlyConfig
from tasks.cli import run_task


def main(cfg: NightlyConfig) -> None:
    from pipeline.workflows.nightly import nightly

    night = nightly(cfg)
    champion = f"{cfg.model_name}/{night.champion}" if night.champion else "none"
    print(
        f"nightly {cfg.night}: done: dataset version {night.dataset_version}, champion "
        f"{champion}{' (promoted tonight)' if night.promoted else ''}"
    )


if __name__ == "__main__":
    sys.exit(run_task("tasks.nightly", NightlyConfig, main))
