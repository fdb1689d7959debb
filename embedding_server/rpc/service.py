"""The embedding server: one shard's :class:`EmbeddingStore` behind gRPC.

:func:`start_server` binds (127.0.0.1 by default), registers the standard gRPC health service
(``SERVING`` once ready, ``NOT_SERVING`` while stopping; with a model root also the service
:data:`HOTLOAD_HEALTH_SERVICE`, ``NOT_SERVING`` while the follower is stalled) and, optionally, a
Prometheus endpoint.
Bad requests are answered ``INVALID_ARGUMENT`` with a message naming the problem (requests that
are not even valid protobuf too, logged at most once a minute: :mod:`~embedding_server.rpc.guards`);
the server keeps serving. Who may call what, and where Dump and Load may go:
:mod:`~embedding_server.rpc.security`.

Example:
    >>> server = start_server(emb_config, global_config, shard_index=0, num_shards=1, port=0)
    >>> server.address
    '127.0.0.1:40123'
    >>> server.stop()
"""

from __future__ import annotations

import gc
import json
import logging
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import ConfigError, InvalidRequestError
from embedding_server.core.optimizers import optimizer_from_dict
from embedding_server.modelroot import checkpoint
from embedding_server.modelroot.hotload import FollowOptions, ModelRootFollower
from embedding_server.modelroot.incremental import PacketPublisher
from embedding_server.rpc import wire
from embedding_server.rpc.guards import GuardingServer, RateLimitedLog, guard_handlers
from embedding_server.rpc.local_lookup import LocalLookupServer, default_socket_path
from embedding_server.rpc.metrics import ServerMetrics
from embedding_server.rpc.security import AdminRoots, RpcRefusal, ServerSecurity
from embedding_server.storage.base import StorageError
from embedding_server.storage.urls import open_storage
from embedding_server.store.store import EmbeddingStore
from protos.embedding import pb, pb_grpc

log = logging.getLogger("ctrserve.embedding_server")

R = TypeVar("R")

