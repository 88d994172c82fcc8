"""The nightly pipeline end to end on embedded defaults: a local Ray, a local
folder as the object store, an sqlite MLflow. It writes the example digits as the
night's raw images, then runs `tasks.nightly`: preprocess, train, evaluate (pixel
Frechet distance, label fidelity, CAS), promote, generate 1,000 digits, and
draws a grid of them. With --latent it trains an autoencoder first, and the
night encodes the digits and trains on their latents.

    python -m tasks.quickstart [--workdir quickstart] [--resolution 32] [--latent true]

Running it again changes nothing (another `--night` without new digits trains
nothing either: the champion was trained on this very dataset).
"""

import sys

from pipeline.config import QuickstartConfig
from tasks.cli import run_task


def main(cfg: QuickstartConfig) -> None:
    from PIL import Image

    from pipeline.data.digits import write_digits
    from pipeline.data.transforms import encode_png
    from pipeline.edges import cluster, storage, tracking
    from pipeline.jobs.generate.job import preview
    from pipeline.workflows.nightly import nightly

    def say(line: str) -> None:
        print(f"quickstart: {line}", flush=True)

    cluster.quiet()
    say(f"{write_digits(cfg.raw)} example digits under {cfg.raw}")
    night = cfg.nightly_config()
    if cfg.latent:
        from pipeline.workflows.autoencoder import autoencoder_for

        autoencoder_for(cfg, say)
    result = nightly(night, say=say)
    say(
        f"the dataset (version {result.dataset_version}) is in {night.dataset}/, "
        f"checkpoints in {night.storage}/, evaluations in {night.evaluations}/"
    )
    if result.scores:
        m = result.scores  # the digits are labelled and have a validation split
        say(
            f"{night.model_name}/{result.candidate}: label fidelity {m['label_fidelity']:.3f} "
            f"(real digits: {m['label_fidelity_ceiling']:.3f}), CAS {m['cas']:.3f}, pixel "
            f"Frechet distance {m['fd_pixel']:.3f}, copies of training digits "
            f"{m['copy_rate']:.1%}"
        )
    if result.samples and result.champion is not None:
        output = night.sample_config(result.champion).output
        grid = f"{output}-grid.png"
        png = encode_png(Image.fromarray(preview(output)))
        if not storage.exists(grid) or storage.read_bytes(grid) != png:  # a re-run writes nothing
            storage.write_bytes(grid, png)
        say(
            f"{cfg.sample_images} generated digits in {output}/, its dataset card in "
            f"{output}/card.md; a grid of them, a row per class: {grid}"
        )
    if night.tracking_uri.startswith("sqlite:"):
        say(f"see the runs in MLflow: mlflow ui --backend-store-uri {night.tracking_uri}")
    else:
        say(f"see the runs in MLflow at {tracking.redact(night.tracking_uri)} (experiment nightly)")


if __name__ == "__main__":
    sys.exit(run_task("tasks.quickstart", QuickstartConfig, main))
