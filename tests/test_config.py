"""Typed configs: defaults < YAML < flags, and errors that name the field."""

import dataclasses
import os
from typing import ClassVar, Literal

import pytest

from pipeline import config as C
from pipeline.config import ConfigError, PreprocessConfig
from pipeline.config.autoencoder import AutoencoderConfig
from pipeline.config.encode import EncodeConfig
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


@pytest.mark.parametrize(
    "cls, argv, message",
    [
        (
            C.EvaluateConfig,
            ["--model", "m/1", "--dataset", "d", "--ema_length", "0.05,0.3"],
            "evaluate.ema_length: each length (EDM2's sigma_rel) must be in (0, 0.2887), "
            "got (0.05, 0.3)",
        ),
        (
            C.EvaluateConfig,
            ["--model", "m/1", "--dataset", "d", "--ema_length", "0"],
            "evaluate.ema_length: each length (EDM2's sigma_rel) must be in (0, 0.2887), "
            "got (0.0,)",
        ),
        (
            C.EvaluateConfig,
            ["--model", "m/1", "--dataset", "d", "--ema_length", "0.1,0.1"],
            "evaluate.ema_length: must not repeat a length, got (0.1, 0.1)",
        ),
        (
            C.NightlyConfig,
            ["--ema_lengths", "-0.1"],
            "nightly.ema_lengths: each length (EDM2's sigma_rel) must be in (0, 0.2887), "
            "got (-0.1,)",
        ),
    ],
)
def test_post_hoc_ema_lengths_are_sigma_rel_values(cls, argv, message):
    with pytest.raises(ConfigError) as err:
        load(argv, cls)
    assert str(err.value) == message


def test_post_hoc_ema_lengths_parse_and_default():
    evaluate = load(
        ["--model", "m/1", "--dataset", "d", "--ema_length", "0.05,0.1,0.2"], C.EvaluateConfig
    )
    assert evaluate.ema_length == (0.05, 0.1, 0.2)
    assert load(["--model", "m/1", "--dataset", "d"], C.EvaluateConfig).ema_length == ()
    nightly = load([], C.NightlyConfig)
    assert nightly.ema_lengths == (0.05, 0.1, 0.2)
    assert nightly.evaluate_config(3, nightly.ema_lengths).ema_length == (0.05, 0.1, 0.2)
    assert load(["--ema_lengths", ""], C.NightlyConfig).ema_lengths == ()
    assert load([], C.QuickstartConfig).nightly_config().ema_lengths == nightly.ema_lengths


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
    EncodeConfig,
    AutoencoderConfig,
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
            "train.model.attention: levels must lie in 0..1 (one per channel_mult entry), got (3,)",
        ),
        (
            ["--model.channel_mult", "1"],
            "train.model.channel_mult: (1,) does not fit the tiny template's attention: levels "
            "must lie in 0..0 (one per channel_mult entry), got (1,)",
        ),
        (
            ["--model.channels", "5"],
            "train.model.channels: must be even (the noise embedding is half cosines, half "
            "sines), got 5",
        ),
        (["--model.blocks", "65"], "train.model.blocks: must be at most 64, got 65"),
        (["--lr", "inf"], "train.lr: expected a finite number, got 'inf'"),
        (["--lr", "nan"], "train.lr: expected a finite number, got 'nan'"),
        (["--lr", "2"], "train.lr: must be at most 1, got 2.0"),
        (["--images", "1e30"], "train.images: expected an integer, got '1e30'"),
        (
            ["--images", str(10**13)],
            "train.images: must be at most 1_000_000_000_000, got 10000000000000",
        ),
        (["--seed", "-1"], "train.seed: must be in 0..2**63-1, got -1"),
        (["--ema_rampup_ratio", "0"], "train.ema_rampup_ratio: must be in (0, 1], got 0.0"),
        (["--run_name", ".."], "train.run_name: must not be . or .., got '..'"),
        (["--experiment", ""], "train.experiment: must be a non-empty name, got ''"),
        (
            ["--storage", "gs://b/runs"],
            "train.storage: gs://b/runs: unknown scheme gs://; a "
            "location is a path, file:// or s3://",
        ),
        (["--run_name", "a\nb"], "train.run_name: must not hold control characters, got 'a\\nb'"),
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


