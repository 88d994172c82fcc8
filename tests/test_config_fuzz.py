"""Config fuzzing: bad values in every field of every task's config, from flags and
from YAML. Each must be refused as tasks/cli.py promises: exit code 2, at most two
lines on stderr that name the field, and nothing written.

The values are not drawn at random: every field of a kind (integer, number, bool,
text, location, choice, list) gets the whole catalogue of that kind (wrong types,
NaN and infinities, overflowing and huge numbers, zero and negative numbers, empty
text, control characters), so the cases are the same on every run and a failure
names its value. The tasks are found on disk and their fields by introspection,
so a new task or field is fuzzed without a word here. Most cases run in-process
through `tasks.cli.run_task`, the function each task's `__main__` calls; a sample
of them runs the real `python -m tasks.<name>` in an empty folder."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import random
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from pipeline.config import Checked, ConfigError, from_dict
from tasks.cli import run_task
from tests import tasks
from tests.services import ROOT


def _task_configs() -> dict[str, type]:
    """Every task module on disk that runs a config, by name: its config class."""
    found = {}
    for path in TASK_FILES:
        module = importlib.import_module(f"tasks.{path.stem}")
        configs = {
            v
            for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, Checked) and v is not Checked
        }
        # A task without a config (tasks.submit) has a parser of its own.
        assert len(configs) <= 1 and bool(configs) == ("run_task(" in path.read_text()), path
        if configs:
            found[path.stem] = configs.pop()
    return found


TASK_FILES = sorted(p for p in (ROOT / "tasks").glob("*.py") if p.stem not in ("__init__", "cli"))
TASKS = _task_configs()

ZERO_OK = {
    "digits.first",  # the first digit
    "digits.count",  # 0: all
    "preprocess.validation_fraction",  # no validation split
    "preprocess.background",  # black
    "model.dropout",
    "model.attention",  # level 0: full resolution
    "train.lr_rampup_images",  # no ramp-up
    "train.label_dropout",
    "train.seed",
    "train.sample_every_images",  # only at the end
    "train.snapshot_every_images",  # 0: a 32nd of the run, at most 8 Mi
    "train.max_failures",
    "sample.guidance",  # the unconditional model
    "sample.seed",
    "sample.actors",  # 0: one per GPU, or per CPU
    "sample.max_copy_ratio",  # nothing is a copy
    "sample.min_label_confidence",  # no label filter
    "evaluate.max_copy_ratio",
    "promote.max_copy_rate",  # no copy at all
    "nightly.max_copy_rate",
    "nightly.max_copy_ratio",
    "nightly.min_label_confidence",
    "evaluate.guidance",
    "evaluate.seed",
    "promote.version",  # 0: the latest
    "promote.margin",
    "nightly.validation_fraction",
    "nightly.lr_rampup_images",
    "nightly.eval_guidance",
    "nightly.margin",
    "nightly.sample_images",  # none
    "nightly.sample_guidance",
    "quickstart.guidance",
    "quickstart.sample_images",
    "quickstart.resolution",  # 0: the default, 8 or 64 with --latent
    "quickstart.images",  # 0: the default, 128,000 or 36,000 with --latent
    "encode.actors",  # 0: one per GPU, or per CPU
    "train_autoencoder.kl_weight",  # no KL
    "train_autoencoder.discriminator_start_images",  # no discriminator
    "train_autoencoder.discriminator_weight",
    "train_autoencoder.validation_images",  # no validation scores
    "train_autoencoder.torch_threads",  # 0: Ray's
    "train_autoencoder.seed",
    "train_autoencoder.max_failures",
}
"""Fields (by the section that declares them) where zero means something. Every
other number field refuses zero, and every number field refuses negative ones."""
# Attention in the bottleneck only; post-hoc EMA off.
EMPTY_OK = {"model.attention", "nightly.ema_lengths", "quickstart.ema_lengths"}
"""List fields that may be empty besides those whose default is empty."""


# --- the fields ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Field:
    """One leaf field of a task's config, addressed as its flag addresses it."""

    task: str
    path: str
    """Dotted, as in the flag: `model.channels`."""
    owner: type
    """The config class that declares the field (ModelConfig for `model.*`)."""
    tp: Any
    """The field's type, without `| None`."""
    optional: bool
    default: Any
    """dataclasses.MISSING for a required field (or a nested config's default)."""

    @property
    def config(self) -> type:
        return TASKS[self.task]

    @property
    def name(self) -> str:
        """As the error messages name it: `train.model.channels`."""
        return f"{self.config.SECTION}.{self.path}"

    @property
    def rule(self) -> str:
        """As ZERO_OK and EMPTY_OK name it: `model.channels`."""
        return f"{self.owner.SECTION}.{self.path.rsplit('.', 1)[-1]}"

    @property
    def kind(self) -> str:
        origin = typing.get_origin(self.tp)
        if origin is Literal:
            return "choice"
        if origin is tuple:
            return "list of " + typing.get_args(self.tp)[0].__name__
        if self.tp is str and _is_location(self):
            return "location"
        return self.tp.__name__


