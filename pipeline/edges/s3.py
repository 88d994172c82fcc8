"""The S3 transport: clients, and how long requests wait for an endpoint.

`pipeline.edges.storage` makes every request through here. boto3 and pyarrow
read the standard AWS variables; what they do not read (pyarrow's endpoint) is
passed explicitly. Reads fail fast, but for the training stream's; those,
whole-object writes and pyarrow's requests (Ray Train's checkpoints) wait out an
endpoint that is down for about a minute, because a failed write costs a job its
shard or checkpoint, and a failed read a training run its steps since the last
checkpoint.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import pyarrow.fs

T = TypeVar("T")


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def client() -> Any:
    return _make_client(s3_endpoint(), region(), os.environ.get("AWS_ACCESS_KEY_ID"))


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


def retry_body(read: Callable[[], bytes], attempts: int = 4) -> bytes:
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


def patiently(put: Callable[[], T], patience: float = WRITE_PATIENCE_S) -> T:
    """Call `put()` again, with backoff, while the S3 endpoint is down, for up to
    `patience` seconds; then raise its error. Only for requests that may be
    repeated: whole-object PUTs (the same bytes land again), and the GETs of a job
    already under way (the training stream's), whose failure costs more than a
    wait."""
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


ARROW_S3_ATTEMPTS = 11
"""Tries of each request of the pyarrow S3 client (its default: 3, about a second
in all). pyarrow's default strategy waits 25 ms x 2^n before try n + 1, so 11
tries span about 51 s: Ray Train's checkpoint uploads, its record of them and Ray
Data's reads ride out an outage about as long as `WRITE_PATIENCE_S`."""


def arrow_s3_filesystem(options: dict[str, Any]) -> pyarrow.fs.S3FileSystem:
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
    """pyarrow's S3FileSystem, pickled as `arrow_s3_filesystem(options)` (made on first
    use: pyarrow is imported only by the jobs that need it)."""
    import pyarrow.fs

    class PatientS3FileSystem(pyarrow.fs.S3FileSystem):
        options: dict[str, Any]

        def __reduce__(self) -> tuple[Any, ...]:
            return (arrow_s3_filesystem, (self.options,))

    return PatientS3FileSystem
