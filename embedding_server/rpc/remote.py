"""Client of a set of remote embedding servers: shards, each served by one or more replicas.

:class:`RemoteEmbeddingClient` is an :class:`~embedding_server.rpc.client.EmbeddingClient`: the same
batching, routing and pooling as in-process, with each shard asked over gRPC, all shards in
parallel. On connect it checks that every replica of shard ``i`` is shard ``i`` of
``len(addresses)`` and that its tables match the client's ``embedding_config.yml``.

Replicas (see :mod:`embedding_server.rpc.replicas` for the address forms):

* **Reads** (Lookup, Stats, Dump) go to one healthy replica of each shard, the one with the
  fewest outstanding requests (on ties one on this machine, then round-robin). When a replica fails with ``UNAVAILABLE``,
  ``DEADLINE_EXCEEDED`` or another transport error, it is marked down and the shard's request
  is sent to the next replica, all within the call's ``timeout``. ``INVALID_ARGUMENT`` is the
  request's fault: raised at once as :class:`InvalidRequestError`, never retried.
* A background thread probes down replicas with the standard gRPC health service every
  ``probe_interval`` seconds and marks them up again once SERVING (checking their Info first
  if they were down at start).
* **Same machine**: a replica whose server has a local socket this process can open (and that
  answers with the instance id Info reported) gets its lookups over that socket instead of
  gRPC (:mod:`embedding_server.rpc.local_lookup`; ``local_lookups=False`` turns it off). A broken
  local connection falls back to gRPC at once; the prober re-attaches when the server returns.
* When every replica of a shard fails, :class:`ShardUnavailableError` names the shard and each
  replica's state; it comes within ``timeout``, never later.
* **Discovery**: a host given as a DNS name stands for every address it resolves to, each a
  replica (a Kubernetes headless Service per shard, or a name with several A records; see
  :mod:`embedding_server.rpc.replicas`). The prober thread resolves names again every
  ``resolve_interval`` seconds (sooner, at most every second, while a shard has no replica up):
  new addresses join as replicas once healthy; vanished ones get no new request and their
  channels close when their calls in flight are done. A name that fails to resolve keeps its
  replicas (a DNS outage does not empty a shard). TLS still verifies the name, not the address.
* **Writes** (PushGradients, SetOptimizer, Load) are broadcast to every replica of the shard,
  and raise if any replica cannot take them. Replicas are a serving feature: train-mode
  servers must have one replica per shard (a replica that missed one gradient push would
  differ forever), so a train-mode server listed with others is a :class:`ConfigError`.

Example:
    >>> client = RemoteEmbeddingClient(emb_config, "127.0.0.1:7001|127.0.0.1:7003,127.0.0.1:7002")
    >>> result = client.lookup(features)
"""

from __future__ import annotations

import json
import queue
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_server.core.config import EmbeddingConfig, JobType
from embedding_server.core.errors import ConfigError, InvalidRequestError, ShardUnavailableError
from embedding_server.core.optimizers import SparseOptimizer
from embedding_server.modelroot import checkpoint
from embedding_server.rpc import wire
from embedding_server.rpc.client import EmbeddingClient
from embedding_server.rpc.local_lookup import LocalLookupChannel, LocalRpcError
from embedding_server.rpc.replicas import (
    Addresses,
    GetAddrInfo,
    HealthProber,
    Replica,
    ReplicaSet,
    is_ip_literal,
    log,
    normalize_addresses,
    resolve_address,
)
from embedding_server.rpc.security import ClientSecurity, make_channel
from embedding_server.rpc.service import CHANNEL_OPTIONS, SERVICE_NAME
from protos.embedding import pb, pb_grpc