SERVICE_NAME = "ctrserve.embedding.v1.EmbeddingService"
#: Health service of a server that follows a model root: SERVING while the follower makes
#: progress, NOT_SERVING while it is stalled (ModelRootFollower.stall_reason). The overall health
#: ("") stays SERVING meanwhile: lookups still answer, from the last state applied.
HOTLOAD_HEALTH_SERVICE = "ctrserve.embedding.v1.Hotload"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
]


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    """RPC handlers; each validates, runs against the store and records metrics."""

    def __init__(self, store: EmbeddingStore, metrics: ServerMetrics, publisher: PacketPublisher | None = None):
        self.store = store
        self.metrics = metrics
        self.publisher = publisher
        self.follower: ModelRootFollower | None = None  # infer mode with a model root (set by start_server)
        self.local: LocalLookupServer | None = None  # the local lookup socket (set by start_server)
        self.admin_roots = AdminRoots()  # where Dump and Load may go (set by start_server); none: nowhere

    def answer(self, method: str, fn: Callable[[], R], keys: int = 0) -> tuple[grpc.StatusCode, R | str]:
        """``(OK, fn())``, or the status and message (a string) a failure of ``fn`` is answered with; the
        request is counted and timed in the metrics either way. Used by the gRPC methods and
        by the local socket (:mod:`~embedding_server.rpc.local_lookup`)."""
        try:
            with self.metrics.track(method, keys):
                return grpc.StatusCode.OK, fn()
        except (InvalidRequestError, ConfigError, StorageError) as exc:
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except RpcRefusal as exc:
            return exc.code, str(exc)
        except Exception as exc:  # a bug, not a bad request: log it with its traceback
            log.exception("%s failed", method)
            return grpc.StatusCode.INTERNAL, f"{method} failed: {type(exc).__name__}: {exc}"

    def _call(self, method: str, context: grpc.ServicerContext, fn: Callable[[], object], keys: int = 0):
        status, result = self.answer(method, fn, keys)
        if status is not grpc.StatusCode.OK:
            context.abort(status, str(result))
        return result

    def lookup_message(self, ids: bytes | memoryview, tables: bytes | memoryview, insert: bool = True) -> bytes:
        """The serialized LookupResponse of one request's raw ids and tables: the store gathers
        the vectors straight into the bytes that are sent (see :mod:`wire`). ``insert=False``
        (the request's ``no_insert``): a train-mode store answers zeros for unseen keys without
        inserting them.

        Raises:
            InvalidRequestError: malformed buffers or a request the store refuses.
        """
        id_array, table_array = wire.decode_keys(ids, tables)
        message = []

        def response_values(dim: int):
            buffer, values = wire.lookup_response(id_array.shape[0], dim)
            message.append(buffer)
            return values

        self.store.lookup(id_array, table_array, out=response_values, insert=insert)
        return message[0]

    def answer_local(self, request: memoryview) -> tuple[grpc.StatusCode, bytes | str]:
        """Status and LookupResponse bytes (or message) of a serialized LookupRequest that came
        over the local socket (:mod:`~embedding_server.rpc.local_lookup`)."""
        try:
            ids, tables, insert = wire.decode_lookup_request(request)
        except ValueError as exc:
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        return self.answer("Lookup", lambda: self.lookup_message(ids, tables, insert), len(ids) // 8)

    def Lookup(self, request, context):
        """Returns the serialized LookupResponse (see :func:`add_servicer`)."""
        return self._call(
            "Lookup",
            context,
            lambda: self.lookup_message(request.ids, request.tables, not request.no_insert),
            len(request.ids) // 8,
        )

    def _refuse_if_following(self, method: str) -> None:
        """A server that follows a model root takes its rows and optimizer from there alone.

        Raises:
            RpcRefusal: ``FAILED_PRECONDITION`` when this server follows a model root.
        """
        if self.follower is not None:
            raise RpcRefusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{method} refused: this server follows the model root {self.follower.storage.url} and takes its rows "
                "and optimizer from there alone; publish a checkpoint or packets to the model root instead (or send "
                f"{method} to a server started without --model-root)",
            )

    def _admin_path(self, method: str, directory: str) -> str:
        """``directory`` made canonical when it lies inside the admin roots.

        Raises:
            RpcRefusal: ``PERMISSION_DENIED``: no admin roots, or ``directory`` is outside them (the
                message never depends on whether ``directory`` exists).
        """
        roots = self.admin_roots
        if not roots:
            raise RpcRefusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} refused: this server has no admin roots, so Dump and Load are off; start it with "
                "--admin-root DIR|URL (security.admin_roots)",
            )
        resolved = roots.resolve(directory)
        if resolved is None:
            raise RpcRefusal(grpc.StatusCode.PERMISSION_DENIED, _outside_roots(method, directory, roots))
        return resolved

    def PushGradients(self, request, context):
        def run():
            self._refuse_if_following("PushGradients")
            ids, tables = wire.decode_keys(request.ids, request.tables)
            grads = wire.decode_matrix(request.grads, ids.shape[0], "grads")
            self.store.apply_gradients(ids, tables, grads)
            return pb.PushGradientsResponse()

        return self._call("PushGradients", context, run, len(request.ids) // 8)

    def SetOptimizer(self, request, context):
        def run():
            self._refuse_if_following("SetOptimizer")
            try:
                data = json.loads(request.optimizer_json)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"optimizer_json is not valid JSON: {exc}") from None
            self.store.set_optimizer(optimizer_from_dict(data, "SetOptimizer"))
            return pb.SetOptimizerResponse()

        return self._call("SetOptimizer", context, run)

    def Info(self, request, context):
        store = self.store
        return pb.InfoResponse(
            shard_index=store.shard_index,
            num_shards=store.num_shards,
            mode=store.mode.value,
            config_fingerprint=store.config.fingerprint(),
            optimizer_json=json.dumps(store.optimizer.to_dict()),
            capacity=store.capacity,
            local_socket=self.local.path if self.local else "",
            instance_id=self.local.instance_id if self.local else "",
            embedding_config_json=json.dumps(store.config.to_dict()),
        )

    def Stats(self, request, context):
        counters = self.store.counters()
        hotload = None
        if self.follower is not None:
            stats = self.follower.stats()
            streams = [pb.PacketStreamState(**s) for s in stats.pop("streams")]
            hotload = pb.HotloadStats(**stats, streams=streams)
        return pb.StatsResponse(
            **counters, methods=[pb.MethodStats(**m) for m in self.metrics.method_stats()], hotload=hotload
        )

    def Dump(self, request, context):
        def run():
            directory = self._admin_path("Dump", request.directory)
            # Publish pending rows first, so the checkpoint includes every packet up to its watermark.
            watermark = self.publisher.flush() if self.publisher is not None else None
            # Written with this server's own storage options (global config ``storage``: file modes too).
            files, rows = checkpoint.dump_shard(self.store, directory, self.store.global_config.server.storage)
            return pb.DumpResponse(rows=rows, files=files, watermark=watermark)

        return self._call("Dump", context, run)

    def Load(self, request, context):
        def run():
            self._refuse_if_following("Load")
            storage = open_storage(self._admin_path("Load", request.directory), self.store.global_config.server.storage)
            try:
                complete = storage.exists(checkpoint.MANIFEST)
            except Exception:  # unreadable is as good as missing here: say nothing more about the path
                complete = False
            if not complete:  # the same answer as for a path outside the roots
                raise RpcRefusal(
                    grpc.StatusCode.PERMISSION_DENIED, _outside_roots("Load", request.directory, self.admin_roots)
                )
            return pb.LoadResponse(rows=checkpoint.load_store(self.store, storage))

        return self._call("Load", context, run)

    def SkipPacket(self, request, context):
        def run():
            if self.follower is None:
                raise InvalidRequestError(
                    "SkipPacket: this server follows no model root (--model-root); nothing skipped"
                )
            if request.num_shards < 1 or request.shard >= request.num_shards:
                raise InvalidRequestError(
                    f"SkipPacket: training shard {request.shard} of {request.num_shards} does not exist; nothing skipped"
                )
            outcome = self.follower.skip_packet(request.shard, request.num_shards, request.seq)
            return pb.SkipPacketResponse(**outcome)

        return self._call("SkipPacket", context, run)


