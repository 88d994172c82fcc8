"""Counts the S3 requests of every Python process that imports it, for
bench/scale.py: that script puts this folder on PYTHONPATH before it starts Ray,
so its driver and every Ray worker import this module at start-up (Python
imports `sitecustomize` by itself).

When SCALE_REQUESTS names a folder, each boto3 API call appends its operation's
name (PutObject, GetObject, ListObjectsV2...) as a line to `<folder>/<pid>.log`;
bench/scale.py sums the folder's lines. Without the variable it does nothing.
"""

from __future__ import annotations

import os


def _install(folder: str) -> None:
    import botocore.client

    original = botocore.client.BaseClient._make_api_call
    path = os.path.join(folder, f"{os.getpid()}.log")

    def counted(self, operation_name, api_params):  # type: ignore[no-untyped-def]
        with open(path, "a") as f:
            f.write(operation_name + "\n")
        return original(self, operation_name, api_params)

    botocore.client.BaseClient._make_api_call = counted  # type: ignore[method-assign]


if os.environ.get("SCALE_REQUESTS"):
    try:
        _install(os.environ["SCALE_REQUESTS"])
    except ImportError:  # a process without boto3 makes no S3 requests
        pass
