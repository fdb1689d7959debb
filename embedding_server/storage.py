"""Where checkpoints (and, later, incremental packets) live: a path or a storage URL.

:class:`Storage` is the small interface the rest of the code writes against: read a file, list a
directory, and publish a file atomically (a reader sees the old file, or the whole new one,
never a part). :func:`open_storage` picks the implementation for a URL. Local paths and
``file://`` URLs are served by :class:`LocalStorage`; remote schemes plug in here.

Example:
    >>> import tempfile
    >>> st = open_storage(tempfile.mkdtemp())
    >>> st.write_atomic("a/b.txt", b"hi"); st.read_bytes("a/b.txt")
    b'hi'
"""

from __future__ import annotations

import abc
import os
import tempfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse


class StorageError(IOError):
    """A storage operation failed, or a path escapes the storage root."""


class Storage(abc.ABC):
    """Files under one root, addressed by relative POSIX paths."""

    def __init__(self, url: str):
        self.url = url

    @abc.abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """The whole file. Raises FileNotFoundError when absent."""

    @abc.abstractmethod
    def write_atomic(self, path: str, data: bytes) -> None:
        """Publish ``data`` at ``path``: readers see the previous content or all of ``data``."""

    @abc.abstractmethod
    def list_dir(self, path: str = "") -> list[str]:
        """Names directly under ``path`` (empty when it does not exist)."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether a file or directory is at ``path``."""

    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Remove a file or a whole directory; absent paths are fine."""

    def child(self, path: str) -> "Storage":
        """A storage rooted at ``path`` below this one."""
        return open_storage(self.join_url(path))

    def join_url(self, path: str) -> str:
        return self.url.rstrip("/") + "/" + clean_relative(path)


def clean_relative(path: str) -> str:
    """Normalise a relative storage path, refusing absolute paths and ``..`` escapes."""
    p = PurePosixPath(path)
    if p.is_absolute() or any(part == ".." for part in p.parts):
        raise StorageError(f"path {path!r} must be relative and stay inside the storage root")
    return str(p) if str(p) != "." else ""


class LocalStorage(Storage):
    """A directory on a local (or locally mounted) file system.

    Atomic publish writes a temporary file in the same directory, fsyncs it and renames it over
    the target, which POSIX guarantees to be atomic.
    """

    def __init__(self, url: str):
        super().__init__(url)
        parsed = urlparse(url)
        self.root = Path(parsed.path if parsed.scheme == "file" else url).resolve()

    def _path(self, path: str) -> Path:
        return self.root / clean_relative(path)

    def read_bytes(self, path: str) -> bytes:
        return self._path(path).read_bytes()

    def write_atomic(self, path: str, data: bytes) -> None:
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def list_dir(self, path: str = "") -> list[str]:
        p = self._path(path)
        if not p.is_dir():
            return []
        return sorted(child.name for child in p.iterdir() if not child.name.startswith("."))

    def exists(self, path: str) -> bool:
        return self._path(path).exists()

    def delete(self, path: str) -> None:
        import shutil

        p = self._path(path)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def open_storage(url: str) -> Storage:
    """The storage for a path or URL.

    Raises:
        StorageError: a scheme this build cannot reach.
    """
    scheme = urlparse(url).scheme
    if scheme in ("", "file"):
        return LocalStorage(url)
    raise StorageError(
        f"storage URL {url!r}: scheme '{scheme}://' is not supported yet; use a local path or file:// URL"
    )
