"""Where checkpoints and incremental packets live: a local path or a storage URL.

:class:`Storage` is the small interface the rest of the code writes against: read a file, list
a directory, stat, delete, and publish a file atomically (a reader sees the old file, or the
whole new one, never a part). The implementations for remote URLs are in
:mod:`embedding_server.storage.remote`;
:func:`embedding_server.storage.urls.open_storage` picks one for a URL.

Connection settings are a :class:`StorageOptions` (typed and validated; ``from_dict`` for the
``storage`` section of ``global_config.yml``). Settings left empty are taken from the
environment, explicit options winning:

==================  ====================================================================
option              environment variables, first one set wins
==================  ====================================================================
endpoint            ``CTRSERVE_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``
access_key          ``AWS_ACCESS_KEY_ID``
secret_key          ``AWS_SECRET_ACCESS_KEY``
session_token       ``AWS_SESSION_TOKEN``
region              ``AWS_REGION``, ``AWS_DEFAULT_REGION``
hdfs_user           ``HADOOP_USER_NAME``
kerb_ticket         ``KRB5CCNAME`` (a ``FILE:`` prefix is dropped)
==================  ====================================================================

Every failure is a :class:`StorageError` whose message names the URL and what went wrong;
a missing file is a :class:`StorageNotFoundError` (also a ``FileNotFoundError``), and a file that
is there but refused (larger than the caller's bound, not a regular file, or a local path whose
symbolic links lead outside the root) an :class:`UnreadableFileError`.

Reads are bounded: ``max_bytes`` is checked against the size the backend reports (``fstat`` of the
opened file, the S3 object's or HDFS file's size) before any byte is read. Local reads open only
regular files inside the root: the path is resolved and must stay under the root (a symbolic link
may point elsewhere inside it), it is opened with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO or device
put there by an outside tool cannot block the open) and refused unless ``fstat`` says it is a
regular file.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import errno
import io
import logging
import math
import os
import shutil
import stat as stat_module
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa

log = logging.getLogger(__name__)


class StorageError(IOError):
    """A storage operation failed, a URL or option is invalid, or a path escapes the root."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The file (or object) asked for does not exist."""


class UnreadableFileError(StorageError):
    """The file is there but refused unread: larger than the caller's bound, not a regular file
    (a FIFO, a device, a directory), or, locally, its path resolves outside the storage root."""


@dataclass(frozen=True)
class StorageStat:
    """What :meth:`Storage.stat` knows about a path.

    Attributes:
        size: bytes in the file (0 for a directory).
        mtime: last modification as seconds since the epoch, or None where the backend has
            none (S3 "directories").
        is_dir: whether the path is a directory (an S3 prefix with objects under it).
    """

    size: int
    mtime: float | None
    is_dir: bool


