#!/usr/bin/env bash
# Run lint, format and type checks, then the test suite (installs first if .venv is missing or stale).
# Extra arguments go to pytest, e.g. the quick loop: deploy/local/run_tests.sh -m unit
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/local/install.sh
echo "ruff check, ruff format --check, mypy:"
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
