"""Shared pieces of the replica and failover tests: a model root with a sparse checkpoint that
infer-mode replicas follow, a polling wait, and latency percentiles."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.modelroot import checkpoint
from embedding_server.modelroot.packets import CHECKPOINTS_DIR
from embedding_server.rpc.client import InProcessEmbeddingClient
from embedding_server.storage.urls import open_storage

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


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def p99(latencies: list[float]) -> float:
    """The 99th percentile of ``latencies`` (seconds)."""
    return float(np.percentile(np.asarray(latencies), 99))
