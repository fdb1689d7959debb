"""What running embedding servers say about themselves: their ``embedding_config.yml`` and shard.

A client that was given no ``embedding_config.yml`` (a bare TorchScript archive without
``model.json``, or PERSIA's ``InferCtx``, which only gets addresses) reads it from the servers'
``Info`` answer (``embedding_config_json``). One answering server is enough to learn the
config: :class:`~embedding_server.rpc.remote.RemoteEmbeddingClient` then checks every replica's
table fingerprint against it when it connects, so servers that disagree are still refused.

Example:
    >>> config = read_embedding_config(["127.0.0.1:7001", "127.0.0.1:7002"], timeout=30.0)
    >>> list(config.slots_config)
    ['C1', 'C2']
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import grpc

from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.errors import ConfigError, ShardUnavailableError
from embedding_server.rpc.replicas import Addresses, normalize_addresses
from embedding_server.rpc.security import ClientSecurity, make_channel
from embedding_server.rpc.service import CHANNEL_OPTIONS
from protos.embedding import pb, pb_grpc

#: Seconds one server is given to answer Info before the next one (or the next try) is asked.
ATTEMPT_S = 2.0


def server_info(address: str, timeout: float, security: ClientSecurity | None = None) -> pb.InfoResponse:
    """The Info answer of the embedding server at ``address``, waiting up to ``timeout`` seconds
    for it to start answering.

    Raises:
        ShardUnavailableError: no answer within ``timeout`` (names the address and the last status).
    """
    channel = make_channel(address, CHANNEL_OPTIONS, security)
    try:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        try:
            return stub.Info(pb.InfoRequest(), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise ShardUnavailableError(
                f"embedding server {address}: no Info answer within {timeout:.1f} s: {exc.code().name}: {exc.details()}"
            ) from None
    finally:
        channel.close()


def served_embedding_config(info: pb.InfoResponse, address: str) -> EmbeddingConfig:
    """The ``embedding_config.yml`` an Info answer carries.

    Raises:
        ConfigError: the server does not report one (a ctrserve older than this field) or it is invalid.
    """
    if not info.embedding_config_json:
        raise ConfigError(
            f"embedding server {address} does not report its embedding config (a ctrserve release older than "
            "Info.embedding_config_json): upgrade it, or archive the model with its model.json (ctrserve archive)"
        )
    try:
        data = json.loads(info.embedding_config_json)
    except ValueError as exc:
        raise ConfigError(f"embedding server {address}: Info.embedding_config_json is not JSON: {exc}") from None
    return EmbeddingConfig.from_dict(data, source=f"embedding config of the server at {address}")


def read_embedding_config(
    addresses: Addresses, timeout: float = 30.0, security: ClientSecurity | None = None
) -> EmbeddingConfig:
    """The ``embedding_config.yml`` the servers at ``addresses`` (shard order, replicas as
    :mod:`~embedding_server.rpc.replicas` writes them) run with, from the first one that answers;
    waits up to ``timeout`` seconds for one.

    Raises:
        ShardUnavailableError: none answered within ``timeout``.
        ConfigError: malformed addresses, or the answering server reports no (or an invalid) config.
    """
    candidates = [address for replicas in normalize_addresses(addresses) for address in replicas]
    deadline = time.monotonic() + timeout
    failures: dict[str, str] = {}
    while True:
        for address in candidates:
            left = deadline - time.monotonic()
            try:
                info = server_info(address, max(0.05, min(ATTEMPT_S, left)), security)
            except ShardUnavailableError as exc:
                failures[address] = str(exc)
                if time.monotonic() >= deadline:
                    raise ShardUnavailableError(
                        f"no embedding server answered within {timeout:.1f} s: {'; '.join(failures.values())}"
                    ) from None
                continue
            return served_embedding_config(info, address)


def order_by_shard(
    addresses: Sequence[str], timeout: float = 30.0, security: ClientSecurity | None = None
) -> list[str]:
    """``addresses`` (one server each, any order) in shard order, as their Info answers say.

    Raises:
        ShardUnavailableError: a server did not answer within ``timeout``.
        ConfigError: the servers are not shards 0 .. n-1 of one n-shard deployment.
    """
    deadline = time.monotonic() + timeout
    infos = {a: server_info(a, max(0.05, deadline - time.monotonic()), security) for a in addresses}
    counts = {info.num_shards for info in infos.values()}
    indexes = sorted(info.shard_index for info in infos.values())
    if counts != {len(addresses)} or indexes != list(range(len(addresses))):
        described = ", ".join(f"{a} (shard {i.shard_index} of {i.num_shards})" for a, i in infos.items())
        raise ConfigError(
            f"the embedding servers given are not shards 0..{len(addresses) - 1} of one {len(addresses)}-shard "
            f"deployment: {described}"
        )
    return sorted(addresses, key=lambda a: infos[a].shard_index)
