"""The embedding server: one shard's :class:`EmbeddingStore` behind gRPC.

:func:`start_server` binds (127.0.0.1 by default), registers the standard gRPC health service
(``SERVING`` once ready, ``NOT_SERVING`` while stopping) and, optionally, a Prometheus endpoint.
Bad requests are answered ``INVALID_ARGUMENT`` with a message naming the problem; the server
keeps serving.

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
from embedding_server.rpc.local_lookup import LocalLookupServer, default_socket_path
from embedding_server.rpc.metrics import ServerMetrics
from embedding_server.rpc.security import ServerSecurity
from embedding_server.storage.base import StorageError
from embedding_server.store.store import EmbeddingStore
from protos.embedding import pb, pb_grpc

log = logging.getLogger("ctrserve.embedding_server")

R = TypeVar("R")

SERVICE_NAME = "ctrserve.embedding.v1.EmbeddingService"
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

    def answer(self, method: str, fn: Callable[[], R], keys: int = 0) -> tuple[grpc.StatusCode, R | str]:
        """``(OK, fn())``, or the status and message (a string) a failure of ``fn`` is answered with; the
        request is counted and timed in the metrics either way. Used by the gRPC methods and
        by the local socket (:mod:`~embedding_server.rpc.local_lookup`)."""
        try:
            with self.metrics.track(method, keys):
                return grpc.StatusCode.OK, fn()
        except (InvalidRequestError, ConfigError, StorageError) as exc:
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except Exception as exc:  # a bug, not a bad request: log it with its traceback
            log.exception("%s failed", method)
            return grpc.StatusCode.INTERNAL, f"{method} failed: {type(exc).__name__}: {exc}"

    def _call(self, method: str, context: grpc.ServicerContext, fn: Callable[[], object], keys: int = 0):
        status, result = self.answer(method, fn, keys)
        if status is not grpc.StatusCode.OK:
            context.abort(status, str(result))
        return result

    def lookup_message(self, ids: bytes | memoryview, tables: bytes | memoryview) -> bytes:
        """The serialized LookupResponse of one request's raw ids and tables: the store gathers
        the vectors straight into the bytes that are sent (see :mod:`wire`).

        Raises:
            InvalidRequestError: malformed buffers or a request the store refuses.
        """
        id_array, table_array = wire.decode_keys(ids, tables)
        message = []

        def response_values(dim: int):
            buffer, values = wire.lookup_response(id_array.shape[0], dim)
            message.append(buffer)
            return values

        self.store.lookup(id_array, table_array, out=response_values)
        return message[0]

    def answer_local(self, request: memoryview) -> tuple[grpc.StatusCode, bytes | str]:
        """Status and LookupResponse bytes (or message) of a serialized LookupRequest that came
        over the local socket (:mod:`~embedding_server.rpc.local_lookup`)."""
        try:
            ids, tables = wire.decode_lookup_request(request)
        except ValueError as exc:
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        return self.answer("Lookup", lambda: self.lookup_message(ids, tables), len(ids) // 8)

    def Lookup(self, request, context):
        """Returns the serialized LookupResponse (see :func:`add_servicer`)."""
        return self._call(
            "Lookup", context, lambda: self.lookup_message(request.ids, request.tables), len(request.ids) // 8
        )

    def PushGradients(self, request, context):
        def run():
            ids, tables = wire.decode_keys(request.ids, request.tables)
            grads = wire.decode_matrix(request.grads, ids.shape[0], "grads")
            self.store.apply_gradients(ids, tables, grads)
            return pb.PushGradientsResponse()

        return self._call("PushGradients", context, run, len(request.ids) // 8)

    def SetOptimizer(self, request, context):
        def run():
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
            # Publish pending rows first, so the checkpoint includes every packet up to its watermark.
            watermark = self.publisher.flush() if self.publisher is not None else None
            files, rows = checkpoint.dump_shard(self.store, request.directory)
            return pb.DumpResponse(rows=rows, files=files, watermark=watermark)

        return self._call("Dump", context, run)

    def Load(self, request, context):
        def run():
            return pb.LoadResponse(rows=checkpoint.load_store(self.store, request.directory))

        return self._call("Load", context, run)


def add_servicer(servicer: EmbeddingServicer, server: grpc.Server) -> None:
    """Register the service's methods: the generated (de)serializers for every method but
    Lookup, whose handler returns its response already serialized (see :mod:`wire`)."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=getattr(pb, f"{name}Request").FromString,
            response_serializer=None if name == "Lookup" else getattr(pb, f"{name}Response").SerializeToString,
        )
        for name in pb.DESCRIPTOR.services_by_name["EmbeddingService"].methods_by_name
    }
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

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking requests, drain those in flight, then publish the pending packet."""
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
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
    store = EmbeddingStore(config, global_config, shard_index, num_shards)
    store.warm_up()
    metrics = ServerMetrics({"shard": str(shard_index)}, store.counters)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=server_options(global_config),
        interceptors=security.interceptors(),
    )
    # Train mode with incremental updates: changed rows go out as packets of this shard.
    publisher = PacketPublisher(store).start() if store.tracks_changes else None
    servicer = EmbeddingServicer(store, metrics, publisher)
    add_servicer(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if local_socket is not None:
        path = default_socket_path(shard_index) if local_socket == "auto" else local_socket
        servicer.local = LocalLookupServer(
            path, servicer.answer_local, security.token, global_config.server.max_request_bytes
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
    )


def server_options(global_config: GlobalConfig) -> list[tuple[str, int]]:
    """gRPC server options: the send cap of :data:`wire.MAX_MESSAGE_BYTES` and the receive cap of
    ``embedding_parameter_server_config.max_request_bytes`` (a larger request is refused with
    ``RESOURCE_EXHAUSTED`` before it is read into memory)."""
    return [
        ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", global_config.server.max_request_bytes),
    ]


def _describe(security: ServerSecurity) -> str:
    tls = ("mutual TLS" if security.tls_client_ca_file else "TLS") if security.tls else "plain text"
    return f"{tls}, {'token required' if security.token else 'no token'}"


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
