#!/usr/bin/env bash
# Create .venv and install energydiag into it, without ever pulling a CUDA build of torch:
# when the venv has no torch yet, the pinned CPU wheel (torch==2.13.0) goes in first, so the
# package's own "torch>=2.4" is already satisfied. Usage: scripts/bootstrap.sh [extras]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
# The build needs only setuptools>=64 (pyproject.toml): where the venv has it, building in
# the venv saves the seconds an isolated build environment takes to install it again.
isolation=(--no-build-isolation)
.venv/bin/python -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" \
  2>/dev/null || isolation=()
.venv/bin/pip install --quiet "${isolation[@]}" -e ".${extras:+[$extras]}"
