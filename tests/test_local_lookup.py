"""Lookups over an embedding server's local Unix socket: found through Info, the same answers as
gRPC, private, refusing strangers and bad frames, and falling back to gRPC when it breaks."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import time

import grpc
import numpy as np
import pytest

from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import ConfigError, InvalidRequestError, ShardUnavailableError
from embedding_server.rpc import wire
from embedding_server.rpc.launcher import ServerGroup
from embedding_server.rpc.local_lookup import (
    HEADER,
    HELLO,
    LOOKUP,
    MAGIC,
    LocalLookupChannel,
    LocalRpcError,
    read_frame,
    send_frame,
)
from embedding_server.rpc.remote import RemoteEmbeddingClient
from embedding_server.rpc.security import ClientSecurity, ServerSecurity
from embedding_server.rpc.service import start_server
from protos.embedding import pb

TOKEN = "local-lookup-test-token-0123456789"


@pytest.fixture(scope="module")
def two_shards(server_configs, tmp_path_factory):
    with ServerGroup.start(*server_configs, num_shards=2, workdir=tmp_path_factory.mktemp("srv")) as group:
        yield group


@pytest.fixture()
def in_process_server(server_configs, tmp_path):
    """A server in this process with its socket at a known path (stopped after the test)."""
    server = start_server(
        EmbeddingConfig.load(server_configs[0]),
        GlobalConfig.load(server_configs[1]),
        local_socket=str(tmp_path / "s.sock"),
    )
    yield server
    server.stop(grace=0)


def info_of(client: RemoteEmbeddingClient, shard: int = 0):
    return client.replica_sets[shard].replicas[0].stubs["service"].Info(pb.InfoRequest(), timeout=10)


def request_bytes(ids, tables) -> bytes:
    return wire.encode_lookup_request(np.asarray(ids, "<u8"), np.asarray(tables, "<u2"))


@pytest.mark.process
def test_local_and_grpc_lookups_give_bit_identical_answers_on_two_shards(server_configs, two_shards, lookup_checks):
    emb = EmbeddingConfig.load(server_configs[0])
    rng = np.random.default_rng(3)
    with (
        RemoteEmbeddingClient(emb, two_shards.addresses) as local,
        RemoteEmbeddingClient(emb, two_shards.addresses, local_lookups=False) as remote,
    ):
        assert [r["transport"] for rs in local.replica_states() for r in rs] == ["local", "local"]
        assert [r["transport"] for rs in remote.replica_states() for r in rs] == ["grpc", "grpc"]

        def lookups_served() -> int:
            return sum(m["requests"] for s in remote.stats() for m in s["methods"] if m["method"] == "Lookup")

        batches = [lookup_checks.random_batch(rng) for _ in range(3)]
        start = lookups_served()
        over_grpc = [remote.lookup(batch) for batch in batches]
        middle = lookups_served()
        for batch, expected in zip(batches, over_grpc):
            lookup_checks.assert_same(expected, local.lookup(batch))
        # the servers count the socket's lookups as they count gRPC ones: per batch, one per
        # embedding dim (8 and 4) per shard
        assert lookups_served() - middle == middle - start == 3 * 2 * 2


@pytest.mark.unit
def test_info_reports_a_private_socket_that_disappears_when_the_server_stops(server_configs, tmp_path):
    emb, glob = EmbeddingConfig.load(server_configs[0]), GlobalConfig.load(server_configs[1])
    server = start_server(emb, glob)  # the "auto" path
    try:
        path = server.local.path
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        with RemoteEmbeddingClient(emb, [server.address]) as client:
            info = info_of(client)
            assert (info.local_socket, info.instance_id) == (path, server.local.instance_id)
    finally:
        server.stop(grace=0)
    assert not os.path.exists(path)


@pytest.mark.unit
def test_a_socket_of_another_server_instance_or_a_wrong_token_is_not_used(server_configs, tmp_path):
    emb, glob = EmbeddingConfig.load(server_configs[0]), GlobalConfig.load(server_configs[1])
    server = start_server(emb, glob, local_socket=str(tmp_path / "t.sock"), security=ServerSecurity(token=TOKEN))
    try:
        path, instance = server.local.path, server.local.instance_id
        channel, problem = LocalLookupChannel.attach(path, "0" * 32, TOKEN)
        assert channel is None and "another server instance" in problem
        channel, problem = LocalLookupChannel.attach(path, instance, "wrong-token-wrong-token-wrong-token")
        assert channel is None and "wrong token" in problem
        channel, problem = LocalLookupChannel.attach(path, instance, None)
        assert channel is None and "missing or wrong token" in problem
        channel, problem = LocalLookupChannel.attach(str(tmp_path / "absent.sock"), instance, TOKEN)
        assert channel is None and "No such file" in problem
        with RemoteEmbeddingClient(emb, [server.address], security=ClientSecurity(token=TOKEN)) as client:
            assert client.replica_states()[0][0]["transport"] == "local"  # the right token attaches
            assert client.lookup_rows(np.array([1, 2], np.uint64), np.zeros(2, np.uint16), 8).shape == (2, 8)
    finally:
        server.stop(grace=0)


@pytest.mark.unit
@pytest.mark.parametrize(
    "body, message",
    [
        (b"\x0a\x05abc", "malformed LookupRequest"),
        (request_bytes([1, 2, 3], [0, 0]), "'ids' has 3 entries but 'tables' has 2"),
        (request_bytes([], []), "empty request"),
        (request_bytes([1, 2], [0, 9]), "table index 9 out of range"),
        (request_bytes([1, 2], [0, 2]), "tables of one dim"),
    ],
)
def test_a_bad_lookup_on_the_socket_is_invalid_argument_and_the_connection_keeps_serving(
    in_process_server, body, message
):
    channel, problem = LocalLookupChannel.attach(
        in_process_server.local.path, in_process_server.local.instance_id, None
    )
    assert channel is not None, problem
    with pytest.raises(LocalRpcError) as err:
        channel(body, timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    dim, values = wire.decode_lookup_response(channel(request_bytes([4, 5], [0, 0]), timeout=10))
    assert dim == 8 and values.shape == (16,)
    channel.close()


@pytest.mark.unit
def test_frames_that_break_the_protocol_end_only_their_own_connection(in_process_server):
    path, instance = in_process_server.local.path, in_process_server.local.instance_id

    def connect() -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(10)
        conn.connect(path)
        return conn

    def assert_closed(conn: socket.socket) -> None:
        try:  # unread bytes make the close a reset
            assert read_frame(conn, 1 << 20) is None
        except ConnectionResetError:
            pass

    with connect() as conn:  # not this protocol at all: closed without a reply
        conn.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert_closed(conn)
    with connect() as conn:  # a lookup before HELLO
        send_frame(conn, LOOKUP, request_bytes([1], [0]))
        status, body = read_frame(conn, 1 << 20)
        assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == status and b"HELLO" in bytes(body)
    with connect() as conn:  # a frame over max_request_bytes is refused before it is read
        send_frame(conn, HELLO, b"")
        assert bytes(read_frame(conn, 1 << 20)[1]).decode() == instance
        conn.sendall(HEADER.pack(MAGIC, LOOKUP, 1 << 31))
        status, body = read_frame(conn, 1 << 20)
        assert status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and b"over the limit" in bytes(body)
        assert_closed(conn)
    with connect() as conn:  # cut mid-frame
        send_frame(conn, HELLO, b"")
        read_frame(conn, 1 << 20)
        conn.sendall(HEADER.pack(MAGIC, LOOKUP, 100) + b"\x0a")
    channel, problem = LocalLookupChannel.attach(path, instance, None)  # the server still serves
    assert channel is not None, problem
    assert wire.decode_lookup_response(channel(request_bytes([7], [1]), timeout=10))[0] == 8
    channel.close()


@pytest.mark.unit
def test_connections_over_the_cap_are_refused_cleanly_and_idle_ones_are_closed(server_configs, tmp_path, wait_until):
    emb, glob = EmbeddingConfig.load(server_configs[0]), GlobalConfig.load(server_configs[1])
    limits = {"local_socket_max_connections": 2, "local_socket_idle_timeout_s": 0.5}
    glob = dataclasses.replace(glob, embedding_parameter_server_config=dataclasses.replace(glob.server, **limits))
    server = start_server(emb, glob, local_socket=str(tmp_path / "cap.sock"))
    path, instance = server.local.path, server.local.instance_id
    try:
        first, problem = LocalLookupChannel.attach(path, instance, None)  # each keeps its connection open
        assert first is not None, problem
        second, problem = LocalLookupChannel.attach(path, instance, None)
        assert second is not None, problem
        # A third connection gets RESOURCE_EXHAUSTED naming the key as soon as it is accepted,
        # then the connection ends.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(path)
            status, body = read_frame(conn, 1 << 20)
            assert status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "2 connections at once (local_socket_max_connections)" in bytes(body).decode()
            assert read_frame(conn, 1 << 20) is None
        third, problem = LocalLookupChannel.attach(path, instance, None)
        assert third is None and "local_socket_max_connections" in problem  # its client keeps gRPC
        with RemoteEmbeddingClient(emb, [server.address]) as client:
            assert client.replica_states()[0][0]["transport"] == "grpc"
            assert client.lookup_rows(np.array([1, 2], np.uint64), np.zeros(2, np.uint16), 8).shape == (2, 8)
        # Idle connections are closed after local_socket_idle_timeout_s; a channel whose pooled
        # connection was closed so sends its next lookup on a fresh one without an error.
        wait_until(lambda: server.local.connections == 0, 10, "idle connections to be closed")
        assert wire.decode_lookup_response(first(request_bytes([4, 5], [0, 0]), timeout=10))[0] == 8
        assert server.local.connections == 1
        first.close()
        second.close()
    finally:
        server.stop(grace=0)


@pytest.mark.unit
def test_the_socket_path_must_not_be_a_live_socket_or_another_file_and_a_stale_one_is_replaced(
    server_configs, in_process_server, tmp_path
):
    emb, glob = EmbeddingConfig.load(server_configs[0]), GlobalConfig.load(server_configs[1])
    with pytest.raises(ConfigError, match="in use by another server"):
        start_server(emb, glob, local_socket=in_process_server.local.path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        start_server(emb, glob, local_socket=str(tmp_path / "file"))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))  # bound, never listening: what a killed server leaves
    stale.close()
    server = start_server(emb, glob, local_socket=str(tmp_path / "stale.sock"))
    try:
        assert LocalLookupChannel.attach(server.local.path, server.local.instance_id, None)[0] is not None
    finally:
        server.stop(grace=0)
    with pytest.raises(ConfigError, match="longer than 107 bytes"):
        start_server(emb, glob, local_socket=str(tmp_path / ("x" * 120)))


@pytest.mark.process
def test_a_client_falls_back_to_grpc_when_the_socket_goes_and_reattaches_after_a_restart(server_configs, tmp_path):
    emb = EmbeddingConfig.load(server_configs[0])
    ids, tables = np.arange(1, 9, dtype=np.uint64), np.zeros(8, np.uint16)
    with (
        ServerGroup.start(*server_configs, num_shards=1, workdir=tmp_path / "srv") as group,
        RemoteEmbeddingClient(emb, group.addresses, timeout=10, probe_interval=0.1) as client,
    ):
        expected = client.lookup_rows(ids, tables, 8).copy()
        old_socket = info_of(client).local_socket
        group.kill(0)
        group.restart(0)
        # the pooled connection is dead: this lookup falls back to gRPC (or to the restarted
        # server after the prober saw it) and never fails
        deadline = time.monotonic() + 30
        while True:
            try:
                got = client.lookup_rows(ids, tables, 8)
                break
            except ShardUnavailableError:  # until the prober has seen the restarted server
                assert time.monotonic() < deadline, "no lookup succeeded after the restart"
        # train mode: the restarted (empty) server initialises the ids from (seed, table, id) again
        np.testing.assert_array_equal(got, expected)
        new_socket = info_of(client).local_socket
        assert new_socket != old_socket
        while client.replica_states()[0][0]["transport"] != "local":  # the prober re-attaches
            assert time.monotonic() < deadline, f"still on gRPC: {client.replica_states()}"
            client.lookup_rows(ids, tables, 8)
            time.sleep(0.05)
        assert client.replica_sets[0].replicas[0].local.path == new_socket


@pytest.mark.process
def test_invalid_requests_raise_the_same_error_over_both_transports(server_configs, two_shards):
    emb = EmbeddingConfig.load(server_configs[0])
    for local in (True, False):
        with RemoteEmbeddingClient(emb, two_shards.addresses, local_lookups=local) as client:
            with pytest.raises(InvalidRequestError, match="table index 9 out of range"):
                client.lookup_rows(np.array([1], np.uint64), np.array([9], np.uint16), 8)


@pytest.mark.unit
@pytest.mark.parametrize("keys, dim", [(1, 4), (1514, 16), (3, 1000), (100_000, 16)])
def test_lookup_responses_put_aligned_rows_that_any_protobuf_parser_reads(keys, dim):
    message, values = wire.lookup_response(keys, dim)
    values[:] = np.arange(keys * dim, dtype=np.float32).reshape(keys, dim)
    parsed = pb.LookupResponse.FromString(message)  # the generated parser skips the padding
    assert parsed.dim == dim and np.array_equal(np.frombuffer(parsed.values, np.float32), values.ravel())
    got_dim, got = wire.decode_lookup_response(message)
    assert got_dim == dim and np.array_equal(got, values.ravel())
    # the rows start 16-byte aligned in the message, so in the sender's and the reader's buffers
    assert (got.ctypes.data - np.frombuffer(message, np.uint8).ctypes.data) % wire.VALUES_ALIGN == 0
    assert values.ctypes.data % wire.VALUES_ALIGN == 0 and got.ctypes.data % wire.VALUES_ALIGN == 0


@pytest.mark.process
def test_reads_prefer_the_replica_on_this_machine_when_none_is_busier(server_configs, tmp_path):
    emb = EmbeddingConfig.load(server_configs[0])
    with (
        ServerGroup.start(
            *server_configs,
            num_shards=1,
            workdir=tmp_path / "remote",
            mode="infer",
            extra_args=["--local-socket", "off"],
        ) as remote_like,
        ServerGroup.start(*server_configs, num_shards=1, workdir=tmp_path / "local", mode="infer") as local,
    ):
        addresses = [[remote_like.addresses[0], local.addresses[0]]]
        with RemoteEmbeddingClient(emb, addresses) as client:
            assert [r["transport"] for r in client.replica_states()[0]] == ["grpc", "local"]
            for _ in range(10):  # one at a time: no replica is ever busier
                client.lookup_rows(np.array([1, 2], np.uint64), np.zeros(2, np.uint16), 8)

        def lookups_served(address: str) -> int:
            with RemoteEmbeddingClient(emb, [address], local_lookups=False) as one:
                return sum(m["requests"] for m in one.stats()[0]["methods"] if m["method"] == "Lookup")

        assert (lookups_served(remote_like.addresses[0]), lookups_served(local.addresses[0])) == (0, 10)
