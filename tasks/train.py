"""Train a denoiser on a preprocessed dataset with Ray Train, tracked in MLflow.

    python -m tasks.train --dataset s3://bucket/datasets/digits-8 --run_name digits \\
        --workers 2 --images 200000 --storage s3://bucket/runs
    ray job submit --working-dir . -- python -m tasks.train --config train.yaml

Running the same command again resumes the run of that name.
"""

import sys

from pipeline.config import TrainConfig
from tasks.cli import run_task


def main(cfg: TrainConfig) -> None:
    from pipeline.edges.tracking import redact
    from pipeline.jobs.train.driver import train

    result = train(cfg)
    print(
        f"train: {result.images_seen} images seen, loss {result.loss:.4f}; "
        f"checkpoint {result.checkpoint}; registered {result.model_name} "
        f"version {result.model_version} (MLflow run {result.run_id} at {redact(cfg.tracking_uri)})"
    )


if __name__ == "__main__":
    sys.exit(run_task("tasks.train", TrainConfig, main))
