#!/usr/bin/env bash
# Set up, then run the whole test-suite (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY -m ruff check .
# test files spread over worker processes (one torch thread pool each, tests/conftest.py): up to 4, one per core
WORKERS=${TEST_WORKERS:-$($PY -c "import os; print(min(4, os.cpu_count() or 1))")}
$PY -m pytest -q -p no:cacheprovider -n "$WORKERS" --dist loadfile tests "$@"