@pytest.mark.parametrize(
    "overrides",
    [{"channels": c} for c in (4, 6, 8, 12, 24, 32, 36, 40, 48, 50, 64, 66, 96, 128, 136, 160)]
    + [{"channels": 24, "head_channels": h} for h in (1, 5, 7, 12, 16, 48, 100)]
    + [{"channels": 36, "channel_mult": (1, 3)}, {"channels": 64, "channel_mult": (1, 3)}]
    + [{"channels": 20, "blocks": 2, "attention": (0, 1)}],
)
def test_a_network_the_config_takes_is_one_that_builds_and_runs(overrides):
    # The widths GroupNorm and the attention heads need are checked with the config,
    # so that a bad one stops the task at once, not a training worker later.
    import torch

    from pipeline.maths.architecture import UNetConfig
    from pipeline.maths.unet import UNet

    try:
        cfg = C.ModelConfig(**overrides).resolve(8)
    except ConfigError:
        cfg = None
    if cfg is not None:
        UNet(cfg)(torch.zeros(1, 3, 8, 8), torch.zeros(1))
        return
    unchecked = object.__new__(UNetConfig)  # the same fields, without the checks
    for name, value in {**C.ModelConfig().resolve(8).to_dict(), **overrides}.items():
        object.__setattr__(unchecked, name, tuple(value) if isinstance(value, list) else value)
    with pytest.raises((ValueError, RuntimeError, ZeroDivisionError)):
        UNet(unchecked)(torch.zeros(1, 3, 8, 8), torch.zeros(1))


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: 3\n", "train.model: expected a mapping of fields, got 3"),
        ("model: [1]\n", "train.model: expected a mapping of fields, got [1]"),
    ],
)
def test_a_flag_into_a_nested_config_the_file_gives_as_no_mapping(tmp_path, text, message):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(["--dataset", "d", "--config", str(path), "--model.channels", "8"], C.TrainConfig)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "cls, text, message",
    [
        # PyYAML raises bare ValueErrors for these; they reach the field as text.
        (C.TrainConfig, "images: " + "1" * 5000, "train.images: expected an integer, got '1111"),
        (C.TrainConfig, "images: !!int abc", "train.images: expected an integer, got 'abc'"),
        (C.TrainConfig, "lr: !!float abc", "train.lr: expected a number, got 'abc'"),
        (C.TrainConfig, "hflip: !!bool maybe", "train.hflip: expected true or false, got 'maybe'"),
        (C.NightlyConfig, "night: 2024-13-45", "nightly.night: must be a date, YYYY-MM-DD, got"),
        # An integer beyond any float.
        (C.TrainConfig, "lr: " + "1" * 400, "train.lr: expected a number, got 1111"),
        (C.TrainConfig, "nosuch: 1\n7: 2", "train.7: unknown field"),  # keys of two types
    ],
)
def test_yaml_values_python_cannot_take_are_named_by_field(tmp_path, cls, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"dataset: d\n{text}\n" if cls is C.TrainConfig else f"{text}\n")
    with pytest.raises(ConfigError) as err:
        load(["--config", str(path)], cls)
    assert str(err.value).startswith(message) and len(str(err.value)) < 600  # 5000 digits cut


def test_an_empty_config_path_is_refused():
    with pytest.raises(ConfigError, match="^--config: cannot read"):
        load(["--input", "a", "--output", "b", "--config", ""])


def test_locations_are_normalized_so_equal_places_compare_equal(tmp_path):
    a = PreprocessConfig(input=f"file://{tmp_path}/raw/", output="s3://bucket/out/")
    b = PreprocessConfig(input=f"{tmp_path}/raw", output="s3://bucket/out")
    assert a == b and a.input == f"{tmp_path}/raw" and a.output == "s3://bucket/out"
    # siblings that share a name prefix are not inside each other
    PreprocessConfig(input="s3://bucket/data", output="s3://bucket/data2")


