#!/usr/bin/env bash
# Install promtool (Debian's `prometheus` package, 2.42 on these machines), which checks and
# unit-tests the alert rules in this folder (tests/test_operations.py runs `promtool check rules`
# and `promtool test rules`). Debian/Ubuntu; uses sudo when not root. Does nothing when promtool
# is already there. Only the package's files are wanted: no Prometheus server is started.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  echo "promtool: already installed ($(promtool --version 2>&1 | head -1))"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "promtool: missing and no apt-get here; install Prometheus' promtool (2.42 or later) with your package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
echo "promtool: installing Debian's prometheus package"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
echo "promtool: installed $(promtool --version 2>&1 | head -1)"
