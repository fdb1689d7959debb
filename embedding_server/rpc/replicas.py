"""Replicas of embedding shards: their addresses, their health, and which one serves a read.

Every shard may run as several replicas: infer-mode servers started with the same shard index on
the same model root (``--mode infer --model-root URL``) converge to the same rows, so any one of
them can answer a read. No replication protocol is involved.

Address forms accepted everywhere (client, ``serving.yml``, ``CTRSERVE_EMBEDDING_SERVERS``, CLI):

* one address per shard (as before): ``["h1:7001", "h3:7002"]``;
* a list of replicas per shard: ``[["h1:7001", "h2:7001"], ["h3:7002"]]``;
* one string: ``"h1:7001|h2:7001,h3:7002"`` (``|`` separates replicas, ``,`` shards); a list
  item may itself be ``"h1:7001|h2:7001"``.

Discovery: a host that is a DNS name (not an IP literal) stands for every address it resolves
to, each a replica of its shard: a Kubernetes headless Service name per shard
(``emb-0.emb.ns.svc:7000``, one A record per ready pod), or any name with several A records.
:func:`resolve_address` resolves one entry (through an injectable ``getaddrinfo``, by default
:func:`socket.getaddrinfo`); the client re-resolves every ``resolve_interval`` seconds, adds the
new addresses as replicas and retires vanished ones after their calls in flight finish
(:meth:`ReplicaSet.retire`). Where a name has IPv4 addresses only those are used (a dual-stack
pod has one of each, and servers bind IPv4 by default); else its IPv6 ones.

Example:
    >>> normalize_addresses("h1:7001|h2:7001,h3:7002")
    [['h1:7001', 'h2:7001'], ['h3:7002']]
    >>> format_addresses([["h1:7001", "h2:7001"], ["h3:7002"]])
    'h1:7001|h2:7001,h3:7002'
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import grpc

from embedding_server.core.errors import ConfigError

log = logging.getLogger("ctrserve.embedding_client")

REPLICA_SEP = "|"
SHARD_SEP = ","
Addresses = str | Sequence[str | Sequence[str]]


# ---------------------------------------------------------------------------- addresses


def is_address(value: object) -> bool:
    """True for a ``host:port`` string with a port in 1..65535."""
    if not isinstance(value, str) or ":" not in value:
        return False
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def parse_addresses(spec: str) -> list[list[str]]:
    """``"h1:7001|h2:7001,h3:7002"`` → ``[["h1:7001", "h2:7001"], ["h3:7002"]]``.

    Raises:
        ConfigError: an empty shard or replica, or something that is not ``host:port``.
    """
    return normalize_addresses([part for part in spec.split(SHARD_SEP)])


def normalize_addresses(addresses: Addresses) -> list[list[str]]:
    """Replica addresses per shard, from any of the accepted forms (see the module docstring).

    Raises:
        ConfigError: no shard, a shard without replicas, a malformed or repeated address.
    """
    if isinstance(addresses, str):
        return parse_addresses(addresses)
    shards: list[list[str]] = []
    for i, item in enumerate(addresses):
        replicas = item.split(REPLICA_SEP) if isinstance(item, str) else list(item)
        replicas = [r.strip() if isinstance(r, str) else r for r in replicas]
        bad = [r for r in replicas if not is_address(r)]
        if not replicas or bad:
            raise ConfigError(
                f"embedding servers: shard {i} must be 'host:port' replicas separated by '{REPLICA_SEP}', got {item!r}"
            )
        shards.append(replicas)
    if not shards:
        raise ConfigError("embedding servers: no shard given")
    listed = [address for replicas in shards for address in replicas]
    repeated = sorted({address for address in listed if listed.count(address) > 1})
    if repeated:
        raise ConfigError(f"embedding servers: address {repeated[0]} is listed more than once")
    return shards


#: ``socket.getaddrinfo``'s signature: (host, port, family=0, type=0, proto=0, flags=0) -> entries
#: whose last item is the socket address, ``(ip, port, ...)``.
GetAddrInfo = Callable[..., Sequence[tuple[Any, ...]]]


def is_ip_literal(address: str) -> bool:
    """True when the host of ``host:port`` is an IP address (``[::1]:7001`` included): nothing to resolve."""
    host = address.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve_address(address: str, getaddrinfo: GetAddrInfo = socket.getaddrinfo) -> list[str]:
    """The ``ip:port`` addresses a ``host:port`` entry stands for, in the resolver's order,
    without repeats; an IP literal stands for itself (the resolver is not asked).

    IPv4 addresses are preferred: where the name has any, its IPv6 ones are left out.

    Raises:
        OSError: the name does not resolve (``socket.gaierror``) or resolves to nothing.
    """
    if is_ip_literal(address):
        return [address]
    host, _, port = address.rpartition(":")
    entries = getaddrinfo(host, int(port), 0, socket.SOCK_STREAM)
    found: dict[str, socket.AddressFamily] = {}
    for entry in entries:
        family, ip = entry[0], str(entry[-1][0])
        found.setdefault(ip, family)
    v4 = [ip for ip, family in found.items() if family == socket.AF_INET]
    chosen = v4 or [f"[{ip}]" for ip, family in found.items() if family == socket.AF_INET6]
    if not chosen:
        raise OSError(f"{host} resolves to no IPv4 or IPv6 address")
    return [f"{ip}:{port}" for ip in chosen]


def format_addresses(shards: Sequence[Sequence[str]]) -> str:
    """The one-string form: ``|`` between replicas, ``,`` between shards."""
    return SHARD_SEP.join(REPLICA_SEP.join(replicas) for replicas in shards)


# ---------------------------------------------------------------------------- health state


class Transport(str, Enum):
    """How a client's lookups reach a replica."""

    GRPC = "grpc"  # the replica's gRPC service
    LOCAL = "local"  # the server's local Unix socket (same machine; see embedding_server.rpc.local_lookup)

    def __str__(self) -> str:
        return self.value


