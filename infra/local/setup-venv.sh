#!/bin/sh
# Create ./.venv (if missing) and install this project into it with the test and
# example extras, at the versions constraints.txt pins (pyproject.toml only states
# ranges). Safe to run again: pip skips what is already installed.
set -eu
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and alone, at the version constraints.txt pins, so nothing else can
# ask for another build. Which build comes is the index's choice: PyPI's Linux
# wheel is the multi-GB CUDA one. These machines hold the CPU wheel on pip's
# find-links; elsewhere, for the CPU build, set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (torch alone comes from
# there; the next step brings its dependencies from PyPI at the pinned versions).
TORCH=$(grep '^torch==' constraints.txt)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/python -m pip install --quiet --no-deps "$TORCH" --index-url "$TORCH_INDEX_URL"
else
  .venv/bin/python -m pip install --quiet -c constraints.txt "$TORCH"
fi
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test,examples]"
