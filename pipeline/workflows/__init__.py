"""Workflows that compose the jobs: the nightly retraining (`nightly`)."""
