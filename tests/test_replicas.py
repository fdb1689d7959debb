"""Replicas and failover of the embedding client (``embedding_server.rpc.replicas``), with REAL
server processes.

Two shards, each run as two infer-mode replicas following one model root, so both replicas of a
shard answer the same rows. Replicas are SIGKILLed and restarted on their old port while a
client keeps looking up; the client must fail over without a failed lookup, report a shard whose
replicas are all down within its deadline, and take restarted replicas back by itself.

Failover through a REAL TorchServe: the handler's embedding shards run as replicas. Two shards x
two infer-mode replicas follow one model root; TorchServe's worker finds them through
``CTRSERVE_EMBEDDING_SERVERS`` in the string form (``a|b,c|d``). A client streams predictions
over gRPC while one replica of each shard is SIGKILLed: no request may fail, and the p99 latency
during the failure is printed as a ratio to the p99 before (a reported figure, not a threshold).
With every replica of a shard down the handler answers 503 within a bounded time, and serves
again by itself once a replica returns.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from archiver.build import archive_model
from archiver.torchserve import TorchServeProcess
from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import ConfigError, ShardUnavailableError
from embedding_server.modelroot import checkpoint
from embedding_server.modelroot.packets import CHECKPOINTS_DIR
from embedding_server.rpc.client import InProcessEmbeddingClient
from embedding_server.rpc.launcher import ServerGroup
from embedding_server.rpc.remote import RemoteEmbeddingClient
from embedding_server.rpc.replicas import Replica, ReplicaSet, format_addresses, normalize_addresses
from embedding_server.storage.urls import open_storage
from handler.client import PredictionClient, PredictionError
from handler.serving_config import ENV_SERVERS, ServingConfig
from protos.embedding import pb, pb_grpc

pytestmark = pytest.mark.timeout(180)
FAILOVER_TIMEOUT_S = 240  # TorchServe starts within the first failover test

EMB = {"slots_config": {"user": {"dim": 8}, "item": {"dim": 4}}}
TIMEOUT = 2.0  # the client's per-call deadline
TRAIN = {"embedding_parameter_server_config": {"capacity": 50_000}, "sparse_optimizer": {"type": "adagrad", "lr": 0.1}}


def seed_model_root(emb: EmbeddingConfig, root: Path, vocab: int = 1000, seed: int = 0) -> None:
    """Train ids ``0..vocab-1`` of every table one random step and publish the rows as the model
    root's only sparse checkpoint (what a trainer leaves behind), so replicas serve non-zero rows."""
    rng = np.random.default_rng(seed)
    with InProcessEmbeddingClient(emb, GlobalConfig.from_dict(TRAIN), num_shards=2) as trainer:
        for table in emb.tables.values():
            ids = np.arange(vocab, dtype=np.uint64)
            tables = np.full(vocab, table.index, np.uint16)
            trainer.lookup_rows(ids, tables, table.dim)
            trainer.push_rows(ids, tables, rng.normal(size=(vocab, table.dim)).astype(np.float32))
        folder = open_storage(str(root)).child(f"{CHECKPOINTS_DIR}/{1:020d}")
        checkpoint.dump_stores(trainer.stores, folder)


def follow_args(root: Path) -> list[str]:
    """Server arguments that follow ``root`` quickly."""
    return ["--model-root", str(root), "--poll-interval", "0.1", "--rescan-interval", "1"]


def start_replicated(embedding_config: Path, global_config: Path, workdir: Path, model_root: Path) -> ServerGroup:
    """2 shards x 2 infer-mode replicas following ``model_root``."""
    return ServerGroup.start(
        embedding_config,
        global_config,
        num_shards=2,
        workdir=workdir,
        mode="infer",
        replicas=2,
        extra_args=follow_args(model_root),
    )


def p99(latencies: list[float]) -> float:
    """The 99th percentile of ``latencies`` (seconds)."""
    return float(np.percentile(np.asarray(latencies), 99))


# ----------------------------------------------------------------------------- addresses and selection


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
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
    with start_replicated(root / "emb.yml", root / "global.yml", root / "servers", root / "model") as group:
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


@pytest.mark.process
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


@pytest.mark.process
def test_killing_one_replica_of_each_shard_fails_no_lookup_and_restarted_replicas_are_used_again(
    emb, group, wait_until
):
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


@pytest.mark.process
def test_a_hung_replica_times_out_and_its_shard_answers_from_the_other(emb, group, wait_until):
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


@pytest.mark.process
def test_a_shard_with_every_replica_down_fails_within_the_deadline_then_recovers(emb, group, caplog, wait_until):
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


@pytest.mark.process
def test_a_replica_down_at_start_is_allowed_and_joins_when_it_serves(emb, group, wait_until):
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


# ----------------------------------------------------------------------------- failover through a real TorchServe


LOOKUP_TIMEOUT_S = 2.0  # serving.yml embedding_timeout_s: the bound on a 503
REQUESTS_PER_PHASE = 150


