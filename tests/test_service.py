"""Embedding servers over gRPC: as real child processes (answers, errors, health, metrics,
admin, the command line) and, for the request limits of ``global_config.yml``'s
embedding_parameter_server_config, in this process: max_ids_per_request (``INVALID_ARGUMENT``)
and max_request_bytes (gRPC's receive cap: ``RESOURCE_EXHAUSTED``), each refused with a message
naming the limit, and the server answering the next good request as before; and the memory
bound of requests in flight (max_concurrent_rpcs) on a child process's peak resident memory."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
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
from embedding_server.rpc.guards import RateLimitedLog
from embedding_server.rpc.launcher import ServerGroup, ctrserve_command, server_command
from embedding_server.rpc.remote import RemoteEmbeddingClient
from embedding_server.rpc.security import ServerSecurity, make_channel
from embedding_server.rpc.service import (
    CHANNEL_OPTIONS,
    SERVICE_NAME,
    request_memory_bound,
    requests_in_flight,
    start_server,
)
from protos.embedding import pb, pb_grpc


@pytest.fixture(scope="module")
def two_shards(server_configs, tmp_path_factory):
    # Admin root: the session's temporary folder, where the tests' tmp_path dumps go.
    with ServerGroup.start(
        *server_configs,
        num_shards=2,
        workdir=tmp_path_factory.mktemp("srv2"),
        metrics=True,
        admin_roots=[tmp_path_factory.getbasetemp()],
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


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident memory) of a process, in KiB, from the kernel."""
    with open(f"/proc/{pid}/status") as status:
        return {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}


@pytest.mark.process
def test_concurrent_max_size_lookups_beyond_max_concurrent_rpcs_are_refused_and_memory_stays_bounded(tmp_path):
    # A server whose every answer can be 64 MB (1M ids x dim 16) taking 2 calls at once, hit by 16
    # at once: the calls over the cap get RESOURCE_EXHAUSTED, and the server's peak resident memory
    # stays under the documented bound (docs/operations.md, Limits): its resident memory when
    # ready plus requests_in_flight x request_memory_bound. Without the cap all 16 are taken and
    # their answers pile up far beyond it.
    ids = 1_000_000
    emb = {"slots_config": {"f": {"dim": 16}}}
    limits = {"capacity": 1000, "max_ids_per_request": ids, "max_request_bytes": 12 << 20, "max_concurrent_rpcs": 2}
    glob = {"common_config": {"job_type": "infer"}, "embedding_parameter_server_config": limits}
    (tmp_path / "emb.yml").write_text(yaml.safe_dump(emb))
    (tmp_path / "glob.yml").write_text(yaml.safe_dump(glob))
    request = wire.encode_lookup_request(np.arange(ids, dtype=np.uint64), np.zeros(ids, np.uint16))
    bound_kib = (
        requests_in_flight(GlobalConfig.from_dict(glob), local_socket=False)
        * request_memory_bound(EmbeddingConfig.from_dict(emb), GlobalConfig.from_dict(glob))
        // 1024
    )
    with ServerGroup.start(
        tmp_path / "emb.yml", tmp_path / "glob.yml", 1, tmp_path / "srv", extra_args=["--local-socket", "off"]
    ) as group:
        pid = group.servers[0].process.pid
        channel = make_channel(group.addresses[0], CHANNEL_OPTIONS)
        lookup = channel.unary_unary(f"/{SERVICE_NAME}/Lookup")
        assert wire.decode_lookup_response(lookup(request, timeout=60))[0] == 16  # warm: first-call allocations
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the resident memory now
        ready_kib = _memory_kib(pid)["VmRSS"]
        codes: list[grpc.StatusCode] = []
        start = threading.Barrier(16)

        def call() -> None:
            start.wait()
            try:
                lookup(request, timeout=120)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                assert "Concurrent RPC limit exceeded" in exc.details(), exc.details()

        threads = [threading.Thread(target=call) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        peak_kib = _memory_kib(pid)["VmHWM"]
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert wire.decode_lookup_response(lookup(request, timeout=60))[0] == 16  # still serving
        channel.close()
    assert peak_kib - ready_kib <= bound_kib, (
        f"peak {peak_kib >> 10} MiB is {(peak_kib - ready_kib) >> 10} MiB over the {ready_kib >> 10} MiB when ready; "
        f"the documented bound allows {bound_kib >> 10} MiB"
    )


# --------------------------------------------------------------------------- requests that are not protobuf

UNDECODABLE = (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x07")  # overlong varint, truncated field, wire type 7


@pytest.mark.unit
def test_undecodable_requests_are_invalid_argument_with_one_rate_limited_log_line(caplog):
    caplog.set_level(logging.INFO)
    security = ServerSecurity(allow_unauthenticated_admin=True)  # admin methods reach their decoder too
    server = start_server(EMB_SERVER, GlobalConfig.from_dict({}), port=0, workers=2, security=security)
    channel = grpc.insecure_channel(server.address)  # raw bytes out and in (no serializers)
    methods = [f"/{SERVICE_NAME}/{m}" for m in pb.DESCRIPTOR.services_by_name["EmbeddingService"].methods_by_name]
    methods.append("/grpc.health.v1.Health/Check")
    try:
        for method in methods:
            call = channel.unary_unary(method)
            for payload in UNDECODABLE * 3:
                with pytest.raises(grpc.RpcError) as refused:
                    call(payload, timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, refused.value.details())
                assert "not a valid" in refused.value.details()
        # A string field that is not UTF-8 does not decode either.
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(f"/{SERVICE_NAME}/Dump")(b"\x0a\x02\xff\xfe", timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Still serving, and the decoded requests still work.
        info = pb_grpc.EmbeddingServiceStub(channel).Info(pb.InfoRequest(), timeout=10)
        assert info.num_shards == 1
    finally:
        channel.close()
        server.stop(0)
    # One WARNING for all of them (the next would come a minute later with the count); no traceback.
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "undecodable" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert not any(r.exc_info for r in caplog.records)
    assert not any("deserializ" in r.getMessage() for r in caplog.records)


@pytest.mark.unit
def test_rate_limited_log_holds_back_and_counts_lines(caplog):
    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("ctrserve.test"), "odd requests", interval=60.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="ctrserve.test")
    assert limited.note("odd request %d", 1)
    assert not any(limited.note("odd request %d", i) for i in range(2, 6))
    now[0] += 30
    assert not limited.note("odd request %d", 6)
    now[0] += 31
    assert limited.note("odd request %d", 7)
    lines = [r.getMessage() for r in caplog.records if r.name == "ctrserve.test"]
    assert len(lines) == 2 and limited.total == 7
    assert lines[0].startswith("odd request 1") and "at most once per 60 s" in lines[0]
    assert lines[1].startswith("odd request 7") and "5 more odd requests in the last 60 s were not logged" in lines[1]
