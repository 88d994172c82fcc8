"""Typed configs: defaults < YAML < flags, and errors that name the field."""

import dataclasses
import os
from typing import ClassVar, Literal

import pytest

from pipeline import config as C
from pipeline.config import ConfigError, PreprocessConfig
from tests import tasks
from tests.services import ROOT


def load(argv, cls=PreprocessConfig):
    return C.parse_args(cls, C.make_parser(cls, "test", ""), argv)


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("input: raw\noutput: out\nresolution: 32\nlabels: none\n")
    cfg = load(["--config", str(path), "--resolution", "16", "--background", "0, 0, 10"])
    assert cfg.resolution == 16 and cfg.labels == "none" and cfg.input == os.path.abspath("raw")
    assert cfg.background == (0, 0, 10)
    assert (
        cfg.samples_per_shard == PreprocessConfig.__dataclass_fields__["samples_per_shard"].default
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output", "o"], "preprocess.input: required"),
        (
            ["--input", "i", "--output", "o", "--resolution", "-5"],
            "preprocess.resolution: must be an integer in 1..4096, got -5",
        ),
        (
            ["--input", "i", "--output", "o", "--resolution", "big"],
            "preprocess.resolution: expected an integer, got 'big'",
        ),
        (
            ["--input", "i", "--output", "o", "--labels", "colour"],
            "preprocess.labels: must be one of auto, folders, none; got 'colour'",
        ),
        (
            ["--input", "i", "--output", "o", "--validation_fraction", "1.5"],
            "preprocess.validation_fraction: must be a number in [0, 1), got 1.5",
        ),
        (
            ["--input", "i", "--output", "o", "--background", "1,2"],
            "preprocess.background: must be three integers in 0..255, got (1, 2)",
        ),
        (["--input", "same", "--output", "same/"], "preprocess.output: must not lie inside input"),
        (
            ["--input", "photos", "--output", "file://photos/ds"],
            "preprocess.output: must not lie inside input",
        ),
        (
            ["--input", "s3://b/data/raw", "--output", "s3://b/data"],
            "preprocess.input: must not lie inside output",
        ),
        (
            ["--input", "s3://", "--output", "o"],
            "preprocess.input: s3://: an S3 URI needs a bucket",
        ),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(argv, message):
    with pytest.raises(ConfigError) as err:
        load(argv)
    assert str(err.value).startswith(message)


def test_unknown_yaml_field_is_named(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("input: a\noutput: b\nresolutoin: 32\n")
    with pytest.raises(ConfigError, match=r"^preprocess\.resolutoin: unknown field; known fields"):
        load(["--config", str(path)])


@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n- b\n", "must hold a mapping"),
        ("input: [unclosed\n", "is not valid YAML"),
    ],
)
def test_bad_yaml_files_are_named(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(["--config", str(path)])


def test_missing_yaml_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read .*nope.yaml"):
        load(["--config", str(tmp_path / "nope.yaml")])


def test_unknown_flag_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        load(["--input", "a", "--output", "b", "--resolutoin", "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --resolutoin 3" in err


def test_configs_are_frozen_and_round_trip_through_plain_data():
    cfg = PreprocessConfig(input="a", output="b", background=(1, 2, 3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.resolution = 3
    plain = C.to_dict(cfg)
    assert plain["background"] == [1, 2, 3]
    assert C.from_dict(PreprocessConfig, plain) == cfg


CONFIGS = [
    PreprocessConfig,
    C.DigitsConfig,
    C.QuickstartConfig,
    C.TrainConfig,
    C.SampleConfig,
    C.EvaluateConfig,
    C.PromoteConfig,
    C.NightlyConfig,
    C.ModelConfig,
]


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_is_documented_and_shown_in_help(cls):
    docs = C.field_docs(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    assert set(docs) == set(names) and all(len(d) > 10 for d in docs.values())
    text = " ".join(C.make_parser(cls, "t", "").format_help().split())
    for name in names:
        assert f"--{name}" in text
        assert " ".join(docs[name].split()[:4]) in text


def test_every_task_explains_itself_with_help():
    # Every module in tasks/ that runs a task, found on disk, not listed here.
    modules = sorted(
        p.stem for p in (ROOT / "tasks").glob("*.py") if p.stem not in ("__init__", "cli")
    )
    assert {"train", "sample", "quickstart", "nightly"} <= set(modules)
    for name in modules:
        done = tasks.run(tasks.command(name, "--help"), timeout=120)
        assert done.returncode == 0 and done.stderr == "", (name, done.stderr[-2000:])
        assert done.stdout.startswith("usage: ") and "--" in done.stdout, name


def test_the_model_is_configured_by_nested_flags_and_yaml(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("dataset: d\nmodel:\n  template: small\n  blocks: 1\n")
    argv = [
        "--config",
        str(path),
        "--model.channels",
        "64",
        "--model.channel_mult",
        "1,2,2",
        "--model.attention",
        "",
    ]
    cfg = load(argv, C.TrainConfig)
    assert cfg.model == C.ModelConfig(
        template="small", channels=64, channel_mult=(1, 2, 2), blocks=1, attention=()
    )
    net = cfg.model.resolve(48, num_classes=10, label_dropout=0.1)
    shape = (net.resolution, net.channels, net.channel_mult, net.blocks, net.attention)
    assert shape == (48, 64, (1, 2, 2), 1, ())
    assert (net.num_classes, net.label_dropout, net.dropout) == (10, 0.1, 0.1)  # small's dropout


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model.template", "huge"],
            "train.model.template: must be one of tiny, small, base, base64, got 'huge'",
        ),
        (["--model.channels", "0"], "train.model.channels: must be a positive integer, got 0"),
        (
            ["--model.channel_mult", "1,0"],
            "train.model.channel_mult: must be positive integers, one per level, got (1, 0)",
        ),
        (
            ["--model.attention", "3"],
            "train.model: template tiny: attention: levels must lie in "
            "0..1 (one per channel_mult entry), got (3,)",
        ),
        (["--lr", "inf"], "train.lr: expected a finite number, got 'inf'"),
        (["--lr", "nan"], "train.lr: expected a finite number, got 'nan'"),
    ],
)
def test_bad_model_and_number_flags_name_the_field(argv, message):
    with pytest.raises(ConfigError) as err:
        load(["--dataset", "d", *argv], C.TrainConfig)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--resolution", "12", "--model.template", "small"],
            "quickstart.resolution: the small "
            "template takes images of 8 to 512 px and a multiple of 8 (channel_mult 1,2,2,2 halves "
            "the side 3 times), got 12",
        ),
        (
            ["--resolution", "1024"],
            "quickstart.resolution: the tiny template takes images of 8 "
            "to 512 px and a multiple of 2 (channel_mult 1,2 halves the side once), got 1024",
        ),
        (["--guidance", "-1"], "quickstart.guidance: must be >= 0, got -1.0"),
    ],
)
def test_a_resolution_the_network_cannot_take_is_refused_before_anything_runs(argv, message):
    with pytest.raises(ConfigError) as err:
        load(argv, C.QuickstartConfig)
    assert str(err.value) == message


@dataclasses.dataclass(frozen=True)
class _Inner(C.Checked):
    SECTION: ClassVar[str] = "inner"
    width: int = 4
    """Width."""
    kind: Literal["a", "b"] = "a"
    """Kind."""


@dataclasses.dataclass(frozen=True)
class _Outer(C.Checked):
    SECTION: ClassVar[str] = "outer"
    name: str = "x"
    """Name."""
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    """Nested settings."""
    limit: int | None = None
    """Optional limit."""


def test_nested_configs_take_dotted_flags_and_nested_yaml(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("inner:\n  width: 8\n")
    cfg = load(["--config", str(path), "--inner.kind", "b", "--limit", "none"], _Outer)
    assert cfg == _Outer(inner=_Inner(width=8, kind="b"), limit=None)
    assert load(["--limit", "7"], _Outer).limit == 7
    with pytest.raises(ConfigError, match=r"^outer\.inner\.wdth: unknown field"):
        C.from_dict(_Outer, {"inner": {"wdth": 1}})


def test_locations_are_normalized_so_equal_places_compare_equal(tmp_path):
    a = PreprocessConfig(input=f"file://{tmp_path}/raw/", output="s3://bucket/out/")
    b = PreprocessConfig(input=f"{tmp_path}/raw", output="s3://bucket/out")
    assert a == b and a.input == f"{tmp_path}/raw" and a.output == "s3://bucket/out"
    # siblings that share a name prefix are not inside each other
    PreprocessConfig(input="s3://bucket/data", output="s3://bucket/data2")
