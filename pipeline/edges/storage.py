"""Where bytes live: reading, writing and listing locations.

A location is a local path, a `file://` URI, or `s3://bucket/prefix`
(`pipeline.config.locations` says how one is written; its functions are
re-exported here). Everything else in the pipeline passes these strings around
and calls the functions here.

S3 settings come from the standard AWS variables, which boto3 reads itself:
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (for S3-compatible servers),
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
and `AWS_MAX_ATTEMPTS` / `AWS_RETRY_MODE` for retries. Requests that fail
transiently (throttling, 5xx, dropped connections) are retried by botocore with
backoff; a download that breaks mid-body is retried here, and a write waits out
an endpoint that is down for up to `WRITE_PATIENCE_S`.

Guarantees:
- Writes are atomic: an object is absent or complete. S3 PUT and multipart
  completion are atomic; a local file is written under a hidden temporary name
  in the same folder and renamed into place.
- Listings are recursive, sorted, and skip hidden names (any path component
  starting with "."), so temporary files are never listed. A local listing
  follows links to folders (stopping at one that leads back to a folder above
  it) and lists regular files only; `list_inputs` returns each other entry (a
  broken link, a FIFO, a folder it may not list, ...) as `Unreadable` rather than
  failing on it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipeline.config.locations import (
    S3,
    LocationError,
    contains,
    is_s3,
    join,
    local_path,
    normalize,
    redact,
    split_s3,
)
from pipeline.edges import local_walk, s3
from pipeline.edges.s3 import WRITE_PATIENCE_S, s3_endpoint

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = [
    "AccessDenied",
    "WRITE_PATIENCE_S",
    "NotFound",
    "ObjectInfo",
    "StorageError",
    "Unreadable",
    "arrow_filesystem",
    "contains",
    "delete",
    "exists",
    "is_s3",
    "join",
    "list_inputs",
    "list_objects",
    "normalize",
    "read_bytes",
    "redact",
    "remove_partial_writes",
    "s3_endpoint",
    "write_bytes",
]

_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{32}\.partial$")
_MISSING_CODES = ("NoSuchKey", "NoSuchBucket", "404", "NotFound")
# Refusals of one object or prefix. Not InvalidAccessKeyId or SignatureDoesNotMatch
# (also HTTP 403): bad credentials refuse everything and are a configuration error.
_DENIED_CODES = ("AccessDenied", "403", "Forbidden", "AllAccessDisabled")


class StorageError(RuntimeError):
    """An object store or file system operation failed; the message names the URI."""


class NotFound(StorageError):
    """The object, folder or bucket does not exist."""


class AccessDenied(StorageError):
    """The object, folder or bucket exists, but may not be read (or listed) by this
    user or these credentials."""


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One object found by `list_objects`."""

    uri: str
    """Full URI (or path) of the object, usable with `read_bytes`."""
    relpath: str
    """Path below the listed prefix, `/`-separated."""
    size: int
    """Size in bytes."""


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """An entry below a listed prefix that has no bytes to read: see `list_inputs`."""

    uri: str
    """Full URI (or path) of the entry."""
    relpath: str
    """Path below the listed prefix, `/`-separated."""
    reason: str
    """`broken_link`, `link_loop`, `not_a_regular_file`, `permission_denied` or
    `unreadable` (any other error of the file system, named in `detail`)."""
    detail: str
    """What the entry is, or the error, in words."""


# --- URIs --------------------------------------------------------------------------


def _split_s3(uri: str) -> tuple[str, str]:
    try:
        return split_s3(uri)
    except LocationError as e:
        raise StorageError(str(e)) from None


def _hidden(relpath: str) -> bool:
    return any(part.startswith(".") for part in relpath.split("/"))


# --- S3 errors ---------------------------------------------------------------------


