#!/bin/sh
# Create ./.venv (if missing) and install this project into it with the test and
# example extras. Safe to run again: pip skips what is already installed.
set -eu
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch==2.13.0 first and alone, so nothing else can ask for another build. Which
# build comes is the index's choice: PyPI's Linux wheel is the multi-GB CUDA one.
# These machines hold the CPU wheel on pip's find-links; elsewhere, for the CPU
# build, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[test,examples]"