# Environment variables each option falls back to, first one set wins (see module docstring).
ENV_FALLBACKS: dict[str, tuple[str, ...]] = {
    "endpoint": ("CTRSERVE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "access_key": ("AWS_ACCESS_KEY_ID",),
    "secret_key": ("AWS_SECRET_ACCESS_KEY",),
    "session_token": ("AWS_SESSION_TOKEN",),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "hdfs_user": ("HADOOP_USER_NAME",),
    "kerb_ticket": ("KRB5CCNAME",),
}


@dataclass(frozen=True)
class StorageOptions:
    """Connection settings for remote storage, and the permission bits of local files.

    Attributes:
        endpoint: S3 endpoint URL, ``http://host:port`` or ``https://host[:port]`` (Ceph's
            gateway, e.g. ``http://127.0.0.1:7480``); empty means AWS's own endpoint.
        access_key: S3 access key id.
        secret_key: S3 secret key (never shown in ``repr``).
        session_token: S3 session token for temporary credentials (never shown in ``repr``).
        region: S3 region; empty lets the client choose (Ceph ignores it).
        connect_timeout_s: seconds to wait for a TCP connection to the S3 endpoint.
        request_timeout_s: an S3 request fails when no byte moves for this many seconds (the
            AWS SDK's own default, 3 s, is too short for a busy single-node Ceph).
        max_attempts: S3 attempts per request, retries included (>= 1).
        hdfs_user: user name for HDFS; empty means the login user.
        kerb_ticket: path of the Kerberos ticket cache for HDFS.
        file_mode: permission bits of files written to a local model root, in octal (``"0640"``:
            the owner writes, the group reads, others nothing), or ``"umask"`` for
            ``0666 & ~umask``. The owner must be able to read and write.
        dir_mode: permission bits of the folders created in a local model root (``"0750"``), or
            ``"umask"`` for ``0777 & ~umask``. The owner must have ``rwx``.
    """

    endpoint: str = ""
    access_key: str = ""
    secret_key: str = dataclasses.field(default="", repr=False)
    session_token: str = dataclasses.field(default="", repr=False)
    region: str = ""
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    max_attempts: int = 3
    hdfs_user: str = ""
    kerb_ticket: str = ""
    file_mode: str = "0640"
    dir_mode: str = "0750"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "str" and not isinstance(value, str):
                raise StorageError(f"storage option {f.name}: expected a string, got {value!r}")
        parse_mode(self.file_mode, "file_mode", 0o600)
        parse_mode(self.dir_mode, "dir_mode", 0o700)
        for name in ("connect_timeout_s", "request_timeout_s"):
            timeout = getattr(self, name)
            if (
                isinstance(timeout, bool)
                or not isinstance(timeout, (int, float))
                or not math.isfinite(timeout)
                or timeout <= 0
            ):
                raise StorageError(f"storage option {name}: expected a positive number of seconds, got {timeout!r}")
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 20:
            raise StorageError(f"storage option max_attempts: expected an integer from 1 to 20, got {attempts!r}")
        if self.endpoint:
            _check_endpoint(self.endpoint)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str | None = None) -> StorageOptions:
        """Options from a mapping (e.g. the ``storage`` section of ``global_config.yml``).

        Args:
            data: option names to values; None or empty gives the defaults.
            where: how to name the source in error messages (e.g. ``global_config.yml: storage``).

        Raises:
            StorageError: ``data`` is not a mapping, has a key that is not an option, or a value
                of the wrong type or range.
        """
        subject = where or "storage options"
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise StorageError(f"{subject}: expected a mapping of option names to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise StorageError(
                f"{subject}: unknown option(s) {', '.join(unknown)}; known options are {', '.join(sorted(known))}"
            )
        values = dict(data)
        for name in ("connect_timeout_s", "request_timeout_s"):
            if isinstance(values.get(name), int) and not isinstance(values[name], bool):
                values[name] = float(values[name])
        try:
            return cls(**values)
        except StorageError as exc:
            if where is None:
                raise
            raise StorageError(f"{where}: {exc}") from None

    def with_env(self, environ: Mapping[str, str] | None = None) -> StorageOptions:
        """A copy with every empty string option filled from the environment (see ENV_FALLBACKS).

        Args:
            environ: the variables to read; defaults to ``os.environ``.

        Raises:
            StorageError: a variable holds an invalid value (e.g. a malformed endpoint).
        """
        env = os.environ if environ is None else environ
        updates: dict[str, Any] = {}  # string options only (ENV_FALLBACKS names no other)
        sources = []
        for name, variables in ENV_FALLBACKS.items():
            variable = next((v for v in variables if env.get(v)), None)
            if getattr(self, name) or variable is None:
                continue
            value = env[variable]
            updates[name] = value[len("FILE:") :] if name == "kerb_ticket" and value.startswith("FILE:") else value
            sources.append(variable)
        try:
            return dataclasses.replace(self, **updates)
        except StorageError as exc:
            raise StorageError(f"{exc} (read from the environment: {', '.join(sources)})") from None


def parse_mode(value: str, name: str = "file_mode", owner: int = 0o600) -> int | None:
    """Permission bits from an octal string such as ``"0640"``; None for ``"umask"``.

    Raises:
        StorageError: not octal, above ``0777`` (no set-id or sticky bits), or without the
            ``owner`` bits (the writer must keep access to what it writes).
    """
    if value == "umask":
        return None
    if not isinstance(value, str) or not value or any(c not in "01234567" for c in value):
        raise StorageError(
            f"storage option {name}: expected octal permission bits such as '0640' or 'umask', got {value!r}"
        )
    mode = int(value, 8)
    if mode > 0o777 or mode & owner != owner:
        raise StorageError(
            f"storage option {name}: {value!r} must be at most 0777 and give the owner {owner:o} (read/write"
            f"{'/search' if owner == 0o700 else ''})"
        )
    return mode