def test_a_latent_night_encodes_into_latents_and_trains_on_them(tmp_path):
    night = C.NightlyConfig(dataset=str(tmp_path / "px"), autoencoder=str(tmp_path / "vae"))
    assert night.latents == str(tmp_path / "px-latents")
    assert night.train_config("").dataset == night.latents
    assert night.evaluate_config(1).dataset == night.dataset  # scored on pixels
    encode = night.encode_config()
    assert (encode.dataset, encode.output, encode.autoencoder) == (
        night.dataset,
        night.latents,
        night.autoencoder,
    )
    assert C.NightlyConfig(dataset=str(tmp_path / "px")).train_config("").dataset == night.dataset
    with pytest.raises(ConfigError, match=r"^nightly.latents: must lie apart from dataset"):
        C.NightlyConfig(
            dataset=str(tmp_path / "px"),
            autoencoder=str(tmp_path / "vae"),
            latents=str(tmp_path / "px" / "z"),
        )


def test_a_registered_autoencoder_is_a_reference_not_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder would be made absolute here
    px, uri = str(tmp_path / "px"), "http://127.0.0.1:5000"
    cfg = EncodeConfig(dataset=px, output=str(tmp_path / "z"), autoencoder="scans-vae/3")
    assert cfg.autoencoder == "scans-vae/3" and cfg.tracking_uri.startswith("sqlite:////")
    folder = EncodeConfig(dataset=px, output=str(tmp_path / "z"), autoencoder="vae")
    assert folder.autoencoder == str(tmp_path / "vae")
    night = C.NightlyConfig(dataset=px, autoencoder="scans-vae@champion", tracking_uri=uri)
    encode = night.encode_config()
    assert (encode.autoencoder, encode.tracking_uri) == ("scans-vae@champion", uri)


def test_the_latent_quickstart_is_64_px_through_an_autoencoder_of_f_8(tmp_path):
    cfg = C.QuickstartConfig(workdir=str(tmp_path), latent=True)
    assert cfg.resolution == 64 and C.QuickstartConfig(workdir=str(tmp_path)).resolution == 8
    night = cfg.nightly_config()
    assert night.autoencoder == cfg.autoencoder and night.resolution == 64
    assert cfg.autoencoder_config().downsample == 8
    assert cfg.autoencoder_config().dataset == night.dataset
    # Fewer images, and no post-hoc EMA search (each length is an evaluation, decoded).
    pixels = C.QuickstartConfig(workdir=str(tmp_path)).nightly_config()
    assert (night.images, night.ema_lengths) == (36_000, ())
    assert (pixels.images, pixels.ema_lengths) == (128_000, C.NightlyConfig.ema_lengths)
    given = C.QuickstartConfig(workdir=str(tmp_path), latent=True, images=5, ema_lengths=(0.1,))
    assert (given.nightly_config().images, given.nightly_config().ema_lengths) == (5, (0.1,))
    with pytest.raises(ConfigError, match=r"^quickstart.resolution: must be a multiple of 8"):
        C.QuickstartConfig(workdir=str(tmp_path), latent=True, resolution=32)


def test_snapshots_default_to_a_32nd_of_the_run_and_at_most_edm2_s_8_mi():
    cfg = C.TrainConfig(dataset="d", storage="s", run_name="r")
    # The nightly's 128,000 images: one every 4,000, so at each of its checkpoints.
    assert cfg.snapshot_interval(128_000) == 4_000
    assert cfg.snapshot_interval(100_000_000) == 3_125_000  # 32 snapshots
    assert cfg.snapshot_interval(2_000_000_000) == 8 * 2**20  # 239: EDM2's interval
    assert cfg.snapshot_interval(10) == 1  # a tiny run: at every checkpoint
    chosen = dataclasses.replace(cfg, snapshot_every_images=5_000)
    assert chosen.snapshot_interval(100_000_000) == 5_000
