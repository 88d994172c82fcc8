"""Evaluation: the driver that scores a model against its dataset (`job`), its
results and their records (`results`), and the model's samples and held-out
losses, computed in one Ray task (`outputs`)."""

from pipeline.jobs.evaluate.job import check_fits, evaluate
from pipeline.jobs.evaluate.results import EvaluateResult, carry

__all__ = ["EvaluateResult", "carry", "check_fits", "evaluate"]
