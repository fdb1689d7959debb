#!/usr/bin/env bash
# Create .venv (if missing) and install ctrserve with its test dependencies.
# torch is installed first as the pinned CPU build: a bare `torch` requirement could pull a
# multi-GB CUDA build. Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install --quiet "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# Builds the embedding service stubs and TorchServe's inference/management stubs (from the
# protos inside the installed TorchServe jar; nothing of TorchServe's is copied into the repo).
.venv/bin/python -m protos.generate
# TorchServe's frontend is Java: serving (ctrserve archive/publish, tests/test_torchserve.py) needs Java 11+.
if ! command -v java >/dev/null 2>&1; then
  echo "warning: java not found; TorchServe needs Java 17 (e.g. apt-get install openjdk-17-jre-headless)" >&2
fi
.venv/bin/python -c "import torch, numba, grpc, pyarrow; print(f'installed: torch {torch.__version__}, numba {numba.__version__}, grpcio {grpc.__version__}, pyarrow {pyarrow.__version__}')"
