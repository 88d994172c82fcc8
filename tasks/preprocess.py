"""Raw images -> webdataset shards, a manifest and a list of rejects.

python -m tasks.preprocess --input photos/ --output s3://bucket/datasets/photos-64
python -m tasks.preprocess --config preprocess.yaml --resolution 32
"""

import sys

from pipeline.config import PreprocessConfig
from tasks.cli import run_task


def main(cfg: PreprocessConfig) -> None:
    from pipeline.jobs.preprocess import preprocess

    result = preprocess(cfg)
    print(f"preprocess: {result.summary()}")


if __name__ == "__main__":
    sys.exit(run_task("tasks.preprocess", PreprocessConfig, main))
