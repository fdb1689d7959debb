"""Embedding servers over gRPC: as real child processes (answers, errors, health, metrics,
admin, the command line) and, for the request limits of ``global_config.yml``'s
embedding_parameter_server_config, in this process: max_ids_per_request (``INVALID_ARGUMENT``)
and max_request_bytes (gRPC's receive cap: ``RESOURCE_EXHAUSTED``), each refused with a message
naming the limit, and the server answering the next good request as before."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request

import grpc
import numpy as np
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_server.core.batch import SparseFeature
from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import ConfigError, InvalidRequestError
from embedding_server.rpc import wire
from embedding_server.rpc.client import InProcessEmbeddingClient
from embedding_server.rpc.launcher import ServerGroup, ctrserve_command, server_command
from embedding_server.rpc.remote import RemoteEmbeddingClient
from embedding_server.rpc.security import make_channel
from embedding_server.rpc.service import CHANNEL_OPTIONS, SERVICE_NAME, start_server
from protos.embedding import pb, pb_grpc


@pytest.fixture(scope="module")
def two_shards(server_configs, tmp_path_factory):
    with ServerGroup.start(
        *server_configs, num_shards=2, workdir=tmp_path_factory.mktemp("srv2"), metrics=True
    ) as group:
        yield group


@pytest.fixture(scope="module")
def one_shard(server_configs, tmp_path_factory):
    with ServerGroup.start(*server_configs, num_shards=1, workdir=tmp_path_factory.mktemp("srv1")) as group:
        yield group


@pytest.mark.process
def test_in_process_one_server_and_two_shards_give_identical_answers(
    server_configs, one_shard, two_shards, lookup_checks
):
    emb = EmbeddingConfig.load(server_configs[0])
    local = InProcessEmbeddingClient(emb, GlobalConfig.load(server_configs[1]))
    rng = np.random.default_rng(1)
    with (
        RemoteEmbeddingClient(emb, one_shard.addresses) as one,
        RemoteEmbeddingClient(emb, two_shards.addresses) as two,
    ):
        for _ in range(3):
            batch = lookup_checks.random_batch(rng)
            expected = local.lookup(batch)
            lookup_checks.assert_same(expected, one.lookup(batch))
            lookup_checks.assert_same(expected, two.lookup(batch))
        stats = two.stats()
        assert all(s["rows"] > 0 for s in stats)
        assert sum(s["rows"] for s in stats) == local.stats()[0]["rows"]


@pytest.mark.process
def test_gradients_over_grpc_match_in_process_training(server_configs, tmp_path, lookup_checks):
    emb = EmbeddingConfig.load(server_configs[0])
    local = InProcessEmbeddingClient(emb, GlobalConfig.load(server_configs[1]))
    rng = np.random.default_rng(2)
    batches = [lookup_checks.random_batch(rng) for _ in range(4)]
    with (
        ServerGroup.start(*server_configs, num_shards=2, workdir=tmp_path) as group,
        RemoteEmbeddingClient(emb, group.addresses) as remote,
    ):
        for batch in batches:
            for client in (local, remote):
                result = client.lookup(batch, requires_grad=True)
                loss = sum(
                    (v**2).sum() if isinstance(v, torch.Tensor) else (v.values**2).sum()
                    for v in result.embeddings.values()
                )
                loss.backward()
                client.push_gradients(result)
        probe = batches[0]
        lookup_checks.assert_same(local.lookup(probe), remote.lookup(probe))
        before = lookup_checks.random_batch(np.random.default_rng(2))[0]
        # the trained rows differ from their initial values
        fresh = InProcessEmbeddingClient(emb, GlobalConfig.load(server_configs[1])).lookup([before])
        assert not torch.equal(fresh["user"], remote.lookup([before])["user"])


@pytest.mark.process
def test_remote_dump_loads_into_other_shard_count_bit_identically(server_configs, two_shards, tmp_path, lookup_checks):
    emb = EmbeddingConfig.load(server_configs[0])
    rng = np.random.default_rng(3)
    batch = lookup_checks.random_batch(rng)
    with RemoteEmbeddingClient(emb, two_shards.addresses) as remote:
        served = remote.lookup(batch)
        remote.dump(str(tmp_path / "ckpt"))
        total = sum(s["rows"] for s in remote.stats())
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["num_shards"] == 2 and manifest["rows"] == total
    three = InProcessEmbeddingClient(
        emb, GlobalConfig.from_dict({"common_config": {"job_type": "infer"}}), num_shards=3
    )
    three.load(str(tmp_path / "ckpt"))
    assert sum(s["rows"] for s in three.stats()) == total
    lookup_checks.assert_same(served, three.lookup(batch))


def raw_stub(address: str):
    return pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))


@pytest.mark.process
@pytest.mark.parametrize(
    "request_fields, message",
    [
        ({"ids": b"\x01\x02\x03", "tables": b""}, "not a whole number of 8-byte"),
        (
            {"ids": np.arange(3, dtype="<u8").tobytes(), "tables": np.zeros(2, "<u2").tobytes()},
            "'ids' has 3 entries but 'tables' has 2",
        ),
        ({"ids": b"", "tables": b""}, "empty request"),
        (
            {"ids": np.arange(2, dtype="<u8").tobytes(), "tables": np.array([0, 9], "<u2").tobytes()},
            "table index 9 out of range",
        ),
        # tables 0 ("items", dim 8) and 2 ("query", dim 4), in the order of embedding_config.yml
        (
            {"ids": np.arange(2, dtype="<u8").tobytes(), "tables": np.array([0, 2], "<u2").tobytes()},
            "tables of one dim",
        ),
    ],
)
def test_malformed_lookup_is_invalid_argument_and_server_keeps_serving(
    server_configs, one_shard, request_fields, message
):
    assert [(t.index, t.dim) for t in EmbeddingConfig.load(server_configs[0]).tables.values()] == [
        (0, 8),
        (1, 8),
        (2, 4),
    ]
    stub = raw_stub(one_shard.addresses[0])
    with pytest.raises(grpc.RpcError) as err:
        stub.Lookup(pb.LookupRequest(**request_fields), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    ok = stub.Lookup(
        pb.LookupRequest(ids=np.arange(4, dtype="<u8").tobytes(), tables=np.zeros(4, "<u2").tobytes()), timeout=10
    )
    assert ok.dim == 8 and len(ok.values) == 4 * 8 * 4


@pytest.mark.process
def test_gradient_of_wrong_shape_is_refused_and_nothing_is_applied(one_shard):
    stub = raw_stub(one_shard.addresses[0])
    ids = np.array([11, 12], "<u8").tobytes()
    tables = np.zeros(2, "<u2").tobytes()
    before = stub.Lookup(pb.LookupRequest(ids=ids, tables=tables), timeout=10).values
    with pytest.raises(grpc.RpcError) as err:
        stub.PushGradients(
            pb.PushGradientsRequest(ids=ids, tables=tables, grads=np.ones(2 * 7, "<f4").tobytes()), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not match 2 ids of dim 8" in err.value.details()
    assert stub.Lookup(pb.LookupRequest(ids=ids, tables=tables), timeout=10).values == before


@pytest.mark.process
def test_bad_batches_raise_invalid_request_through_the_remote_client(server_configs, one_shard):
    emb = EmbeddingConfig.load(server_configs[0])
    with RemoteEmbeddingClient(emb, one_shard.addresses) as client:
        with pytest.raises(InvalidRequestError, match="unknown feature 'nope'"):
            client.lookup([SparseFeature.from_lists("nope", [[1]])])
        with pytest.raises(InvalidRequestError, match="uint64"):
            client.lookup([SparseFeature.from_lists("user", [np.array([1], np.int64)])])
        # the same connection still serves good requests
        assert client.lookup([SparseFeature.from_lists("user", [[1, 2]])])["user"].shape == (1, 8)


@pytest.mark.process
def test_client_refuses_servers_listed_out_of_shard_order(server_configs, two_shards):
    emb = EmbeddingConfig.load(server_configs[0])
    # Both servers are asked at once; whichever answers first is reported.
    with pytest.raises(
        ConfigError,
        match="is shard (1 of 2, but the client lists it as shard 0|0 of 2, but the client lists it as shard 1)",
    ):
        RemoteEmbeddingClient(emb, list(reversed(two_shards.addresses)))


@pytest.mark.process
def test_client_refuses_servers_with_other_tables(two_shards):
    other = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 8}}})
    with pytest.raises(ConfigError, match="different tables"):
        RemoteEmbeddingClient(other, two_shards.addresses)


@pytest.mark.process
def test_health_stats_and_prometheus_metrics(server_configs, two_shards, lookup_checks):
    emb = EmbeddingConfig.load(server_configs[0])
    with RemoteEmbeddingClient(emb, two_shards.addresses) as client:
        client.lookup(lookup_checks.random_batch(np.random.default_rng(5)))
        stats = client.stats()
    for server, shard_stats in zip(two_shards.servers, stats):
        with grpc.insecure_channel(server.address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        lookups = {m["method"]: m for m in shard_stats["methods"]}["Lookup"]
        assert lookups["requests"] >= 1 and lookups["latency_p99_ms"] >= lookups["latency_p50_ms"] > 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
        rows_line = [line for line in text.splitlines() if line.startswith("ctrserve_embedding_store_rows{")]
        assert rows_line and float(rows_line[0].split()[-1]) == shard_stats["rows"]
        assert 'ctrserve_embedding_requests_total{method="Lookup",shard=' in text


@pytest.mark.process
def test_sigterm_stops_the_server_gracefully(server_configs, tmp_path):
    group = ServerGroup.start(*server_configs, num_shards=1, workdir=tmp_path)
    proc = group.servers[0].process
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "stopped" in group.servers[0].log_path.read_text()


@pytest.mark.process
def test_server_binds_loopback_by_default(one_shard):
    assert one_shard.addresses[0].startswith("127.0.0.1:")


@pytest.mark.process
def test_cli_reports_config_errors_with_file_and_key(tmp_path):
    emb = tmp_path / "emb.yml"
    emb.write_text(yaml.safe_dump({"slots_config": {"user": {"dimm": 8}}}))
    glob = tmp_path / "global.yml"
    glob.write_text("{}")
    proc = subprocess.run(server_command(emb, glob), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert str(emb) in proc.stderr and "slots_config.user.dimm" in proc.stderr and "did you mean 'dim'" in proc.stderr


@pytest.mark.process
def test_cli_help_lists_every_subcommand():
    out = subprocess.run(ctrserve_command("--help"), capture_output=True, text=True, timeout=120).stdout
    for command in ("embedding-server", "embedding-admin", "demo", "config-reference"):
        assert command in out


# --------------------------------------------------------------------------- request limits (a server in this process)


EMB_SERVER = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 4}}})


@pytest.fixture(scope="module")
def limited_server():
    glob = GlobalConfig.from_dict(
        {
            "common_config": {"job_type": "train"},
            "embedding_parameter_server_config": {
                "capacity": 10_000,
                "max_ids_per_request": 100,
                "max_request_bytes": 64 << 10,
            },
        }
    )
    server = start_server(EMB_SERVER, glob, port=0, workers=2)
    channel = make_channel(server.address, CHANNEL_OPTIONS)
    yield channel.unary_unary(f"/{SERVICE_NAME}/Lookup")
    channel.close()
    server.stop(0)


def _lookup(call, n: int):
    return call(wire.encode_lookup_request(np.arange(n, dtype=np.uint64), np.zeros(n, np.uint16)), timeout=10)


@pytest.mark.unit
def test_server_max_ids_per_request_is_invalid_argument_and_the_server_keeps_serving(limited_server):
    with pytest.raises(grpc.RpcError) as err:
        _lookup(limited_server, 101)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request carries 101 ids; the limit is 100 (max_ids_per_request)" in err.value.details()
    dim, values = wire.decode_lookup_response(_lookup(limited_server, 100))
    assert dim == 4 and values.shape == (400,)


@pytest.mark.unit
def test_server_max_request_bytes_is_resource_exhausted_and_the_server_keeps_serving(limited_server):
    # 10,000 ids are 100 KB: over the 64 KiB receive cap, refused by gRPC before it is read.
    with pytest.raises(grpc.RpcError) as err:
        _lookup(limited_server, 10_000)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "65536" in err.value.details() and "larger than max" in err.value.details()
    assert wire.decode_lookup_response(_lookup(limited_server, 10))[0] == 4


@pytest.mark.unit
def test_server_limits_are_validated():
    for key in ("max_ids_per_request", "max_request_bytes"):
        with pytest.raises(ConfigError, match=key):
            GlobalConfig.from_dict({"embedding_parameter_server_config": {key: 0}})
