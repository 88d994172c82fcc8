"""A distributed diffusion pipeline on Ray: preprocess, train, sample, evaluate, promote.

Layers, top to bottom; a module imports only from its own layer and those below
(import-linter contracts in pyproject.toml; docs/architecture.md):
- `workflows`: the jobs chained (the nightly retraining);
- `jobs`: one per task (preprocess, train, generate, evaluate, promote), none
  importing another; the code that runs on Ray Data and Ray Train is here;
- `data`: the dataset format: shards and manifests, inputs, decoding, transforms;
- `edges`: storage (the one module that reads and writes locations), tracking
  (the one MLflow import), the model registry, checkpoints, the Ray cluster;
- `config`: typed, validated settings, how a location is written, typed records;
- `maths`: diffusion, network, solvers, metrics: torch and numpy only.
The entry points (`python -m tasks.<name>`) sit above them all, in `tasks`.
"""
