"""Typed task configs: frozen dataclasses, loaded from YAML and the command line.

Each task has one config class. Every field carries a docstring on the line
below it (as in torchtitan); `field_docs` reads those from the source so that
`--help` prints them. Values resolve in this order: the field's default, then a
YAML file (`--config FILE`), then command-line flags (`--resolution 32`).
Nested configs are addressed with dots (`--model.channels 64`).

Validation happens on construction (`__post_init__`), and every error names the
field, what is allowed and what was given:
`preprocess.resolution: must be an integer in 1..4096, got -5`. Counts and sizes
also have an upper bound that no real run reaches (`MAX_IMAGES`...), so that a
slip of the keyboard (or 1e30) fails here instead of overflowing hours later.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import functools
import inspect
import math
import reprlib
import textwrap
import types
import typing
import unicodedata
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from pipeline.config import locations


class ConfigError(ValueError):
    """A user-supplied setting is wrong; the message names the field."""


# Upper bounds of counts and sizes: far beyond any real run, and within what the
# libraries downstream take (64-bit integers in torch and numpy, 32-bit model
# versions in MLflow's database).
MAX_IMAGES = 10**12
"""Images a job sees or writes (and intervals counted in images)."""
MAX_BATCH = 65_536
"""Images in one batch or one network call."""
MAX_WORKERS = 4096
"""Ray workers or actors of one job."""
MAX_SEED = 2**63 - 1
"""Seeds: what torch.manual_seed takes."""
MAX_SHARD = 1_000_000
"""Samples in one shard (a shard is written from memory)."""


def show(value: Any) -> str:
    """`repr(value)`, shortened to one readable line: the "got ..." of an error."""
    return _SHOW.repr(value)


_SHOW = reprlib.Repr()
_SHOW.maxstring, _SHOW.maxlong, _SHOW.maxother, _SHOW.maxtuple = 120, 60, 120, 10


# --- field documentation -----------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        node = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0]
        assert isinstance(node, ast.ClassDef)
        body = node.body
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


# --- values: coercion from YAML and from command-line text ----------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp)]
        return ("; or " if any("," in p for p in parts) else " or ").join(parts)
    if origin is tuple:
        return f"a comma-separated list, each {_describe(typing.get_args(tp)[0])}"
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        type(None): "null",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """`value` as type `tp`; text (from the command line) is parsed."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{name}: expected {_describe(tp)}, got {show(value)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
            raise bad
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{name}: must be one of {', '.join(map(str, allowed))}; got {show(value)}"
            )
        return value
    if origin is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        return tuple(_coerce(v, item, name) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            number = float(value)
        except (ValueError, OverflowError):  # OverflowError: an int beyond any float
            raise bad from None
        if not math.isfinite(number):
            raise ConfigError(f"{name}: expected a finite number, got {show(value)}")
        return number
    if tp is str:
        if type(value) is datetime.date:  # YAML reads `night: 2024-01-02` as a date
            value = value.isoformat()
        if not isinstance(value, str):
            raise bad
        # No name or location holds a newline, tab or NUL, and each would break the
        # one-line messages and logs that quote it.
        if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value):
            raise ConfigError(f"{name}: must not hold control characters, got {show(value)}")
        return value
    raise TypeError(f"{name}: unsupported config field type {tp!r}")


# --- building configs ------------------------------------------------------------


def _nested(tp: object) -> bool:
    """Whether a field's type is itself a config (a dataclass)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type[Any], data: Mapping[str, Any], prefix: str | None = None) -> Any:
    """Build config `cls` from a (possibly nested) mapping; unknown keys are errors."""
    prefix = prefix or cls.SECTION
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(map(str, set(data) - set(fields)))  # YAML keys may be numbers
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}: unknown field; known fields are {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        tp = hints[name]
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if _nested(tp):
                    kwargs[name] = from_dict(tp, {}, f"{prefix}.{name}")
                    continue
                raise ConfigError(f"{prefix}.{name}: required, but not given (see --help)")
            continue
        value = data[name]
        if _nested(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{prefix}.{name}: expected a mapping of fields, got {show(value)}"
                )
            kwargs[name] = from_dict(tp, value, f"{prefix}.{name}")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}.{name}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # A nested config names its fields by its own section ("model.channels");
        # here it lives at `prefix` ("train.model.channels").
        section = getattr(cls, "SECTION", prefix)
        message = str(e)
        if prefix == section or not message.startswith(section):
            raise
        raise ConfigError(prefix + message[len(section) :]) from None


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (tuples become lists), ready for JSON or YAML."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a scalar its tag cannot take (an integer
    of 5,000 digits, the date 2024-13-45, `!!float abc`) stays text: the field it is
    given to then refuses it by name, where PyYAML would raise a bare ValueError."""