class ReplicatedTorchServe:
    """Replicated embedding servers and a TorchServe whose worker uses them."""

    def __init__(self, group: ServerGroup, ts: TorchServeProcess):
        self.group, self.ts = group, ts

    def client(self) -> PredictionClient:
        return PredictionClient(self.ts.grpc_inference_url, model_name="deepctr", timeout=30)

    def all_running(self) -> None:
        stopped = [(s.shard, s.replica) for s in self.group.servers if s.process.poll() is not None]
        if stopped:
            self.group.restart_many(stopped)


@pytest.fixture(scope="module")
def replicated_torchserve(tmp_path_factory, tiny_ctr):
    root = tmp_path_factory.mktemp("failover")
    emb_path, glob_path = tiny_ctr.write_configs(root / "cfg")
    seed_model_root(EmbeddingConfig.from_dict(tiny_ctr.EMB), root / "model_root")
    version = tiny_ctr.export_version(root / "model_root", 1, seed=1)
    (root / "serving.yml").write_text(json.dumps({"embedding_timeout_s": LOOKUP_TIMEOUT_S, "max_batch_size": 256}))
    archive_model(version, root / "store", serving_config=root / "serving.yml")
    with start_replicated(emb_path, glob_path, root / "embedding", root / "model_root") as group:
        environment = {ENV_SERVERS: format_addresses(group.replica_addresses)}
        with TorchServeProcess.start(
            root / "store", root / "torchserve", models={"deepctr": "deepctr.mar"}, environment=environment
        ) as ts:
            yield ReplicatedTorchServe(group, ts)


def timed_predictions(
    client: PredictionClient, batch, count: int, expected: np.ndarray
) -> tuple[list[float], list[Exception]]:
    """Send ``batch`` ``count`` times; latencies of the answers and every failure (a wrong score counts)."""
    latencies, failures = [], []
    for _ in range(count):
        started = time.perf_counter()
        try:
            scores = client.predict(batch)
        except PredictionError as exc:
            failures.append(exc)
            continue
        latencies.append(time.perf_counter() - started)
        if not np.array_equal(scores, expected):
            failures.append(AssertionError(f"scores changed: {scores[:4]} != {expected[:4]}"))
    return latencies, failures


@pytest.mark.process
@pytest.mark.timeout(FAILOVER_TIMEOUT_S)
def test_killing_one_replica_of_each_shard_fails_no_prediction(replicated_torchserve, tiny_ctr):
    replicated_torchserve.all_running()
    batch = tiny_ctr.random_batch(np.random.default_rng(3), 16)
    with replicated_torchserve.client() as client:
        expected = client.predict(batch)
        assert np.abs(expected).sum() > 0
        timed_predictions(client, batch, 20, expected)  # warm up
        before, failed_before = timed_predictions(client, batch, REQUESTS_PER_PHASE, expected)
        replicated_torchserve.group.kill(0, 0)
        replicated_torchserve.group.kill(1, 1)
        during, failed_during = timed_predictions(client, batch, REQUESTS_PER_PHASE, expected)
    assert failed_before == [] and failed_during == []
    ratio = p99(during) / p99(before)
    print(
        f"\nfailover: p99 before {p99(before) * 1e3:.2f} ms (p50 {np.median(before) * 1e3:.2f}), with one replica of "
        f"each shard SIGKILLed {p99(during) * 1e3:.2f} ms (p50 {np.median(during) * 1e3:.2f}): p99 ratio {ratio:.2f} "
        f"({len(during)} requests, 0 failed)"
    )
    assert np.isfinite(ratio) and ratio > 0


@pytest.mark.process
@pytest.mark.timeout(FAILOVER_TIMEOUT_S)
def test_every_replica_of_a_shard_down_answers_503_in_bounded_time_and_recovers(
    replicated_torchserve, tiny_ctr, wait_until
):
    group = replicated_torchserve.group
    batch = tiny_ctr.random_batch(np.random.default_rng(4), 8)
    with replicated_torchserve.client() as client:
        expected = client.predict(batch)
        for server in [s for s in group.servers if s.shard == 0]:
            group.kill(0, server.replica)
        for _ in range(3):  # the worker stays up and keeps answering the same way
            started = time.monotonic()
            with pytest.raises(PredictionError) as info:
                client.predict(batch)
            elapsed = time.monotonic() - started
            assert info.value.code == 503, info.value
            assert elapsed < LOOKUP_TIMEOUT_S + 3.0, f"the 503 took {elapsed:.1f} s"
        assert "embedding servers unavailable" in info.value.message and "embedding shard 0" in info.value.message
        group.restart(0, 1)

        def serves_again() -> bool:
            try:
                return np.array_equal(client.predict(batch), expected)
            except PredictionError as exc:
                assert exc.code == 503, exc
                return False

        wait_until(serves_again, timeout=30, what="predictions to succeed after a replica returned")
