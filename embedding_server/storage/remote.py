"""Remote storage through ``pyarrow.fs``: S3 (Ceph's RADOS Gateway, or any S3 service) and HDFS.

Open these with :func:`embedding_server.storage.urls.open_storage`; this module holds the backends.

**S3** (``s3://bucket/prefix``, :class:`S3Storage`). Publishing relies on S3's own atomicity: an
object becomes visible only when its upload completes, whole. :meth:`S3Storage.write_atomic`
therefore writes the object under its final name, never under a visible temporary name: one
``PutObject`` request for objects under pyarrow's 10 MiB part size, and a multipart upload
(also invisible until its final ``CompleteMultipartUpload``) above that. Reads are checked to
be one whole version even while the object is being overwritten (pyarrow reads the size with
one request and the bytes with another; see :meth:`S3Storage.read_bytes`). "Directories" are
key prefixes: listing one lists the names under ``prefix/``, deleting one deletes every object
under it. A missing bucket, refused credentials or an unreachable endpoint each give a
:class:`~embedding_server.storage.base.StorageError` that says so.

**HDFS** (``hdfs://host:port/path``, :class:`HdfsStorage`) writes a temporary ``.name.*.tmp``
file next to the target and renames it into place. HDFS refuses to rename onto an existing
file, so replacing a file removes the old one first: a reader may then briefly find no file,
but never a partial one. Packets and checkpoint files are written once under fresh names, so
this only concerns rewritten files.

The HDFS backend is exercised only through pyarrow's FileSystem API here: no Hadoop cluster,
JVM or libhdfs can be installed on the machines this project is developed on. Its code path
(temporary name, rename, listing, deletion, errors) runs in the test-suite over pyarrow's
local file system with HDFS's rename rule emulated, and URL parsing, options and the error for
a missing libhdfs are tested directly; set ``CTRSERVE_TEST_HDFS_URL`` to run the storage
contract tests against a real cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
from pyarrow import fs as pafs

from embedding_server.storage.base import (
    Storage,
    StorageError,
    StorageNotFoundError,
    StorageOptions,
    StorageStat,
    check_size,
    clean_relative,
    plain_names,
)

# pyarrow's AWS SDK adds checksum headers that Ceph's gateway answers with HTTP 411
# MissingContentLength; these make the SDK send checksums only where S3 requires them.
S3_ENV_DEFAULTS = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
}
# How often a read is retried when the object changed between pyarrow's size request and its
# data request (each retry reads a newer version; writers would have to replace the object
# continuously for all attempts to fail).
READ_ATTEMPTS = 8
# Listings are retried when an entry disappears while they are being made.
LIST_ATTEMPTS = 5
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$")
_AWS_ERROR = re.compile(r"AWS Error (\w+) during (\w+) operation")
_SERVER_ERROR = re.compile(r"HTTP status 5\d\d|SLOW_DOWN|SERVICE_UNAVAILABLE|INTERNAL_FAILURE")
_ACCESS_ERRORS = {"ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "INVALID_SIGNATURE"}


@dataclass
class _Connection:
    """A pyarrow file system shared by a storage and all its children."""

    filesystem: pafs.FileSystem
    describe: str  # where it connects, for messages (endpoint or name node)
    container_checked: bool = False  # S3: the bucket was seen to exist


class ArrowStorage(Storage):
    """Files under ``root`` on a pyarrow file system; the shared part of S3 and HDFS.

    Subclasses provide :meth:`write_atomic` and may refine error messages.

    Args:
        url: this root's URL.
        connection: the file system (shared with children).
        root: the root as a pyarrow path (``bucket/prefix`` for S3, ``/path`` for HDFS).
    """

    def __init__(self, url: str, connection: _Connection, root: str):
        super().__init__(url)
        self._conn = connection
        self._root = root.rstrip("/") or "/"

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The underlying pyarrow file system (shared with children)."""
        return self._conn.filesystem

    def _key(self, path: str) -> str:
        rel = self._relative(path)
        if not rel:
            return self._root
        return f"{self._root}/{rel}" if self._root != "/" else f"/{rel}"

    def _file_key(self, path: str) -> str:
        """The key of a file: ``path`` must name something below the root."""
        if not self._relative(path):
            raise StorageError(f"{self.url}: a file path below the storage root is needed, not the root itself")
        return self._key(path)

    def child(self, path: str) -> ArrowStorage:
        return type(self)(self.join_url(path), self._conn, self._key(path))

    # -- errors ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _failing(self, action: str, path: str) -> Iterator[None]:
        """Turn pyarrow errors inside the block into StorageErrors naming the URL and action.

        A missing file becomes StorageNotFoundError, unless its whole container (S3 bucket) is
        missing, which is a StorageError saying so.
        """
        try:
            yield
            return
        except StorageError:
            raise
        except FileNotFoundError:
            pass
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"{self._where(path)}: {action} failed: {self._explain(exc)}") from exc
        try:
            self._check_container()
        except StorageError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"{self._where(path)}: {action} failed: {self._explain(exc)}") from exc
        raise StorageNotFoundError(f"{self._where(path)}: no such file")

    def _explain(self, exc: BaseException) -> str:
        """A one-line reason for a pyarrow error."""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return first[:500]

    def _check_container(self) -> None:
        """Raise a clear error when the container (S3 bucket) of this storage is missing."""

    # -- reading -----------------------------------------------------------------------------

    def _info(self, path: str, action: str) -> pafs.FileInfo:
        with self._failing(action, path):
            info = self.filesystem.get_file_info(self._key(path))
        if info.type == pafs.FileType.NotFound:
            with self._failing(action, path):
                self._check_container()
        return info

    def read_bytes(self, path: str, max_bytes: int | None = None) -> bytes:
        data, size, _ = self._read_once(path, max_bytes)
        if len(data) != size:
            raise StorageError(
                f"{self._where(path)}: read {len(data)} bytes of a {size}-byte file; it changed while being read"
            )
        return data

    def _read_once(self, path: str, max_bytes: int | None) -> tuple[bytes, int, dict]:
        """One read: the bytes, the size the file had when opened, and its metadata."""
        with self._failing("read", path):
            with self.filesystem.open_input_file(self._file_key(path)) as fh:
                size = fh.size()
                check_size(self._where(path), size, max_bytes)
                metadata = fh.metadata() or {}
                return fh.read(), size, metadata

    def list_dir(self, path: str = "") -> list[str]:
        key = self._key(path)
        selector = pafs.FileSelector(key, allow_not_found=True, recursive=False)
        for attempt in range(LIST_ATTEMPTS):
            try:
                with self._failing("listing", path):
                    infos = self.filesystem.get_file_info(selector)
                break
            except StorageNotFoundError:
                # An entry vanished while a non-atomic listing looked at it (a temporary file
                # renamed away); list again.
                if attempt == LIST_ATTEMPTS - 1:
                    raise
            except StorageError as exc:
                if isinstance(exc.__cause__, NotADirectoryError):  # a file, not a directory
                    return []
                raise
        if not infos:
            with self._failing("listing", path):
                self._check_container()
        prefix = key.rstrip("/") + "/"
        # Entries are the root's paths plus a name; a backend that answers fully qualified
        # paths (hdfs://host:port/...) gets its last component taken instead.
        names = [info.path[len(prefix) :] if info.path.startswith(prefix) else info.base_name for info in infos]
        return plain_names(self._where(path), names)

    def stat(self, path: str) -> StorageStat:
        info = self._info(path, "stat")
        if info.type == pafs.FileType.NotFound:
            raise StorageNotFoundError(f"{self._where(path)}: no such file or directory")
        is_dir = info.type == pafs.FileType.Directory
        mtime = info.mtime.timestamp() if info.mtime is not None else None
        return StorageStat(size=0 if is_dir else int(info.size or 0), mtime=mtime, is_dir=is_dir)

    def exists(self, path: str) -> bool:
        return self._info(path, "existence check").type != pafs.FileType.NotFound

    # -- deleting ----------------------------------------------------------------------------

    def delete(self, path: str) -> None:
        info = self._info(path, "delete")
        with self._failing("delete", path):
            if info.type == pafs.FileType.Directory:
                self._delete_dir(self._key(path))
            elif info.type != pafs.FileType.NotFound:
                self.filesystem.delete_file(self._key(path))

    def _delete_dir(self, key: str) -> None:
        self.filesystem.delete_dir(key)