def _outside_roots(method: str, directory: str, roots: AdminRoots) -> str:
    """The one answer to a Dump or Load path outside the admin roots, or (Load) one without a
    checkpoint: it does not tell whether the path exists."""
    what = "a complete checkpoint inside" if method == "Load" else "inside"
    return f"{method} refused: {directory[:1000]!r} is not {what} this server's admin roots ({roots.describe()})"


def add_servicer(servicer: EmbeddingServicer, server: grpc.Server, bad_requests: RateLimitedLog | None = None) -> None:
    """Register the service's methods: the generated (de)serializers for every method but
    Lookup, whose handler returns its response already serialized (see :mod:`wire`). Requests that
    do not decode are answered ``INVALID_ARGUMENT`` and noted in ``bad_requests`` (see
    :func:`~embedding_server.rpc.guards.guard_handler`)."""
    if bad_requests is None:
        bad_requests = RateLimitedLog(log, "undecodable requests")
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=getattr(pb, f"{name}Request").FromString,
            response_serializer=None if name == "Lookup" else getattr(pb, f"{name}Response").SerializeToString,
        )
        for name in pb.DESCRIPTOR.services_by_name["EmbeddingService"].methods_by_name
    }
    handlers = guard_handlers(SERVICE_NAME, handlers, bad_requests)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


