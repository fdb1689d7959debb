#!/usr/bin/env bash
# Install the Ceph daemons the s3:// tests and the demo start on loopback (ctrserve/ceph_cluster.py):
# a monitor, an OSD, the RADOS Gateway (S3) and the admin tools. Debian/Ubuntu; uses sudo when
# not root. Does nothing when they are already installed; the first run downloads the packages.
set -euo pipefail
needed=(monmaptool ceph-mon ceph-osd ceph radosgw radosgw-admin uuidgen)
missing=()
for tool in "${needed[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "ceph: already installed ($(ceph --version 2>/dev/null | cut -d' ' -f1-3))"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ceph: missing ${missing[*]} and no apt-get here; install ceph-mon ceph-osd radosgw ceph-common uuid-runtime with your package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
echo "ceph: installing (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# systemd is absent in containers; the packages' complaints about it are harmless.
$SUDO apt-get install -y -qq --no-install-recommends ceph-mon ceph-osd radosgw ceph-common uuid-runtime >/dev/null
echo "ceph: installed $(ceph --version | cut -d' ' -f1-3)"
