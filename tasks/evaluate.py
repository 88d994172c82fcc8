"""Score a model against its dataset: pixel-space Frechet and sliced Wasserstein
distances, k-NN precision/recall, the held-out denoising loss (and FID/KID with a
local Inception weights file). Results go to a JSON file and to MLflow.

    python -m tasks.evaluate --model digits@champion --dataset s3://bucket/datasets/digits \\
        --output s3://bucket/evaluations --compare euler_ancestral:1000

With `--ema_length 0.05,0.1,0.2` the model is also scored at those post-hoc EMA
lengths, reconstructed from its training run's snapshots: one line each.
Running the same command again finds the results and writes nothing.
"""

import sys

from pipeline.config import EvaluateConfig
from tasks.cli import run_task


def main(cfg: EvaluateConfig) -> None:
    from pipeline.jobs.evaluate import evaluate

    result = evaluate(cfg)
    for scored in (result, *result.lengths.values()):
        for line in scored.sampler_lines():
            print(f"evaluate: {line}")
    for name, reason in result.results["not_computed"].items():
        print(f"evaluate: {name} not computed: {reason}")
    for scored in (result, *result.lengths.values()):
        print(f"evaluate: {scored.summary()}")


if __name__ == "__main__":
    sys.exit(run_task("tasks.evaluate", EvaluateConfig, main))
