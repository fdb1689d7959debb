"""Embedding servers as real child processes over gRPC: answers, errors, health, metrics, admin."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
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
from embedding_server.rpc.client import InProcessEmbeddingClient
from embedding_server.rpc.launcher import ServerGroup
from embedding_server.rpc.remote import RemoteEmbeddingClient
from embedding_server.rpc.service import CHANNEL_OPTIONS
from protos.embedding import pb, pb_grpc

EMB = {
    "slots_config": {
        "user": {"dim": 8},
        "item": {"dim": 8, "sqrt_scaling": True},
        "history": {"dim": 8, "embedding_summation": False, "sample_fixed_size": 4},
        "query": {"dim": 4, "mean_scaling": True},
    },
    "feature_groups": {"items": ["item", "history"]},
}
GLOBAL = {
    "embedding_parameter_server_config": {"capacity": 50_000},
    "sparse_optimizer": {"type": "adagrad", "lr": 0.05},
}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    (d / "emb.yml").write_text(yaml.safe_dump(EMB, sort_keys=False))
    (d / "global.yml").write_text(yaml.safe_dump(GLOBAL))
    return d / "emb.yml", d / "global.yml"


@pytest.fixture(scope="module")
def two_shards(configs, tmp_path_factory):
    with ServerGroup.start(*configs, num_shards=2, workdir=tmp_path_factory.mktemp("srv2"), metrics=True) as group:
        yield group


@pytest.fixture(scope="module")
def one_shard(configs, tmp_path_factory):
    with ServerGroup.start(*configs, num_shards=1, workdir=tmp_path_factory.mktemp("srv1")) as group:
        yield group


def random_batch(rng: np.random.Generator, batch: int = 32) -> list[SparseFeature]:
    def lists(high, max_len):
        return [rng.integers(0, high, rng.integers(0, max_len + 1)).astype(np.uint64) for _ in range(batch)]

    return [
        SparseFeature.from_lists("user", lists(2**63, 3)),
        SparseFeature.from_lists("item", lists(500, 5)),
        SparseFeature.from_lists("history", lists(500, 6)),
        SparseFeature.from_lists("query", lists(1000, 4)),
    ]


def assert_same(a, b):
    for name, value in a.embeddings.items():
        other = b.embeddings[name]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        else:
            assert torch.equal(value.values, other.values) and torch.equal(value.mask, other.mask), name


def test_in_process_one_server_and_two_shards_give_identical_answers(configs, one_shard, two_shards):
    emb = EmbeddingConfig.load(configs[0])
    local = InProcessEmbeddingClient(emb, GlobalConfig.load(configs[1]))
    rng = np.random.default_rng(1)
    with (
        RemoteEmbeddingClient(emb, one_shard.addresses) as one,
        RemoteEmbeddingClient(emb, two_shards.addresses) as two,
    ):
        for _ in range(3):
            batch = random_batch(rng)
            expected = local.lookup(batch)
            assert_same(expected, one.lookup(batch))
            assert_same(expected, two.lookup(batch))
        stats = two.stats()
        assert all(s["rows"] > 0 for s in stats)
        assert sum(s["rows"] for s in stats) == local.stats()[0]["rows"]


def test_gradients_over_grpc_match_in_process_training(configs, tmp_path):
    emb = EmbeddingConfig.load(configs[0])
    local = InProcessEmbeddingClient(emb, GlobalConfig.load(configs[1]))
    rng = np.random.default_rng(2)
    batches = [random_batch(rng) for _ in range(4)]
    with (
        ServerGroup.start(*configs, num_shards=2, workdir=tmp_path) as group,
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
        assert_same(local.lookup(probe), remote.lookup(probe))
        before = random_batch(np.random.default_rng(2))[0]
        # the trained rows differ from their initial values
        fresh = InProcessEmbeddingClient(emb, GlobalConfig.load(configs[1])).lookup([before])
        assert not torch.equal(fresh["user"], remote.lookup([before])["user"])


def test_remote_dump_loads_into_other_shard_count_bit_identically(configs, two_shards, tmp_path):
    emb = EmbeddingConfig.load(configs[0])
    rng = np.random.default_rng(3)
    batch = random_batch(rng)
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
    assert_same(served, three.lookup(batch))


def raw_stub(address: str):
    return pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))


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
def test_malformed_lookup_is_invalid_argument_and_server_keeps_serving(configs, one_shard, request_fields, message):
    assert [(t.index, t.dim) for t in EmbeddingConfig.load(configs[0]).tables.values()] == [(0, 8), (1, 8), (2, 4)]
    stub = raw_stub(one_shard.addresses[0])
    with pytest.raises(grpc.RpcError) as err:
        stub.Lookup(pb.LookupRequest(**request_fields), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    ok = stub.Lookup(
        pb.LookupRequest(ids=np.arange(4, dtype="<u8").tobytes(), tables=np.zeros(4, "<u2").tobytes()), timeout=10
    )
    assert ok.dim == 8 and len(ok.values) == 4 * 8 * 4


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


def test_bad_batches_raise_invalid_request_through_the_remote_client(configs, one_shard):
    emb = EmbeddingConfig.load(configs[0])
    with RemoteEmbeddingClient(emb, one_shard.addresses) as client:
        with pytest.raises(InvalidRequestError, match="unknown feature 'nope'"):
            client.lookup([SparseFeature.from_lists("nope", [[1]])])
        with pytest.raises(InvalidRequestError, match="uint64"):
            client.lookup([SparseFeature.from_lists("user", [np.array([1], np.int64)])])
        # the same connection still serves good requests
        assert client.lookup([SparseFeature.from_lists("user", [[1, 2]])])["user"].shape == (1, 8)


def test_client_refuses_servers_listed_out_of_shard_order(configs, two_shards):
    emb = EmbeddingConfig.load(configs[0])
    # Both servers are asked at once; whichever answers first is reported.
    with pytest.raises(
        ConfigError,
        match="is shard (1 of 2, but the client lists it as shard 0|0 of 2, but the client lists it as shard 1)",
    ):
        RemoteEmbeddingClient(emb, list(reversed(two_shards.addresses)))


def test_client_refuses_servers_with_other_tables(two_shards):
    other = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 8}}})
    with pytest.raises(ConfigError, match="different tables"):
        RemoteEmbeddingClient(other, two_shards.addresses)


def test_health_stats_and_prometheus_metrics(configs, two_shards):
    emb = EmbeddingConfig.load(configs[0])
    with RemoteEmbeddingClient(emb, two_shards.addresses) as client:
        client.lookup(random_batch(np.random.default_rng(5)))
        stats = client.stats()
    for server, shard_stats in zip(two_shards.servers, stats):
        with grpc.insecure_channel(server.address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        lookups = {m["method"]: m for m in shard_stats["methods"]}["Lookup"]
        assert lookups["requests"] >= 1 and lookups["latency_p99_ms"] >= lookups["latency_p50_ms"] > 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
        rows_line = [l for l in text.splitlines() if l.startswith("ctrserve_embedding_store_rows{")]
        assert rows_line and float(rows_line[0].split()[-1]) == shard_stats["rows"]
        assert 'ctrserve_embedding_requests_total{method="Lookup",shard=' in text


def test_sigterm_stops_the_server_gracefully(configs, tmp_path):
    group = ServerGroup.start(*configs, num_shards=1, workdir=tmp_path)
    proc = group.servers[0].process
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "stopped" in group.servers[0].log_path.read_text()


def test_server_binds_loopback_by_default(one_shard):
    assert one_shard.addresses[0].startswith("127.0.0.1:")


def test_cli_reports_config_errors_with_file_and_key(tmp_path):
    emb = tmp_path / "emb.yml"
    emb.write_text(yaml.safe_dump({"slots_config": {"user": {"dimm": 8}}}))
    glob = tmp_path / "global.yml"
    glob.write_text("{}")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctrserve",
            "embedding-server",
            "--embedding-config",
            str(emb),
            "--global-config",
            str(glob),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert str(emb) in proc.stderr and "slots_config.user.dimm" in proc.stderr and "did you mean 'dim'" in proc.stderr


def test_cli_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "ctrserve", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    for command in ("embedding-server", "embedding-admin", "demo", "config-reference"):
        assert command in out