class S3Storage(ArrowStorage):
    """Objects under ``s3://bucket/prefix`` on an S3 service (Ceph's RADOS Gateway, AWS, ...)."""

    _conn: _S3Connection

    def __init__(self, url: str, connection: _S3Connection, root: str):
        super().__init__(url, connection, root)

    @classmethod
    def open(cls, url: str, options: StorageOptions) -> S3Storage:
        """Parse ``url`` and connect with ``options`` (no request is sent yet).

        Args:
            url: ``s3://bucket`` or ``s3://bucket/prefix``.
            options: endpoint and credentials, environment already applied.

        Raises:
            StorageError: malformed URL or bucket name, or only one of the two static keys.

        Without static keys (``access_key``/``secret_key`` empty in the options and the
        environment), pyarrow's S3 client takes credentials from the AWS SDK's default chain: the
        environment, the shared credentials and config files (``AWS_SHARED_CREDENTIALS_FILE``,
        ``AWS_CONFIG_FILE``, ``AWS_PROFILE``), web identity (``AWS_WEB_IDENTITY_TOKEN_FILE`` with
        ``AWS_ROLE_ARN``: IAM roles for Kubernetes service accounts), and the container or
        instance metadata service.
        """
        bucket, prefix = parse_s3_url(url)
        if bool(options.access_key) != bool(options.secret_key):
            given, missing = ("access_key", "secret_key") if options.access_key else ("secret_key", "access_key")
            raise StorageError(
                f"{url}: S3 {given} is set but {missing} is not: give both (storage options or AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY), or neither to use the AWS default credential chain"
            )
        for name, value in S3_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        kwargs: dict = {}
        if options.endpoint:
            endpoint = urlparse(options.endpoint)
            kwargs.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme)
        if options.region:
            kwargs["region"] = options.region
        if options.access_key:  # else the AWS SDK's default credential chain
            kwargs.update(access_key=options.access_key, secret_key=options.secret_key)
            if options.session_token:
                kwargs["session_token"] = options.session_token
        try:
            filesystem = pafs.S3FileSystem(
                connect_timeout=float(options.connect_timeout_s),
                request_timeout=float(options.request_timeout_s),
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
                allow_delayed_open=True,  # small objects go up as one PutObject at close
                **kwargs,
            )
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"{url}: cannot set up the S3 client: {exc}") from exc
        describe = options.endpoint or "AWS S3"
        connection = _S3Connection(filesystem, describe, bucket=bucket, access_key=options.access_key)
        root = f"{bucket}/{prefix}" if prefix else bucket
        return cls(f"s3://{root}", connection, root)

    @property
    def bucket(self) -> str:
        return self._conn.bucket

    def write_atomic(self, path: str, data: bytes) -> None:
        """Upload ``data`` as the object at ``path`` (see the module docstring for atomicity)."""
        key = self._file_key(path)
        with self._failing("write", path):
            with self.filesystem.open_output_stream(key) as out:
                out.write(data)

    def read_bytes(self, path: str, max_bytes: int | None = None) -> bytes:
        """The whole object, verified to be one complete version.

        pyarrow learns an object's size and ETag with a HEAD request and then fetches that many
        bytes with a ranged GET; an overwrite in between would hand back a mix of two versions.
        A single-part object's ETag is the MD5 of its bytes, so the bytes are checked against
        it; for multipart objects the ETag is fetched again and must be unchanged. A read that
        fails the check is retried (up to :data:`READ_ATTEMPTS` times), and so is one that gets
        a server error: Ceph's gateway answers HTTP 500 now and then to a GET that races with an
        overwrite of the same object.

        Raises:
            StorageNotFoundError: no object at ``path``.
            StorageError: larger than ``max_bytes``, unreadable, or changing on every attempt.
        """
        for attempt in range(READ_ATTEMPTS):
            try:
                data, size, metadata = self._read_once(path, max_bytes)
            except StorageError as exc:
                if not _is_server_error(exc.__cause__) or attempt == READ_ATTEMPTS - 1:
                    raise
            else:
                if len(data) == size and self._is_one_version(path, data, metadata):
                    return data
            time.sleep(0.005 * (attempt + 1))
        raise StorageError(f"{self._where(path)}: the object changed during each of {READ_ATTEMPTS} read attempts")

    def _is_one_version(self, path: str, data: bytes, metadata: dict) -> bool:
        etag = _header(metadata, "ETag").strip('"')
        if re.fullmatch(r"[0-9a-fA-F]{32}", etag):  # single-part upload: ETag = MD5 of the bytes
            return hashlib.md5(data, usedforsecurity=False).hexdigest() == etag.lower()
        with self._failing("read", path), self.filesystem.open_input_file(self._key(path)) as fh:
            again = fh.metadata() or {}
        fields = ("ETag",) if etag else ("Content-Length", "Last-Modified")
        return all(_header(metadata, f) == _header(again, f) for f in fields)

    def _delete_dir(self, key: str) -> None:
        if "/" in key:
            self.filesystem.delete_dir(key)
        else:  # the storage root is the whole bucket: empty it, keep the bucket
            self.filesystem.delete_dir_contents(key, missing_dir_ok=True)

    def _check_container(self) -> None:
        conn = self._conn
        if conn.container_checked:
            return
        info = self.filesystem.get_file_info(conn.bucket)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{self.url}: bucket '{conn.bucket}' does not exist at {conn.describe}")
        conn.container_checked = True

    def _explain(self, exc: BaseException) -> str:
        raw = super()._explain(exc)
        match = _AWS_ERROR.search(raw)
        code = match.group(1) if match else ""
        conn = self._conn
        if code in _ACCESS_ERRORS:
            reason = (
                f"access denied by {conn.describe}: "
                + (
                    f"the access key '{conn.access_key}' or its secret key is wrong"
                    if conn.access_key
                    else "the credentials of the AWS default chain (no static keys were set) are missing or wrong"
                )
                + f", or the user may not use bucket '{conn.bucket}'"
            )
        elif code == "NO_SUCH_BUCKET":
            reason = f"bucket '{conn.bucket}' does not exist at {conn.describe}"
        elif code == "NETWORK_CONNECTION":
            reason = f"cannot connect to the S3 endpoint {conn.describe}"
        else:
            return raw
        return f"{reason} ({raw})"