@dataclass
class RunningServer:
    """A started embedding server; :meth:`stop` drains in-flight requests."""

    server: grpc.Server
    health: health.HealthServicer
    store: EmbeddingStore
    metrics: ServerMetrics
    host: str
    port: int
    metrics_port: int | None
    publisher: PacketPublisher | None = None
    follower: ModelRootFollower | None = None
    local: LocalLookupServer | None = None
    stall_watch: StallWatch | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking requests, drain those in flight, then publish the pending packet."""
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.stall_watch is not None:
            self.stall_watch.stop()
        if self.local is not None:
            self.local.stop()  # its clients fall back to gRPC, which drains below
        self.server.stop(grace).wait()
        if self.follower is not None:
            self.follower.stop()
        if self.publisher is not None:
            self.publisher.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def start_server(
    config: EmbeddingConfig,
    global_config: GlobalConfig,
    shard_index: int = 0,
    num_shards: int = 1,
    port: int = 0,
    host: str = "127.0.0.1",
    metrics_port: int | None = None,
    workers: int = 8,
    model_root: str | None = None,
    follow_options: FollowOptions | None = None,
    security: ServerSecurity | None = None,
    local_socket: str | None = "auto",
) -> RunningServer:
    """Start serving one shard; returns once the port is bound and health says SERVING.

    Args:
        port: 0 picks a free port (see :attr:`RunningServer.port`).
        metrics_port: serve Prometheus metrics on this port (0 picks one; None disables).
        model_root: infer mode: follow this model root (:mod:`~embedding_server.modelroot.hotload`); the
            server serves only once its newest checkpoint and packets are loaded. Connection
            options of s3:// and hdfs:// roots come from the global config's ``storage`` section.
        follow_options: how to follow ``model_root``.
        security: TLS and token settings; None reads the global config's ``security`` section
            (its token from the file or environment variable it names).
        local_socket: also answer lookups on this Unix socket, for clients on this machine
            (:mod:`~embedding_server.rpc.local_lookup`); "auto" makes a fresh path in a private
            per-user directory, None turns it off.

    Raises:
        ConfigError: the security settings are invalid or a certificate/token file is unreadable.
        RuntimeError: the port could not be bound.
        ValueError: ``model_root`` given to a train-mode server.
        HotloadError: no complete checkpoint under ``model_root`` could be loaded.
    """
    if security is None:
        security = ServerSecurity.from_settings(global_config.security)
    security.check_host(host)
    store = EmbeddingStore(config, global_config, shard_index, num_shards)
    store.warm_up()
    metrics = ServerMetrics({"shard": str(shard_index)}, store.counters)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=server_options(global_config),
        interceptors=security.interceptors(),
        # Calls beyond this (running, queued or still sending their answer) get RESOURCE_EXHAUSTED
        # before their message is read: what bounds the memory of requests in flight.
        maximum_concurrent_rpcs=global_config.server.max_concurrent_rpcs,
    )
    # Train mode with incremental updates: changed rows go out as packets of this shard.
    publisher = PacketPublisher(store).start() if store.tracks_changes else None
    servicer = EmbeddingServicer(store, metrics, publisher)
    servicer.admin_roots = security.roots
    bad_requests = RateLimitedLog(log, "undecodable requests")
    add_servicer(servicer, server, bad_requests)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, GuardingServer(server, bad_requests))
    if local_socket is not None:
        path = default_socket_path(shard_index) if local_socket == "auto" else local_socket
        servicer.local = LocalLookupServer(
            path,
            servicer.answer_local,
            security.local_tokens(),
            global_config.server.max_request_bytes,
            max_connections=global_config.server.local_socket_max_connections,
            idle_timeout_s=global_config.server.local_socket_idle_timeout_s,
        )
    try:
        bound = security.add_port(server, f"{host}:{port}")
    except RuntimeError as exc:
        raise RuntimeError(f"cannot bind {host}:{port}: {exc}") from None
    if bound == 0:
        raise RuntimeError(f"cannot bind {host}:{port}: address in use or not available")
    _warn_if_exposed(host, security)
    follower = None
    if model_root is not None:
        follower = ModelRootFollower(
            store,
            model_root,
            follow_options,
            storage_options=global_config.server.storage,
            registry=metrics.registry,
            labels={"shard": str(shard_index)},
        )
        servicer.follower = follower
        try:
            follower.start().wait_synced()  # the first lookup already sees the newest state
        except BaseException:
            follower.stop()
            raise
    # Everything loaded so far (modules, config, the store's arrays) lives as long as the server:
    # keep it out of the garbage collector's full passes, which would otherwise walk it all with the
    # GIL held every few packets and stall every lookup meanwhile.
    gc.freeze()
    if servicer.local is not None:
        try:
            servicer.local.start()  # before gRPC: a client that reads Info can attach at once
        except ConfigError:
            server.stop(0)
            if follower is not None:
                follower.stop()
            if publisher is not None:
                publisher.close()
            raise
    server.start()
    bound_metrics = None
    if metrics_port is not None:
        bound_metrics = metrics.serve_http(metrics_port, host)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    stall_watch = StallWatch(follower, health_servicer).start() if follower is not None else None
    log.info(
        "embedding server shard %d/%d (%s mode, capacity %d rows) listening on %s:%d (%s)%s%s",
        shard_index,
        num_shards,
        store.mode,
        store.capacity,
        host,
        bound,
        _describe(security),
        f", local lookups on {servicer.local.path}" if servicer.local else "",
        f", metrics on http://{host}:{bound_metrics}/metrics" if bound_metrics else "",
    )
    return RunningServer(
        server,
        health_servicer,
        store,
        metrics,
        host,
        bound,
        bound_metrics,
        publisher,
        follower=follower,
        local=servicer.local,
        stall_watch=stall_watch,
    )


class StallWatch:
    """Keeps the health of :data:`HOTLOAD_HEALTH_SERVICE` equal to whether ``follower`` makes
    progress (:meth:`ModelRootFollower.stall_reason`), from a thread of its own, so that a follower
    stuck in a read or an apply still shows: one WARNING when it stalls, one INFO when it goes on.
    """

    def __init__(self, follower: ModelRootFollower, health_servicer: health.HealthServicer):
        self.follower = follower
        self.health = health_servicer
        self.interval_s = min(1.0, follower.options.stall_timeout_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hotload-stall-watch", daemon=True)

    def start(self) -> StallWatch:
        self.health.set(HOTLOAD_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.health.set(HOTLOAD_HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    def _run(self) -> None:
        stalled = False
        while not self._stop.wait(self.interval_s):
            reason = self.follower.stall_reason()
            if bool(reason) == stalled:
                continue
            stalled = bool(reason)
            status = health_pb2.HealthCheckResponse.NOT_SERVING if stalled else health_pb2.HealthCheckResponse.SERVING
            self.health.set(HOTLOAD_HEALTH_SERVICE, status)
            if stalled:
                log.warning(
                    "following model root %s stalled: %s; health service %s is NOT_SERVING (lookups go on)",
                    self.follower.storage.url,
                    reason,
                    HOTLOAD_HEALTH_SERVICE,
                )
            else:
                log.info(
                    "following model root %s goes on again; health service %s is SERVING",
                    self.follower.storage.url,
                    HOTLOAD_HEALTH_SERVICE,
                )


def server_options(global_config: GlobalConfig) -> list[tuple[str, int]]:
    """gRPC server options: the send cap of :data:`wire.MAX_MESSAGE_BYTES` and the receive cap of
    ``embedding_parameter_server_config.max_request_bytes`` (a larger request is refused with
    ``RESOURCE_EXHAUSTED`` before it is read into memory)."""
    return [
        ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", global_config.server.max_request_bytes),
    ]


def request_memory_bound(config: EmbeddingConfig, global_config: GlobalConfig) -> int:
    """Bytes one request in flight may hold at most: its message twice (gRPC's buffer and the
    bytes handed to Python) plus, per id, the answer's vector twice (the bytes built here and
    gRPC's copy being sent) and the store's working arrays (at most 64 bytes per id, measured).

    The server's resident memory stays under its resident memory when ready plus
    :func:`requests_in_flight` times this (docs/operations.md, Limits)."""
    server = global_config.server
    widest = max((table.dim for table in config.tables.values()), default=0)
    return 2 * server.max_request_bytes + server.max_ids_per_request * (8 * widest + 64)


def requests_in_flight(global_config: GlobalConfig, local_socket: bool = True) -> int:
    """Most requests a server holds at once: ``max_concurrent_rpcs`` gRPC calls, plus one per
    local-socket connection (each answers one request at a time) when the socket is on."""
    server = global_config.server
    return server.max_concurrent_rpcs + (server.local_socket_max_connections if local_socket else 0)


def _describe(security: ServerSecurity) -> str:
    tls = ("mutual TLS" if security.tls_client_ca_file else "TLS") if security.tls else "plain text"
    admin = {
        "admin token": "admin calls need the admin token",
        "unauthenticated": "admin calls allowed without a token (--allow-unauthenticated-admin)",
        "off": "admin calls off (no admin token)",
    }[security.admin_access]
    roots = f"admin roots {security.roots.describe()}" if security.roots else "no admin roots"
    return f"{tls}, {'read token required' if security.token else 'no read token'}, {admin}, {roots}"


def _warn_if_exposed(host: str, security: ServerSecurity) -> None:
    """Log a warning when a server reachable from other machines runs without TLS or token."""
    if host in ("127.0.0.1", "::1", "localhost") or (security.tls and security.token):
        return
    log.warning(
        "embedding server bound to %s with %s: other machines can reach it; set the global config's "
        "'security' section (TLS certificate and a token file) in production, see deploy/production/",
        host,
        _describe(security),
    )
