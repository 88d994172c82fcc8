"""How a location is written: a local path, a `file://` URI, or
`s3://bucket/prefix`. Pure string logic, shared by the configs (which normalize
what the user typed) and `pipeline.edges.storage` (which reads and writes)."""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

S3 = "s3://"
FILE = "file://"
_USERINFO = re.compile(r"(?<=://)[^/\s]+@")


class LocationError(ValueError):
    """A location that cannot be used; the message names it."""


def redact(text: str) -> str:
    """`text` with the user:password of any URL in it replaced by `***`, so that a
    URI with credentials (say, an MLflow tracking URI) can be logged and printed."""
    return _USERINFO.sub("***@", text)


def is_s3(uri: str) -> bool:
    return uri.startswith(S3)


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) of an `s3://` URI."""
    bucket, _, key = uri[len(S3) :].partition("/")
    if not bucket:
        raise LocationError(f"{uri}: an S3 URI needs a bucket: s3://bucket/prefix")
    return bucket, key


def local_path(uri: str) -> Path:
    return Path(uri[len(FILE) :] if uri.startswith(FILE) else uri)


def normalize(uri: str) -> str:
    """One spelling per location: `s3://bucket/prefix` without a trailing slash, or
    an absolute local path (`file://` dropped), so that equal locations compare
    equal and workers on other machines or folders see the same path."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return f"{S3}{bucket}/{key}".rstrip("/")
    scheme, sep, path = uri.partition("://")
    if sep and f"{scheme}://" != FILE and "/" not in scheme:
        # Taken as a local path, gs://bucket or S3://bucket would quietly become a
        # folder named "gs:" under the current one.
        raise LocationError(
            f"{uri}: unknown scheme {scheme}://; a location is a path, file:// or s3://"
        )
    if sep and not path:
        raise LocationError(f"{uri}: a file:// URI needs a path")
    return os.path.abspath(local_path(uri))


def contains(outer: str, inner: str) -> bool:
    """Whether location `inner` is `outer` or lies below it (both normalized)."""
    outer, inner = normalize(outer), normalize(inner)
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def join(base: str, *parts: str) -> str:
    """`base` with `/`-separated `parts` appended, keeping its scheme."""
    return posixpath.join(base, *parts) if base else posixpath.join(*parts)
