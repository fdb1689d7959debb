"""TLS, the read and admin credentials, and the admin roots of the embedding servers' gRPC service.

Both credentials and TLS are off by default (servers bind 127.0.0.1, where only local processes
can connect) and belong on in production (see ``deploy/production/``):

* **TLS**: the server presents ``tls_cert_file``/``tls_key_file``; with ``tls_client_ca_file``
  it also demands a client certificate signed by that CA (mutual TLS). Clients verify the
  server against ``tls_ca_file`` and, for mutual TLS, present ``tls_cert_file``/``tls_key_file``.
* **Two roles.** The *read* token (``token_file``, or ``$CTRSERVE_EMBEDDING_TOKEN``) allows the
  methods of :data:`READ_METHODS` (Lookup, Info, Stats; health needs no token): what every
  TorchServe worker holds. The *admin* token (``admin_token_file``, or
  ``$CTRSERVE_EMBEDDING_ADMIN_TOKEN``) allows everything, including :data:`ADMIN_METHODS`
  (Dump, Load, SetOptimizer, PushGradients, SkipPacket): what trainers and operators hold. A method in
  neither set is an admin method (fail closed). Callers send ``authorization: Bearer <token>``;
  :class:`AccessInterceptor` refuses a missing or wrong token with ``UNAUTHENTICATED`` and a
  read token on an admin method with ``PERMISSION_DENIED``, before any handler runs.
* **Admin calls without an admin token** are refused with ``PERMISSION_DENIED`` unless the
  server was started with ``--allow-unauthenticated-admin`` (``allow_unauthenticated_admin``),
  which only a server bound to loopback accepts: then every local user may call them.
* **Admin roots.** Dump and Load only touch paths inside ``admin_roots`` (local directories,
  canonicalised with symlinks resolved; ``s3://`` and ``hdfs://`` URL prefixes), see
  :class:`AdminRoots`; none configured: Dump and Load are refused.

Tokens are read from a file or an environment variable, never from the command line, where
``ps`` would show them. Without TLS they travel in clear text; use both off loopback.

Example:
    >>> server_security = ServerSecurity.from_settings(global_config.security)
    >>> client_security = ClientSecurity(tls_ca_file="ca.pem", token=read_token_file("token"))
    >>> channel = client_security.channel("10.0.0.5:7001", options=CHANNEL_OPTIONS)
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc

from embedding_server.core.errors import ConfigError
from embedding_server.rpc.guards import RateLimitedLog
from protos.embedding import pb

log = logging.getLogger("ctrserve.security")

#: Environment variable read for the token when no token file is given.
TOKEN_ENV = "CTRSERVE_EMBEDDING_TOKEN"
#: Environment variable naming a token file (used when ``token_file`` is not set).
TOKEN_FILE_ENV = "CTRSERVE_EMBEDDING_TOKEN_FILE"
#: Shortest token accepted: a guessable shared secret is no secret.
MIN_TOKEN_CHARS = 16
#: Environment variable read for the admin token when no admin token file is given.
ADMIN_TOKEN_ENV = "CTRSERVE_EMBEDDING_ADMIN_TOKEN"
#: Environment variable naming an admin token file (used when ``admin_token_file`` is not set).
ADMIN_TOKEN_FILE_ENV = "CTRSERVE_EMBEDDING_ADMIN_TOKEN_FILE"
#: Methods callable without any token (health says nothing worth protecting).
UNAUTHENTICATED_METHODS = frozenset(
    {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/List"}
)
#: The embedding service's full name, as in the method paths (``/<SERVICE>/<method>``).
SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
#: Embedding-service methods the read credential allows: they change nothing and touch no file.
READ_METHODS = frozenset({"Lookup", "Info", "Stats"})
#: Embedding-service methods that need the admin credential: they change a server's rows or
#: optimizer, or read or write files. Add every new mutating or administrative RPC here (a
#: method in neither set is treated as admin anyway; tests/test_security.py checks that every
#: method of protos/embedding_service.proto is in exactly one of the two sets).
ADMIN_METHODS = frozenset({"Dump", "Load", "SetOptimizer", "PushGradients", "SkipPacket"})
#: Hosts a server may bind with ``allow_unauthenticated_admin`` (only local processes reach them).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "[::1]", "localhost"})
_BEARER = "bearer "
_READ_PATHS = frozenset(f"/{SERVICE}/{name}" for name in READ_METHODS)


def is_admin_method(method: str) -> bool:
    """Whether the full method path ``method`` (``/package.Service/Method``) needs the admin
    credential: every method but health and :data:`READ_METHODS`."""
    return method not in _READ_PATHS and method not in UNAUTHENTICATED_METHODS


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped).

    Raises:
        ConfigError: the file cannot be read, is empty or holds a token shorter than
            :data:`MIN_TOKEN_CHARS`.
    """
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token file {path}: cannot read it: {exc}") from None
    return check_token(token, f"token file {path}")