# A restarted server is reconnected to within about a second (gRPC's default backoff grows to 120 s).
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# Seconds a client waits at start for the remaining replicas once every shard has one answering.
START_GRACE_S = 0.5
# Failures that say "this replica cannot answer now": try another one. INVALID_ARGUMENT (the
# request's fault) and UNAUTHENTICATED/PERMISSION_DENIED (the client's) are never retried.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
# Of those, the ones that mark the replica down until a health probe says it is back.
MARKS_DOWN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class RemoteEmbeddingClient(EmbeddingClient):
    """Embedding lookups against sharded, optionally replicated, embedding servers.

    Args:
        config: the same ``embedding_config.yml`` the servers run with.
        addresses: per shard in order, its ``host:port`` or its list of replica addresses, or
            the string form ``"h1:7001|h2:7001,h3:7002"``.
        timeout: seconds allowed per call (a lookup of every shard), retries included.
        connect_timeout: seconds to wait at construction for one replica of every shard.
        attempt_timeout: seconds allowed to one replica before the next is tried (default:
            ``timeout`` divided by the shard's replica count).
        probe_interval: seconds between health probes of replicas marked down.
        security: TLS and token settings of secured servers (None: plain text, no token).
        local_lookups: send a replica's lookups over its server's local socket when this
            process can open it (see the module docstring); False: always gRPC.
        resolve_interval: seconds between re-resolutions of the DNS names among ``addresses``
            (0: resolve once, at start).
        getaddrinfo: the resolver (``socket.getaddrinfo``'s signature; tests pass their own).

    Raises:
        ShardUnavailableError: no replica of some shard answers within ``connect_timeout``.
        ConfigError: malformed addresses; a replica is another shard than its position says,
            has other tables, or is a train-mode server listed with other replicas.
    """

    def __init__(
        self,
        config: EmbeddingConfig,
        addresses: Addresses,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        attempt_timeout: float | None = None,
        probe_interval: float = 0.5,
        security: ClientSecurity | None = None,
        local_lookups: bool = True,
        resolve_interval: float = 30.0,
        getaddrinfo: GetAddrInfo = socket.getaddrinfo,
    ):
        shards = normalize_addresses(addresses)
        super().__init__(config, len(shards))
        self.addresses = shards  # as configured: DNS names stay names (replica_sets holds what they resolved to)
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.security = security
        self.local_lookups = local_lookups
        self.resolve_interval = resolve_interval
        self.probe_interval = probe_interval
        self._getaddrinfo = getaddrinfo
        self._has_names = any(not is_ip_literal(a) for replicas in shards for a in replicas)
        self._next_resolve = 0.0  # time.monotonic() of the next re-resolution
        self._draining: list[Replica] = []  # retired replicas whose channels are still open
        self._reattach: set[Replica] = set()  # up replicas whose local socket broke
        self.replica_sets = [ReplicaSet(s, []) for s in range(len(shards))]
        try:
            self._discover_at_start(connect_timeout)
            self._connect(connect_timeout)
            self.infos = [self._read("Info", s, pb.InfoRequest()) for s in range(self.num_shards)]
        except BaseException:
            self._close_channels()
            raise
        self._prober = HealthProber(self.replica_sets, self._probe, probe_interval, self._after_probe_round).start()

    def close(self) -> None:
        """Stop the health prober and close every channel."""
        self._prober.stop()
        self._close_channels()

    def __enter__(self) -> RemoteEmbeddingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ channels and replicas

    def _open_channel(self, address: str, name: str = "") -> grpc.Channel:
        """THE place where channels to embedding servers are made (lookups, admin and probes).

        ``name``: the DNS entry ``address`` was resolved from; the channel then presents the
        name as its authority and, with TLS, verifies the name in the server's certificate.
        """
        options: list[tuple[str, Any]] = [*CHANNEL_OPTIONS, *RECONNECT_OPTIONS]
        if name and name != address:
            options.append(("grpc.default_authority", name))
            if self.security is not None and self.security.tls and not self.security.tls_server_name:
                options.append(("grpc.ssl_target_name_override", name.rpartition(":")[0]))
        return make_channel(address, options, self.security)  # TLS/token when set

    def _make_replica(self, shard: int, address: str, name: str = "") -> Replica:
        channel = self._open_channel(address, name)
        stubs = {
            "service": pb_grpc.EmbeddingServiceStub(channel),
            # Lookup moves hand-encoded messages (see wire.py): no protobuf copies of the vectors.
            "Lookup": channel.unary_unary(f"/{SERVICE_NAME}/Lookup"),
            "health": health_pb2_grpc.HealthStub(channel),
        }
        return Replica(shard, address, channel, stubs, name=name or address)

    def _close_channels(self) -> None:
        for replica in [r for rs in self.replica_sets for r in rs.snapshot()] + self._draining:
            self._close_replica(replica)
        self._draining = []

    @staticmethod
    def _close_replica(replica: Replica) -> None:
        if replica.local is not None:
            replica.local.close()
        replica.channel.close()

    # ------------------------------------------------------------------ discovery

    def _resolve_shard(self, shard: int) -> tuple[dict[str, str], set[str]]:
        """``{address: entry}`` of every configured entry of ``shard``, and the entries whose
        resolution failed this time (logged)."""
        found: dict[str, str] = {}
        failed: set[str] = set()
        for entry in self.addresses[shard]:
            try:
                for address in resolve_address(entry, self._getaddrinfo):
                    found.setdefault(address, entry)
            except (OSError, UnicodeError) as exc:
                failed.add(entry)
                log.warning("embedding shard %d: cannot resolve %s: %s", shard, entry, exc)
        return found, failed

    def _discover_at_start(self, timeout: float) -> None:
        """Resolve every entry; a shard whose names resolve to nothing yet is tried again until
        ``timeout`` (pods may still be starting)."""
        deadline = time.monotonic() + timeout
        for shard in range(self.num_shards):
            while True:
                found, failed = self._resolve_shard(shard)
                if found or time.monotonic() >= deadline:
                    break
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            if not found:
                raise ShardUnavailableError(
                    f"embedding shard {shard}: no address within {timeout:.1f} s: "
                    f"{', '.join(sorted(failed))} did not resolve"
                )
            for address, entry in found.items():
                self.replica_sets[shard].add(self._make_replica(shard, address, entry))
        self._next_resolve = time.monotonic() + self.resolve_interval

    def rediscover(self) -> None:
        """Resolve the DNS names again now: add new addresses as replicas (down until the
        prober finds them healthy) and retire vanished ones (see :meth:`ReplicaSet.retire`).
        Entries that fail to resolve keep their replicas."""
        if not self._has_names:
            return
        for shard, replica_set in enumerate(self.replica_sets):
            found, failed = self._resolve_shard(shard)
            current = {r.address: r for r in replica_set.snapshot()}
            for address, entry in found.items():
                if address not in current:
                    replica_set.add(self._make_replica(shard, address, entry))
            for address, replica in current.items():
                if address not in found and replica.name not in failed:
                    replica_set.retire(replica)
                    self._reattach.discard(replica)
                    self._draining.append(replica)

    def _close_drained(self) -> None:
        """Close the channels of retired replicas once no call is in flight on them (and a probe
        round has passed, so a call that picked one just before it was retired has started), or
        once every call that could be using them is past its deadline."""
        now = time.monotonic()
        keep = []
        for replica in self._draining:
            age = now - (replica.retired_at or now)
            idle = replica.outstanding <= 0 and age >= self.probe_interval
            if idle or (self.timeout != float("inf") and age > self.timeout + 1.0):
                self._close_replica(replica)
            else:
                keep.append(replica)
        self._draining = keep

    def _after_probe_round(self) -> None:
        """The prober thread's upkeep after each round: local sockets, discovery, draining."""
        self._reattach_local()
        now = time.monotonic()
        if self._has_names and self.resolve_interval > 0:
            starving = any(not any(r.up for r in rs.snapshot()) for rs in self.replica_sets)
            due = self.resolve_interval > 0 and now >= self._next_resolve
            if due or (starving and now >= self._next_resolve - self.resolve_interval + 1.0):
                self._next_resolve = now + self.resolve_interval
                try:
                    self.rediscover()
                except Exception:  # the prober thread must live on
                    log.exception("embedding servers: re-resolving the addresses failed")
        self._close_drained()

    def _connect(self, timeout: float) -> None:
        """Ask every replica's Info at once; return when each shard has a valid replica and
        the others answered too, or at most :data:`START_GRACE_S` later.

        Replicas still silent then stay down and join when the prober finds them healthy.
        """
        answers: queue.Queue = queue.Queue()
        calls = []
        for replica_set in self.replica_sets:
            for replica in replica_set.snapshot():
                future = replica.stubs["service"].Info.future(pb.InfoRequest(), timeout=timeout, wait_for_ready=True)
                future.add_done_callback(lambda f, r=replica: answers.put((r, f)))
                calls.append(future)
        deadline = time.monotonic() + timeout
        waiting = {s.shard for s in self.replica_sets}
        pending = len(calls)
        try:
            while pending:
                try:
                    replica, future = answers.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                pending -= 1
                if self._accept_info(replica, future) and replica.shard in waiting:
                    waiting.discard(replica.shard)
                    if not waiting:  # every shard can serve: give the other replicas a moment
                        deadline = min(deadline, time.monotonic() + START_GRACE_S)
        finally:
            for future in calls:
                future.cancel()
        if waiting:
            shard = min(waiting)
            raise ShardUnavailableError(
                f"embedding shard {shard}: no replica answered within {timeout:.1f} s: "
                f"{self.replica_sets[shard].describe()}"
            )

    def _accept_info(self, replica: Replica, future: grpc.Future) -> bool:
        """Validate a replica's Info answer at start; True when it may serve.

        Raises:
            ConfigError: it answered, but as another shard, with other tables, or in train mode
                beside other replicas.
        """
        try:
            info = future.result()
        except grpc.RpcError as exc:
            replica.reason = f"{exc.code().name}: {exc.details()}"
            return False
        problem = self._info_problem(replica, info)
        if problem:
            raise ConfigError(problem)
        replica.validated = True
        self._attach_local(replica, info)
        self.replica_sets[replica.shard].mark_up(replica)
        return True

    def _attach_local(self, replica: Replica, info: Any) -> None:
        """Send ``replica``'s lookups over its server's local socket when this process can reach
        it and it is the server ``info`` came from; otherwise they stay on gRPC."""
        if not self.local_lookups or not info.local_socket or replica.local is not None:
            return
        token = self.security.token if self.security else None
        channel, problem = LocalLookupChannel.attach(info.local_socket, info.instance_id, token)
        if channel is None:
            log.debug("embedding shard %d: %s: lookups stay on gRPC: %s", replica.shard, replica.address, problem)
            return
        replica.local = channel
        log.info(
            "embedding shard %d: %s: lookups over its local socket %s", replica.shard, replica.address, channel.path
        )

    def _detach_local(self, replica: Replica, error: LocalRpcError) -> None:
        channel, replica.local = replica.local, None
        if channel is not None:
            channel.close()
            self._reattach.add(replica)
            log.warning(
                "embedding shard %d: %s: local socket failed (%s); lookups go over gRPC",
                replica.shard,
                replica.address,
                error.details(),
            )

    def _reattach_local(self) -> None:
        """After a probe round: ask each up replica whose local socket broke for its Info again
        (a restarted server has a new socket) and attach to it; a replica that answers without
        a reachable socket stays on gRPC for good."""
        for replica in list(self._reattach):
            if not replica.up:
                continue  # the probe re-attaches it when it comes back
            try:
                info = replica.stubs["service"].Info(pb.InfoRequest(), timeout=1.0)
            except grpc.RpcError:
                continue  # try again next round
            self._reattach.discard(replica)
            if self._info_problem(replica, info) is None:
                self._attach_local(replica, info)

    def _info_problem(self, replica: Replica, info: Any) -> str | None:
        """Why ``replica`` must not serve its shard, given its Info; None when it may."""
        shard, n = replica.shard, self.num_shards
        if (info.shard_index, info.num_shards) != (shard, n):
            return (
                f"{replica.address} is shard {info.shard_index} of {info.num_shards}, but the client lists it as "
                f"shard {shard} of {n}; give addresses in shard order"
            )
        if info.config_fingerprint != self.config.fingerprint():
            return (
                f"{replica.address} runs with different tables than this client's embedding_config.yml "
                f"(fingerprint {info.config_fingerprint} != {self.config.fingerprint()})"
            )
        if info.mode == JobType.TRAIN.value and len(self.replica_sets[shard].snapshot()) > 1:
            return (
                f"{replica.address} is a train-mode server listed with other replicas of shard {shard}: "
                "train mode takes one server per shard (replicas serve infer-mode servers on one model root)"
            )
        return None

    def _probe(self, replica: Replica) -> str | None:
        """Health-check a down replica (and check its Info once); None when it may serve again."""
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        try:
            status = replica.stubs["health"].Check(request, timeout=1.0).status
            if status != health_pb2.HealthCheckResponse.SERVING:
                return f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
            if not replica.validated or (self.local_lookups and replica.local is None):
                info = replica.stubs["service"].Info(pb.InfoRequest(), timeout=1.0)
                problem = self._info_problem(replica, info)
                if problem:
                    if problem != replica.reason:
                        self._log_refusal(replica, problem)
                    return problem
                replica.validated = True
                self._attach_local(replica, info)  # a restarted server has a new socket
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return None

    @staticmethod
    def _log_refusal(replica: Replica, problem: str) -> None:
        log.error("embedding shard %d: replica %s stays down: %s", replica.shard, replica.address, problem)

    # ------------------------------------------------------------------ calls with failover

    def _attempt_timeout(self, shard: int) -> float:
        return self.attempt_timeout or self.timeout / max(1, len(self.replica_sets[shard].snapshot()))

    def _start(
        self, shard: int, send: Callable[[Replica, float | None], grpc.Future], timeout: float | None = None
    ) -> _ShardCall:
        """Send one request to ``shard``; the returned call fails over to other replicas."""
        limit = self.timeout if timeout is None else timeout
        return _ShardCall(self, shard, send, time.monotonic() + limit).start()

    def _read(self, method: str, shard: int, request: Any, timeout: float | None = None) -> Any:
        """Call ``method`` on one replica of ``shard``, failing over to the others."""
        return self._start(
            shard, lambda r, t: getattr(r.stubs["service"], method).future(request, timeout=t), timeout
        ).result()

    def _broadcast(self, method: str, shard: int, request: Any, timeout: float | None = None) -> list[Any]:
        """Call ``method`` on every replica of ``shard`` (writes); all must succeed.

        Raises:
            ShardUnavailableError: a replica failed (others may have applied the request).
            InvalidRequestError: a replica refused the request.
        """
        return self._broadcast_results(method, shard, self._broadcast_start(method, shard, request, timeout))

    def _broadcast_start(
        self, method: str, shard: int, request: Any, timeout: float | None = None, blocking: bool = False
    ) -> list[tuple[Replica, Any]]:
        """Start :meth:`_broadcast`'s calls (``blocking``: make them here, one after another);
        :meth:`_broadcast_results` waits for them."""
        limit = timeout or self.timeout
        calls: list[tuple[Replica, Any]] = []
        for r in self.replica_sets[shard].snapshot():
            stub = getattr(r.stubs["service"], method)
            calls.append(
                (r, _Completed.call(stub, request, limit) if blocking else stub.future(request, timeout=limit))
            )
        return calls

    @staticmethod
    def _broadcast_results(method: str, shard: int, calls: list[tuple[Replica, Any]]) -> list[Any]:
        """The answers of :meth:`_broadcast_start`'s calls; raises as :meth:`_broadcast`."""
        out = []
        for replica, future in calls:
            try:
                out.append(future.result())
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequestError(exc.details()) from None
                raise ShardUnavailableError(
                    f"embedding shard {shard}: {method} failed on replica {replica.address}: "
                    f"{exc.code().name}: {exc.details()}"
                ) from None
        return out

    # ------------------------------------------------------------------ transport

    def _lookup_shards(self, requests, dim, insert=True):
        calls = []
        # With one shard there is nothing to overlap: a blocking call skips the thread gRPC
        # starts per future.
        parallel = len(requests) > 1
        for s, ids, tables in requests:
            payload = wire.encode_lookup_request(ids, tables, insert)
            calls.append(self._start(s, self._lookup_sender(payload, parallel)))
        out = []
        for call, (s, ids, _) in zip(calls, requests):
            answer = call.result()
            try:
                got_dim, values = wire.decode_lookup_response(answer)
            except ValueError as exc:
                raise ShardUnavailableError(f"embedding shard {s} ({call.address}): {exc}") from None
            if got_dim != dim or values.shape[0] != ids.shape[0] * dim:
                raise ShardUnavailableError(
                    f"embedding shard {s} ({call.address}) answered {values.shape[0]} floats of dim {got_dim} "
                    f"for {ids.shape[0]} ids of dim {dim}"
                )
            out.append(values.reshape(ids.shape[0], dim))
        return out

    def _lookup_sender(self, payload: bytes, parallel: bool) -> Callable[[Replica, float | None], Any]:
        """What a :class:`_ShardCall` starts the LookupRequest ``payload`` on a replica with."""
        return lambda replica, timeout: self._send_lookup(replica, payload, timeout, parallel)

    def _send_lookup(self, replica: Replica, payload: bytes, timeout: float | None, parallel: bool) -> Any:
        """Start one serialized LookupRequest on ``replica``: over its local socket when it has one
        (synchronous: a round trip too short to be worth a thread), else over gRPC (a future when
        ``parallel``)."""
        local = replica.local
        if local is not None:
            try:
                return _Completed(local(payload, timeout=timeout))
            except LocalRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    return _Completed(error=exc)
                self._detach_local(replica, exc)  # the socket broke: this and later calls use gRPC
        stub = replica.stubs["Lookup"]
        return stub.future(payload, timeout=timeout) if parallel else _Completed.call(stub, payload, timeout)

    def _push_shards(self, requests):
        # Every shard's push is sent before any answer is awaited: the shards apply in parallel.
        # The last one is a blocking call on this thread: a future starts a polling thread per
        # call on an idle channel, which costs more than a small push's round trip.
        calls = []
        for k, (s, ids, tables, grads) in enumerate(requests):
            request = pb.PushGradientsRequest(
                ids=wire.encode(ids, wire.IDS),
                tables=wire.encode(tables, wire.TABLES),
                grads=wire.encode(grads, wire.VALUES),
            )
            calls.append((s, self._broadcast_start("PushGradients", s, request, blocking=k == len(requests) - 1)))
        for s, started in calls:
            self._broadcast_results("PushGradients", s, started)

    # ------------------------------------------------------------------ administration

    def set_optimizer(self, optimizer: SparseOptimizer) -> None:
        request = pb.SetOptimizerRequest(optimizer_json=json.dumps(optimizer.to_dict()))
        for s in range(self.num_shards):
            self._broadcast("SetOptimizer", s, request)

    def replica_states(self) -> list[list[dict]]:
        """Per shard, ``{"address", "up", "reason", "outstanding", "transport"}`` of each replica
        (``transport``: a :class:`~embedding_server.rpc.replicas.Transport`)."""
        return [
            [
                {
                    "address": r.address,
                    "up": r.up,
                    "reason": r.reason,
                    "outstanding": r.outstanding,
                    "transport": r.transport,
                    "name": r.name,
                }
                for r in rs.snapshot()
            ]
            for rs in self.replica_sets
        ]

    def stats(self) -> list[dict]:
        """One dict of counters per shard, from one healthy replica (``address`` names it;
        ``replicas`` gives every replica's health as the client sees it)."""
        out = []
        states = self.replica_states()
        for s in range(self.num_shards):
            call = self._start(s, lambda r, t: r.stubs["service"].Stats.future(pb.StatsRequest(), timeout=t))
            r = call.result()
            out.append(
                {
                    "address": call.address,
                    "replicas": states[s],
                    "rows": r.rows,
                    "capacity": r.capacity,
                    "hits": r.hits,
                    "misses": r.misses,
                    "evictions": r.evictions,
                    "inserts": r.inserts,
                    "methods": [
                        {
                            "method": m.method,
                            "requests": m.requests,
                            "errors": m.errors,
                            "latency_p50_ms": m.latency_p50_ms,
                            "latency_p99_ms": m.latency_p99_ms,
                        }
                        for m in r.methods
                    ],
                    # An infer-mode server following a model root: its watermarks and freshness.
                    "hotload": hotload_dict(r.hotload) if r.HasField("hotload") else None,
                }
            )
            if r.HasField("hotload"):  # {training shard: last packet seq applied}, as handlers report it
                out[-1]["watermark"] = {str(st.shard): st.watermark for st in r.hotload.streams}
                # {training shard: seqs an operator skipped}, for the shards with any (handlers report it)
                out[-1]["skipped"] = {str(st.shard): list(st.skipped) for st in r.hotload.streams if st.skipped}
        return out

    def skip_packet(self, shard: int, num_shards: int, seq: int) -> list[list[dict]]:
        """Ask every replica of every serving shard to skip packet ``seq`` of training shard
        ``shard`` of ``num_shards``, which their model-root followers are held at (see
        :meth:`~embedding_server.modelroot.hotload.ModelRootFollower.skip_packet`). Every replica
        is asked even when one refuses, so replicas end up alike.

        Returns:
            Per serving shard, per replica: ``{"address", "ok", "watermark", "skipped",
            "already_skipped"}`` or ``{"address", "ok": False, "error"}``.
        """
        request = pb.SkipPacketRequest(shard=shard, num_shards=num_shards, seq=seq)
        calls = [
            [(r.address, r.stubs["service"].SkipPacket.future(request, timeout=self.timeout)) for r in rs.snapshot()]
            for rs in self.replica_sets
        ]
        out = []
        for replicas in calls:
            answers = []
            for address, future in replicas:
                try:
                    r = future.result()
                except grpc.RpcError as exc:
                    answers.append({"address": address, "ok": False, "error": f"{exc.code().name}: {exc.details()}"})
                    continue
                answers.append(
                    {
                        "address": address,
                        "ok": True,
                        "watermark": r.watermark,
                        "skipped": list(r.skipped),
                        "already_skipped": r.already_skipped,
                    }
                )
            out.append(answers)
        return out

    def dump(self, directory: str, storage_options: Mapping[str, Any] | None = None) -> None:
        """Every shard's rows from one replica each (replicas hold the same rows). Each server
        writes its files with its own global config's storage options; ``storage_options`` open
        ``directory`` for the manifest this client writes (None: the defaults)."""
        request = pb.DumpRequest(directory=directory)
        calls = [
            (
                s,
                self._start(
                    s, lambda r, t: r.stubs["service"].Dump.future(request, timeout=None), timeout=float("inf")
                ),
            )
            for s in range(self.num_shards)
        ]
        files, rows, watermark = [], 0, {}
        for s, call in calls:
            response = call.result()
            files += list(response.files)
            rows += response.rows
            if response.HasField("watermark"):
                watermark[str(s)] = response.watermark
        optimizer = json.loads(self._read("Info", 0, pb.InfoRequest()).optimizer_json)
        checkpoint.write_manifest(
            directory, self.num_shards, files, rows, self.config.to_dict(), optimizer, watermark, storage_options
        )

    def load(self, directory: str) -> None:
        """Every replica of every shard loads the checkpoint (no deadline)."""
        for s in range(self.num_shards):
            self._broadcast("Load", s, pb.LoadRequest(directory=directory), timeout=None)


