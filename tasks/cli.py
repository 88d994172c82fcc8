"""What every task does around its one library call: parse, validate, exit codes.

Exit codes: 0 success; 2 a bad input or config (one line naming it, nothing
written); 1 a failure while running (one line for storage, MLflow and other
expected failures, a traceback for anything unexpected, which is a bug); 130
interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from pipeline import storage
from pipeline.config import ConfigError, make_parser, parse_args


def run_task(
    prog: str, config_cls: type, main: Callable[[Any], None], argv: list[str] | None = None
) -> int:
    """Parse `argv` into a `config_cls`, call `main(config)`, map errors to exit codes."""
    parser = make_parser(config_cls, prog, config_cls.__doc__ or "")
    try:
        config = parse_args(config_cls, parser, argv)
        main(config)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (storage.StorageError, RuntimeError) as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # An MLflow server that cannot be reached (or refuses) is no bug: one line,
        # with any credentials of the tracking URI redacted.
        if type(e).__module__.split(".")[0] != "mlflow":
            raise
        detail = " ".join(storage.redact(str(e)).split())[:500]
        print(f"{prog}: failed: MLflow: {detail}", file=sys.stderr)
        return 1
    return 0