@contextmanager
def _errors(uri: str) -> Iterator[None]:
    """Translate boto3 and OS errors into StorageError/NotFound naming `uri`."""
    import botocore.exceptions as bx

    try:
        yield
    except bx.ClientError as e:
        err = e.response.get("Error", {})
        code = str(err.get("Code", "unknown"))
        message = err.get("Message") or code
        if code in _MISSING_CODES:
            raise NotFound(f"{uri}: not found ({message})") from None
        if code in _DENIED_CODES:
            raise AccessDenied(f"{uri}: permission denied ({message})") from None
        raise StorageError(f"{uri}: {code}: {message}") from None
    except bx.NoCredentialsError:
        raise StorageError(
            f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    except (bx.EndpointConnectionError, bx.ConnectTimeoutError) as e:
        raise StorageError(f"{uri}: cannot reach the S3 endpoint: {e}") from None
    except bx.BotoCoreError as e:
        raise StorageError(f"{uri}: {e}") from None
    except FileNotFoundError:
        raise NotFound(f"{uri}: not found") from None
    except PermissionError:
        raise AccessDenied(f"{uri}: permission denied") from None
    except OSError as e:
        raise StorageError(f"{uri}: {e.strerror or e}") from None


# --- operations ---------------------------------------------------------------------


def read_bytes(uri: str, start: int = 0, length: int | None = None, patient: bool = False) -> bytes:
    """The object's bytes, or `length` bytes from offset `start`. A `patient` read
    of S3 waits out an endpoint that is down, as writes do (`s3.patiently`)."""
    if length == 0:
        return b""  # an HTTP range cannot say "nothing"
    with _errors(uri):
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            extra = {}
            if start or length is not None:
                end = "" if length is None else str(start + length - 1)
                extra["Range"] = f"bytes={start}-{end}"

            def read() -> bytes:
                return s3.client().get_object(Bucket=bucket, Key=key, **extra)["Body"].read()

            if patient:
                return s3.patiently(lambda: s3.retry_body(read))
            return s3.retry_body(read)
        with open(local_path(uri), "rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically, creating local parent folders."""
    with _errors(uri):
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            # upload_fileobj switches to multipart above 8 MiB; completion is atomic.
            s3.patiently(lambda: s3.client().upload_fileobj(io.BytesIO(data), bucket, key))
            return
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def remove_partial_writes(prefix: str) -> int:
    """Delete the temporary files that local writes interrupted by a crash left in
    the folder `prefix` (S3 leaves none: an unfinished upload is never an object).
    Only for a folder that no other job is writing to. Returns how many went."""
    if is_s3(prefix) or not local_path(prefix).is_dir():
        return 0
    removed = 0
    for folder, _, files in os.walk(local_path(prefix)):
        for name in files:
            if _TEMPORARY.match(name):
                os.unlink(os.path.join(folder, name))
                removed += 1
    return removed


def list_objects(prefix: str) -> list[ObjectInfo]:
    """Every object below `prefix` (a folder), recursively, sorted by relative path.

    Raises NotFound when a local folder or an S3 bucket does not exist (an S3
    prefix with nothing under it lists as empty), AccessDenied when it may not be
    listed, and StorageError naming the first entry below it that `list_inputs`
    finds unreadable (for the prefixes the pipeline writes, where none belongs).
    """
    objects, unreadable = list_inputs(prefix)
    if unreadable:
        raise StorageError(f"{unreadable[0].uri}: {unreadable[0].detail}")
    return objects


def list_inputs(prefix: str) -> tuple[list[ObjectInfo], list[Unreadable]]:
    """What `list_objects` lists, and every other entry below `prefix` as an
    `Unreadable`, so one bad entry costs that entry, not the listing.

    Unreadable, with their `reason`: a link to nothing (`broken_link`); a link
    that loops, or leads to a folder above it (`link_loop`); a FIFO, socket or
    device (`not_a_regular_file`: opening a FIFO waits for a writer, forever); a
    file or sub-folder this user may not read or list (`permission_denied`); any
    other error of the file system (`unreadable`). An S3 listing has none: every
    key it returns is an object. Raises NotFound when `prefix` itself does not
    exist and AccessDenied when it may not be listed.
    """
    with _errors(prefix):
        if is_s3(prefix):
            return _list_s3(prefix), []
        return _list_local(prefix)


def _list_s3(prefix: str) -> list[ObjectInfo]:
    bucket, key = _split_s3(prefix)
    key = key.rstrip("/")
    start = f"{key}/" if key else ""
    out = []
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start)
    for page in pages:
        for obj in page.get("Contents", []):
            relpath = obj["Key"][len(start) :]
            if relpath and not relpath.endswith("/") and not _hidden(relpath):
                out.append(ObjectInfo(f"{S3}{bucket}/{obj['Key']}", relpath, obj["Size"]))
    return sorted(out, key=lambda o: o.relpath)


def _list_local(prefix: str) -> tuple[list[ObjectInfo], list[Unreadable]]:
    root = local_path(prefix)
    try:
        files, bad = local_walk.walk(root)
    except local_walk.NotAFolder as e:
        raise NotFound(f"{prefix}: not found ({e})") from None
    objects = [ObjectInfo(join(prefix, f.relpath), f.relpath, f.size) for f in files]
    unreadable = [Unreadable(join(prefix, b.relpath), b.relpath, b.reason, b.detail) for b in bad]
    return objects, unreadable


def exists(uri: str) -> bool:
    """Whether an object (or local file) exists at `uri`."""
    with _errors(uri):
        if is_s3(uri):
            import botocore.exceptions as bx

            bucket, key = _split_s3(uri)
            try:
                s3.client().head_object(Bucket=bucket, Key=key)
            except bx.ClientError as e:
                if e.response.get("Error", {}).get("Code") in _MISSING_CODES:
                    return False
                raise
            return True
        return local_path(uri).is_file()


def delete(uri: str) -> None:
    """Delete the object at `uri`; deleting what is absent is not an error."""
    with _errors(uri):
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            s3.client().delete_object(Bucket=bucket, Key=key)
        else:
            local_path(uri).unlink(missing_ok=True)


def arrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and the path within it, for Ray Data and Ray Train.

    pyarrow's S3 client does not read `AWS_ENDPOINT_URL*` itself, so the endpoint
    is passed explicitly. Ray takes the path without its scheme (`bucket/prefix`).
    Its requests wait out an endpoint that is down for up to about a minute, in
    every process Ray sends it to (`arrow_s3_filesystem`).
    """
    import pyarrow.fs

    if is_s3(uri):
        bucket, key = _split_s3(uri)
        fs = s3.arrow_s3_filesystem(
            {"endpoint_override": s3_endpoint(), "region": s3.region() or "us-east-1"}
        )
        return fs, f"{bucket}/{key}".rstrip("/")
    return pyarrow.fs.LocalFileSystem(), str(local_path(uri).resolve())