class _ShardCall:
    """One request to one shard, moved to the shard's next replica when one fails.

    Args:
        client: the client whose replicas are used.
        shard: the shard asked.
        send: starts the request on a replica with a timeout (seconds or None); returns its future.
        deadline: ``time.monotonic()`` after which no replica is tried any more.
    """

    def __init__(
        self,
        client: RemoteEmbeddingClient,
        shard: int,
        send: Callable[[Replica, float | None], grpc.Future],
        deadline: float,
    ):
        self.client = client
        self.shard = shard
        self.replica_set = client.replica_sets[shard]
        self.send = send
        self.deadline = deadline
        self.replica: Replica | None = None
        self.future: grpc.Future | None = None
        self._next = iter(self.replica_set.candidates())
        self._failures: list[str] = []

    def start(self) -> _ShardCall:
        if not self._try_next():
            raise self._unavailable()
        return self

    @property
    def address(self) -> str:
        """The address of the replica the request was last sent to (after :meth:`result`: the
        one that answered)."""
        return self.replica.address if self.replica is not None else "(not started)"

    def result(self) -> Any:
        """The first successful answer.

        Raises:
            InvalidRequestError: the replica refused the request (not retried).
            ShardUnavailableError: every replica failed, or the deadline passed.
        """
        while True:
            replica, future = self.replica, self.future
            if replica is None or future is None:
                raise RuntimeError("_ShardCall.result() called before start()")
            try:
                return future.result()
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
                if code not in RETRYABLE:
                    if code == grpc.StatusCode.INVALID_ARGUMENT:
                        raise InvalidRequestError(details) from None
                    raise ShardUnavailableError(
                        f"embedding shard {self.shard} ({replica.address}): {code.name}: {details}"
                    ) from None
                reason = f"{code.name}: {details}"
                self._failures.append(f"{replica.address}: {reason}")
                if code in MARKS_DOWN:
                    self.replica_set.mark_down(replica, reason)
                if not self._try_next():
                    raise self._unavailable() from None

    def _try_next(self) -> bool:
        """Send to the next candidate replica while time is left; False when none is left."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return False
        replica = next(self._next, None)
        while replica is not None and replica.retired_at is not None:  # dropped by discovery meanwhile
            replica = next(self._next, None)
        if replica is None:
            return False
        timeout = min(remaining, self.client._attempt_timeout(self.shard))
        self.replica = replica
        self.replica_set.started(replica)
        self.future = self.send(replica, None if timeout == float("inf") else timeout)
        self.future.add_done_callback(lambda _: self.replica_set.finished(replica))
        return True

    def _unavailable(self) -> ShardUnavailableError:
        tried = "; ".join(self._failures) or "no replica could be tried"
        return ShardUnavailableError(
            f"embedding shard {self.shard} unavailable: {tried} (replicas: {self.replica_set.describe()})"
        )


class _Completed:
    """A finished call with the interface :class:`_ShardCall` uses of a ``grpc.Future``."""

    def __init__(self, value: Any = None, error: grpc.RpcError | None = None):
        self._value, self._error = value, error

    @classmethod
    def call(cls, method: Any, request: Any, timeout: float | None) -> _Completed:
        try:
            return cls(method(request, timeout=timeout))
        except grpc.RpcError as exc:
            return cls(error=exc)

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def add_done_callback(self, fn: Callable[[_Completed], None]) -> None:
        fn(self)


def hotload_dict(message) -> dict:
    """A ``HotloadStats`` message as the dict :meth:`ModelRootFollower.stats` returns."""
    out = {field.name: _plain(getattr(message, field.name)) for field in message.DESCRIPTOR.fields}
    out["streams"] = [
        {field.name: _plain(getattr(s, field.name)) for field in s.DESCRIPTOR.fields} for s in message.streams
    ]
    out["quarantined"] = list(message.quarantined)
    out["foreign_runs"] = list(message.foreign_runs)
    return out


def _plain(value: Any) -> Any:
    """A repeated scalar protobuf field as a list (JSON-serialisable); other values as they are."""
    return value if isinstance(value, (str, bytes, int, float, bool)) or hasattr(value, "DESCRIPTOR") else list(value)
