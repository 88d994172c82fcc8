"""The edges to the outside world: object storage (`storage`), MLflow (`tracking`),
the model registry and checkpoint folders (`registry`), checkpoint files
(`checkpoint`) and the Ray cluster (`cluster`). Jobs reach the outside only
through these modules."""
