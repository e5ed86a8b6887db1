#!/usr/bin/env bash
# Set up, then optimize the pretrained all-MiniLM-L6-v2 and show what changed and how fast.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY -m examples.demo "$@"