@dataclass(eq=False)
class Replica:
    """One server of one shard, with the client's view of its health.

    Attributes:
        shard: the shard it serves.
        address: ``host:port``.
        channel: its gRPC channel (reconnects by itself after the server returns).
        stubs: whatever the client calls on it (generated stub, raw Lookup callable, ...).
        up: reads may go to it.
        validated: its Info (shard index, config fingerprint) was checked.
        outstanding: requests sent and not yet answered.
        reason: why it is down (empty while up).
        local: its :class:`~embedding_server.rpc.local_lookup.LocalLookupChannel` when lookups go
            over the server's local socket (same machine), else None (gRPC).
        name: the configured entry it came from (a DNS name's ``host:port``; its own address
            when the entry was an IP literal).
        retired_at: ``time.monotonic()`` when discovery dropped it (no new request goes to it;
            its channel is closed once its calls in flight are done), else None.
    """

    shard: int
    address: str
    channel: grpc.Channel
    stubs: dict[str, Any] = field(default_factory=dict)
    up: bool = False
    validated: bool = False
    outstanding: int = 0
    reason: str = "not checked yet"
    local: Any = None
    name: str = ""
    retired_at: float | None = None

    @property
    def transport(self) -> Transport:
        """Where its lookups go now."""
        return Transport.GRPC if self.local is None else Transport.LOCAL


