"""The key checks of the records (`records`): unknown and missing keys named."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any


class RecordError(ValueError):
    """A record read back is not in its format; the message names the record and
    the key."""


def check_keys(
    what: str, data: Any, required: Collection[str], optional: Collection[str] = ()
) -> None:
    """Raise a RecordError naming every unknown and every missing key."""
    if not isinstance(data, Mapping):
        raise RecordError(f"{what}: must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(required) - set(optional))
    missing = [k for k in required if k not in data]
    problems = [
        f"{kind} key{'s' if len(keys) > 1 else ''} {', '.join(map(repr, keys))}"
        for kind, keys in (("unknown", unknown), ("missing", missing))
        if keys
    ]
    if problems:
        raise RecordError(f"{what}: {'; '.join(problems)}")


def check_fields(what: str, data: Any, cls: type) -> None:
    """`check_keys` with every field of dataclass `cls` required and no other key."""
    check_keys(what, data, [f.name for f in dataclasses.fields(cls)])