def _is_location(field: Field) -> bool:
    """Whether the config normalizes the field as a location (a relative path comes
    back absolute), found by trying: no list of location fields to keep in step."""
    data = {**_required(field.config), **_nest(field.path, "probe-location")}
    try:
        value = _get(from_dict(field.config, data), field.path)
    except ConfigError:
        return False
    return value == os.path.abspath("probe-location")


def _fields(task: str, cls: type, prefix: str = "") -> Iterator[Field]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(task, tp, f"{prefix}{f.name}.")  # type: ignore[arg-type]
            continue
        args = typing.get_args(tp)
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
        if optional:
            (tp,) = (a for a in args if a is not type(None))
        yield Field(task, prefix + f.name, cls, tp, optional, f.default)


FIELDS = [f for task, cls in TASKS.items() for f in _fields(task, cls)]
NESTED = [
    (task, f.name)
    for task, cls in TASKS.items()
    for f in dataclasses.fields(cls)
    if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])
]
"""(task, field) of each field that holds a nested config."""


def _required(cls: type) -> dict[str, str]:
    """A value for each required field, valid as a location, a model reference and
    a registered model's name alike."""
    return {
        f.name: f"{f.name}-value"
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


def _nest(path: str, value: Any) -> dict[str, Any]:
    *parents, leaf = path.split(".")
    data: dict[str, Any] = {leaf: value}
    for p in reversed(parents):
        data = {p: data}
    return data


def _get(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = getattr(config, part)
    return config


# --- the catalogue of bad values, by kind -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bad:
    """A bad value as typed after a flag, and as written in YAML (None: not in that
    channel: a flag's value is always text)."""

    flag: str | None
    yaml: str | None
    why: str


HUGE = str(10**30)
LONG = "1" * 5000  # beyond the 4,300 digits Python parses into an int
NUMBER = [
    Bad("abc", "abc", "text"),
    Bad("", '""', "empty"),
    Bad("nan", ".nan", "nan"),
    Bad("inf", ".inf", "inf"),
    Bad("-inf", "-.inf", "-inf"),
    Bad("1e309", "1e309", "overflows to inf"),
    Bad(None, "[1]", "a list"),
    Bad(None, "{a: 1}", "a mapping"),
    Bad(None, "true", "a bool"),
    Bad("-1", "-1", "negative"),
    Bad(HUGE, HUGE, "huge"),
    Bad("-" + HUGE, "-" + HUGE, "huge negative"),
    Bad(LONG, LONG, "too many digits"),
]
TEXT = [
    Bad("", '""', "empty"),
    Bad("a\nb", '"a\\nb"', "newline"),
    Bad("a\tb", '"a\\tb"', "tab"),
    Bad(None, '"a\\0b"', "NUL"),
    Bad(None, '"a\\u2028b"', "line separator"),
    Bad(None, "123", "a number"),
    Bad(None, "true", "a bool"),
    Bad(None, "[a]", "a list"),
    Bad(None, "{a: b}", "a mapping"),
]
CATALOGUE: dict[str, list[Bad]] = {
    "int": [*NUMBER, Bad("1.5", "1.5", "fraction"), Bad("0", "0", "zero")],
    "float": [*NUMBER, Bad("1e30", "1.0e+30", "huge float"), Bad("0", "0.0", "zero")],
    "bool": [
        Bad("abc", "abc", "text"),
        Bad("", '""', "empty"),
        Bad("2", "2", "a number"),
        Bad("nan", ".nan", "nan"),
        Bad(None, "[true]", "a list"),
    ],
    "str": TEXT,
    "location": [
        *TEXT,
        Bad("s3://", "s3://", "no bucket"),
        Bad("s3:///data", "s3:///data", "empty bucket"),
        Bad("gs://bucket/data", "gs://bucket/data", "unknown scheme"),
        Bad("S3://bucket/data", "S3://bucket/data", "misspelled scheme"),
        Bad("file://", "file://", "no path"),
    ],
    "choice": [
        Bad("abc", "abc", "unknown"),
        Bad("", '""', "empty"),
        Bad(None, "1", "a number"),
        Bad(None, "[a]", "a list"),
    ],
    "list of int": [
        Bad("abc", "abc", "text"),
        Bad("1,abc", "[1, abc]", "text item"),
        Bad("1.5", "[1.5]", "fraction"),
        Bad("nan", "[.nan]", "nan"),
        Bad("1e309", "[1e309]", "overflows"),
        Bad(HUGE, f"[{HUGE}]", "huge"),
        Bad("-1", "[-1]", "negative"),
        Bad("0", "[0]", "zero"),
        Bad("", "[]", "empty"),
        Bad(None, "[[1]]", "nested list"),
        Bad(None, "{a: 1}", "a mapping"),
        Bad(None, "true", "a bool"),
    ],
    "list of float": [
        Bad("abc", "abc", "text"),
        Bad("nan", "[.nan]", "nan"),
        Bad("1,inf", "[1.0, .inf]", "inf item"),
        Bad("1e309", "[1e309]", "overflows"),
        Bad("1e30", "[1.0e+30]", "huge"),
        Bad("-1", "[-1.0]", "negative"),
        Bad("0", "[0.0]", "zero"),
        Bad("", "[]", "empty"),
        Bad(None, "[[1.0]]", "nested list"),
        Bad(None, "{a: 1}", "a mapping"),
    ],
    "list of str": [
        Bad("a\nb", '["a\\nb"]', "newline"),
        Bad(None, "[1]", "a number item"),
        Bad(None, "[[a]]", "nested list"),
        Bad(None, "{a: b}", "a mapping"),
        Bad(None, "5", "a number"),
    ],
}


def _refused(field: Field, bad: Bad) -> bool:
    """Whether `bad` must be refused in `field`, or is a value the field takes."""
    if bad.why == "zero":
        return field.rule not in ZERO_OK
    if bad.why == "empty" and field.kind.startswith("list of"):
        return field.default != () and field.rule not in EMPTY_OK
    if bad.why == "empty" and field.kind in ("str", "location"):
        return field.default != ""  # empty text means "the default"
    return True


# --- the cases -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """A command line of a task that must be refused."""

    task: str
    what: str
    flags: tuple[str, ...]
    yaml: str
    """The text of a `--config` file, or "" for none."""
    names: tuple[str, ...]
    """The refusal's last line must hold one of these."""

    def argv(self, folder: Path) -> list[str]:
        """The flags, and `--config` with the YAML written into `folder`."""
        if not self.yaml:
            return list(self.flags)
        file = folder / f"{len(list(folder.iterdir()))}.yaml"
        file.write_text(self.yaml)
        return [*self.flags, "--config", str(file)]


def _yaml_at(path: str, text: str) -> str:
    *parents, leaf = path.split(".")
    lines = [f"{'  ' * depth}{p}:" for depth, p in enumerate(parents)]
    return "\n".join([*lines, f"{'  ' * len(parents)}{leaf}: {text}"]) + "\n"


def _given(task: str, but: str = "") -> tuple[str, ...]:
    """Flags for the required fields of `task`, but the field `but`."""
    required = _required(TASKS[task]).items()
    return tuple(a for k, v in required if k != but for a in (f"--{k}", v))


def field_cases(field: Field) -> list[Case]:
    """The catalogue of the field's kind, by flag and in YAML, but the values the
    field takes."""
    values = [(c, b) for b in CATALOGUE[field.kind] for c in ("flag", "yaml")]
    if not field.optional:  # where null is no default, it is no value
        values.append(("yaml", Bad(None, "null", "null")))
        if field.kind in ("int", "float", "bool"):
            values.append(("flag", Bad("none", None, "none")))
    cases = []
    for channel, bad in values:
        text = getattr(bad, channel)
        if text is None or not _refused(field, bad):
            continue
        flags = _given(field.task, but=field.path)
        if channel == "flag":
            flags, yaml = (*flags, f"--{field.path}", text), ""
        else:
            yaml = _yaml_at(field.path, text)
        what = f"{field.path} {channel} {bad.why} {text[:30]!r}"
        # The config names the field; argparse, the flag.
        cases.append(Case(field.task, what, flags, yaml, (f"{field.name}:", f"--{field.path}")))
    return cases


def whole_cases(task: str) -> list[Case]:
    """Fields that do not exist, YAML that is no mapping, nested configs given as
    something else."""
    section = TASKS[task].SECTION
    given = _given(task)

    def case(flags: tuple[str, ...], yaml: str, names: str) -> Case:
        what = " ".join([*flags, *([f"file {yaml!r}"] if yaml else [])])
        return Case(task, what, (*given, *flags), yaml, (names,))

    cases = [
        case(("--nosuch", "1"), "", "--nosuch"),
        case(("--nosuch",), "", "--nosuch"),
        case((), "nosuch: 1\n", f"{section}.nosuch:"),
        case((), "1: 2\n", f"{section}.1:"),
        case((), "nosuch: 1\n2: 3\n", f"{section}.2:"),  # keys of two types
        case((), "- a\n- b\n", "--config"),
        case((), "just text\n", "--config"),
        case((), "3\n", "--config"),
        case((), '""\n', "--config"),
        case((), "!!binary aGk=\n", "--config"),
        case((), "a: [unclosed\n", "--config"),
        case((), "a:\tb\n", "--config"),
        case(("--config", ""), "", "--config"),
    ]
    for name in (n for t, n in NESTED if t == task):
        where = f"{section}.{name}"
        cases += [
            case((f"--{name}.nosuch", "1"), "", f"--{name}.nosuch"),
            case((f"--{name}", "x"), "", f"--{name}"),
            case((), f"{name}:\n  nosuch: 1\n", f"{where}.nosuch:"),
            case((), f"{name}:\n  1: 2\n", f"{where}.1:"),
            case((), f"{name}: 3\n", f"{where}:"),
            case((), f"{name}: [1]\n", f"{where}:"),
            case((), f"{name}: text\n", f"{where}:"),
            case((), f"{name}: null\n", f"{where}:"),
            # A flag into a nested config that the file gives as no mapping.
            case((f"--{name}.blocks", "1"), f"{name}: 3\n", f"{where}:"),
        ]
    return cases


# --- running a case ----------------------------------------------------------------------


class _Ran(Exception):
    """The task got past its config to its work."""


def _never(config: Any) -> None:
    raise _Ran(config)


_taken: list[Any] = []
"""The configs `run_in_process` saw taken, latest last."""


def run_in_process(case: Case, folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The task's exit code and stderr, as its __main__ gets them; a config that is
    taken, or an exception that escapes (a traceback), as exit code 0 or 1 with a
    description."""
    capsys.readouterr()
    try:
        code = run_task(f"tasks.{case.task}", TASKS[case.task], _never, case.argv(folder))
    except SystemExit as e:  # argparse's usage errors
        code = int(e.code or 0)
    except _Ran as e:
        _taken.append(e.args[0])
        return 0, f"taken: {e.args[0]}"
    except Exception as e:
        return 1, f"traceback: {type(e).__name__}: {e}"
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


def verdict(case: Case, code: int, err: str) -> str | None:
    """What is wrong with how the case was refused; None when it was refused well."""
    lines = err.splitlines()
    if code != 2:
        return f"{case.what}: exit code {code}: {err[:300]!r}"
    if not 1 <= len(lines) <= 2:
        return f"{case.what}: {len(lines)} lines on stderr: {err[:300]!r}"
    if not any(n in lines[-1] for n in case.names):
        return f"{case.what}: does not name {' or '.join(case.names)}: {lines[-1][:300]!r}"
    return None


@pytest.fixture
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(the working folder, which must stay empty; a folder for the YAML files)."""
    work, files = tmp_path / "work", tmp_path / "yaml"
    work.mkdir()
    files.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a file in work/
    return work, files


def _refused_well(cases: list[Case], folders: tuple[Path, Path], capsys) -> None:
    work, files = folders
    failures = [verdict(c, *run_in_process(c, files, capsys)) for c in cases]
    assert not any(failures), "\n".join(f for f in failures if f)
    assert not list(work.iterdir())


# --- the tests ----------------------------------------------------------------------------


def test_every_task_and_kind_of_field_is_fuzzed():
    assert {"preprocess", "train", "sample", "evaluate", "promote", "nightly"} <= set(TASKS)
    kinds = {f.kind for f in FIELDS}
    assert kinds == set(CATALOGUE), kinds ^ set(CATALOGUE)
    assert NESTED, "no nested config to fuzz"
    rules = {f.rule for f in FIELDS}
    assert ZERO_OK | EMPTY_OK <= rules, (ZERO_OK | EMPTY_OK) - rules  # none gone stale


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_bad_values_are_refused_naming_the_field(field: Field, folders, capsys):
    _refused_well(field_cases(field), folders, capsys)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_unknown_fields_and_files_that_are_no_mapping_are_refused(task, folders, capsys):
    _refused_well(whole_cases(task), folders, capsys)


def _flag_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_values_a_user_would_give_are_taken(field: Field, folders):
    """The default spelled out, as a flag and as YAML data, and zero where ZERO_OK
    says it means something: the checks refuse nothing a real run uses."""
    work, _ = folders
    cls = field.config
    default = _get(from_dict(cls, _required(cls)), field.path)
    plain = list(default) if isinstance(default, tuple) else default
    for given in (_flag_text(default), plain):
        config = from_dict(cls, {**_required(cls), **_nest(field.path, given)})
        assert _get(config, field.path) == default, given
    if field.rule in ZERO_OK:
        zero = [0] * len(default or (0,)) if field.kind.startswith("list of") else 0
        from_dict(cls, {**_required(cls), **_nest(field.path, zero)})
    assert not list(work.iterdir())


def test_a_date_in_yaml_is_the_text_a_user_means(folders, capsys):
    """YAML reads `night: 2024-01-02` as a date; the night is that text."""
    _, files = folders
    (files / "night.yaml").write_text("night: 2024-01-02\n")
    taken = []
    argv = ["--config", str(files / "night.yaml")]
    assert run_task("tasks.nightly", TASKS["nightly"], taken.append, argv) == 0
    assert taken[0].night == "2024-01-02", capsys.readouterr().err


def _sample() -> list[Case]:
    """Per task: one field of each kind, by flag and in YAML (a different value of
    the catalogue for each), and the first three whole-file cases."""
    out = []
    for n, task in enumerate(sorted(TASKS)):
        first: dict[str, Field] = {}
        for f in (f for f in FIELDS if f.task == task):
            first.setdefault(f.kind, f)
        for k, field in enumerate(first.values()):
            cases = field_cases(field)
            for channel in ("flag", "yaml"):
                of_channel = [c for c in cases if f" {channel} " in c.what]
                out.append(of_channel[(n + k) % len(of_channel)])
        out += whole_cases(task)[:3]
    return out


SAMPLE = _sample()


@pytest.mark.parametrize("case", SAMPLE, ids=[f"{c.task}: {c.what}" for c in SAMPLE])
def test_the_real_task_refuses_and_writes_nothing(case: Case, tmp_path):
    """`python -m tasks.<name>` in an empty folder, with the default MLflow store
    (a file in that folder) and a private Ray temp folder: both stay absent."""
    work, files, ray_tmp = tmp_path / "work", tmp_path / "yaml", tmp_path / "ray"
    work.mkdir()
    files.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["RAY_TMPDIR"] = str(ray_tmp)
    done = tasks.run(tasks.command(case.task, *case.argv(files)), env=env, cwd=work, timeout=60)
    assert verdict(case, done.returncode, done.stderr) is None
    assert done.stdout == ""
    assert not list(work.iterdir()) and not ray_tmp.exists()


@pytest.mark.parametrize("name", sorted({p.stem for p in TASK_FILES} - set(TASKS)))
def test_a_task_without_a_config_refuses_in_one_line_too(name, tmp_path):
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")}
    env.pop("RAY_ADDRESS", None)
    for argv in (["--nosuch"], ["--nosuch", "nosuch"]):
        done = tasks.run(tasks.command(name, *argv), env=env, cwd=tmp_path, timeout=60)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr.startswith(f"tasks.{name}: error: ") and done.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())


# --- random values ---------------------------------------------------------------------


def _random_value(rng: random.Random) -> tuple[str, str]:
    """(a flag's text, a YAML scalar or list) drawn from what a user, a script or a
    corrupted file might give: numbers of any sign and size, text of any
    characters, lists of either."""
    kind = rng.choice(("int", "float", "text", "list", "special"))
    if kind == "int":
        text = str(rng.choice((-1, 1)) * rng.randrange(10 ** rng.randint(1, 40)))
    elif kind == "float":
        text = f"{rng.uniform(-10, 10):.6g}e{rng.randint(-400, 400)}"
    elif kind == "text":
        alphabet = "az09 ,.:-_/#%{}[]'\"\\\t\u00e9\u2028\U0001f600"
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
    elif kind == "list":
        text = ",".join(str(rng.randint(-3, 70)) for _ in range(rng.randint(0, 6)))
    else:
        text = rng.choice(("nan", "-inf", "true", "null", "~", "0x1f", "1_000", "1e3", ""))
    return text, json.dumps(text) if kind == "text" else f"[{text}]" if kind == "list" else text


def _value_at(config: Any, path: str) -> Any:
    for name in path.split("."):
        config = getattr(config, name)
    return config


def _out_of_range(field: Field, value: Any) -> str | None:
    """What no field should hold, whatever its rule: a number that is not finite,
    negative, or zero where zero means nothing; text with control characters."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            if v != v or v in (float("inf"), float("-inf")):
                return f"not finite: {v!r}"
            if v < 0:
                return f"negative: {v!r}"
            if v == 0 and field.rule not in ZERO_OK and v != field.default:
                return f"zero: {v!r}"
        elif isinstance(v, str) and any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in v):
            return f"control characters: {v!r}"
    return None


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_random_values_are_taken_or_refused_naming_the_field(field: Field, folders, capsys):
    """Twelve random values per field (seeded by its name, so a failure repeats), by
    flag and in YAML: each is either taken, as a value the field can hold
    (`_out_of_range`), or refused with exit 2 and at most two lines naming the
    field; never a traceback, and nothing is written."""
    work, files = folders
    rng = random.Random(field.name)
    for _ in range(12):
        flag, yaml = _random_value(rng)
        given = _given(field.task, but=field.path)
        for what, flags, text in [
            ("flag", (*given, f"--{field.path}", flag), ""),
            ("yaml", given, _yaml_at(field.path, yaml)),
        ]:
            case = Case(field.task, f"{field.path} {what} {flag!r}", flags, text, ())
            code, err = run_in_process(case, files, capsys)
            if code == 0:  # taken: then it must be a value the field can hold
                problem = _out_of_range(field, _value_at(_taken[-1], field.path))
                assert problem is None, f"{case.what}: taken, but {problem}"
                continue
            names = (f"{field.name}:", f"--{field.path}", "--config")
            if field.path.rsplit(".", 1)[-1] in err:  # a rule joining two fields
                names += (f"{field.config.SECTION}.",)
            assert verdict(dataclasses.replace(case, names=names), code, err) is None
    assert not list(work.iterdir())