def umask() -> int:
    """The process's umask (read from ``/proc/self/status`` where it can be, without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _check_endpoint(endpoint: str) -> None:
    parsed = urlparse(endpoint)
    problem = ""
    if parsed.scheme not in ("http", "https"):
        problem = "it must start with http:// or https://"
    elif not parsed.hostname:
        problem = "it has no host"
    elif parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.username:
        problem = "it must be only scheme://host[:port], with no path, query or credentials"
    else:
        try:
            _ = parsed.port
        except ValueError:
            problem = "its port is not a number from 0 to 65535"
    if problem:
        raise StorageError(f"storage option endpoint {endpoint!r}: {problem} (e.g. http://127.0.0.1:7480)")


def clean_relative(path: str) -> str:
    """Normalise a relative storage path, refusing absolute paths and ``..`` escapes.

    Raises:
        StorageError: ``path`` is absolute, contains ``..`` or is not a string.
    """
    if not isinstance(path, str):
        raise StorageError(f"storage path {path!r}: expected a string")
    p = PurePosixPath(path)
    if p.is_absolute() or any(part == ".." for part in p.parts):
        raise StorageError(f"path {path!r} must be relative and stay inside the storage root")
    return str(p) if str(p) != "." else ""


def plain_names(url: str, names: Iterable[str]) -> list[str]:
    """Sorted listing names, keeping only plain visible names.

    Names with a ``/``, a NUL, empty names, ``.`` and ``..`` cannot be addressed safely and are
    dropped with a warning (a stray object must not stop a directory scan); names starting
    with ``.`` are temporary or hidden files and are dropped silently.
    """
    kept = []
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            log.warning("%s: ignoring listing entry %r: not a plain file name", url, name)
        elif not name.startswith("."):
            kept.append(name)
    return sorted(kept)


class Storage(abc.ABC):
    """Files under one root, addressed by relative POSIX paths (``""`` is the root itself).

    Attributes:
        url: the root's URL (or path), as given to :func:`open_storage`.
    """

    def __init__(self, url: str):
        self.url = url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @abc.abstractmethod
    def read_bytes(self, path: str, max_bytes: int | None = None) -> bytes:
        """The whole file, as one complete published version.

        Args:
            path: relative path of the file.
            max_bytes: refuse files larger than this many bytes (None: no bound).

        Raises:
            StorageNotFoundError: no file at ``path``.
            StorageError: the file is larger than ``max_bytes``, or the read failed.
        """

    def read_buffer(self, path: str, max_bytes: int | None = None) -> memoryview:
        """:meth:`read_bytes` for large files (packets, checkpoint tables): the same bytes as a
        buffer, which a backend may place in pyarrow's memory pool instead of a new ``bytes``
        object. Same arguments and errors as :meth:`read_bytes`."""
        return memoryview(self.read_bytes(path, max_bytes))

    @abc.abstractmethod
    def write_atomic(self, path: str, data: bytes) -> None:
        """Publish ``data`` at ``path``: readers see the previous content or all of ``data``.

        Missing parent directories are created.

        Raises:
            StorageError: the write failed (nothing partial is left visible).
        """

    @abc.abstractmethod
    def list_dir(self, path: str = "") -> list[str]:
        """Sorted names directly under ``path`` (files and directories; empty when absent).

        Names starting with ``.`` (temporary files) and names that are not plain file names
        are left out (see :func:`plain_names`).

        Raises:
            StorageError: the listing failed (e.g. unreachable endpoint, no such bucket).
        """

    @abc.abstractmethod
    def stat(self, path: str) -> StorageStat:
        """Size, modification time and kind of ``path``.

        Raises:
            StorageNotFoundError: nothing at ``path``.
            StorageError: the request failed.
        """

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether a file or directory is at ``path``.

        Raises:
            StorageError: the request failed (a missing path is False, not an error).
        """

    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Remove a file, or a directory (prefix) with everything under it; absent is fine.

        Raises:
            StorageError: the deletion failed.
        """

    @abc.abstractmethod
    def child(self, path: str) -> Storage:
        """A storage rooted at ``path`` below this one, with the same connection settings.

        Raises:
            StorageError: ``path`` is absolute or escapes this root.
        """

    def size(self, path: str) -> int:
        """Bytes in the file at ``path`` (see :meth:`stat`)."""
        return self.stat(path).size

    def mtime(self, path: str) -> float | None:
        """Last modification time of ``path`` in seconds since the epoch (see :meth:`stat`)."""
        return self.stat(path).mtime

    def join_url(self, path: str) -> str:
        """The URL of ``path`` below this root.

        Raises:
            StorageError: ``path`` is absolute or escapes this root.
        """
        rel = self._relative(path)
        return self.url.rstrip("/") + "/" + rel if rel else self.url

    def _relative(self, path: str) -> str:
        """:func:`clean_relative`, with this storage's URL in the error message."""
        try:
            return clean_relative(path)
        except StorageError as exc:
            raise StorageError(f"{self.url}: {exc}") from None

    def _where(self, path: str) -> str:
        return self.join_url(path) if path else self.url


