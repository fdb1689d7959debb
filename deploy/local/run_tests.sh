#!/usr/bin/env bash
# Run the whole test suite (installs first if .venv is missing or stale).
# Extra arguments go to pytest, e.g. deploy/local/run_tests.sh -k lookup
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/local/install.sh
exec .venv/bin/python -m pytest "$@"
