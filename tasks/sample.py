"""Generate images with a trained model into webdataset shards.

    python -m tasks.sample --model digits@champion --output s3://bucket/synthetic/digits \\
        --images 1000000 --actors 8 --sampler dpmpp_2m --steps 20
    python -m tasks.sample --model runs/digits/checkpoint-000000200000 --output out/ --images 64

Running the same command again generates only the shards still missing.
"""

import sys

from pipeline.config import SampleConfig
from tasks.cli import run_task


def main(cfg: SampleConfig) -> None:
    from pipeline.jobs.generate.job import sample

    result = sample(cfg)
    print(
        f"sample: {result.summary()}; manifest at {result.manifest_uri} "
        f"(MLflow run {result.run_id})"
    )


if __name__ == "__main__":
    sys.exit(run_task("tasks.sample", SampleConfig, main))