def check_size(where: str, size: int, max_bytes: int | None) -> None:
    """Refuse a file of ``size`` bytes when it is over ``max_bytes``.

    Raises:
        UnreadableFileError: ``size`` exceeds ``max_bytes``.
    """
    if max_bytes is not None and size > max_bytes:
        raise UnreadableFileError(
            f"{where}: {size} bytes is more than the allowed {max_bytes} bytes; refusing to read it"
        )


class LocalStorage(Storage):
    """A directory on a local (or locally mounted) file system.

    Atomic publish writes a temporary file in the same directory, fsyncs it and renames it over
    the target, which POSIX guarantees to be atomic. Reads open only regular files whose resolved
    path stays inside the root (see the module docstring); a child storage keeps its parent's
    root as that bound.

    Files are written with ``file_mode`` and the folders a write creates get ``dir_mode``
    (storage options ``file_mode``/``dir_mode``: 0640 and 0750 by default, so a serving process
    running as another user of the writer's group can read the model root; ``"umask"`` applies
    the process umask instead). Existing folders keep their modes.

    Args:
        url: a path or ``file://`` URL.
        boundary: reads must stay inside this resolved directory (default: the root itself).
        file_mode: permission bits of written files (None: ``0666 & ~umask``).
        dir_mode: permission bits of created folders (None: ``0777 & ~umask``).
    """

    def __init__(
        self, url: str, boundary: Path | None = None, file_mode: int | None = 0o640, dir_mode: int | None = 0o750
    ):
        super().__init__(url)
        self.file_mode, self.dir_mode = file_mode, dir_mode
        parsed = urlparse(url)
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StorageError(f"storage URL {url!r}: file:// URLs must name a local path (file:///abs/path)")
        self.root = Path(parsed.path if parsed.scheme == "file" else url).resolve()
        self.boundary = self.root if boundary is None else boundary

    def _path(self, path: str) -> Path:
        return self.root / self._relative(path)

    def read_bytes(self, path: str, max_bytes: int | None = None) -> bytes:
        with self._reading(path) as fh:
            if max_bytes is not None:
                check_size(self._where(path), os.fstat(fh.fileno()).st_size, max_bytes)
                data = fh.read(max_bytes + 1)  # the file may have grown since the fstat
                check_size(self._where(path), len(data), max_bytes)
                return data
            return fh.read()

    def read_buffer(self, path: str, max_bytes: int | None = None) -> memoryview:
        with self._reading(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            check_size(self._where(path), size, max_bytes)
            # pyarrow's pool keeps freed memory for the next packet, where a new bytes object of a
            # packet's size costs a fresh mapping and its page faults each time.
            view = memoryview(pa.allocate_buffer(size + 1))  # one byte more: a file that grew is noticed
            got = 0
            while got <= size and (k := fh.readinto(view[got:])):
                got += k
        if got > size:  # written in place while read (not by an atomic publisher): read it again whole
            return memoryview(self.read_bytes(path, max_bytes))
        return view[:got]

    @contextlib.contextmanager
    def _reading(self, path: str) -> Iterator[io.BufferedReader]:
        """The open file, with OS errors turned into storage errors (see :meth:`_open_regular`)."""
        try:
            with os.fdopen(self._open_regular(path), "rb") as fh:
                yield fh
        except StorageError:  # from the caller's checks (an IOError too): as it is
            raise
        except FileNotFoundError:
            raise StorageNotFoundError(f"{self._where(path)}: no such file") from None
        except OSError as exc:
            raise StorageError(f"{self._where(path)}: read failed: {exc}") from exc

    def _open_regular(self, path: str) -> int:
        """A read-only descriptor of the regular file at ``path``, which must resolve inside the
        boundary. Opening never blocks (``O_NONBLOCK``: a FIFO without a writer opens at once and
        is then refused) and follows no link swapped in after the check (``O_NOFOLLOW``).

        Raises:
            FileNotFoundError: nothing there (a dangling link included).
            UnreadableFileError: outside the root, or not a regular file.
            OSError: the open failed otherwise.
        """
        where = self._where(path)
        real = Path(os.path.realpath(self._path(path)))
        if real != self.boundary and self.boundary not in real.parents:
            raise UnreadableFileError(
                f"{where}: resolves to {real}, outside the storage root {self.boundary}; refusing to read it"
            )
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # replaced by a symbolic link since it was resolved
                raise UnreadableFileError(f"{where}: is a symbolic link now; refusing to read it") from None
            raise
        try:
            mode = os.fstat(fd).st_mode
            if not stat_module.S_ISREG(mode):
                raise UnreadableFileError(f"{where}: is {_file_kind(mode)}, not a regular file; refusing to read it")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write_atomic(self, path: str, data: bytes) -> None:
        target = self._path(path)
        try:
            self._make_dirs(target.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        except OSError as exc:
            raise StorageError(f"{self._where(path)}: write failed: {exc}") from exc
        try:
            os.fchmod(fd, self.file_mode if self.file_mode is not None else 0o666 & ~umask())  # mkstemp: 0600
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StorageError(f"{self._where(path)}: write failed: {exc}") from exc
            raise

    def _make_dirs(self, folder: Path) -> None:
        """Create ``folder`` and its missing parents with ``dir_mode`` (chmod after mkdir: mkdir's
        mode is cut by the umask)."""
        missing = []
        while not folder.is_dir():
            missing.append(folder)
            if folder.parent == folder:
                break
            folder = folder.parent
        for created in reversed(missing):
            try:
                created.mkdir()
            except FileExistsError:
                continue  # made by a concurrent writer: its mode is its business
            if self.dir_mode is not None:
                os.chmod(created, self.dir_mode)

    def list_dir(self, path: str = "") -> list[str]:
        p = self._path(path)
        try:
            return plain_names(self._where(path), os.listdir(p)) if p.is_dir() else []
        except FileNotFoundError:  # removed between the check and the listing
            return []
        except OSError as exc:
            raise StorageError(f"{self._where(path)}: listing failed: {exc}") from exc

    def stat(self, path: str) -> StorageStat:
        try:
            st = self._path(path).stat()
        except FileNotFoundError:
            raise StorageNotFoundError(f"{self._where(path)}: no such file or directory") from None
        except OSError as exc:
            raise StorageError(f"{self._where(path)}: stat failed: {exc}") from exc
        is_dir = stat_module.S_ISDIR(st.st_mode)
        return StorageStat(size=0 if is_dir else st.st_size, mtime=st.st_mtime, is_dir=is_dir)

    def exists(self, path: str) -> bool:
        return self._path(path).exists()

    def delete(self, path: str) -> None:
        p = self._path(path)
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"{self._where(path)}: delete failed: {exc}") from exc

    def child(self, path: str) -> LocalStorage:
        return LocalStorage(self.join_url(path), self.boundary, self.file_mode, self.dir_mode)


def _file_kind(mode: int) -> str:
    """What a non-regular file is, for messages: "a FIFO", "a directory", ..."""
    for test, kind in (
        (stat_module.S_ISDIR, "a directory"),
        (stat_module.S_ISFIFO, "a FIFO"),
        (stat_module.S_ISCHR, "a character device"),
        (stat_module.S_ISBLK, "a block device"),
        (stat_module.S_ISSOCK, "a socket"),
        (stat_module.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return kind
    return f"a special file (mode {mode:o})"
