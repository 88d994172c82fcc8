"""Typed configs: defaults < YAML < flags, and errors that name the field."""

import dataclasses
import os
from typing import ClassVar, Literal

import pytest

from pipeline import config as C
from pipeline.config import ConfigError, PreprocessConfig


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


@pytest.mark.parametrize("cls", [PreprocessConfig, C.DigitsConfig, C.QuickstartConfig])
def test_every_field_is_documented_and_shown_in_help(cls):
    docs = C.field_docs(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    assert set(docs) == set(names) and all(len(d) > 10 for d in docs.values())
    text = " ".join(C.make_parser(cls, "t", "").format_help().split())
    for name in names:
        assert f"--{name}" in text
        assert " ".join(docs[name].split()[:4]) in text


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
