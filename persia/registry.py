"""The service registry: who serves what in a PERSIA job (the part NATS plays in PERSIA).

``persia-launcher embedding-worker`` runs a :class:`RegistryServer`; embedding parameter servers
(``persia-launcher embedding-parameter-server``) and nn workers register their addresses with it,
and whoever needs them (the nn workers' embedding client, data loaders) asks for them, waiting
until all are there. :mod:`persia.service` holds PERSIA's functions on top of it.

The protocol is small JSON over HTTP/1.1 (``http.server``; no extra dependency), bound to
127.0.0.1 unless told otherwise:

* ``PUT /v1/services/<role>/<index>`` with ``{"address": "host:port", "size": n | null, "ttl":
  s | null}``: register (or re-register: the entry is replaced, so a restarted server
  re-registers under its index with its new address). ``size`` declares how many entries the
  role has in all; ``ttl`` (seconds, at most :data:`MAX_TTL_S`) is for a registrant that
  re-registers periodically: its entry is dropped once it is older than ``ttl``.
* ``DELETE /v1/services/<role>/<index>`` with ``{"address": "host:port"}``: deregister, only if
  the entry still holds that address: ``{"removed": true}``; else (the index was registered
  again by a replacement, or is gone already) nothing changes: ``{"removed": false}``. So a
  late deregistration of an old instance never removes its replacement.
* ``GET /v1/services/<role>?count=N&wait=S``: the role's entries, ordered by index, answered as
  soon as ``count`` (or, without it, the declared size, else one) entries exist or after ``S``
  seconds (at most :data:`MAX_WAIT_S`) with what there is: ``{"role", "size", "services":
  [{"index", "address", "registered_at", "ttl"}, ...]}`` (``registered_at``: the registry's
  Unix time of the entry's last registration).
* ``GET /v1/health``: ``{"status": "SERVING"}``.

Entries are not tied to a connection. One goes away when its registrant deregisters it (``persia-
launcher embedding-parameter-server`` does when its server stops, a ``StreamingDataset`` when it
is closed), or, for an entry registered with a ``ttl``, once it has not been registered again for
``ttl`` seconds (a registrant killed without deregistering: the launcher registers with a 30 s
ttl and re-registers every 5 s). An entry registered without ``ttl`` (one-shot registrations such
as the nn workers') stays until it is deregistered or registered again. Requests are bounded (a
body of at most :data:`MAX_BODY_BYTES`, a URL of at most :data:`MAX_URL_BYTES`, at most
:data:`MAX_ROLES` roles and :data:`MAX_INDEX` entries per role, at most :data:`MAX_CONNECTIONS`
connections at once) and validated; a bad one gets a 4xx answer whose ``error`` names what is
wrong, and the server keeps serving.

Example:
    >>> server = RegistryServer(("127.0.0.1", 0))
    >>> server.start()
    >>> client = RegistryClient(server.address)
    >>> client.register("embedding-parameter-server", 0, "127.0.0.1:8888", size=1)
    >>> client.wait_for("embedding-parameter-server", timeout=5)
    ['127.0.0.1:8888']
    >>> client.deregister("embedding-parameter-server", 0, "127.0.0.1:8888")
    True
    >>> server.stop()
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import socketserver
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_logger = logging.getLogger("persia.registry")

MAX_BODY_BYTES = 4096
MAX_URL_BYTES = 1024
MAX_ROLES = 64
MAX_INDEX = 65536
MAX_CONNECTIONS = 256
#: the longest one GET waits for entries; a client waiting longer asks again
MAX_WAIT_S = 30.0
#: a connection that sends nothing for this long is closed
IDLE_TIMEOUT_S = 30.0
#: the longest ``ttl`` a registration may carry (a day)
MAX_TTL_S = 86400.0

_ROLE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HOST = re.compile(r"[A-Za-z0-9_.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


class RegistryError(Exception):
    """The registry refused a request (the message is its answer) or answered nonsense."""


def check_role(role: object) -> str:
    """``role`` if it is a valid role name (lowercase letters, digits, ``.``, ``_``, ``-``; 1 to 64).

    Raises:
        ValueError: naming the role.
    """
    if not isinstance(role, str) or not _ROLE.fullmatch(role):
        raise ValueError(
            f"role {role!r}: must be 1 to 64 of lowercase letters, digits, '.', '_' and '-', starting with a "
            "letter or digit"
        )
    return role


def check_address(address: object) -> str:
    """``address`` if it is ``host:port`` (a name, an IPv4 address or a bracketed IPv6 address;
    port 1 to 65535).

    Raises:
        ValueError: naming the address.
    """
    if isinstance(address, str) and len(address) <= 300:
        host, sep, port = address.rpartition(":")
        if sep and _HOST.fullmatch(host) and port.isdigit() and 0 < int(port) < 65536:
            return address
    raise ValueError(f"address {address!r}: expected host:port with a port from 1 to 65535")


def _check_index(index: object, what: str = "index", size: int | None = None) -> int:
    limit = MAX_INDEX if size is None else size
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < limit:
        bound = f"less than {limit}" if size is None else f"less than the size {size}"
        raise ValueError(f"{what} {index!r}: must be an integer from 0, {bound}")
    return index


def _check_size(size: object) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_INDEX:
        raise ValueError(f"size {size!r}: must be an integer from 1 to {MAX_INDEX}")
    return size


def check_ttl(ttl: object) -> float | None:
    """``ttl`` if it is None (the entry never expires) or a number of seconds above 0, at most
    :data:`MAX_TTL_S`.

    Raises:
        ValueError: naming the ttl.
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL_S:
        raise ValueError(f"ttl {ttl!r}: must be null or a number of seconds above 0, at most {MAX_TTL_S:g}")
    return float(ttl)