def _lenient(construct: Any) -> Any:
    def construct_or_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, KeyError, AttributeError):
            return loader.construct_scalar(node)

    return construct_or_text


for _tag in (f"tag:yaml.org,2002:{kind}" for kind in ("int", "float", "bool", "timestamp")):
    _Loader.add_constructor(_tag, _lenient(yaml.SafeLoader.yaml_constructors[_tag]))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping, naming the file on any error."""
    try:
        data = yaml.load(Path(path).read_text(), Loader=_Loader)  # a SafeLoader
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"--config: {path} must hold a mapping of fields, got {type(data).__name__}"
        )
    return data


# --- the command line --------------------------------------------------------------


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit with code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_flags(
    parser: argparse.ArgumentParser,
    group: argparse._ActionsContainer,
    cls: type,
    prefix: str = "",
) -> None:
    """One `--field` flag per leaf field of `cls`, its docstring as help; a nested
    config gets a group of `--name.field` flags, its docstring as description."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if _nested(tp):
            title = f"{prefix}{f.name} (--{prefix}{f.name}.FIELD)"
            about = textwrap.fill(
                docs.get(f.name, ""), 78, initial_indent="  ", subsequent_indent="  "
            )
            nested = parser.add_argument_group(title, about)
            _add_flags(parser, nested, tp, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f"default: {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default: {f.default_factory()!r}"
        else:
            default = "required"
        # argparse formats help with %: a literal one must be doubled.
        text = f"{docs.get(f.name, '')} [{_describe(tp)}; {default}]".replace("%", "%%")
        group.add_argument(
            f"--{prefix}{f.name}",
            dest=f"field:{prefix}{f.name}",
            metavar="VALUE",
            default=argparse.SUPPRESS,
            help=text,
        )


def make_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with `--config FILE` and one `--field` flag per config field."""
    parser = OneLineErrorParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of field values; command-line flags override it",
    )
    _add_flags(parser, parser.add_argument_group("config fields"), cls)
    return parser


def parse_args(cls: type[Any], parser: argparse.ArgumentParser, argv: list[str] | None) -> Any:
    """Resolve defaults, then the YAML file, then flags, into a validated config."""
    args = parser.parse_args(argv)
    data = load_yaml(args.config) if args.config is not None else {}
    for key, value in vars(args).items():
        if not key.startswith("field:"):
            continue
        node = data
        *parents, leaf = key[len("field:") :].split(".")
        for depth, p in enumerate(parents, 1):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # the file gives the nested config as no mapping
                where = ".".join([cls.SECTION, *parents[:depth]])
                raise ConfigError(f"{where}: expected a mapping of fields, got {show(node)}")
        node[leaf] = value
    return from_dict(cls, data)


# --- validation helpers used by the config classes ------------------------------


class Checked:
    """Mixin: `self.check(cond, field, message)` raises a ConfigError naming the field."""

    SECTION: ClassVar[str] = "config"

    def check(self, condition: bool, field: str, message: str) -> None:
        if not condition:
            raise ConfigError(
                f"{self.SECTION}.{field}: {message}, got {show(getattr(self, field))}"
            )

    def at_most(self, limit: int, *fields: str) -> None:
        """Refuse values above `limit` in `fields` (numbers, lists of them or None):
        the upper bound of a count or size, checked after its lower bound."""
        for field in fields:
            value = getattr(self, field)
            values = value if isinstance(value, tuple) else (value,)
            self.check(
                all(v is None or v <= limit for v in values), field, f"must be at most {limit:_}"
            )

    def locate(self, field: str) -> None:
        """Normalize the location in `field` (see `locations.normalize`) in place."""
        value = getattr(self, field)
        self.check(bool(value), field, "must name a folder or s3:// prefix")
        try:
            object.__setattr__(self, field, locations.normalize(value))
        except locations.LocationError as e:
            raise ConfigError(f"{self.SECTION}.{field}: {e}") from None


def blame(
    error: ConfigError, section: str, fields: Collection[str], renamed: Mapping[str, str]
) -> ConfigError:
    """`error`, raised by a config built from the fields of config `section`,
    re-addressed to the field that the bad value came from: `train.images: ...` ->
    `nightly.images: ...` where `images` is one of `fields`, and `evaluate.images:
    ...` -> `nightly.eval_images: ...` where `renamed` maps `evaluate.images` to
    `eval_images`. Any other error keeps its address after `section: `."""
    where, sep, detail = str(error).partition(": ")
    inner = where.partition(".")[2]
    if sep and where in renamed:
        return ConfigError(f"{section}.{renamed[where]}: {detail}")
    if sep and inner.split(".")[0] in fields:
        return ConfigError(f"{section}.{inner}: {detail}")
    return ConfigError(f"{section}: {error}")