def check_token(token: str, source: str) -> str:
    """``token`` if it is usable as a shared secret.

    Raises:
        ConfigError: empty, shorter than :data:`MIN_TOKEN_CHARS`, or containing whitespace or
            control characters (it must fit one metadata value).
    """
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{source}: the token must have at least {MIN_TOKEN_CHARS} characters, got {len(token)}")
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in token):
        raise ConfigError(f"{source}: the token must be printable ASCII without spaces")
    return token


def resolve_token(
    token_file: str | None,
    token_env: str | None = TOKEN_ENV,
    environ: Mapping[str, str] = os.environ,
    file_env: str = TOKEN_FILE_ENV,
) -> str | None:
    """The token from ``token_file``, else from ``$token_env``, else from the file named by
    ``$file_env`` (``CTRSERVE_EMBEDDING_TOKEN_FILE``); None when none is set.

    Raises:
        ConfigError: a named source exists but holds no usable token.
    """
    if token_file:
        return read_token_file(token_file)
    if token_env and environ.get(token_env, "").strip():
        return check_token(environ[token_env].strip(), f"environment variable {token_env}")
    if environ.get(file_env, "").strip():
        return read_token_file(environ[file_env].strip())
    return None


def resolve_admin_token(
    token_file: str | None = None, token_env: str | None = ADMIN_TOKEN_ENV, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The admin token from ``token_file``, else ``$CTRSERVE_EMBEDDING_ADMIN_TOKEN`` (or
    ``$token_env``), else the file named by ``$CTRSERVE_EMBEDDING_ADMIN_TOKEN_FILE``; None when
    none is set.

    Raises:
        ConfigError: a named source exists but holds no usable token.
    """
    return resolve_token(token_file, token_env, environ, ADMIN_TOKEN_FILE_ENV)


def environment_client_security(admin: bool, environ: Mapping[str, str] = os.environ) -> ClientSecurity | None:
    """Client settings from the environment alone (no TLS): the admin token when ``admin`` and one
    is set, else the read token; None when neither is set. What trainers use.

    Raises:
        ConfigError: a named token source holds no usable token.
    """
    token = (resolve_admin_token(environ=environ) if admin else None) or resolve_token(None, environ=environ)
    if token is None and not admin:
        token = resolve_admin_token(environ=environ)
    return ClientSecurity(token=token) if token else None


class RpcRefusal(Exception):
    """A request refused with a gRPC status other than ``INVALID_ARGUMENT`` (e.g. a path outside the
    admin roots, ``PERMISSION_DENIED``); the servicer answers ``code`` with the message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- admin roots


@dataclass(frozen=True)
class AdminRoots:
    """Where Dump and Load may write and read.

    Args:
        roots: local directories (made absolute and canonical, symlinks resolved, when parsed) and
            ``s3://bucket[/prefix]`` / ``hdfs://host[:port]/path`` URL prefixes. Empty: Dump and
            Load are refused.

    A local target is inside when its canonical path (symlinks resolved, ``..`` folded) is a
    root or below one; a URL when it has a root's scheme and host and the root's path segments
    as its first ones, with no ``.`` or ``..`` segment, ``%`` escape, query, fragment or user
    name anywhere. ``file:///path`` is a local path.
    """

    roots: tuple[str, ...] = ()
    _local: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    _urls: tuple[tuple[str, str, tuple[str, ...]], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        local, urls = [], []
        for root in self.roots:
            if not isinstance(root, str) or not root.strip():
                raise ConfigError(f"admin root {root!r}: expected a directory or an s3:// or hdfs:// URL")
            kind, value = _split_target(root.strip())
            if kind == "local":
                local.append(os.path.realpath(value))
            elif kind == "url":
                urls.append(value)
            else:
                raise ConfigError(
                    f"admin root {root!r}: {value}; give a local directory, file:///dir, s3://bucket/prefix or "
                    "hdfs://host:port/path"
                )
        object.__setattr__(self, "_local", tuple(local))
        object.__setattr__(self, "_urls", tuple(urls))

    def __bool__(self) -> bool:
        return bool(self.roots)

    def describe(self) -> str:
        """The roots as configured, for messages."""
        return ", ".join(self.roots) if self.roots else "none"

    def resolve(self, target: str) -> str | None:
        """The canonical form of ``target`` (what to open) when it lies inside a root, else None.
        Never touches remote storage; for local paths it resolves symlinks that exist."""
        if not isinstance(target, str) or not target or "\0" in target:
            return None
        kind, value = _split_target(target)
        if kind == "local":
            try:
                path = os.path.realpath(value)
            except (OSError, ValueError):
                return None
            return path if any(_inside(path, root) for root in self._local) else None
        if kind == "url":
            scheme, netloc, parts = value
            for r_scheme, r_netloc, r_parts in self._urls:
                if (scheme, netloc) == (r_scheme, r_netloc) and parts[: len(r_parts)] == r_parts:
                    return target
        return None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _split_target(target: str) -> tuple[str, Any]:
    """``("local", path)``, ``("url", (scheme, host, path segments))`` or ``("bad", why)``."""
    parsed = urlparse(target)
    scheme = parsed.scheme.lower()
    if scheme == "":
        return "local", target
    if scheme == "file":
        if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment or parsed.params:
            return "bad", "a file:// URL must be file:///absolute/path"
        return "local", parsed.path
    if scheme not in ("s3", "hdfs"):
        return "bad", f"scheme '{scheme}://' is not supported"
    if parsed.query or parsed.fragment or parsed.params or "@" in parsed.netloc or "%" in target or "\\" in target:
        return "bad", "a URL with a query, fragment, user name, '%' escape or backslash is not accepted"
    segments = [s for s in parsed.path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        return "bad", "a URL with '.' or '..' segments is not accepted"
    return "url", (scheme, parsed.netloc.lower(), tuple(segments))


def _read_pem(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it: {exc}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


# --------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class ServerSecurity:
    """How an embedding server authenticates itself and its callers, and what admin calls may do.

    Args:
        tls_cert_file: PEM certificate (chain) the server presents; enables TLS.
        tls_key_file: PEM private key of ``tls_cert_file``.
        tls_client_ca_file: PEM CA bundle; clients must present a certificate it signed
            (mutual TLS). Needs TLS.
        token: the read token callers must send for :data:`READ_METHODS` (None: reads need no
            token).
        admin_token: the admin token callers must send for admin methods (it allows reads too).
        allow_unauthenticated_admin: without ``admin_token``, serve admin calls to any caller
            (that passes the read token check); only for servers bound to loopback. Ignored
            (with a warning) when ``admin_token`` is set.
        admin_roots: where Dump and Load may write and read (see :class:`AdminRoots`).

    Raises:
        ConfigError: a certificate without its key (or the reverse), a client CA without TLS,
            an unusable token, the same token for both roles, or a malformed admin root.
    """

    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    token: str | None = None
    admin_token: str | None = None
    allow_unauthenticated_admin: bool = False
    admin_roots: tuple[str, ...] = ()
    roots: AdminRoots = field(default=AdminRoots(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("security: tls_cert_file and tls_key_file go together (the server's certificate and key)")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("security: tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.token is not None:
            check_token(self.token, "security token")
        if self.admin_token is not None:
            check_token(self.admin_token, "security admin token")
            if self.token is not None and hmac.compare_digest(self.admin_token.encode(), self.token.encode()):
                raise ConfigError(
                    "security: the admin token must differ from the read token (every TorchServe worker holds the "
                    "read token); make one with `openssl rand -hex 32`"
                )
        object.__setattr__(self, "admin_roots", tuple(self.admin_roots))
        object.__setattr__(self, "roots", AdminRoots(self.admin_roots))

    def __repr__(self) -> str:  # never print a token
        return (
            f"ServerSecurity(tls={self.tls}, mutual_tls={bool(self.tls_client_ca_file)}, "
            f"token={'set' if self.token else 'none'}, admin={self.admin_access}, "
            f"admin_roots={list(self.admin_roots)})"
        )

    @classmethod
    def from_settings(cls, settings: Any, environ: Mapping[str, str] = os.environ) -> ServerSecurity:
        """From a ``security`` config section (:class:`~embedding_server.core.config.SecurityConfig`
        or anything with the same attributes); the tokens come from their files or environment variables.

        Raises:
            ConfigError: a file cannot be read or the settings contradict each other.
        """
        return cls(
            tls_cert_file=settings.tls_cert_file or None,
            tls_key_file=settings.tls_key_file or None,
            tls_client_ca_file=settings.tls_client_ca_file or None,
            token=resolve_token(settings.token_file or None, settings.token_env or None, environ),
            admin_token=resolve_admin_token(
                settings.admin_token_file or None, settings.admin_token_env or None, environ
            ),
            allow_unauthenticated_admin=settings.allow_unauthenticated_admin,
            admin_roots=tuple(settings.admin_roots),
        )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def enabled(self) -> bool:
        return self.tls or self.token is not None or self.admin_token is not None

    @property
    def admin_access(self) -> str:
        """How admin calls are allowed: ``"admin token"``, ``"unauthenticated"`` or ``"off"``."""
        if self.admin_token is not None:
            return "admin token"
        return "unauthenticated" if self.allow_unauthenticated_admin else "off"

    def check_host(self, host: str) -> None:
        """Refuse ``allow_unauthenticated_admin`` on a server other machines can reach.

        Raises:
            ConfigError: the flag is set, no admin token is, and ``host`` is not loopback.
        """
        if self.admin_access == "unauthenticated" and host not in LOOPBACK_HOSTS:
            raise ConfigError(
                f"--allow-unauthenticated-admin (security.allow_unauthenticated_admin) is only for servers bound to "
                f"loopback, not {host}: anyone reaching the port could load checkpoints, dump files and push "
                "gradients; set an admin token instead (security.admin_token_file or CTRSERVE_EMBEDDING_ADMIN_TOKEN)"
            )
        if self.allow_unauthenticated_admin and self.admin_token is not None:
            log.warning("allow_unauthenticated_admin is ignored: an admin token is set, and admin calls need it")

    def local_tokens(self) -> tuple[str, ...] | None:
        """The tokens the local lookup socket accepts (None: it needs none): reads take either token."""
        if self.token is None:
            return None
        return (self.token,) + ((self.admin_token,) if self.admin_token is not None else ())

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        """The server interceptors to install: the access check, unless every call is allowed."""
        if self.token is None and self.admin_access == "unauthenticated":
            return []
        return [AccessInterceptor(self.token, self.admin_token, self.allow_unauthenticated_admin)]

    def add_port(self, server: grpc.Server, address: str) -> int:
        """Bind ``address`` with TLS when configured, else in plain text; returns the port (0: failed).

        Raises:
            ConfigError: a certificate or key file cannot be read.
            RuntimeError: gRPC could not bind.
        """
        if not self.tls:
            return server.add_insecure_port(address)
        key = _read_pem(self.tls_key_file, "tls_key_file")
        cert = _read_pem(self.tls_cert_file, "tls_cert_file")
        client_ca = _read_pem(self.tls_client_ca_file, "tls_client_ca_file")
        if key is None or cert is None:  # __post_init__ requires both with tls_cert_file
            raise ConfigError("security: tls_cert_file and tls_key_file go together (the server's certificate and key)")
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
        return server.add_secure_port(address, credentials)


_HOW_TO_ENABLE_ADMIN = (
    "set an admin token on the server (security.admin_token_file, or the variable CTRSERVE_EMBEDDING_ADMIN_TOKEN) "
    "and send it, or start a server bound to loopback with --allow-unauthenticated-admin "
    "(security.allow_unauthenticated_admin: true) where every local user may be trusted with it"
)


class AccessInterceptor(grpc.ServerInterceptor):
    """Checks each call's role before any handler runs (and before its request is decoded).

    * Health: always allowed.
    * :data:`READ_METHODS`: with a read token, the read or the admin token is needed
      (``UNAUTHENTICATED`` otherwise); without one, everyone may call them.
    * Every other method (admin): with an admin token, that token is needed (``UNAUTHENTICATED``
      when missing or wrong, ``PERMISSION_DENIED`` for the read token); without one, allowed
      only with ``allow_unauthenticated_admin`` (after the read token check), else
      ``PERMISSION_DENIED`` with a message saying how to enable admin calls.

    Refusals are logged at most once a minute (:class:`~embedding_server.rpc.guards.RateLimitedLog`).

    Args:
        token: the read token (None: reads are open).
        admin_token: the admin token (None: see ``allow_unauthenticated_admin``).
        allow_unauthenticated_admin: serve admin calls without an admin token.
    """

    def __init__(self, token: str | None, admin_token: str | None = None, allow_unauthenticated_admin: bool = False):
        self._read = token.encode() if token else None
        self._admin = admin_token.encode() if admin_token else None
        self._open_admin = allow_unauthenticated_admin and self._admin is None
        self.refusals = RateLimitedLog(log, "refused calls")

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        if method in _READ_PATHS:
            if self._read is None:
                return continuation(handler_call_details)
            role, problem = self._role(handler_call_details.invocation_metadata)
            if role is not None:
                return continuation(handler_call_details)
            return self._refuse(method, grpc.StatusCode.UNAUTHENTICATED, problem)
        if method in UNAUTHENTICATED_METHODS:
            return continuation(handler_call_details)
        name = (method.rpartition("/")[2] or method)[:200]
        if self._admin is None and self._read is None and self._open_admin:
            return continuation(handler_call_details)
        role, problem = self._role(handler_call_details.invocation_metadata)
        if self._admin is not None:
            if role == "admin":
                return continuation(handler_call_details)
            if role == "read":
                return self._refuse(
                    method,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{name} is an admin call and the read token does not allow it: send the admin token "
                    "(trainers and `ctrserve embedding-admin` read it from CTRSERVE_EMBEDDING_ADMIN_TOKEN or "
                    "CTRSERVE_EMBEDDING_ADMIN_TOKEN_FILE)",
                )
            return self._refuse(method, grpc.StatusCode.UNAUTHENTICATED, f"{name} is an admin call: {problem}")
        if self._read is not None and role is None:
            return self._refuse(method, grpc.StatusCode.UNAUTHENTICATED, problem)
        if self._open_admin:
            return continuation(handler_call_details)
        return self._refuse(
            method,
            grpc.StatusCode.PERMISSION_DENIED,
            f"{name} is an admin call, and admin calls are off on this server (it has no admin token): "
            + _HOW_TO_ENABLE_ADMIN,
        )

    def _role(self, metadata: Sequence[tuple[str, Any]] | None) -> tuple[str | None, str]:
        """(``"admin"``, ``"read"`` or None, and why None)."""
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            return (
                None,
                "missing 'authorization' metadata: send 'authorization: Bearer <token>' (the embedding servers' token)",
            )
        value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        if len(values) > 1 or not value.lower().startswith(_BEARER):
            return None, "malformed 'authorization' metadata: expected exactly one 'Bearer <token>'"
        sent = value[len(_BEARER) :].strip().encode()
        # Both comparisons always run (constant time, whichever token was sent).
        is_admin = self._admin is not None and hmac.compare_digest(sent, self._admin)
        is_read = self._read is not None and hmac.compare_digest(sent, self._read)
        if is_admin:
            return "admin", ""
        if is_read:
            return "read", ""
        return None, "wrong token in 'authorization' metadata"

    def _refuse(self, method: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
        self.refusals.note("refused %s with %s: %s", method[:200], code.name, message)
        return _refusal(code, message)


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler for any unary method that answers ``code`` without reading the request."""

    def refuse(request, context: grpc.ServicerContext):
        context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(refuse)  # no deserializer: the bytes stay unread


# --------------------------------------------------------------------------- client side


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches secured embedding servers.

    Args:
        tls_ca_file: PEM CA bundle that signed the servers' certificates; enables TLS.
        tls_cert_file: the client's PEM certificate, for servers that demand mutual TLS.
        tls_key_file: PEM private key of ``tls_cert_file``.
        tls_server_name: the name to verify in the servers' certificates when it differs from
            the host part of the addresses (e.g. connecting by IP to a cert for a DNS name).
        token: the shared token sent as ``authorization: Bearer <token>`` on every call.

    Raises:
        ConfigError: a client certificate without its key (or the reverse), or one without TLS.
    """

    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_name: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError(
                "client security: tls_cert_file and tls_key_file go together (the client's certificate and key)"
            )
        if (self.tls_cert_file or self.tls_server_name) and not self.tls_ca_file:
            raise ConfigError("client security: a client certificate or tls_server_name needs tls_ca_file (TLS)")
        if self.token is not None:
            check_token(self.token, "client token")

    def __repr__(self) -> str:  # never print the token
        return (
            f"ClientSecurity(tls={self.tls}, client_cert={bool(self.tls_cert_file)}, "
            f"token={'set' if self.token else 'none'})"
        )

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca_file)

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel to ``address``: TLS when configured, and the token on every call when set.

        Raises:
            ConfigError: a certificate or key file cannot be read.
        """
        options = list(options)
        if self.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(self.tls_ca_file, "tls_ca_file"),
                private_key=_read_pem(self.tls_key_file, "tls_key_file"),
                certificate_chain=_read_pem(self.tls_cert_file, "tls_cert_file"),
            )
            if self.tls_server_name:
                options.append(("grpc.ssl_target_name_override", self.tls_server_name))
            channel = grpc.secure_channel(address, credentials, options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        if self.token:
            channel = grpc.intercept_channel(channel, _BearerToken(self.token))
        return channel


def make_channel(
    address: str, options: Sequence[tuple[str, Any]] = (), security: ClientSecurity | None = None
) -> grpc.Channel:
    """A channel to an embedding server: plain text without ``security``, else as it says."""
    if security is None:
        return grpc.insecure_channel(address, options=list(options))
    return security.channel(address, options)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call's metadata."""

    def __init__(self, token: str):
        self._entry = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"] + [self._entry]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