def _check_path_index(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"index {text!r}: must be an integer from 0")
    return int(text)


def _json_fields(body: bytes, allowed: set[str], shape: str) -> dict[str, Any]:
    """The JSON object ``body`` holds, with ``address`` and no key outside ``allowed``."""
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(fields, dict) or not set(fields) <= allowed or "address" not in fields:
        raise ValueError(f"body must be {shape}")
    return fields


@dataclass(frozen=True)
class _Entry:
    address: str
    #: Unix time of the registration (answered to readers)
    registered_at: float
    #: monotonic time of the registration (expiry counts from it)
    renewed: float
    ttl: float | None

    def expired(self, now: float) -> bool:
        return self.ttl is not None and now - self.renewed > self.ttl


class _Entries:
    """The registrations, under one condition variable that wakes waiting readers."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.roles: dict[str, dict[int, _Entry]] = {}
        self.sizes: dict[str, int] = {}

    def put(self, role: str, index: int, address: str, size: int | None, ttl: float | None = None) -> None:
        with self.changed:
            if role not in self.roles and len(self.roles) >= MAX_ROLES:
                raise ValueError(f"role {role!r}: the registry holds {MAX_ROLES} roles already")
            entries = self.roles.setdefault(role, {})
            self._drop_expired(role, entries, time.monotonic())
            previous = entries.get(index)
            entries[index] = _Entry(address, time.time(), time.monotonic(), ttl)
            if size is not None:
                self.sizes[role] = size
            self.changed.notify_all()
        if previous is None:
            _logger.info("registered %s %d at %s", role, index, address)
        elif previous.address != address:
            _logger.info("re-registered %s %d at %s (was %s)", role, index, address, previous.address)

    def remove(self, role: str, index: int, address: str) -> bool:
        """Remove entry ``index`` of ``role`` if it holds ``address``; whether it did."""
        with self.changed:
            entries = self.roles.get(role, {})
            self._drop_expired(role, entries, time.monotonic())
            entry = entries.get(index)
            if entry is None or entry.address != address:
                held = "nothing" if entry is None else entry.address
                _logger.info("kept %s %d: deregistering %s, it holds %s", role, index, address, held)
                return False
            del entries[index]
            self.changed.notify_all()
        _logger.info("deregistered %s %d at %s", role, index, address)
        return True

    @staticmethod
    def _drop_expired(role: str, entries: dict[int, _Entry], now: float) -> None:
        for index in [i for i, entry in entries.items() if entry.expired(now)]:
            entry = entries.pop(index)
            _logger.warning(
                "dropped %s %d at %s: not registered again within its ttl of %g s",
                role,
                index,
                entry.address,
                entry.ttl,
            )

    def read(self, role: str, count: int | None, wait: float) -> dict[str, Any]:
        deadline = time.monotonic() + wait
        with self.changed:
            while True:
                now = time.monotonic()
                entries = self.roles.get(role, {})
                self._drop_expired(role, entries, now)
                wanted = count if count is not None else self.sizes.get(role, 1)
                left = deadline - now
                if left <= 0 or all(i in entries for i in range(wanted)):
                    return {
                        "role": role,
                        "size": self.sizes.get(role),
                        "services": [
                            {
                                "index": i,
                                "address": entries[i].address,
                                "registered_at": entries[i].registered_at,
                                "ttl": entries[i].ttl,
                            }
                            for i in sorted(entries)
                        ],
                    }
                self.changed.wait(left)


class _Handler(BaseHTTPRequestHandler):
    server: RegistryServer
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        _logger.debug("%s %s", self.address_string(), format % args)

    def _answer(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        _logger.debug("refused %s %s: %s", self.command, self.path[:MAX_URL_BYTES], message)
        self._answer(status, {"error": message})

    def _route(self) -> tuple[str, list[str], dict[str, list[str]]] | None:
        if len(self.path) > MAX_URL_BYTES:
            self.close_connection = True
            self._refuse(HTTPStatus.REQUEST_URI_TOO_LONG, f"URL longer than {MAX_URL_BYTES} bytes")
            return None
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        return url.path, parts, urllib.parse.parse_qs(url.query, max_num_fields=8)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        route = self._route()
        if route is None:
            return
        _, parts, query = route
        if parts == ["v1", "health"]:
            self._answer(HTTPStatus.OK, {"status": "SERVING"})
            return
        if len(parts) != 3 or parts[:2] != ["v1", "services"]:
            self._refuse(HTTPStatus.NOT_FOUND, "no such path: use /v1/services/<role> or /v1/health")
            return
        try:
            role = check_role(parts[2])
            count = _one_number(query, "count", int)
            if count is not None:
                _check_size(count)
            wait = _one_number(query, "wait", float) or 0.0
            if not 0 <= wait < float("inf"):
                raise ValueError(f"wait {wait!r}: must be a number of seconds from 0")
        except ValueError as exc:
            self._refuse(HTTPStatus.BAD_REQUEST, str(exc))
            return
        self._answer(HTTPStatus.OK, self.server.entries.read(role, count, min(wait, MAX_WAIT_S)))

    def _entry_request(self) -> tuple[str, str, bytes] | None:
        """A PUT's or DELETE's ``(role, index text, body)`` once its length and path are right;
        None when refused."""
        route = self._route()
        if route is None:
            return None
        _, parts, _ = route
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._refuse(HTTPStatus.LENGTH_REQUIRED, f"a {self.command} needs a Content-Length header")
            return None
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes: at most {MAX_BODY_BYTES}")
            return None
        body = self.rfile.read(int(length))
        if len(parts) != 4 or parts[:2] != ["v1", "services"]:
            self._refuse(HTTPStatus.NOT_FOUND, "no such path: use /v1/services/<role>/<index>")
            return None
        return parts[2], parts[3], body

    def do_PUT(self) -> None:  # noqa: N802
        request = self._entry_request()
        if request is None:
            return
        try:
            role, index = check_role(request[0]), _check_path_index(request[1])
            fields = _json_fields(
                request[2], {"address", "size", "ttl"}, '{"address": "host:port", "size": n or null, "ttl": s or null}'
            )
            size = _check_size(fields.get("size"))
            _check_index(index, size=size)
            address, ttl = check_address(fields["address"]), check_ttl(fields.get("ttl"))
            self.server.entries.put(role, index, address, size, ttl)
        except ValueError as exc:
            self._refuse(HTTPStatus.BAD_REQUEST, str(exc))
            return
        self._answer(HTTPStatus.OK, {"ok": True})

    def do_DELETE(self) -> None:  # noqa: N802
        request = self._entry_request()
        if request is None:
            return
        try:
            role, index = check_role(request[0]), _check_index(_check_path_index(request[1]))
            fields = _json_fields(request[2], {"address"}, '{"address": "host:port"} (the address to deregister)')
            removed = self.server.entries.remove(role, index, check_address(fields["address"]))
        except ValueError as exc:
            self._refuse(HTTPStatus.BAD_REQUEST, str(exc))
            return
        self._answer(HTTPStatus.OK, {"removed": removed})

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} not allowed: use GET, PUT or DELETE")

    do_POST = do_PATCH = do_HEAD = _not_allowed  # noqa: N815


def _one_number(query: dict[str, list[str]], name: str, kind: type) -> Any:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ValueError(f"{name} given {len(values)} times")
    try:
        return kind(values[0])
    except ValueError:
        raise ValueError(f"{name} {values[0]!r}: must be a number") from None


class RegistryServer(ThreadingHTTPServer):
    """The registry, served by threads (one per connection, at most :data:`MAX_CONNECTIONS`).

    Args:
        address: ``(host, port)`` to bind; port 0 picks a free one.

    Example:
        >>> server = RegistryServer(("127.0.0.1", 0)); server.start()
        >>> server.address
        '127.0.0.1:...'
        >>> server.stop()
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int]):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self.entries = _Entries()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread: threading.Thread | None = None

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host's name up (getfqdn), which can stall on a
        # machine without DNS; the name is only used in CGI variables
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def address(self) -> str:
        """``host:port`` to reach it (IPv6 hosts bracketed)."""
        host = str(self.server_address[0])
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            _logger.warning("refusing a connection from %s: %d connections open", client_address, MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def start(self) -> None:
        """Serve in a background thread."""
        # a short poll interval: stop() returns within it
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="persia-registry", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (waiting readers get their answer from the closed
        connection: an error, after which their clients retry elsewhere or give up)."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()


class RegistryClient:
    """Talks to a registry at ``address`` (``host:port``), one HTTP connection per request.

    Connection failures (the registry not started yet, restarting) are retried until the call's
    deadline, with a growing pause between tries (readiness polling); refusals are not retried.

    Example:
        >>> client = RegistryClient("127.0.0.1:8887")
        >>> client.register("nn-worker", 0, "10.0.0.5:40123", size=2)
        >>> client.wait_for("nn-worker", timeout=60)
        ['10.0.0.5:40123', '10.0.0.6:40123']
    """

    def __init__(self, address: str):
        check_address(address)
        host, _, port = address.rpartition(":")
        self.address = address
        self._host, self._port = host.strip("[]"), int(port)

    def _request(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        """One request; raises OSError on connection trouble, RegistryError on a refusal."""
        connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read(1 << 24)
        except http.client.HTTPException as exc:
            raise OSError(f"bad answer from {self.address}: {exc!r}") from None
        finally:
            connection.close()
        try:
            answer = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RegistryError(f"registry at {self.address} answered {response.status} with non-JSON") from None
        if response.status != HTTPStatus.OK:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise RegistryError(f"registry at {self.address} refused {method} {path}: {error or response.status}")
        if not isinstance(answer, dict):
            raise RegistryError(f"registry at {self.address} answered {answer!r}")
        return answer

    def _retrying(self, what: str, timeout: float, call: Any) -> Any:
        deadline = time.monotonic() + timeout
        pause = 0.02
        while True:
            try:
                return call(max(0.0, deadline - time.monotonic()))
            except OSError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{what}: the service registry at {self.address} is not reachable ({exc}); is "
                        "'persia-launcher embedding-worker' running there? (EMBEDDING_WORKER_SERVICE names it)"
                    ) from None
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.5)

    def register(
        self,
        role: str,
        index: int,
        address: str,
        size: int | None = None,
        timeout: float = 60.0,
        ttl: float | None = None,
    ) -> None:
        """Register ``address`` as entry ``index`` of ``role`` (replacing an earlier one).

        Args:
            ttl: seconds after which the registry drops the entry unless it is registered again
                (for a registrant that re-registers periodically); None: it stays until
                deregistered or replaced.

        Raises:
            ValueError: a bad role, index, address, size or ttl (checked here before sending).
            RegistryError: the registry refused it.
            TimeoutError: the registry was not reachable within ``timeout`` seconds.
        """
        check_role(role)
        check_address(address)
        _check_index(index, size=_check_size(size))
        check_ttl(ttl)
        path = f"/v1/services/{role}/{index}"
        body = {"address": address, "size": size, "ttl": ttl}
        self._retrying(
            f"registering {role} {index}",
            timeout,
            lambda left: self._request("PUT", path, body, min(left, 10.0) or 0.1),
        )

    def deregister(self, role: str, index: int, address: str, timeout: float = 10.0) -> bool:
        """Remove entry ``index`` of ``role`` if it still holds ``address``.

        Returns:
            Whether it was removed (False: the index holds another address, registered by a
            replacement, or nothing).

        Raises:
            ValueError: a bad role, index or address (checked here before sending).
            RegistryError: the registry refused it or answered nonsense.
            TimeoutError: the registry was not reachable within ``timeout`` seconds.
        """
        check_role(role)
        check_address(address)
        _check_index(index)
        path = f"/v1/services/{role}/{index}"
        answer = self._retrying(
            f"deregistering {role} {index}",
            timeout,
            lambda left: self._request("DELETE", path, {"address": address}, min(left, 10.0) or 0.1),
        )
        removed = answer.get("removed")
        if not isinstance(removed, bool):
            raise RegistryError(f"registry at {self.address} answered {answer!r}")
        return removed

    def services(self, role: str, count: int | None = None, wait: float = 0.0, timeout: float = 10.0) -> dict[str, Any]:
        """The registry's answer for ``role`` (waiting up to ``wait`` s there for ``count`` entries).

        Raises:
            RegistryError: refused or a malformed answer.
            TimeoutError: not reachable within ``timeout`` seconds.
        """
        check_role(role)
        query = urllib.parse.urlencode({k: v for k, v in (("count", count), ("wait", wait)) if v})
        path = f"/v1/services/{role}" + (f"?{query}" if query else "")
        answer = self._retrying(
            f"reading {role}", timeout, lambda left: self._request("GET", path, None, max(left, wait + 5.0))
        )
        services = answer.get("services")
        if not isinstance(services, list) or not all(
            isinstance(s, dict) and isinstance(s.get("index"), int) and isinstance(s.get("address"), str)
            for s in services
        ):
            raise RegistryError(f"registry at {self.address} answered {answer!r}")
        return answer

    def wait_for(self, role: str, count: int | None = None, timeout: float = 60.0) -> list[str]:
        """The addresses of ``role``'s entries 0..n-1 in index order, once ``count`` of them (without
        ``count``: the size the registrants declared, else one) are registered.

        Raises:
            TimeoutError: fewer than that within ``timeout`` seconds (the message says what is there)
                or the registry not reachable.
            RegistryError: the registry refused the request.
        """
        deadline = time.monotonic() + timeout
        answer: dict[str, Any] = {"services": [], "size": None}
        while True:
            left = deadline - time.monotonic()
            answer = self.services(role, count, wait=max(0.0, min(left, MAX_WAIT_S)), timeout=max(left, 0.1))
            wanted = count if count is not None else answer.get("size") or 1
            entries = {s["index"]: s["address"] for s in answer["services"]}
            if all(i in entries for i in range(wanted)):
                return [entries[i] for i in range(wanted)]
            if time.monotonic() >= deadline:
                have = ", ".join(f"{i}: {a}" for i, a in sorted(entries.items())) or "none"
                raise TimeoutError(
                    f"waited {timeout:g} s for {wanted} {role} service(s) (indexes 0 to {wanted - 1}) at the "
                    f"registry {self.address}; registered: {have}"
                )
