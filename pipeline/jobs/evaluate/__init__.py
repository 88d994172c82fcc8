"""Evaluation: the driver that scores a model against its dataset and records the
result (`job`), and the model's samples and held-out losses, computed in one Ray
task (`outputs`)."""

from pipeline.jobs.evaluate.job import EvaluateResult, carry, check_fits, evaluate

__all__ = ["EvaluateResult", "carry", "check_fits", "evaluate"]
