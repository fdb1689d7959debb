"""Client of a set of remote embedding servers, one address per shard.

:class:`RemoteEmbeddingClient` is an :class:`~embedding_server.client.EmbeddingClient`: the same
batching, routing and pooling as in-process, with each shard asked over gRPC, all shards in
parallel. On connect it checks that server ``i`` is shard ``i`` of ``len(addresses)`` and that
its tables match the client's ``embedding_config.yml``.

Example:
    >>> client = RemoteEmbeddingClient(emb_config, ["127.0.0.1:7001", "127.0.0.1:7002"])
    >>> result = client.lookup(features)
"""

from __future__ import annotations

import json
from typing import Sequence

import grpc
import numpy as np

from embedding_server import checkpoint, wire
from embedding_server.client import EmbeddingClient
from embedding_server.config import EmbeddingConfig
from embedding_server.errors import ConfigError, InvalidRequestError, ShardUnavailableError
from embedding_server.optimizers import SparseOptimizer
from embedding_server.security import ClientSecurity, make_channel
from embedding_server.service import CHANNEL_OPTIONS, SERVICE_NAME
from protos.embedding import pb, pb_grpc


class RemoteEmbeddingClient(EmbeddingClient):
    """Embedding lookups against sharded embedding servers.

    Args:
        config: the same ``embedding_config.yml`` the servers run with.
        addresses: ``host:port`` of shard 0, 1, ... in order.
        timeout: seconds allowed per RPC.
        connect_timeout: seconds to wait for every server to answer at construction.
        security: TLS and token settings of secured servers (None: plain text, no token).

    Raises:
        ShardUnavailableError: a server does not answer within ``connect_timeout``.
        ConfigError: a server is another shard than its position says, or has other tables.
    """

    def __init__(self, config: EmbeddingConfig, addresses: Sequence[str], timeout: float = 30.0, connect_timeout: float = 10.0,
                 security: ClientSecurity | None = None):
        super().__init__(config, len(addresses))
        self.addresses = list(addresses)
        self.timeout = timeout
        self.security = security
        self._channels = [make_channel(a, CHANNEL_OPTIONS, security) for a in self.addresses]  # TLS/token when set
        self._stubs = [pb_grpc.EmbeddingServiceStub(c) for c in self._channels]
        # Lookup moves hand-encoded messages (see wire.py): no protobuf copies of the vectors.
        self._raw_lookups = [c.unary_unary(f"/{SERVICE_NAME}/Lookup") for c in self._channels]
        self.infos = [self._call(i, "Info", pb.InfoRequest(), timeout=connect_timeout) for i in range(self.num_shards)]
        for i, info in enumerate(self.infos):
            if (info.shard_index, info.num_shards) != (i, self.num_shards):
                raise ConfigError(
                    f"{self.addresses[i]} is shard {info.shard_index} of {info.num_shards}, but the client lists it "
                    f"as shard {i} of {self.num_shards}; give addresses in shard order"
                )
            if info.config_fingerprint != config.fingerprint():
                raise ConfigError(
                    f"{self.addresses[i]} runs with different tables than this client's embedding_config.yml "
                    f"(fingerprint {info.config_fingerprint} != {config.fingerprint()})"
                )

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "RemoteEmbeddingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def _lookup_shards(self, requests, dim):
        calls = [
            (s, self._raw_lookups[s].future(wire.encode_lookup_request(ids, tables), timeout=self.timeout))
            for s, ids, tables in requests
        ]
        out = []
        for (s, call), (_, ids, _) in zip(calls, requests):
            try:
                got_dim, values = wire.decode_lookup_response(self._result(s, call))
            except ValueError as exc:
                raise ShardUnavailableError(f"{self.addresses[s]}: {exc}") from None
            if got_dim != dim or values.shape[0] != ids.shape[0] * dim:
                raise ShardUnavailableError(
                    f"{self.addresses[s]} answered {values.shape[0]} floats of dim {got_dim} for {ids.shape[0]} ids of dim {dim}"
                )
            out.append(values.reshape(ids.shape[0], dim))
        return out

    def _push_shards(self, requests):
        calls = [
            (s, self._stubs[s].PushGradients.future(
                pb.PushGradientsRequest(
                    ids=wire.encode(ids, wire.IDS), tables=wire.encode(tables, wire.TABLES), grads=wire.encode(grads, wire.VALUES)
                ),
                timeout=self.timeout,
            ))
            for s, ids, tables, grads in requests
        ]
        for s, call in calls:
            self._result(s, call)

    def _call(self, shard: int, method: str, request, timeout: float | None = None):
        future = getattr(self._stubs[shard], method).future(request, timeout=timeout or self.timeout)
        return self._result(shard, future)

    def _result(self, shard: int, future):
        try:
            return future.result()
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequestError(details) from None
            raise ShardUnavailableError(f"embedding server {self.addresses[shard]}: {code.name}: {details}") from None

    # ------------------------------------------------------------------ administration

    def set_optimizer(self, optimizer: SparseOptimizer) -> None:
        request = pb.SetOptimizerRequest(optimizer_json=json.dumps(optimizer.to_dict()))
        for s in range(self.num_shards):
            self._call(s, "SetOptimizer", request)

    def stats(self) -> list[dict]:
        out = []
        for s in range(self.num_shards):
            r = self._call(s, "Stats", pb.StatsRequest())
            out.append(
                {
                    "address": self.addresses[s],
                    "rows": r.rows, "capacity": r.capacity, "hits": r.hits, "misses": r.misses,
                    "evictions": r.evictions, "inserts": r.inserts,
                    "methods": [
                        {"method": m.method, "requests": m.requests, "errors": m.errors,
                         "latency_p50_ms": m.latency_p50_ms, "latency_p99_ms": m.latency_p99_ms}
                        for m in r.methods
                    ],
                    # An infer-mode server following a model root: its watermarks and freshness.
                    "hotload": hotload_dict(r.hotload) if r.HasField("hotload") else None,
                }
            )
            if r.HasField("hotload"):  # {training shard: last packet seq applied}, as handlers report it
                out[-1]["watermark"] = {str(s.shard): s.watermark for s in r.hotload.streams}
        return out

    def dump(self, directory: str) -> None:
        calls = [(s, self._stubs[s].Dump.future(pb.DumpRequest(directory=directory), timeout=None)) for s in range(self.num_shards)]
        files, rows, watermark = [], 0, {}
        for s, call in calls:
            response = self._result(s, call)
            files += list(response.files)
            rows += response.rows
            if response.HasField("watermark"):
                watermark[str(s)] = response.watermark
        optimizer = json.loads(self._call(0, "Info", pb.InfoRequest()).optimizer_json)
        checkpoint.write_manifest(directory, self.num_shards, files, rows, self.config.to_dict(), optimizer, watermark)

    def load(self, directory: str) -> None:
        calls = [(s, self._stubs[s].Load.future(pb.LoadRequest(directory=directory), timeout=None)) for s in range(self.num_shards)]
        for s, call in calls:
            self._result(s, call)


def hotload_dict(message) -> dict:
    """A ``HotloadStats`` message as the dict :meth:`ModelRootFollower.stats` returns."""
    out = {field.name: getattr(message, field.name) for field in message.DESCRIPTOR.fields}
    out["streams"] = [{field.name: getattr(s, field.name) for field in s.DESCRIPTOR.fields} for s in message.streams]
    out["quarantined"] = list(message.quarantined)
    return out
