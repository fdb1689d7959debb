"""Opening a storage root by path or URL.

:func:`open_storage` picks the implementation for a URL by its
:class:`~embedding_server.storage.kinds.StorageKind` (the interface is
:class:`~embedding_server.storage.base.Storage`):

==============================  ===========================================================
``/abs/path``, ``rel/path``,    :class:`LocalStorage`: temp file + fsync + rename
``file:///abs/path``
``s3://bucket/prefix``          :class:`~embedding_server.storage.remote.S3Storage` (pyarrow's
                                S3FileSystem; Ceph's RADOS Gateway or any S3 service):
                                each object is written under its final name in one request
``hdfs://host:port/path``       :class:`~embedding_server.storage.remote.HdfsStorage`
                                (pyarrow's HadoopFileSystem): temp name + rename
==============================  ===========================================================

Example:
    >>> import tempfile
    >>> st = open_storage(tempfile.mkdtemp())
    >>> st.write_atomic("a/b.txt", b"hi"); st.read_bytes("a/b.txt"), st.list_dir("a")
    (b'hi', ['b.txt'])
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from embedding_server.storage.base import LocalStorage, Storage, StorageError, StorageOptions, parse_mode
from embedding_server.storage.kinds import StorageKind


def open_storage(
    url: str | os.PathLike[str] | Storage,
    options: StorageOptions | Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Storage:
    """The storage for a path or URL.

    Args:
        url: a local path, ``file:///path``, ``s3://bucket[/prefix]`` or
            ``hdfs://[host[:port]]/path``. An already open :class:`Storage` is returned as is
            (then no options may be given).
        options: connection settings, as :class:`StorageOptions` or a mapping for
            :meth:`StorageOptions.from_dict`.
        **overrides: individual options on top of ``options`` (e.g. ``endpoint=...``).
            Options still empty are read from the environment (see the module docstring).

    Raises:
        StorageError: an unknown scheme, a malformed URL, invalid options, missing S3
            credentials, or an HDFS client that cannot be loaded.
    """
    if isinstance(url, Storage):
        if options is not None or overrides:
            raise StorageError(f"{url.url}: already open; options apply only when opening a URL")
        return url
    url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise StorageError(f"storage URL {url!r}: expected a non-empty path or URL string")
    if not isinstance(options, StorageOptions):
        options = StorageOptions.from_dict(options)
    if overrides:
        options = StorageOptions.from_dict({**dataclasses.asdict(options), **overrides})
    kind = StorageKind.of_url(url)
    if kind is None:
        raise StorageError(
            f"storage URL {url!r}: scheme '{urlparse(url).scheme}://' is not supported; "
            "use a local path, file://, s3:// or hdfs://"
        )
    if kind is StorageKind.LOCAL:
        return LocalStorage(url, file_mode=parse_mode(options.file_mode), dir_mode=parse_mode(options.dir_mode))
    from embedding_server.storage import remote as storage_remote  # pyarrow.fs is only needed for remote URLs

    opener = storage_remote.S3Storage if kind is StorageKind.S3 else storage_remote.HdfsStorage
    return opener.open(url, options.with_env())
