#!/bin/sh
# Create ./.venv (if missing) and install this project into it with the test and
# example extras, at the versions constraints.txt pins (pyproject.toml only states
# ranges). Safe to run again: what is installed at the pinned version stays.
#
# The installer is uv (from PyPI, into the venv): it resolves and unpacks in
# parallel, and sets the venv up in about a minute, bytecode compiled, where pip
# takes about five (on 2 cores, same pins, same packages). INSTALLER=pip uses pip.
set -eu
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
INSTALLER=${INSTALLER:-uv}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip's find-links (a folder of local wheels, such as a CPU torch) serve uv too.
FIND_LINKS=${PIP_FIND_LINKS:-$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)}
if [ "$INSTALLER" = uv ]; then
  .venv/bin/python -m pip install --quiet "$(grep '^uv==' constraints.txt)"
  # --compile-bytecode, as pip does: else each package is compiled at its first
  # import, by every process that imports it before its .pyc is written.
  install() {
    .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python \
      ${FIND_LINKS:+--find-links "$FIND_LINKS"} "$@"
  }
else
  .venv/bin/python -m pip install --quiet --upgrade pip
  install() { .venv/bin/python -m pip install --quiet "$@"; }
fi
# torch first and alone, at the version constraints.txt pins, so nothing else can
# ask for another build. Which build comes is the index's choice: PyPI's Linux
# wheel is the multi-GB CUDA one. These machines hold the CPU wheel in pip's
# find-links; elsewhere, for the CPU build, set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (torch alone comes from
# there; the next step brings its dependencies from PyPI at the pinned versions).
TORCH=$(grep '^torch==' constraints.txt)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  install --no-deps "$TORCH" --index-url "$TORCH_INDEX_URL"
else
  install -c constraints.txt "$TORCH"
fi
install -c constraints.txt -e ".[test,examples]"
