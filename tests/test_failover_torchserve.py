"""Failover through a REAL TorchServe: the handler's embedding shards run as replicas.

Two shards x two infer-mode replicas follow one model root; TorchServe's worker finds them
through ``CTRSERVE_EMBEDDING_SERVERS`` in the string form (``a|b,c|d``). A client streams
predictions over gRPC while one replica of each shard is SIGKILLed: no request may fail, and
the p99 latency during the failure is printed as a ratio to the p99 before (a reported figure,
not a threshold). With every replica of a shard down the handler answers 503 within a bounded
time, and serves again by itself once a replica returns.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from replica_support import follow_args, p99, seed_model_root, wait_until
from torchserve_support import EMB, export_version, random_batch, write_configs

from archiver.build import archive_model
from archiver.torchserve import TorchServeProcess
from embedding_server.core.config import EmbeddingConfig
from embedding_server.rpc.launcher import ServerGroup
from embedding_server.rpc.replicas import format_addresses
from handler.client import PredictionClient, PredictionError
from handler.serving_config import ENV_SERVERS

pytestmark = pytest.mark.timeout(240)

LOOKUP_TIMEOUT_S = 2.0  # serving.yml embedding_timeout_s: the bound on a 503
REQUESTS_PER_PHASE = 150


class Replicated:
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
def replicated(tmp_path_factory):
    root = tmp_path_factory.mktemp("failover")
    emb_path, glob_path = write_configs(root / "cfg")
    seed_model_root(EmbeddingConfig.from_dict(EMB), root / "model_root")
    version = export_version(root / "model_root", 1, seed=1)
    (root / "serving.yml").write_text(json.dumps({"embedding_timeout_s": LOOKUP_TIMEOUT_S, "max_batch_size": 256}))
    archive_model(version, root / "store", serving_config=root / "serving.yml")
    with ServerGroup.start(
        emb_path,
        glob_path,
        num_shards=2,
        workdir=root / "embedding",
        mode="infer",
        replicas=2,
        extra_args=follow_args(root / "model_root"),
    ) as group:
        environment = {ENV_SERVERS: format_addresses(group.replica_addresses)}
        with TorchServeProcess.start(
            root / "store", root / "torchserve", models={"deepctr": "deepctr.mar"}, environment=environment
        ) as ts:
            yield Replicated(group, ts)


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


def test_killing_one_replica_of_each_shard_fails_no_prediction(replicated):
    replicated.all_running()
    batch = random_batch(np.random.default_rng(3), 16)
    with replicated.client() as client:
        expected = client.predict(batch)
        assert np.abs(expected).sum() > 0
        timed_predictions(client, batch, 20, expected)  # warm up
        before, failed_before = timed_predictions(client, batch, REQUESTS_PER_PHASE, expected)
        replicated.group.kill(0, 0)
        replicated.group.kill(1, 1)
        during, failed_during = timed_predictions(client, batch, REQUESTS_PER_PHASE, expected)
    assert failed_before == [] and failed_during == []
    ratio = p99(during) / p99(before)
    print(
        f"\nfailover: p99 before {p99(before) * 1e3:.2f} ms (p50 {np.median(before) * 1e3:.2f}), with one replica of "
        f"each shard SIGKILLed {p99(during) * 1e3:.2f} ms (p50 {np.median(during) * 1e3:.2f}): p99 ratio {ratio:.2f} "
        f"({len(during)} requests, 0 failed)"
    )
    assert np.isfinite(ratio) and ratio > 0


def test_every_replica_of_a_shard_down_answers_503_in_bounded_time_and_recovers(replicated):
    group = replicated.group
    batch = random_batch(np.random.default_rng(4), 8)
    with replicated.client() as client:
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
