"""TLS and a shared token for the embedding servers' gRPC service.

Both are off by default (servers bind 127.0.0.1, where only local processes can connect) and
both belong on in production (see ``deploy/production/``):

* **TLS**: the server presents ``tls_cert_file``/``tls_key_file``; with ``tls_client_ca_file``
  it also demands a client certificate signed by that CA (mutual TLS). Clients verify the
  server against ``tls_ca_file`` and, for mutual TLS, present ``tls_cert_file``/``tls_key_file``.
* **Token**: every call must carry the metadata ``authorization: Bearer <token>``; a server
  interceptor refuses a missing or wrong one with ``UNAUTHENTICATED`` before any handler runs
  (the gRPC health service is exempt, so load balancers and Kubernetes probes need no secret).
  The token is read from a file (``token_file``) or an environment variable (``token_env``,
  default ``CTRSERVE_EMBEDDING_TOKEN``), never from the command line, where ``ps`` would show
  it. Without TLS the token travels in clear text; use both off loopback.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from embedding_server.core.errors import ConfigError

log = logging.getLogger("ctrserve.security")

#: Environment variable read for the token when no token file is given.
TOKEN_ENV = "CTRSERVE_EMBEDDING_TOKEN"
#: Environment variable naming a token file (used when ``token_file`` is not set).
TOKEN_FILE_ENV = "CTRSERVE_EMBEDDING_TOKEN_FILE"
#: Shortest token accepted: a guessable shared secret is no secret.
MIN_TOKEN_CHARS = 16
#: Methods callable without the token (health says nothing worth protecting).
UNAUTHENTICATED_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_BEARER = "bearer "


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
    token_file: str | None, token_env: str | None = TOKEN_ENV, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The token from ``token_file``, else from ``$token_env``, else from
    ``$CTRSERVE_EMBEDDING_TOKEN_FILE``; None when none is set.

    Raises:
        ConfigError: a named source exists but holds no usable token.
    """
    if token_file:
        return read_token_file(token_file)
    if token_env and environ.get(token_env, "").strip():
        return check_token(environ[token_env].strip(), f"environment variable {token_env}")
    if environ.get(TOKEN_FILE_ENV, "").strip():
        return read_token_file(environ[TOKEN_FILE_ENV].strip())
    return None


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
    """How an embedding server authenticates itself and its callers.

    Args:
        tls_cert_file: PEM certificate (chain) the server presents; enables TLS.
        tls_key_file: PEM private key of ``tls_cert_file``.
        tls_client_ca_file: PEM CA bundle; clients must present a certificate it signed
            (mutual TLS). Needs TLS.
        token: the shared token callers must send (None: no token check).

    Raises:
        ConfigError: a certificate without its key (or the reverse), or a client CA without TLS.
    """

    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("security: tls_cert_file and tls_key_file go together (the server's certificate and key)")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("security: tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.token is not None:
            check_token(self.token, "security token")

    def __repr__(self) -> str:  # never print the token
        return (
            f"ServerSecurity(tls={self.tls}, mutual_tls={bool(self.tls_client_ca_file)}, "
            f"token={'set' if self.token else 'none'})"
        )

    @classmethod
    def from_settings(cls, settings: Any, environ: Mapping[str, str] = os.environ) -> ServerSecurity:
        """From a ``security`` config section (:class:`~embedding_server.core.config.SecurityConfig`
        or anything with the same attributes); the token comes from its file or environment variable.

        Raises:
            ConfigError: a file cannot be read or the settings contradict each other.
        """
        return cls(
            tls_cert_file=settings.tls_cert_file or None,
            tls_key_file=settings.tls_key_file or None,
            tls_client_ca_file=settings.tls_client_ca_file or None,
            token=resolve_token(settings.token_file or None, settings.token_env or None, environ),
        )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def enabled(self) -> bool:
        return self.tls or self.token is not None

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        """The server interceptors to install (the token check, when a token is set)."""
        return [TokenInterceptor(self.token)] if self.token else []

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


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` with ``UNAUTHENTICATED``.

    Args:
        token: the shared token (compared in constant time).
    """

    def __init__(self, token: str):
        self._expected = token.encode()
        self._refusals: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        if handler_call_details.method in UNAUTHENTICATED_METHODS:
            return continuation(handler_call_details)
        problem = self._problem(handler_call_details.invocation_metadata or ())
        if problem is None:
            return continuation(handler_call_details)
        log.warning("refused %s: %s", handler_call_details.method, problem)
        return _refusal(problem)

    def _problem(self, metadata: Sequence[tuple[str, Any]]) -> str | None:
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            return "missing 'authorization' metadata: send 'authorization: Bearer <token>' (the embedding servers' shared token)"
        value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        if len(values) > 1 or not value.lower().startswith(_BEARER):
            return "malformed 'authorization' metadata: expected exactly one 'Bearer <token>'"
        if not hmac.compare_digest(value[len(_BEARER) :].strip().encode(), self._expected):
            return "wrong token in 'authorization' metadata"
        return None


def _refusal(message: str) -> grpc.RpcMethodHandler:
    """A handler for any unary method that answers UNAUTHENTICATED without reading the request."""

    def refuse(request, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

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
