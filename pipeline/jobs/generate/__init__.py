"""Batch generation: the driver lists, plans and tracks the job (`job`); Ray Data
actors sample and write one shard per call (`sampler`).

Nothing is imported here: the actors import `sampler` alone, without the
driver's MLflow (import `sample` and `preview` from `pipeline.jobs.generate.job`).
"""
