"""Write scikit-learn's handwritten digits as a folder of PNGs by class.

python -m tasks.digits --output data/digits
"""

import sys

from pipeline.config import DigitsConfig
from tasks.cli import run_task


def main(cfg: DigitsConfig) -> None:
    from pipeline.data.digits import write_digits

    count = write_digits(cfg.output, cfg.first, cfg.count or None)
    print(f"digits: {count} PNGs (from index {cfg.first}) under {cfg.output}/<label>/")


if __name__ == "__main__":
    sys.exit(run_task("tasks.digits", DigitsConfig, main))
