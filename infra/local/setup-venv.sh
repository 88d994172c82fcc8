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
# torch==2.13.0 first and alone: it resolves to the CPU wheel where one is on the
# machine's find-links, before anything else can ask for a CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,examples]"
