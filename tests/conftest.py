"""Shared pytest fixtures.

``ceph_s3`` (session scope): a real single-node Ceph cluster (one monitor, one memstore OSD, the
RADOS Gateway on a free loopback port; all state in a temporary directory) started with
:mod:`ctrserve.ceph_cluster`, with an S3 user and the bucket ``ctrserve-test``. It starts in about
2-3 s the first time a test asks for it and is stopped (SIGTERM, then SIGKILL after a short
grace) when the session ends. Without Ceph's programs installed the tests that use it fail
with the install command; they are not skipped.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ctrserve import ceph_cluster

REPO = Path(__file__).resolve().parents[1]
CEPH_TEST_BUCKET = "ctrserve-test"


@dataclass(frozen=True)
class CephS3:
    """How to reach the test cluster's S3 gateway."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    start_seconds: float

    def env(self) -> dict[str, str]:
        """Environment variables that ``embedding_server.storage.base`` reads."""
        return {
            "CTRSERVE_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def options(self, **overrides):
        """StorageOptions for this gateway, with ``overrides`` on top."""
        from embedding_server.storage.base import StorageOptions

        values = {"endpoint": self.endpoint, "access_key": self.access_key, "secret_key": self.secret_key}
        return StorageOptions.from_dict({**values, **overrides})


@pytest.fixture(scope="session")
def ceph_s3():
    missing = ceph_cluster.missing_binaries()
    if missing:
        pytest.fail(
            f"the S3 tests need a real Ceph; not found: {', '.join(missing)}; {ceph_cluster.INSTALL_HINT}",
            pytrace=False,
        )
    root = tempfile.mkdtemp(prefix="ctrserve-ceph-")
    began = time.monotonic()
    try:
        cluster = ceph_cluster.CephCluster.start(root, die_with_parent=True)
    except ceph_cluster.CephError as exc:  # its logs stay in ``root`` for diagnosis
        pytest.fail(f"could not start the test Ceph cluster: {exc}", pytrace=False)
    try:
        cluster.create_bucket(CEPH_TEST_BUCKET)
        yield CephS3(
            cluster.endpoint, cluster.access_key, cluster.secret_key, CEPH_TEST_BUCKET, time.monotonic() - began
        )
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
