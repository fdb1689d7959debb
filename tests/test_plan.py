"""``ctrserve plan``: the bytes per row it sizes shards with are the bytes a real store allocates."""

from __future__ import annotations

import json

import pytest

from ctrserve.cli import main
from embedding_server.core.config import EmbeddingConfig, GlobalConfig, JobType
from embedding_server.core.errors import ConfigError
from embedding_server.store.plan import MAX_SHARD_ROWS, bytes_per_row, parse_bytes, plan
from embedding_server.store.store import EmbeddingStore

pytestmark = pytest.mark.unit

EMB = EmbeddingConfig.from_dict({"slots_config": {"a": {"dim": 16}, "b": {"dim": 8}}})


def store(mode: str, optimizer: dict, capacity: int, incremental: bool = False) -> EmbeddingStore:
    server = {"capacity": capacity, "enable_incremental_update": incremental}
    if incremental:
        server["incremental_dir"] = "/nonexistent-unused"
    return EmbeddingStore(
        EMB,
        GlobalConfig.from_dict(
            {
                "common_config": {"job_type": mode},
                "embedding_parameter_server_config": server,
                "sparse_optimizer": optimizer,
            }
        ),
    )


@pytest.mark.parametrize(
    ("mode", "optimizer", "state_width", "incremental"),
    [
        ("train", {"type": "adagrad", "lr": 0.1}, 16, False),
        ("train", {"type": "adam", "lr": 0.01}, 33, True),
        ("train", {"type": "sgd", "lr": 0.1}, 0, False),
        ("infer", {"type": "adagrad", "lr": 0.1}, 0, False),  # serving keeps no optimizer state
    ],
)
def test_bytes_per_row_is_what_a_real_store_allocates(mode, optimizer, state_width, incremental):
    capacity = 70_000
    try:
        real = store(mode, optimizer, capacity, incremental)
    except ConfigError:
        pytest.skip("this global config needs other incremental keys")
    arrays = real.arrays()
    measured = sum(a.nbytes for a in arrays.values())
    assert measured == real.memory_bytes()
    # The store's constants (index slots, the zero row) are a few hundred bytes; per row they vanish.
    formula = bytes_per_row(16, state_width, JobType(mode), incremental)
    assert measured / capacity == pytest.approx(formula, rel=2e-3)
    assert arrays["weights"].shape[1] == 16 and arrays["state"].shape[1] == max(1, state_width)


def test_bytes_per_row_matches_the_hand_count_and_the_memory_benchmark():
    # vector 64 + Adagrad accumulator 64 + index 16/0.7 + row_slot 4 + row_tick 4 + free stack 8
    assert bytes_per_row(16, 16, JobType.TRAIN) == pytest.approx(64 + 64 + 16 / 0.7 + 4 + 4 + 8, abs=0.01)
    # benchmarks/README.md: bench_memory measures 158.9 resident B/row (Adagrad, dim 16, full
    # store, no eviction yet, so the free stack's 8 B are not touched).
    assert bytes_per_row(16, 16, JobType.TRAIN) - 8 == pytest.approx(158.9, abs=0.5)
    assert bytes_per_row(16, 0, JobType.INFER) == pytest.approx(64 + 4 + 16 / 0.7 + 4 + 4 + 8 + 4, abs=0.01)


def test_plan_sizes_shards_and_pods_from_the_row_bytes():
    p = plan(10**9, dim=16, optimizer="adagrad", memory_per_pod=64 << 30, replicas=2, headroom=0.25)
    for tier in (p.train, p.serve):
        assert tier.shards * tier.capacity >= 10**9
        assert tier.memory_per_pod <= (64 << 30) * 0.75
        assert (tier.shards - 1) * (64 << 30) * 0.75 < 10**9 * tier.bytes_per_row + tier.shards * (1 << 30)
    assert (p.train.shards, p.train.replicas) == (4, 1)
    assert (p.serve.shards, p.serve.pods) == (3, 6)
    huge = plan(10**10, dim=16, memory_per_pod=1 << 40)
    assert huge.serve.capacity <= MAX_SHARD_ROWS  # the store's per-shard row limit
    assert parse_bytes("64GiB") == 64 << 30 and parse_bytes("64Gi") == 64 << 30 and parse_bytes("500MB") == 5 * 10**8
    with pytest.raises(ValueError, match="no room"):
        plan(10**6, dim=16, memory_per_pod=1 << 30)


def test_plan_command_prints_shards_and_memory_per_pod(capsys):
    args = ["plan", "--rows", "1e9", "--dim", "16", "--optimizer", "adagrad", "--replicas", "2"]
    assert main([*args, "--memory-per-pod", "64GiB"]) == 0
    text = capsys.readouterr().out
    assert "train:  167.9 B/row -> 4 shards" in text and "3 shards x 2 replicas = 6 pods" in text
    assert "1e+10" in text and "1e+08" in text
    assert main([*args, "--memory-per-pod", "64GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["serve"]["pods"] == 6 and [p["rows"] for p in out["scale"]] == [10**8, 10**9, 10**10]
    assert main([*args, "--memory-per-pod", "lots"]) == 2
