"""A pixel dataset -> its latents, through a diffusers AutoencoderKL, on Ray Data.

python -m tasks.encode --dataset s3://bucket/datasets/photos-256 \
    --autoencoder s3://bucket/autoencoders/sd-vae-ft-mse --output s3://bucket/latents/photos-256
python -m tasks.encode --config encode.yaml --precision bf16 --actors 4

Run it again on a grown dataset (a later version of it) to append the new shards.
"""

import sys

from pipeline.config.encode import EncodeConfig
from tasks.cli import run_task


def main(cfg: EncodeConfig) -> None:
    from pipeline.jobs.encode import encode

    result = encode(cfg)
    print(f"encode: {result.summary()}")


if __name__ == "__main__":
    sys.exit(run_task("tasks.encode", EncodeConfig, main))
