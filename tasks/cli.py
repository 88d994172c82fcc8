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

from pipeline.config import ConfigError, make_parser, parse_args
from pipeline.edges import storage


def run_task(
    prog: str, config_cls: type, main: Callable[[Any], None], argv: list[str] | None = None
) -> int:
    """Parse `argv` into a `config_cls`, call `main(config)`, map errors to exit codes."""
    parser = make_parser(config_cls, prog, config_cls.__doc__ or "")
    try:
        config = parse_args(config_cls, parser, argv)
        main(config)
    except ConfigError as e:
        _say_last(refused_line(prog, e))
        return 2
    except (storage.StorageError, RuntimeError) as e:
        _say_last(f"{prog}: failed: {e}")
        return 1
    except KeyboardInterrupt:
        _say_last(f"{prog}: interrupted")
        return 130
    except Exception as e:
        # An MLflow server that cannot be reached (or refuses) is no bug: one line,
        # with any credentials of the tracking URI redacted.
        if type(e).__module__.split(".")[0] != "mlflow":
            raise
        detail = " ".join(storage.redact(str(e)).split())[:500]
        _say_last(f"{prog}: failed: MLflow: {detail}")
        return 1
    return 0


def refused_line(prog: str, e: ConfigError) -> str:
    """The one line a task ends with when its input is refused (exit 2)."""
    return f"{prog}: error: {e}"


def _say_last(line: str) -> None:
    """Print the task's one-line verdict as the last line of stderr: first stop
    Ray, whose driver would otherwise still print lines forwarded from workers."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    print(line, file=sys.stderr)
