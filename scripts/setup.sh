#!/usr/bin/env bash
# Creates .venv (once) with the CPU build of PyTorch pinned and srlora installed in
# editable mode with its dev tools. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch==2.13.0 is the CPU build this project is tested with; the library itself only
# asks for torch>=2.1, so GPU users keep their own build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
