"""Typed task configs: frozen dataclasses, loaded from YAML and the command line.
See `pipeline.config.core` for how; the task configs live beside it."""

from pipeline.config.core import (
    Checked,
    ConfigError,
    field_docs,
    from_dict,
    load_yaml,
    make_parser,
    parse_args,
    to_dict,
)
from pipeline.config.data import DigitsConfig, PreprocessConfig
from pipeline.config.evaluate import EvaluateConfig, PromoteConfig
from pipeline.config.model import ModelConfig
from pipeline.config.nightly import NightlyConfig
from pipeline.config.quickstart import QuickstartConfig
from pipeline.config.sample import SampleConfig
from pipeline.config.train import TrainConfig

__all__ = [
    "Checked",
    "ConfigError",
    "DigitsConfig",
    "EvaluateConfig",
    "ModelConfig",
    "NightlyConfig",
    "PreprocessConfig",
    "PromoteConfig",
    "QuickstartConfig",
    "SampleConfig",
    "TrainConfig",
    "field_docs",
    "from_dict",
    "load_yaml",
    "make_parser",
    "parse_args",
    "to_dict",
]
