"""Move the `champion` alias to a candidate version if it beats the champion on
the configured metric by the configured margin (both scored by tasks.evaluate on
the same data and settings). The first version becomes champion.

    python -m tasks.promote --model_name digits --version 7 --metric fd_pixel --margin 0.02
"""

import sys

from pipeline.config import PromoteConfig
from tasks.cli import run_task


def main(cfg: PromoteConfig) -> None:
    from pipeline.jobs.promote import promote

    print(f"promote: {promote(cfg).summary()}")


if __name__ == "__main__":
    sys.exit(run_task("tasks.promote", PromoteConfig, main))
