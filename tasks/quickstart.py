"""The pipeline end to end on embedded defaults: a local Ray, a local folder as
the object store. Today: write the example digits, then preprocess them.

    python -m tasks.quickstart [--workdir quickstart]
"""

import sys

from pipeline import storage
from pipeline.config import PreprocessConfig, QuickstartConfig
from tasks.cli import run_task


def main(cfg: QuickstartConfig) -> None:
    from pipeline.data.digits import write_digits
    from pipeline.preprocess import preprocess

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


if __name__ == "__main__":
    sys.exit(run_task("tasks.quickstart", QuickstartConfig, main))
