"""A distributed diffusion pipeline on Ray: preprocess, train, sample, evaluate, promote.

Layers, imports pointing down only (see DESIGN.md):
- `preprocess` (and later training, sampling, evaluation): Ray lives here;
- `data`: decoding, transforms, the shard format;
- `storage` (the one module that knows URIs), `config` (typed task configs).
"""