@dataclass
class _S3Connection(_Connection):
    bucket: str = ""
    access_key: str = ""


def _is_server_error(exc: BaseException | None) -> bool:
    """Whether ``exc`` is an S3 answer worth retrying: HTTP 5xx, throttling, service unavailable."""
    return exc is not None and bool(_SERVER_ERROR.search(str(exc)))


def _header(metadata: dict, name: str) -> str:
    value = metadata.get(name, b"")
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` as ``("bucket", "a/b")``.

    Raises:
        StorageError: not an s3:// URL, a missing or malformed bucket name, credentials or a
            query in the URL, or a prefix that escapes with ``..``.
    """
    parsed = urlparse(url)
    if parsed.scheme != "s3":
        raise StorageError(f"storage URL {url!r}: not an s3:// URL")
    if parsed.username or parsed.password or "@" in parsed.netloc:
        raise StorageError(f"storage URL {url!r}: credentials do not belong in the URL; use the storage options")
    if parsed.query or parsed.fragment or parsed.params:
        raise StorageError(f"storage URL {url!r}: query parameters are not supported; use the storage options")
    bucket = parsed.netloc
    if not _BUCKET_NAME.match(bucket or ""):
        raise StorageError(
            f"storage URL {url!r}: bucket name {bucket!r} is not valid (lower-case letters, digits, '.', '-', "
            "3 or more characters): expected s3://bucket/prefix"
        )
    try:
        prefix = clean_relative(parsed.path.lstrip("/"))
    except StorageError:
        raise StorageError(f"storage URL {url!r}: the prefix must not contain '..'") from None
    return bucket, prefix


class HdfsStorage(ArrowStorage):
    """Files under ``hdfs://host:port/path`` through pyarrow's HadoopFileSystem (libhdfs)."""

    @classmethod
    def open(cls, url: str, options: StorageOptions) -> HdfsStorage:
        """Parse ``url`` and connect to the name node.

        Args:
            url: ``hdfs://host[:port]/path`` (port 8020 by default), or ``hdfs:///path`` for the
                ``fs.defaultFS`` of the local Hadoop configuration.
            options: ``hdfs_user`` and ``kerb_ticket`` are used.

        Raises:
            StorageError: malformed URL, or the Hadoop client (JVM, libhdfs, CLASSPATH) cannot
                be loaded, or the name node refuses the connection.
        """
        host, port, path = parse_hdfs_url(url)
        try:
            filesystem = pafs.HadoopFileSystem(
                host, port, user=options.hdfs_user or None, kerb_ticket=options.kerb_ticket or None
            )
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"{url}: cannot connect to HDFS: {_hadoop_hint(exc)}") from exc
        return cls.with_filesystem(url, filesystem)

    @classmethod
    def with_filesystem(cls, url: str, filesystem: pafs.FileSystem) -> HdfsStorage:
        """The storage for ``url`` over an already connected pyarrow file system.

        For callers that manage the HadoopFileSystem themselves, and for tests, which pass a
        local pyarrow file system to run this backend's code without a cluster.

        Raises:
            StorageError: malformed URL.
        """
        host, port, path = parse_hdfs_url(url)
        where = f"{host}:{port}" if host != "default" else "fs.defaultFS"
        canonical = f"hdfs://{host}:{port}{path}" if host != "default" else f"hdfs://{path}"
        return cls(canonical.rstrip("/") if path != "/" else canonical, _Connection(filesystem, where), path)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write a hidden temporary file next to ``path`` and rename it into place."""
        key = self._file_key(path)
        parent, name = key.rsplit("/", 1)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        filesystem = self.filesystem
        with self._failing("write", path):
            try:
                filesystem.create_dir(parent or "/", recursive=True)
                with filesystem.open_output_stream(tmp) as out:
                    out.write(data)
                self._rename_over(tmp, key)
            except BaseException:
                with contextlib.suppress(OSError, pa.ArrowException):
                    filesystem.delete_file(tmp)
                raise

    def _rename_over(self, tmp: str, key: str) -> None:
        """Rename ``tmp`` to ``key``, replacing an existing file (HDFS's rename will not)."""
        filesystem = self.filesystem
        try:
            filesystem.move(tmp, key)
            return
        except (OSError, pa.ArrowException):
            if filesystem.get_file_info(key).type != pafs.FileType.File:
                raise
        filesystem.delete_file(key)
        filesystem.move(tmp, key)


def parse_hdfs_url(url: str) -> tuple[str, int, str]:
    """``hdfs://host:port/a/b`` as ``("host", port, "/a/b")``.

    Without a host the ``fs.defaultFS`` of the Hadoop configuration is meant (host "default",
    port 0); without a port, 8020.

    Raises:
        StorageError: not an hdfs:// URL, a bad port, credentials or a query in the URL, or a
            path with ``..``.
    """
    parsed = urlparse(url)
    if parsed.scheme != "hdfs":
        raise StorageError(f"storage URL {url!r}: not an hdfs:// URL")
    if parsed.username or parsed.password or parsed.query or parsed.fragment or parsed.params:
        raise StorageError(f"storage URL {url!r}: expected hdfs://host:port/path, without user, query or fragment")
    try:
        port = parsed.port
    except ValueError:
        raise StorageError(f"storage URL {url!r}: the port is not a number from 0 to 65535") from None
    host = parsed.hostname or "default"
    if host == "default":
        port = 0 if port is None else port
    elif port is None:
        port = 8020
    try:
        rel = clean_relative(parsed.path.lstrip("/"))
    except StorageError:
        raise StorageError(f"storage URL {url!r}: the path must not contain '..'") from None
    return host, port, "/" + rel


def _hadoop_hint(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if any(s in str(exc) for s in ("libjvm", "libhdfs", "NoClassDefFoundError", "CLASSPATH")):
        return (
            f"pyarrow could not load the Hadoop client ({first}). HDFS needs a JVM and Hadoop's libhdfs: "
            "set JAVA_HOME, HADOOP_HOME (or ARROW_LIBHDFS_DIR) and CLASSPATH=$(hadoop classpath --glob)"
        )
    return first[:500]
