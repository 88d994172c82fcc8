"""Train an AutoencoderKL on a pixel dataset (Ray Train), registered in MLflow.

python -m tasks.train_autoencoder --dataset s3://bucket/datasets/scans-256 \
    --channels 64,128,256,256 --images 200000 --run_name scans-vae
python -m tasks.train_autoencoder --config autoencoder.yaml --discriminator_start_images 50000

The registered version's files are a `save_pretrained` folder: give it (or the
final checkpoint's `autoencoder/` folder) to tasks.encode --autoencoder.
"""

import sys

from pipeline.config.autoencoder import AutoencoderConfig
from tasks.cli import run_task


def main(cfg: AutoencoderConfig) -> None:
    from pipeline.jobs.train.autoencoder import train_autoencoder

    result = train_autoencoder(cfg)
    print(f"train_autoencoder: {result.summary()}")


if __name__ == "__main__":
    sys.exit(run_task("tasks.train_autoencoder", AutoencoderConfig, main))
