"""Preprocess: raw images -> webdataset shards and a manifest (`job`), the Ray Data
work on one shard (`build`), and appending new inputs as a new dataset version
(`versions`)."""

from pipeline.jobs.preprocess.job import PreprocessResult, preprocess

__all__ = ["PreprocessResult", "preprocess"]
