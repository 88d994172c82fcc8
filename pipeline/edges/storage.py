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
import functools
import io
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

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
from pipeline.edges import local_walk

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = [
    "AccessDenied",
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


# --- S3 client ---------------------------------------------------------------------


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def _client() -> Any:
    return _make_client(s3_endpoint(), _region(), os.environ.get("AWS_ACCESS_KEY_ID"))


@functools.lru_cache(maxsize=4)
def _make_client(endpoint: str | None, region: str | None, _key_id: str | None) -> Any:
    # One client per process and setting; boto3 clients are thread-safe. The key
    # id is part of the cache key so a changed identity gets a new client.
    import boto3
    import botocore.config

    config = botocore.config.Config(
        retries={
            "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "5")),
        },
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=32,
        # Custom endpoints (MinIO, SeaweedFS, in-cluster services) rarely resolve
        # bucket subdomains; AWS itself prefers virtual hosting.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region, config=config
    )


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


def _retry_body(read: Callable[[], bytes], attempts: int = 4) -> bytes:
    """Call `read()` again when a download breaks mid-body; botocore retries
    requests, not the streaming of an already-started response."""
    import botocore.exceptions as bx
    import urllib3.exceptions as ux

    transient = (
        bx.ResponseStreamingError,
        bx.ReadTimeoutError,
        bx.IncompleteReadError,
        bx.ConnectionClosedError,
        ux.ProtocolError,
    )
    for attempt in range(attempts):
        try:
            return read()
        except transient:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)  # backoff between retries of a failed download
    raise AssertionError("unreachable: the last attempt returns or raises")


WRITE_PATIENCE_S = 60.0
"""How long a write to S3 keeps trying an endpoint that does not answer, or answers
5xx (a server restarting, a network blip), before it fails. botocore gives up on
a refused connection within a second or two, and a failed write costs a job its
shard or checkpoint, so writes wait. Reads and listings do not: a job makes them
first, and a wrong endpoint should be reported at once, not after a minute."""


def _patiently(put: Callable[[], None], patience: float = WRITE_PATIENCE_S) -> None:
    """Call `put()` again, with backoff, while the S3 endpoint is down, for up to
    `patience` seconds; then raise its error. Only for whole-object PUTs, which
    may be repeated: the same bytes land again."""
    deadline, delay = time.monotonic() + patience, 0.5
    while True:
        try:
            return put()
        except Exception as e:
            if not _endpoint_down(e) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)  # backoff while the endpoint is down
        delay = min(2 * delay, 8.0)


def _endpoint_down(e: Exception) -> bool:
    """Whether `e` says that the S3 endpoint is down or failing (worth waiting
    for), rather than that the request is wrong."""
    import botocore.exceptions as bx

    if isinstance(e, bx.ClientError):
        return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    down = (
        bx.EndpointConnectionError,
        bx.ConnectTimeoutError,
        bx.ConnectionClosedError,
        bx.ReadTimeoutError,
    )
    return isinstance(e, down)


# --- operations ---------------------------------------------------------------------


def read_bytes(uri: str, start: int = 0, length: int | None = None) -> bytes:
    """The object's bytes, or `length` bytes from offset `start`."""
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
                return _client().get_object(Bucket=bucket, Key=key, **extra)["Body"].read()

            return _retry_body(read)
        with open(local_path(uri), "rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically, creating local parent folders."""
    with _errors(uri):
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            # upload_fileobj switches to multipart above 8 MiB; completion is atomic.
            _patiently(lambda: _client().upload_fileobj(io.BytesIO(data), bucket, key))
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
    pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start)
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
                _client().head_object(Bucket=bucket, Key=key)
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
            _client().delete_object(Bucket=bucket, Key=key)
        else:
            local_path(uri).unlink(missing_ok=True)


def arrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and the path within it, for Ray Data and Ray Train.

    pyarrow's S3 client does not read `AWS_ENDPOINT_URL*` itself, so the endpoint
    is passed explicitly. Ray takes the path without its scheme (`bucket/prefix`).
    Its requests wait out an endpoint that is down for up to about a minute, in
    every process Ray sends it to (`_s3_filesystem`).
    """
    import pyarrow.fs

    if is_s3(uri):
        bucket, key = _split_s3(uri)
        fs = _s3_filesystem(
            {"endpoint_override": s3_endpoint(), "region": _region() or "us-east-1"}
        )
        return fs, f"{bucket}/{key}".rstrip("/")
    return pyarrow.fs.LocalFileSystem(), str(local_path(uri).resolve())


ARROW_S3_ATTEMPTS = 11
"""Tries of each request of the pyarrow S3 client (its default: 3, about a second
in all). pyarrow's default strategy waits 25 ms x 2^n before try n + 1, so 11
tries span about 51 s: Ray Train's checkpoint uploads, its record of them and Ray
Data's reads ride out an outage about as long as `WRITE_PATIENCE_S`."""


def _s3_filesystem(options: dict[str, Any]) -> pyarrow.fs.S3FileSystem:
    """A pyarrow S3 filesystem with `options` and ARROW_S3_ATTEMPTS tries per
    request, which it keeps when pickled: pyarrow's own pickling drops the retry
    strategy, and Ray pickles the filesystem to its controller and workers."""
    import pyarrow.fs

    fs = _patient_s3_class()(
        retry_strategy=pyarrow.fs.AwsDefaultS3RetryStrategy(max_attempts=ARROW_S3_ATTEMPTS),
        **options,
    )
    fs.options = options
    return fs


@functools.cache
def _patient_s3_class() -> type[pyarrow.fs.S3FileSystem]:
    """pyarrow's S3FileSystem, pickled as `_s3_filesystem(options)` (made on first
    use: pyarrow is imported only by the jobs that need it)."""
    import pyarrow.fs

    class PatientS3FileSystem(pyarrow.fs.S3FileSystem):
        options: dict[str, Any]

        def __reduce__(self) -> tuple[Any, ...]:
            return (_s3_filesystem, (self.options,))

    return PatientS3FileSystem
