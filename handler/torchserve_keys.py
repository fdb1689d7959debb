"""TorchServe's token-authorization keys for ctrserve's clients: where they come from, and a new
one when TorchServe refuses the old.

With token authorization on (TorchServe 0.12's default, kept on in
``deploy/torchserve/config.production.properties``) every call carries
``Authorization: Bearer <key>`` (gRPC: the ``authorization`` metadata): the **management** key
for the management API, the **inference** key for predictions. TorchServe writes both, with a
third **API** key, to ``key_file.json`` in its working directory (mode 0600)::

    {"management": {"key": "tXBmnCT7", "expiration time": "2026-12-06T00:22:50.36Z"},
     "inference": {"key": "ksa7a4iV", "expiration time": "..."},
     "API": {"key": "t3PRdVjk"}}

The management and inference keys expire after ``token_expiration_min`` minutes; TorchServe
then refuses them (REST 400 ``InvalidKeyException``, gRPC ``PERMISSION_DENIED``) and does not
rewrite the file by itself. ``GET <management address>/token?type=management|inference`` with the
API key (which does not expire) makes a new key of that type and rewrites the file.

A :class:`TorchServeKey` reads its key from one source: TorchServe's key file, a file holding
only the key, the environment, or a value given in Python. When TorchServe refuses the key the
clients (:class:`~handler.client.PredictionClient`, :class:`~archiver.management.ManagementClient`)
call :meth:`TorchServeKey.refresh` and retry the call once: it reads the source again, and when
that still holds the refused key, a key-file source with a ``token_api`` address (the management
client over REST sets its own) asks TorchServe for a new key first. Keys are never taken from a
command line (``ps`` shows arguments to every user) and never logged.

Example:
    >>> key = TorchServeKey("management", key_file="/srv/torchserve/key_file.json")
    >>> ManagementClient("http://127.0.0.1:8081", token=key)   # renews it when expired
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from embedding_server.core.errors import ConfigError

KINDS = ("management", "inference")
KEY_FILE = "key_file.json"
#: The key itself (lowest precedence: see :meth:`TorchServeKey.resolve`).
TOKEN_ENV = "CTRSERVE_TORCHSERVE_TOKEN"
#: A file holding only the key.
TOKEN_FILE_ENV = "CTRSERVE_TORCHSERVE_TOKEN_FILE"
#: TorchServe's key_file.json.
KEY_FILE_ENV = "CTRSERVE_TORCHSERVE_KEY_FILE"
#: How long a reader waits for TorchServe to finish rewriting its key file (it truncates, then writes).
KEY_FILE_SETTLE_S = 2.0


class TorchServeKey:
    """One TorchServe key (``kind``: ``management`` or ``inference``) and where it comes from.

    Give exactly one source.

    Args:
        kind: which key of TorchServe's key file; also the ``type`` of a renewal.
        key_file: TorchServe's ``key_file.json``.
        token_file: a file holding only the key (e.g. a mounted secret a rotation job updates).
        env: the name of an environment variable holding the key.
        value: the key itself (Python callers; it cannot be re-read).
        token_api: management address (``http://host:port``) to renew an expired key through,
            with the API key of ``key_file``; None: the source is only re-read.

    Raises:
        ValueError: an unknown kind, or not exactly one source.
    """

    def __init__(
        self,
        kind: str,
        *,
        key_file: str | Path | None = None,
        token_file: str | Path | None = None,
        env: str | None = None,
        value: str | None = None,
        token_api: str | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        sources = [s for s in (key_file, token_file, env, value) if s is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of key_file, token_file, env and value")
        self.kind = kind
        self.key_file = Path(key_file) if key_file is not None else None
        self.token_file = Path(token_file) if token_file is not None else None
        self.env = env
        self.token_api = token_api.rstrip("/") if token_api else None
        self._value = value
        self._lock = threading.Lock()
        self._cached: str | None = _checked(value, "the key given") if value is not None else None

    @classmethod
    def resolve(
        cls,
        kind: str,
        token_file: str | None = None,
        key_file: str | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> TorchServeKey | None:
        """The first source set of: ``token_file``, ``key_file``, ``$CTRSERVE_TORCHSERVE_TOKEN_FILE``,
        ``$CTRSERVE_TORCHSERVE_KEY_FILE``, ``$CTRSERVE_TORCHSERVE_TOKEN``; None when none is (no
        key is sent: TorchServe with token authorization off)."""
        if token_file:
            return cls(kind, token_file=token_file)
        if key_file:
            return cls(kind, key_file=key_file)
        if environ.get(TOKEN_FILE_ENV):
            return cls(kind, token_file=environ[TOKEN_FILE_ENV])
        if environ.get(KEY_FILE_ENV):
            return cls(kind, key_file=environ[KEY_FILE_ENV])
        if environ.get(TOKEN_ENV):
            return cls(kind, env=TOKEN_ENV)
        return None

    def renewing_through(self, management_address: str) -> TorchServeKey:
        """A copy that renews an expired key through this management address (REST) when its
        source is a key file; itself when it has an address already or cannot renew."""
        if self.key_file is None or self.token_api is not None:
            return self
        return TorchServeKey(self.kind, key_file=self.key_file, token_api=management_address)

    @property
    def source(self) -> str:
        """Where the key comes from, in words (never the key)."""
        if self.key_file is not None:
            return f"TorchServe key file {self.key_file} ('{self.kind}' key)"
        if self.token_file is not None:
            return f"token file {self.token_file}"
        if self.env is not None:
            return f"environment variable {self.env}"
        return "the key given"

    def current(self) -> str:
        """The key (read from the source on first use).

        Raises:
            ConfigError: the source is missing, unreadable, or holds no usable key.
        """
        with self._lock:
            if self._cached is None:
                self._cached = self._read()
            return self._cached

    def refresh(self, refused: str | None) -> str | None:
        """After TorchServe refused ``refused``: read the source again (renewing the key through
        ``token_api`` when the source still holds the refused key); the new key, or None when
        there is none to retry with.

        Raises:
            ConfigError: the source cannot be read any more.
        """
        with self._lock:
            if self._value is not None:
                return None
            key = self._read()
            if key == refused and self.token_api is not None and self.key_file is not None:
                self._renew()
                key = self._read()
            self._cached = key
            return key if key != refused else None

    def __repr__(self) -> str:
        return f"TorchServeKey({self.kind!r}, {self.source})"

    # ------------------------------------------------------------------ sources

    def _read(self) -> str:
        if self.key_file is not None:
            return _checked(self._key_file_entry(self.kind), self.source)
        if self.token_file is not None:
            try:
                return _checked(self.token_file.read_text(), self.source)
            except OSError as exc:
                raise ConfigError(f"cannot read the TorchServe key from {self.source}: {exc}") from None
        if self.env is not None:
            return _checked(os.environ.get(self.env, ""), self.source)
        return _checked(self._value or "", self.source)

    def _key_file_entry(self, kind: str) -> str:
        """The key of ``kind`` (or "API") in the key file, waiting out a rewrite in progress."""
        assert self.key_file is not None
        deadline = time.monotonic() + KEY_FILE_SETTLE_S
        while True:
            try:
                entry = json.loads(self.key_file.read_text())[kind]["key"]
                if isinstance(entry, str):
                    return entry
                problem = f"its '{kind}' key is not a string"
            except FileNotFoundError:
                raise ConfigError(
                    f"TorchServe key file {self.key_file} not found: TorchServe writes {KEY_FILE} into its working "
                    "directory when it starts with token authorization on"
                ) from None
            except OSError as exc:
                raise ConfigError(f"cannot read TorchServe key file {self.key_file}: {exc}") from None
            except (ValueError, KeyError, TypeError):
                problem = f"it holds no '{kind}' key"  # or TorchServe is rewriting it: wait a moment
            if time.monotonic() > deadline:
                raise ConfigError(f"TorchServe key file {self.key_file}: {problem}")
            time.sleep(0.02)

    def _renew(self) -> None:
        """Ask TorchServe for a new key of this kind; it rewrites the key file.

        Raises:
            ConfigError: TorchServe refused or could not be reached.
        """
        import requests  # only renewing needs it: the command line starts without

        api_key = self._key_file_entry("API")
        url = f"{self.token_api}/token"
        try:
            response = requests.get(
                url, params={"type": self.kind}, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
            )
        except requests.RequestException as exc:
            raise ConfigError(f"cannot renew the TorchServe {self.kind} key at {url}: {exc}") from None
        if response.status_code != 200:
            raise ConfigError(
                f"TorchServe refused to renew the {self.kind} key at {url} with the API key of {self.key_file}: "
                f"HTTP {response.status_code}"
            )


def _checked(key: str, source: str) -> str:
    key = key.strip()
    if not key:
        raise ConfigError(f"no TorchServe key in {source}")
    if not key.isprintable() or any(c.isspace() for c in key):
        raise ConfigError(f"the TorchServe key in {source} holds spaces or control characters")
    return key


def as_key(token: str | TorchServeKey | None, kind: str) -> TorchServeKey | None:
    """``token`` as a :class:`TorchServeKey` (a string is a fixed key of ``kind``)."""
    if token is None or isinstance(token, TorchServeKey):
        return token
    return TorchServeKey(kind, value=token)


def key_refused(status: int, content: bytes) -> bool:
    """Whether a REST answer refuses the key: 401, 403, or TorchServe 0.12's 400 ``InvalidKeyException``."""
    if status in (401, 403):
        return True
    if status != 400:
        return False
    try:
        data: Any = json.loads(content)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("type") == "InvalidKeyException"


# ---------------------------------------------------------------------- command line


class _RemovedTokenFlag(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        parser.error(
            "--token was removed: a key on the command line is visible to every user (ps); use --key-file "
            f"(TorchServe's {KEY_FILE}), --token-file, or ${TOKEN_ENV} / ${TOKEN_FILE_ENV} / ${KEY_FILE_ENV}"
        )


def add_key_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """``--key-file`` and ``--token-file`` (one of them) for the ``kind`` key; ``--token`` says it was removed."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--key-file",
        metavar="PATH",
        help=f"TorchServe's {KEY_FILE} (its working directory): the {kind} key is read from it and read again "
        "when TorchServe refuses it"
        + (", and renewed through the token API (REST) when expired" if kind == "management" else "")
        + f" (default: ${KEY_FILE_ENV})",
    )
    group.add_argument(
        "--token-file",
        metavar="PATH",
        help=f"a file holding only the {kind} key, read again when TorchServe refuses it (default: "
        f"${TOKEN_FILE_ENV}; else the key in ${TOKEN_ENV})",
    )
    parser.add_argument("--token", nargs="?", action=_RemovedTokenFlag, help=argparse.SUPPRESS)


def key_from_arguments(args: argparse.Namespace, kind: str) -> TorchServeKey | None:
    """The key source :func:`add_key_arguments`'s flags (or the environment) name."""
    return TorchServeKey.resolve(kind, token_file=args.token_file, key_file=args.key_file)
