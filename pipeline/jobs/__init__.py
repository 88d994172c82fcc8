"""The jobs, one per task: `preprocess` (raw images -> dataset shards), `train`
(Ray Train), `generate` (batch generation into shards), `evaluate` and `promote`.
No job imports another: what two jobs share lives in a lower layer."""
