"""Replicas and failover of the embedding client, with REAL server processes.

Two shards, each run as two infer-mode replicas following one model root, so both replicas of a
shard answer the same rows. Replicas are SIGKILLed and restarted on their old port while a
client keeps looking up; the client must fail over without a failed lookup, report a shard whose
replicas are all down within its deadline, and take restarted replicas back by itself.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import yaml
from replica_support import follow_args, seed_model_root, wait_until

from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.errors import ConfigError, ShardUnavailableError
from embedding_server.rpc.launcher import ServerGroup
from embedding_server.rpc.remote import RemoteEmbeddingClient
from embedding_server.rpc.replicas import Replica, ReplicaSet, format_addresses, normalize_addresses
from handler.serving_config import ENV_SERVERS, ServingConfig
from protos.embedding import pb, pb_grpc

pytestmark = pytest.mark.timeout(180)

EMB = {"slots_config": {"user": {"dim": 8}, "item": {"dim": 4}}}
TIMEOUT = 2.0  # the client's per-call deadline


# ----------------------------------------------------------------------------- addresses and selection


def test_address_forms_parse_to_replicas_per_shard():
    grouped = [["h1:7001", "h2:7001"], ["h3:7002"]]
    assert normalize_addresses("h1:7001|h2:7001,h3:7002") == grouped
    assert normalize_addresses(["h1:7001|h2:7001", "h3:7002"]) == grouped
    assert normalize_addresses(grouped) == grouped
    assert normalize_addresses(["h1:7001", "h3:7002"]) == [["h1:7001"], ["h3:7002"]]  # one per shard, as before
    assert format_addresses(grouped) == "h1:7001|h2:7001,h3:7002"
    for bad, message in [
        ("h1:7001|,h3:7002", "shard 0"),
        ("h1:7001,nohost", "shard 1"),
        ([], "no shard"),
        ("h1:7001|h1:7001", "h1:7001 is listed more than once"),
        ([["h1:7001"], []], "shard 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            normalize_addresses(bad)


def test_serving_config_and_environment_take_replicas():
    config = ServingConfig.from_dict({"embedding_servers": [["h1:7001", "h2:7001"], "h3:7002"]})
    assert config.embedding_servers == ("h1:7001|h2:7001", "h3:7002")
    assert config.embedding_replicas == [["h1:7001", "h2:7001"], ["h3:7002"]]
    overridden = config.with_environment({ENV_SERVERS: "10.0.0.1:1|10.0.0.2:1, 10.0.0.3:2"})
    assert overridden.embedding_replicas == [["10.0.0.1:1", "10.0.0.2:1"], ["10.0.0.3:2"]]
    with pytest.raises(ConfigError, match=ENV_SERVERS):
        config.with_environment({ENV_SERVERS: "10.0.0.1:1|x"})
    with pytest.raises(ConfigError, match="serving.yml: embedding servers: address h1:7001 is listed more than once"):
        ServingConfig.from_dict({"embedding_servers": ["h1:7001", "h1:7001"]})


def _replica_set(n: int) -> ReplicaSet:
    replicas = [Replica(0, f"h{i}:1", channel=None, up=True, validated=True) for i in range(n)]
    return ReplicaSet(0, replicas)


def test_reads_rotate_over_up_replicas_prefer_the_least_busy_and_skip_down_ones(caplog):
    replicas = _replica_set(3)
    firsts = [replicas.candidates()[0].address for _ in range(6)]
    assert sorted(firsts) == ["h0:1", "h0:1", "h1:1", "h1:1", "h2:1", "h2:1"]  # round-robin
    busy = replicas.replicas[0]
    replicas.started(busy)
    assert all(replicas.candidates()[0] is not busy for _ in range(4))  # least outstanding first
    replicas.finished(busy)
    with caplog.at_level(logging.INFO, logger="ctrserve.embedding_client"):
        replicas.mark_down(busy, "UNAVAILABLE: gone")
        replicas.mark_down(busy, "UNAVAILABLE: still gone")
        assert all(replicas.candidates()[-1] is busy for _ in range(4))  # down: last resort only
        replicas.mark_up(busy)
        replicas.mark_up(busy)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "embedding shard 0: replica h0:1 marked down: UNAVAILABLE: gone",
        "embedding shard 0: replica h0:1 marked up",
    ]  # each transition logged once


# ----------------------------------------------------------------------------- real replicas


@pytest.fixture(scope="module")
def emb() -> EmbeddingConfig:
    return EmbeddingConfig.from_dict(EMB)


@pytest.fixture(scope="module")
def replicated(emb, tmp_path_factory):
    """2 shards x 2 infer-mode replicas following one model root."""
    root = tmp_path_factory.mktemp("replicas")
    (root / "emb.yml").write_text(yaml.safe_dump(EMB, sort_keys=False))
    (root / "global.yml").write_text(yaml.safe_dump({"embedding_parameter_server_config": {"capacity": 50_000}}))
    seed_model_root(emb, root / "model")
    with ServerGroup.start(
        root / "emb.yml",
        root / "global.yml",
        num_shards=2,
        workdir=root / "servers",
        mode="infer",
        replicas=2,
        extra_args=follow_args(root / "model"),
    ) as group:
        yield group


@pytest.fixture()
def group(replicated):
    """The replicated group, every replica running again after the test."""
    yield replicated
    stopped = [(s.shard, s.replica) for s in replicated.servers if s.process.poll() is not None]
    if stopped:
        replicated.restart_many(stopped)


def keys(emb: EmbeddingConfig) -> tuple[np.ndarray, np.ndarray, int]:
    ids = np.arange(0, 1000, 7, dtype=np.uint64)
    return ids, np.full(ids.shape[0], emb.tables["user"].index, np.uint16), emb.tables["user"].dim


def lookup_requests(address: str) -> int:
    """How many Lookup requests the server at ``address`` has answered."""
    with grpc.insecure_channel(address) as channel:
        stats = pb_grpc.EmbeddingServiceStub(channel).Stats(pb.StatsRequest(), timeout=5)
    return next((m.requests for m in stats.methods if m.method == "Lookup"), 0)


def is_up(client: RemoteEmbeddingClient, shard: int, address: str) -> bool:
    return any(r["address"] == address and r["up"] for r in client.replica_states()[shard])


def test_replicas_of_a_shard_are_validated_and_reads_spread_over_them(emb, group):
    ids, tables, dim = keys(emb)
    with RemoteEmbeddingClient(emb, format_addresses(group.replica_addresses), timeout=TIMEOUT) as client:
        assert [[r["up"] for r in shard] for shard in client.replica_states()] == [[True, True], [True, True]]
        before = {s.address: lookup_requests(s.address) for s in group.servers}
        first = client.lookup_rows(ids, tables, dim)
        assert np.abs(first).sum() > 0  # the model root's rows, not zeros
        for _ in range(20):
            assert client.lookup_rows(ids, tables, dim).tobytes() == first.tobytes()
        assert all(lookup_requests(s.address) - before[s.address] >= 5 for s in group.servers), "a replica got no reads"
    (a00, _), (a10, a11) = group.replica_addresses
    with pytest.raises(ConfigError, match=f"{a10} is shard 1 of 2, but the client lists it as shard 0 of 2"):
        RemoteEmbeddingClient(emb, [[a00, a10], [a11]], timeout=TIMEOUT)


def test_killing_one_replica_of_each_shard_fails_no_lookup_and_restarted_replicas_are_used_again(emb, group):
    ids, tables, dim = keys(emb)
    with RemoteEmbeddingClient(emb, group.replica_addresses, timeout=TIMEOUT, probe_interval=0.2) as client:
        expected = client.lookup_rows(ids, tables, dim).tobytes()
        done, failures, wrong, stop = [0], [], [0], threading.Event()

        def stream() -> None:
            while not stop.is_set():
                try:
                    wrong[0] += client.lookup_rows(ids, tables, dim).tobytes() != expected
                    done[0] += 1
                except Exception as exc:  # noqa: BLE001 - any failure is what the test counts
                    failures.append(exc)

        streamer = threading.Thread(target=stream)
        streamer.start()
        try:
            wait_until(lambda: done[0] >= 20, what="lookups to flow")
            group.kill(0, 0)
            group.kill(1, 1)
            at_kill = done[0]
            wait_until(lambda: done[0] >= at_kill + 100, what="lookups after the kill")
        finally:
            stop.set()
            streamer.join()
        assert failures == [] and wrong[0] == 0
        assert not is_up(client, 0, group.server(0, 0).address) and not is_up(client, 1, group.server(1, 1).address)
        restarted = group.restart_many([(0, 0), (1, 1)])
        for server in restarted:
            wait_until(lambda s=server: is_up(client, s.shard, s.address), what=f"{server.address} to be marked up")
        for _ in range(20):
            assert client.lookup_rows(ids, tables, dim).tobytes() == expected
        assert all(lookup_requests(s.address) >= 5 for s in restarted), "a restarted replica got no reads"


def test_a_hung_replica_times_out_and_its_shard_answers_from_the_other(emb, group):
    """SIGSTOP: the replica accepts connections but never answers (DEADLINE_EXCEEDED)."""
    ids, tables, dim = keys(emb)
    hung = group.server(0, 0)
    with RemoteEmbeddingClient(emb, group.replica_addresses, timeout=TIMEOUT, probe_interval=0.2) as client:
        expected = client.lookup_rows(ids, tables, dim).tobytes()
        os.kill(hung.process.pid, signal.SIGSTOP)
        try:
            for _ in range(5):
                started = time.monotonic()
                assert client.lookup_rows(ids, tables, dim).tobytes() == expected
                assert time.monotonic() - started < TIMEOUT
            assert not is_up(client, 0, hung.address)
        finally:
            os.kill(hung.process.pid, signal.SIGCONT)
        wait_until(lambda: is_up(client, 0, hung.address), what="the resumed replica to be marked up")


def test_a_shard_with_every_replica_down_fails_within_the_deadline_then_recovers(emb, group, caplog):
    ids, tables, dim = keys(emb)
    with RemoteEmbeddingClient(emb, group.replica_addresses, timeout=TIMEOUT, probe_interval=0.2) as client:
        expected = client.lookup_rows(ids, tables, dim).tobytes()
        group.kill(1, 0)
        group.kill(1, 1)
        for _ in range(3):  # first with the replicas still marked up, then marked down
            started = time.monotonic()
            with pytest.raises(ShardUnavailableError) as info:
                client.lookup_rows(ids, tables, dim)
            assert time.monotonic() - started < TIMEOUT + 0.5
        message = str(info.value)
        assert "embedding shard 1 unavailable" in message
        assert all(s.address in message for s in (group.server(1, 0), group.server(1, 1)))
        back = group.restart(1, 1)
        wait_until(lambda: is_up(client, 1, back.address), what="the restarted replica to be marked up")
        assert client.lookup_rows(ids, tables, dim).tobytes() == expected  # the same client, no reconnect by hand


def test_a_replica_down_at_start_is_allowed_and_joins_when_it_serves(emb, group):
    ids, tables, dim = keys(emb)
    group.kill(0, 1)
    late = group.server(0, 1).address
    started = time.monotonic()
    with RemoteEmbeddingClient(
        emb, group.replica_addresses, timeout=TIMEOUT, connect_timeout=10, probe_interval=0.2
    ) as client:
        assert time.monotonic() - started < 5, "waited for the missing replica"
        assert not is_up(client, 0, late)
        expected = client.lookup_rows(ids, tables, dim).tobytes()
        group.restart(0, 1)
        wait_until(lambda: is_up(client, 0, late), what="the late replica to join")
        wait_until(
            lambda: client.lookup_rows(ids, tables, dim).tobytes() == expected and lookup_requests(late) > 0,
            what="reads on the late replica",
        )
    nobody = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]  # shard 0: no server at all
    started = time.monotonic()
    with pytest.raises(ShardUnavailableError, match="embedding shard 0: no replica answered within 1.0 s"):
        RemoteEmbeddingClient(emb, [nobody, group.replica_addresses[1]], timeout=TIMEOUT, connect_timeout=1.0)
    assert time.monotonic() - started < 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
