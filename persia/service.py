"""Where the services of a PERSIA job are: PERSIA's ``persia.service``, and the registry lookups.

ctrserve has no embedding worker process: the nn workers' embedding client routes ids to the
embedding parameter servers itself. What the embedding worker's address meant in PERSIA, the
place every process finds the others, is here the address of the service registry
(:mod:`persia.registry`) that ``persia-launcher embedding-worker`` serves on its ``--port``
(8887). Where that address comes from:

1. ``EMBEDDING_WORKER_SERVICE`` (``host:port``), as in PERSIA; set it wherever the registry is
   not on this machine's default.
2. Else PERSIA's default ``embedding_worker:8887`` when the name ``embedding_worker`` resolves
   (PERSIA's docker-compose and Kubernetes setups name the service so).
3. Else ``127.0.0.1:8887``: a single machine running ``persia-launcher embedding-worker`` with
   its default port (a Procfile, a shell script, :func:`persia.helper.ensure_persia_service`,
   which sets ``EMBEDDING_WORKER_SERVICE`` itself).

``PERSIA_NATS_URL`` is accepted and not used (logged once): PERSIA's processes found each other
through a NATS server; here the registry does that, so no NATS server is needed.

Roles registered: ``embedding-parameter-server`` (by ``persia-launcher
embedding-parameter-server`` once its server is healthy, index = replica index) and
``nn-worker`` (by each nn worker's ``StreamingDataset``, index = rank, with its data address).

Entries go away when their registrant deregisters them (:func:`deregister_service`): the
launcher when its server stops (SIGTERM, SIGINT, SIGHUP or the server exiting), a
``StreamingDataset`` when it is closed. A deregistration removes the entry only while it holds
the address given, so a late one from an old instance never removes its replacement. The
launcher also registers with a ttl (:data:`persia.launcher.REGISTRATION_TTL_S`) and re-registers
well within it, so the entry of a launcher killed without deregistering (SIGKILL, a lost
machine) is dropped once the ttl passes; one-shot registrations carry no ttl.

Example:
    >>> register_service("nn-worker", 0, "10.0.0.5:40123", size=1)
    >>> wait_for_services("nn-worker")
    ['10.0.0.5:40123']
    >>> deregister_service("nn-worker", 0, "10.0.0.5:40123")
    True
    >>> embedding_server_addresses()        # shard order
    ['127.0.0.1:8888', '127.0.0.1:8889']
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from functools import cache

from persia.registry import RegistryClient, RegistryError, check_address

_logger = logging.getLogger("persia.service")

#: the role ``persia-launcher embedding-parameter-server`` registers its server under
EMBEDDING_PARAMETER_SERVER = "embedding-parameter-server"
#: the role nn workers register their data-receiving address under (index = rank)
NN_WORKER = "nn-worker"
#: PERSIA's default embedding worker address (a docker-compose / Kubernetes service name)
PERSIA_DEFAULT_SERVICE = "embedding_worker:8887"
#: the default where ``embedding_worker`` does not resolve: a registry on the local host
LOCAL_DEFAULT_SERVICE = "127.0.0.1:8887"
#: how long a deregistration on the way out keeps trying to reach the registry
DEREGISTER_TIMEOUT_S = 5.0

_nats_noted = threading.Event()


def note_unused_nats_url() -> None:
    """Log once per process that ``PERSIA_NATS_URL`` is set but not used, and why."""
    url = os.environ.get("PERSIA_NATS_URL")
    if url and not _nats_noted.is_set():
        _nats_noted.set()
        _logger.info(
            "PERSIA_NATS_URL=%s is not used: services find each other through the registry of "
            "'persia-launcher embedding-worker' (EMBEDDING_WORKER_SERVICE), no NATS server is needed",
            url,
        )


@cache
def _persia_default_resolves() -> bool:
    try:
        socket.getaddrinfo(PERSIA_DEFAULT_SERVICE.rpartition(":")[0], None)
    except (OSError, UnicodeError):
        return False
    return True


def get_embedding_worker_services() -> list[str]:
    """The embedding worker service addresses, PERSIA's function: here the one service registry's
    ``host:port``, from ``EMBEDDING_WORKER_SERVICE``, else ``embedding_worker:8887`` where that
    name resolves, else ``127.0.0.1:8887``.

    Raises:
        ValueError: ``EMBEDDING_WORKER_SERVICE`` is not ``host:port``.
    """
    note_unused_nats_url()
    configured = os.environ.get("EMBEDDING_WORKER_SERVICE", "").strip()
    if configured:
        try:
            return [check_address(configured)]
        except ValueError as exc:
            raise ValueError(f"EMBEDDING_WORKER_SERVICE: {exc}") from None
    return [PERSIA_DEFAULT_SERVICE if _persia_default_resolves() else LOCAL_DEFAULT_SERVICE]


def _registry() -> RegistryClient:
    return RegistryClient(get_embedding_worker_services()[0])


def register_service(
    role: str,
    index: int,
    address: str,
    *,
    size: int | None = None,
    timeout: float = 60.0,
    ttl: float | None = None,
) -> None:
    """Register ``address`` (``host:port``) as entry ``index`` of ``role`` with the registry; a
    later registration of the same index replaces it (a restarted service registers again).

    Args:
        size: how many entries ``role`` has in all (ctrserve extension; what
            :func:`wait_for_services` waits for when given no count).
        timeout: how long to keep trying while the registry is not reachable (it may start later).
        ttl: seconds after which the registry drops the entry unless it is registered again
            (for a caller that re-registers periodically); None: it stays until deregistered.

    Raises:
        ValueError: a bad role, index, address, size or ttl.
        TimeoutError: the registry was not reachable in ``timeout`` seconds.
        persia.registry.RegistryError: the registry refused it.
    """
    _registry().register(role, index, address, size=size, timeout=timeout, ttl=ttl)


def deregister_service(
    role: str, index: int, address: str, *, timeout: float = DEREGISTER_TIMEOUT_S, registry: str | None = None
) -> bool:
    """Remove entry ``index`` of ``role`` from the registry if it still holds ``address`` (a
    replacement registered since keeps its entry). Meant for the way out: a registry that cannot
    be reached in ``timeout`` seconds, or that refuses, is logged as a warning, never raised.

    Args:
        registry: the registry's ``host:port`` (ctrserve extension); default: the one
            :func:`get_embedding_worker_services` names.

    Returns:
        Whether the entry was removed (False: it holds another address or is gone already, or the
        registry could not be reached).

    Raises:
        ValueError: a bad role, index or address, or ``EMBEDDING_WORKER_SERVICE`` is not
            ``host:port`` (mistakes of the caller, not failures on the way out).
    """
    client = _registry() if registry is None else RegistryClient(registry)
    try:
        return client.deregister(role, index, address, timeout=timeout)
    except (TimeoutError, RegistryError, OSError) as exc:
        _logger.warning("could not deregister %s %d at %s: %s", role, index, address, exc)
        return False


def wait_for_services(role: str, count: int | None = None, timeout: float = 60.0) -> list[str]:
    """Block until entries 0 to ``count`` - 1 of ``role`` are registered; their addresses in
    index order. Without ``count``: as many as the registrants declared (``size``), else one.

    Raises:
        TimeoutError: not all there in ``timeout`` seconds (the message lists those that are), or
            the registry not reachable.
        persia.registry.RegistryError: the registry refused the request.
    """
    return _registry().wait_for(role, count, timeout)


def embedding_server_addresses(timeout: float = 60.0) -> list[str]:
    """The embedding parameter servers' addresses in shard order: ``PERSIA_EMBEDDING_SERVERS``
    (comma-separated ``host:port``; ctrserve extension) when set, else the registry's
    ``embedding-parameter-server`` entries (waiting up to ``timeout`` s for all of them).

    Raises:
        ValueError: ``PERSIA_EMBEDDING_SERVERS`` holds something that is not ``host:port``.
        TimeoutError: the registry does not have them all in ``timeout`` seconds.
    """
    configured = os.environ.get("PERSIA_EMBEDDING_SERVERS", "").strip()
    if configured:
        try:
            return [check_address(part.strip()) for part in configured.split(",") if part.strip()]
        except ValueError as exc:
            raise ValueError(f"PERSIA_EMBEDDING_SERVERS: {exc}") from None
    return wait_for_services(EMBEDDING_PARAMETER_SERVER, None, timeout)
