"""A pixel dataset to a latent dataset, on Ray Data (see `job`)."""

from pipeline.jobs.encode.job import EncodeResult, encode

__all__ = ["EncodeResult", "encode"]
