"""The kinds of storage root, told apart by their URL's scheme.

A module of its own, free of pyarrow, so that command lines can offer the kinds as choices
without loading the storage implementations.

Example:
    >>> StorageKind.of_url("s3://models/ctr"), StorageKind.of_url("/data/models")
    (<StorageKind.S3: 's3'>, <StorageKind.LOCAL: 'local'>)
"""

from __future__ import annotations

from enum import Enum
from urllib.parse import urlparse


class StorageKind(str, Enum):
    """Where a storage root lives (see :func:`~embedding_server.storage.urls.open_storage`)."""

    LOCAL = "local"  # a path or file:// URL
    S3 = "s3"  # s3://bucket/prefix (Ceph's RADOS Gateway or any S3 service)
    HDFS = "hdfs"  # hdfs://host:port/path

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of_url(cls, url: str) -> StorageKind | None:
        """The kind of ``url``, or None when its scheme is none of them."""
        return _BY_SCHEME.get(urlparse(url).scheme)


_BY_SCHEME = {"": StorageKind.LOCAL, "file": StorageKind.LOCAL, "s3": StorageKind.S3, "hdfs": StorageKind.HDFS}