class ReplicaSet:
    """The replicas of one shard; thread-safe.

    Reads go to the up replica with the fewest outstanding requests; ties go to a replica on this
    machine (lookups over its local socket), then round-robin.
    A replica marked down is skipped until the health prober marks it up again; when every
    replica is down, the validated ones are still tried as a last resort (a refused connection
    fails at once, so this costs nothing and notices a returned server before the next probe).

    Args:
        shard: shard index.
        replicas: its replicas (all start down until validated).
    """

    def __init__(self, shard: int, replicas: Sequence[Replica]):
        self.shard = shard
        self.replicas = list(replicas)
        self._lock = threading.Lock()
        self._turn = 0

    def candidates(self) -> list[Replica]:
        """Replicas to try in order for one request: up ones (least outstanding first; on ties a
        replica reached over its local socket first, then rotating), then validated down ones."""
        with self._lock:
            n = len(self.replicas)
            if n == 0:
                return []
            self._turn = (self._turn + 1) % n
            ranked = sorted(
                range(n),
                key=lambda i: (
                    not self.replicas[i].up,
                    self.replicas[i].outstanding,
                    self.replicas[i].local is None,
                    (i - self._turn) % n,
                ),
            )
            return [self.replicas[i] for i in ranked if self.replicas[i].up or self.replicas[i].validated]

    def snapshot(self) -> list[Replica]:
        """The current replicas (a copy: discovery may change the set meanwhile)."""
        with self._lock:
            return list(self.replicas)

    def add(self, replica: Replica) -> None:
        """A replica found by discovery; it takes reads once the health prober marks it up."""
        with self._lock:
            self.replicas.append(replica)
        log.info("embedding shard %d: replica %s (%s) added", self.shard, replica.address, replica.name)

    def retire(self, replica: Replica) -> None:
        """Drop ``replica`` (gone from its name's addresses): no new request goes to it; calls in
        flight finish (the client closes its channel once ``outstanding`` is 0)."""
        with self._lock:
            if replica in self.replicas:
                self.replicas.remove(replica)
            replica.retired_at = time.monotonic()
        log.info("embedding shard %d: replica %s (%s) removed", self.shard, replica.address, replica.name)

    def started(self, replica: Replica) -> None:
        """Count a request sent to ``replica``."""
        with self._lock:
            replica.outstanding += 1

    def finished(self, replica: Replica) -> None:
        """Count a request of ``replica`` answered (or failed)."""
        with self._lock:
            replica.outstanding -= 1

    def mark_down(self, replica: Replica, reason: str) -> None:
        """Stop sending reads to ``replica``; logs once per transition."""
        with self._lock:
            was_up, replica.up, replica.reason = replica.up, False, reason
        if was_up:
            log.warning("embedding shard %d: replica %s marked down: %s", self.shard, replica.address, reason)

    def mark_up(self, replica: Replica) -> None:
        """Send reads to ``replica`` again; logs once per transition."""
        with self._lock:
            was_up, replica.up, replica.reason = replica.up, True, ""
        if not was_up:
            log.info("embedding shard %d: replica %s marked up", self.shard, replica.address)

    def down(self) -> list[Replica]:
        """The replicas currently marked down."""
        with self._lock:
            return [r for r in self.replicas if not r.up]

    def describe(self) -> str:
        """``"h1:7001 (down: UNAVAILABLE ...), h2:7001 (up)"`` for error messages."""
        with self._lock:
            return ", ".join(f"{r.address} ({'up' if r.up else 'down: ' + r.reason})" for r in self.replicas)


class HealthProber:
    """A background thread that probes down replicas and marks them up when healthy.

    Args:
        sets: every shard's replicas.
        probe: checks one replica; returns None when it may serve, else why not (it must not raise).
        interval: seconds between probe rounds.
        after_round: called after each round (it must not raise), for the client's other upkeep.
    """

    def __init__(
        self,
        sets: Sequence[ReplicaSet],
        probe: Callable[[Replica], str | None],
        interval: float,
        after_round: Callable[[], None] | None = None,
    ):
        self.sets = list(sets)
        self.probe = probe
        self.interval = interval
        self.after_round = after_round
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedding-health-prober", daemon=True)

    def start(self) -> HealthProber:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def probe_once(self) -> None:
        """Probe every down replica once."""
        for replica_set in self.sets:
            for replica in replica_set.down():
                if self._stop.is_set():
                    return
                problem = self.probe(replica)
                if problem is None:
                    replica_set.mark_up(replica)
                else:
                    replica.reason = problem

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.probe_once()
            if self.after_round is not None:
                self.after_round()
