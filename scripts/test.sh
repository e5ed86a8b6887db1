#!/usr/bin/env bash
# Set up, then run the whole test-suite (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY -m ruff check .
$PY -m pytest -q -p no:cacheprovider tests "$@"
