"""Faults for the training tests, injected from outside the pipeline's code.

The training tests' Ray cluster puts this folder on its nodes' PYTHONPATH, so
every Python process of that cluster imports this module at start-up (Python
imports `sitecustomize` by itself). It wraps `pipeline.maths.train_step.train_step`
as that module is imported. The wrapper does nothing unless the JSON file named
by TRAINING_TEST_FAULTS asks for a fault in the Ray Train run the process works
for:

    {"nan_at_images": {"<run name>": 640}}

makes that run's images NaN from 640 images seen on, so the loss becomes NaN at
that step as a diverging run's would.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import os
import sys

TARGET = "pipeline.maths.train_step"


def _nan_at_images() -> int | None:
    """Images seen from which this process's run gets NaN images (None: never)."""
    try:
        with open(os.environ["TRAINING_TEST_FAULTS"]) as f:
            faults = json.load(f)
    except (KeyError, FileNotFoundError):
        return None
    import ray.train

    run = ray.train.get_context().get_experiment_name()
    return faults.get("nan_at_images", {}).get(run)


def _with_faults(train_step):
    @functools.wraps(train_step)
    def faulty(denoiser, optimizer, ema, batches, *, images_seen, **kw):
        at = _nan_at_images()
        if at is not None and images_seen >= at:
            batches = [(x * float("nan"), label) for x, label in batches]
        return train_step(denoiser, optimizer, ema, batches, images_seen=images_seen, **kw)

    return faulty


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds TARGET as Python would, and wraps its train_step once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # the real module, found by the other finders
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.train_step = _with_faults(module.train_step)

        spec.loader.exec_module = exec_module
        return spec


if "TRAINING_TEST_FAULTS" in os.environ:
    sys.meta_path.insert(0, _WrapOnImport())
