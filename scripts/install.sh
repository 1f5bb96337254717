#!/usr/bin/env bash
# Create (or reuse) .venv and install navit-pe into it.
# Where the venv has no torch, the CPU build (torch==2.13.0) is installed first, so that the
# unpinned `torch` requirement is already met and pip never pulls the CUDA wheels.
# Where a torch is already importable it is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "install: no torch in .venv, installing the CPU build torch==2.13.0"
  "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q -e ".[dev]"
