#!/usr/bin/env bash
# Install torch-rewrite and its test dependencies. torch goes first, pinned to the build this
# machine already has (or the local CPU wheel), so no CUDA build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
TORCH_PIN=$($PY -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==${TORCH_PIN}" > /tmp/torch-rewrite-constraints.txt
$PY -m pip install -q -c /tmp/torch-rewrite-constraints.txt --no-build-isolation -e ".[dev]" \
    || $PY -m pip install -q -c /tmp/torch-rewrite-constraints.txt -e ".[dev]"
