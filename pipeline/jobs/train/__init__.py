"""Training on Ray Train: the driver plans, resumes, tracks and registers
(`driver`); each Ray Train worker runs the loop (`worker`)."""

from pipeline.jobs.train.driver import TrainResult, train

__all__ = ["TrainResult", "train"]
