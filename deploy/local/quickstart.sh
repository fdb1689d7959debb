#!/usr/bin/env bash
# The main job: set everything up and run the end-to-end demo on local storage.
# Extra arguments go to `ctrserve demo` (see `ctrserve demo --help`).
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/local/install.sh
exec .venv/bin/ctrserve demo "$@"
