"""Serving follows training: infer-mode stores and servers hot-load a model root's newest
checkpoint and packets, in order, atomically, through gaps, duplicates and corrupt files.

Packets and checkpoints are written here by hand from a train-mode in-process client (so the
expected values are the trainer's own), with the real packet and checkpoint writers and the
real storage layer; followers run in-process, in real server processes, and on Ceph's S3.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import InvalidRequestError
from embedding_server.modelroot import checkpoint
from embedding_server.modelroot.hotload import FollowOptions, HotloadError, ModelRootFollower
from embedding_server.modelroot.packets import CHECKPOINTS_DIR, FIRST_SEQ, encode_packet, packet_dir, packet_name
from embedding_server.rpc.client import InProcessEmbeddingClient
from embedding_server.rpc.launcher import ServerGroup, ctrserve_command, server_command
from embedding_server.rpc.remote import RemoteEmbeddingClient
from embedding_server.storage.base import LocalStorage, Storage
from embedding_server.storage.urls import open_storage
from embedding_server.store import kernels
from embedding_server.store.cpus import format_cpu_list, usable_cpus
from embedding_server.store.memory import HUGE_PAGE
from embedding_server.store.store import EmbeddingStore, TableRows

EMB = {"slots_config": {"user": {"dim": 8}, "item": {"dim": 8}, "query": {"dim": 4}}}
TRAIN = {"embedding_parameter_server_config": {"capacity": 20_000}, "sparse_optimizer": {"type": "adagrad", "lr": 0.1}}
INFER = {"embedding_parameter_server_config": {"capacity": 20_000}, "common_config": {"job_type": "infer"}}
FAST = FollowOptions(poll_interval_s=0.05, rescan_interval_s=0.5, gap_timeout_s=30.0)


@pytest.fixture(scope="module")
def emb() -> EmbeddingConfig:
    return EmbeddingConfig.from_dict(EMB)


class Trainer:
    """A train-mode in-process client that publishes what it changes, by hand, under a model root.

    Args:
        root: the model root (URL or open storage).
        num_shards: training shards (packet streams).
    """

    def __init__(self, emb: EmbeddingConfig, root: str | Storage, num_shards: int = 2, seed: int = 0):
        self.emb = emb
        self.client = InProcessEmbeddingClient(emb, GlobalConfig.from_dict(TRAIN), num_shards)
        self.stores = self.client.stores
        self.storage = open_storage(root)
        self.num_shards = num_shards
        self.rng = np.random.default_rng(seed)
        self.seq = [FIRST_SEQ - 1] * num_shards
        self.keys: dict[str, set[int]] = {name: set() for name in emb.tables}

    def step(self, rows: int = 200, vocab: int = 3000) -> list[list[TableRows]]:
        """One gradient step on random keys of every table; the changed rows per training shard."""
        changed: list[list[TableRows]] = [[] for _ in range(self.num_shards)]
        for table in self.emb.tables.values():
            ids = np.unique(self.rng.integers(0, vocab, rows).astype(np.uint64))
            self.keys[table.name].update(ids.tolist())
            tabs = np.full(ids.shape[0], table.index, np.uint16)
            for shard, store in enumerate(self.stores):
                mine = store.owns(ids, tabs)
                if not mine.any():
                    continue
                grads = self.rng.normal(size=(int(mine.sum()), table.dim)).astype(np.float32)
                store.apply_gradients(ids[mine], tabs[mine], grads)
                values = store.lookup(ids[mine], tabs[mine])
                changed[shard].append(TableRows(table, ids[mine], values, np.zeros((values.shape[0], 0), np.float32)))
        return changed

    def publish(
        self, shard: int, tables: list[TableRows], seq: int | None = None, created_at: float | None = None
    ) -> int:
        """Write one packet of ``shard`` (the next seq unless given); returns its seq."""
        if seq is None:
            seq = self.seq[shard] + 1
        self.seq[shard] = max(self.seq[shard], seq)
        self.storage.write_atomic(
            f"{packet_dir(shard, self.num_shards)}/{packet_name(seq)}", self.encode(shard, tables, seq, created_at)
        )
        return seq

    def encode(self, shard: int, tables: list[TableRows], seq: int, created_at: float | None = None) -> bytes:
        return encode_packet(
            tables,
            shard=shard,
            num_shards=self.num_shards,
            seq=seq,
            fingerprint=self.emb.fingerprint(),
            created_at=created_at,
        )

    def step_and_publish(self, rows: int = 200) -> list[list[TableRows]]:
        """One step, and a packet of every training shard with the rows it changed."""
        changed = self.step(rows)
        for shard, tables in enumerate(changed):
            self.publish(shard, tables)
        return changed

    def checkpoint(self, number: int, watermark: list[int] | None = None) -> str:
        """A full checkpoint ``checkpoints/<number>`` whose manifest records ``watermark``
        (default: every shard's last published seq)."""
        name = f"{number:020d}"
        folder = self.storage.child(f"{CHECKPOINTS_DIR}/{name}")
        # The manifest is written once, last, with the watermark: a follower may read it at once.
        marks = {str(s): seq for s, seq in enumerate(self.seq if watermark is None else watermark)}
        checkpoint.dump_stores(self.stores, folder, marks)
        return name

    def expected(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, the trainer's current vectors) of every key of ``table`` trained so far."""
        ids = np.array(sorted(self.keys[table]), np.uint64)
        tabs = np.full(ids.shape[0], self.emb.tables[table].index, np.uint16)
        out = np.zeros((ids.shape[0], self.emb.tables[table].dim), np.float32)
        for store in self.stores:
            mine = store.owns(ids, tabs)
            if mine.any():
                out[mine] = store.lookup(ids[mine], tabs[mine])
        return ids, out


def serving_lookup(stores: list[EmbeddingStore], table, ids: np.ndarray) -> np.ndarray:
    """What infer-mode serving shards answer for ``ids`` of ``table``."""
    tabs = np.full(ids.shape[0], table.index, np.uint16)
    out = np.zeros((ids.shape[0], table.dim), np.float32)
    for store in stores:
        mine = store.owns(ids, tabs)
        if mine.any():
            out[mine] = store.lookup(ids[mine], tabs[mine])
    return out


def assert_serves_trainer_state(emb: EmbeddingConfig, trainer: Trainer, stores: list[EmbeddingStore]) -> None:
    for table in emb.tables.values():
        ids, want = trainer.expected(table.name)
        got = serving_lookup(stores, table, ids)
        assert got.tobytes() == want.tobytes(), f"table {table.name}: served vectors differ from the trainer's"


def infer_stores(emb: EmbeddingConfig, num_shards: int = 1, capacity: int = 20_000) -> list[EmbeddingStore]:
    glob = GlobalConfig.from_dict({**INFER, "embedding_parameter_server_config": {"capacity": capacity}})
    return [EmbeddingStore(emb, glob, i, num_shards) for i in range(num_shards)]


def watermarks(follower: ModelRootFollower) -> list[int]:
    return [s["watermark"] for s in follower.stats()["streams"]]


def stream_of(follower: ModelRootFollower, index: int = 0) -> dict:
    return follower.stats()["streams"][index]


@pytest.fixture
def followers():
    """Start followers through ``start(store, root, options)``; all are stopped at the end."""
    started: list[ModelRootFollower] = []

    def start(store, root, options=FAST, **kwargs) -> ModelRootFollower:
        follower = ModelRootFollower(store, root, options, **kwargs).start()
        started.append(follower)
        assert follower.wait_synced(30), "the follower did not finish its initial load"
        assert not store.commit_ahead  # only the start-up replay commits memory in a second thread
        return follower

    yield start
    for follower in started:
        follower.stop()


# ----------------------------------------------------------------------------- the store


@pytest.mark.unit
def test_put_many_applies_every_table_or_nothing(emb):
    store = infer_stores(emb)[0]
    user, query = emb.tables["user"], emb.tables["query"]
    good = TableRows(user, np.arange(5, dtype=np.uint64), np.ones((5, 8), np.float32), np.zeros((5, 0), np.float32))
    bad = TableRows(query, np.arange(3, dtype=np.uint64), np.ones((3, 8), np.float32), np.zeros((3, 0), np.float32))
    with pytest.raises(InvalidRequestError, match="table 'query': weights shape"):
        store.put_many([good, bad])
    assert len(store) == 0
    ok = TableRows(query, np.arange(3, dtype=np.uint64), np.full((3, 4), 2.0, np.float32), np.zeros((3, 0), np.float32))
    assert store.put_many([good, ok]) == 0
    assert len(store) == 8
    assert (store.lookup(np.arange(3, dtype=np.uint64), np.full(3, query.index, np.uint16)) == 2.0).all()


@pytest.mark.unit
def test_staged_applies_keep_a_repeated_keys_last_value_and_recycle_replaced_rows(emb):
    store = infer_stores(emb, capacity=1000)[0]
    user = emb.tables["user"]
    ids = np.arange(300, dtype=np.uint64)
    tabs = np.full(300, user.index, np.uint16)
    for k in range(50):  # 300-row packets staged into 1000 rows: replaced rows must be reused
        repeated = np.concatenate([ids, ids[:100]])  # the second copy of 0..99 comes last and wins
        values = np.concatenate([np.full((300, 8), k, np.float32), np.full((100, 8), k + 0.5, np.float32)])
        assert store.put_many([TableRows(user, repeated, values, np.zeros((400, 0), np.float32))]) == 0
        got = store.lookup(ids, tabs)
        assert (got[:100] == k + 0.5).all() and (got[100:] == k).all()
    assert len(store) == 300 and store.counters()["evictions"] == 0


@pytest.mark.unit
def test_staged_applies_commit_memory_only_ahead_of_the_rows_they_use(emb):
    store = infer_stores(emb, capacity=1_000_000)[0]
    user = emb.tables["user"]
    ids = np.arange(1000, dtype=np.uint64)
    for k in range(20):
        store.put_many([TableRows(user, ids, np.full((1000, 8), k, np.float32), np.zeros((1000, 0), np.float32))])
    # Rows in use stay about 2,000 (held + one packet staged): one 64k-row chunk is committed, not 20.
    assert store._committed_rows == 1 << 16


@pytest.mark.unit
def test_committing_ahead_keeps_values_and_commits_at_most_one_packet_beyond_what_is_used(emb):
    store = infer_stores(emb, capacity=1_000_000)[0]
    store.commit_ahead = True
    user = emb.tables["user"]
    n = 100_000  # more than one 64k-row commit chunk per packet
    for k in range(4):  # each packet: n new keys
        ids = np.arange(k * n, (k + 1) * n, dtype=np.uint64)
        store.put_many([TableRows(user, ids, np.full((n, 8), k, np.float32), np.zeros((n, 0), np.float32))])
        used = int(store._meta[kernels.META_SIZE])
        assert store._committing is not None  # the next packet's rows are being committed
        store._committing.join()
        assert used <= store._committed_rows <= used + 2 * n
    got = store.lookup(np.arange(4 * n, dtype=np.uint64), np.full(4 * n, user.index, np.uint16))
    assert (got[:, 0] == np.repeat(np.arange(4, dtype=np.float32), n)).all()
    store.commit_ahead = False
    store.put_many(
        [
            TableRows(
                user,
                np.arange(5 * n, 6 * n, dtype=np.uint64),
                np.ones((n, 8), np.float32),
                np.zeros((n, 0), np.float32),
            )
        ]
    )
    assert store._committing is None


@pytest.mark.unit
def test_a_store_filled_on_small_pages_moves_its_rows_onto_huge_pages_intact(emb, huge_page_bytes):
    store = infer_stores(emb, capacity=400_000)[0]
    assert store.defer_huge_pages() and store.huge_pages_pending
    user = emb.tables["user"]
    n = 200_000  # 6.4 MB of weights: three huge pages and more
    ids = np.arange(n, dtype=np.uint64)
    values = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    store.put_many([TableRows(user, ids, values, np.zeros((n, 0), np.float32))])
    assert huge_page_bytes(store._weights) == 0
    assert not store.defer_huge_pages()  # its pages are chosen once it holds rows
    assert store.adopt_huge_pages()
    assert not store.huge_pages_pending
    assert huge_page_bytes(store._weights) >= n * 8 * 4 // HUGE_PAGE * HUGE_PAGE
    assert store.lookup(ids, np.full(n, user.index, np.uint16)).tobytes() == values.tobytes()
    more = np.arange(n, 2 * n, dtype=np.uint64)  # rows committed after the move: on huge pages from the start
    store.put_many([TableRows(user, more, values, np.zeros((n, 0), np.float32))])
    assert store.lookup(more, np.full(n, user.index, np.uint16)).tobytes() == values.tobytes()


@pytest.mark.unit
def test_a_store_deferred_while_empty_commits_its_first_rows_on_huge_pages_once_adopted(emb, huge_page_bytes):
    store = infer_stores(emb, capacity=400_000)[0]  # e.g. a follower on a model root with nothing published yet
    assert store.defer_huge_pages()
    assert store.adopt_huge_pages() and not store.huge_pages_pending
    user = emb.tables["user"]
    n = 200_000
    values = np.ones((n, 8), np.float32)
    store.put_many([TableRows(user, np.arange(n, dtype=np.uint64), values, np.zeros((n, 0), np.float32))])
    assert huge_page_bytes(store._weights) >= n * 8 * 4 // HUGE_PAGE * HUGE_PAGE


@pytest.mark.unit
def test_a_store_that_holds_rows_keeps_its_pages_and_has_nothing_to_move(emb):
    store = infer_stores(emb)[0]
    user = emb.tables["user"]
    store.put_many(
        [TableRows(user, np.arange(3, dtype=np.uint64), np.ones((3, 8), np.float32), np.zeros((3, 0), np.float32))]
    )
    assert not store.defer_huge_pages()
    assert not store.huge_pages_pending and store.adopt_huge_pages()


@pytest.mark.unit
def test_put_many_evicts_least_recently_used_rows_in_infer_mode_only(emb):
    store = infer_stores(emb, capacity=100)[0]
    user = emb.tables["user"]

    def rows(lo, hi, value):
        n = hi - lo
        return TableRows(
            user, np.arange(lo, hi, dtype=np.uint64), np.full((n, 8), value, np.float32), np.zeros((n, 0), np.float32)
        )

    store.put_many([rows(0, 100, 1.0)])
    store.lookup(np.arange(50, 100, dtype=np.uint64), np.full(50, user.index, np.uint16))  # 0..49 are the LRU rows
    evicted = store.put_many([rows(90, 130, 2.0)])  # 30 new rows, 10 overwritten
    assert evicted >= 30 and len(store) <= 100
    got = store.lookup(np.arange(50, 130, dtype=np.uint64), np.full(80, user.index, np.uint16))
    assert (got[:40] == 1.0).all() and (got[40:] == 2.0).all()  # recent rows and the packet's all kept
    with pytest.raises(InvalidRequestError, match="more distinct rows than this shard's capacity of 100"):
        store.put_many([rows(1000, 1101, 3.0)])

    train = EmbeddingStore(emb, GlobalConfig.from_dict({"embedding_parameter_server_config": {"capacity": 100}}))
    train.put_many(
        [
            TableRows(
                user,
                np.arange(100, dtype=np.uint64),
                np.ones((100, 8), np.float32),
                np.zeros((100, train.optimizer.state_width(8)), np.float32),
            )
        ]
    )
    with pytest.raises(InvalidRequestError, match="would exceed this shard's capacity of 100 rows"):
        train.put(
            TableRows(
                user,
                np.arange(100, 101, dtype=np.uint64),
                np.ones((1, 8), np.float32),
                np.zeros((1, train.optimizer.state_width(8)), np.float32),
            )
        )


# ----------------------------------------------------------------------------- start and replay


@pytest.mark.unit
def test_newest_checkpoint_plus_newer_packets_serve_the_trainers_values_bit_for_bit(
    emb, tmp_path, followers, wait_until
):
    trainer = Trainer(emb, tmp_path)
    trainer.step_and_publish()
    trainer.checkpoint(1)
    trainer.step_and_publish()
    trainer.step_and_publish()
    newest = trainer.checkpoint(2)
    trainer.checkpoint(3, watermark=None)  # incomplete: its manifest is removed below
    (tmp_path / CHECKPOINTS_DIR / f"{3:020d}" / checkpoint.MANIFEST).unlink()
    trainer.step_and_publish()
    trainer.step_and_publish()

    stores = infer_stores(emb)
    follower = followers(stores[0], str(tmp_path))
    stats = follower.stats()
    assert stats["checkpoint"] == newest
    assert stats["packets_applied"] == 2 * 2  # only the packets after checkpoint 2's watermark
    assert watermarks(follower) == trainer.seq
    assert_serves_trainer_state(emb, trainer, stores)

    for _ in range(3):  # then it follows
        trainer.step_and_publish()
    wait_until(lambda: watermarks(follower) == trainer.seq, what="the new packets")
    assert_serves_trainer_state(emb, trainer, stores)


@pytest.mark.unit
def test_a_broken_newest_checkpoint_falls_back_to_an_older_one_and_none_loading_is_an_error(
    emb, tmp_path, followers, caplog
):
    trainer = Trainer(emb, tmp_path, num_shards=2)
    trainer.step_and_publish()
    older = trainer.checkpoint(1)
    trainer.step_and_publish()
    broken = trainer.checkpoint(2)
    manifest = json.loads((tmp_path / CHECKPOINTS_DIR / broken / checkpoint.MANIFEST).read_text())
    (tmp_path / CHECKPOINTS_DIR / broken / manifest["files"][0]).unlink()
    store = infer_stores(emb)[0]
    follower = followers(store, str(tmp_path))
    assert follower.stats()["checkpoint"] == older
    assert watermarks(follower) == trainer.seq  # the packets after the older one's watermark replayed
    assert_serves_trainer_state(emb, trainer, [store])
    assert any(f"checkpoint {broken} cannot be loaded" in r.getMessage() for r in caplog.records)

    (tmp_path / CHECKPOINTS_DIR / older / manifest["files"][0]).unlink()
    lost = ModelRootFollower(infer_stores(emb)[0], str(tmp_path), FAST).start()
    with pytest.raises(HotloadError, match="no complete checkpoint could be loaded"):
        lost.wait_synced(30)
    lost.stop()


@pytest.mark.unit
def test_two_training_shards_serve_from_one_and_from_three_serving_shards(emb, tmp_path, followers, wait_until):
    trainer = Trainer(emb, tmp_path, num_shards=2)
    trainer.step_and_publish()
    trainer.checkpoint(1)
    trainer.step_and_publish()
    for serving_shards in (1, 3):
        stores = infer_stores(emb, serving_shards)
        group = [followers(store, str(tmp_path)) for store in stores]
        trainer.step_and_publish()
        for follower in group:
            wait_until(lambda f=follower: watermarks(f) == trainer.seq, what="every packet")
        assert_serves_trainer_state(emb, trainer, stores)
        assert sum(len(s) for s in stores) == sum(len(s) for s in trainer.stores)


@pytest.mark.unit
def test_packets_written_out_of_order_are_applied_in_order(emb, tmp_path, followers, wait_until):
    trainer = Trainer(emb, tmp_path, num_shards=1)
    user = emb.tables["user"]
    ids = np.arange(100, dtype=np.uint64)

    def constant(value: float) -> list[TableRows]:
        return [TableRows(user, ids, np.full((100, 8), value, np.float32), np.zeros((100, 0), np.float32))]

    store = infer_stores(emb)[0]
    trainer.publish(0, constant(0.0), seq=0)
    follower = followers(store, str(tmp_path))
    trainer.publish(0, constant(2.0), seq=2)  # seq 1 comes late
    wait_until(lambda: follower.stats()["streams"][0]["waiting_for"] == 1, what="the gap at seq 1")
    assert watermarks(follower) == [0]
    assert (serving_lookup([store], user, ids) == 0.0).all()
    trainer.publish(0, constant(1.0), seq=1)
    wait_until(lambda: watermarks(follower) == [2], what="seq 1 and 2")
    assert (serving_lookup([store], user, ids) == 2.0).all()  # 2 was applied after 1, not before
    assert follower.stats()["streams"][0]["waiting_for"] == -1


@pytest.mark.unit
def test_duplicate_packets_are_skipped(emb, tmp_path, followers, wait_until):
    trainer = Trainer(emb, tmp_path, num_shards=1)
    user = emb.tables["user"]

    def rows(lo: int, value: float) -> list[TableRows]:
        ids = np.arange(lo, lo + 10, dtype=np.uint64)
        return [TableRows(user, ids, np.full((10, 8), value, np.float32), np.zeros((10, 0), np.float32))]

    store = infer_stores(emb)[0]
    trainer.publish(0, rows(0, 1.0), seq=0)
    trainer.publish(0, rows(0, 2.0), seq=1)
    follower = followers(store, str(tmp_path))
    trainer.publish(0, rows(0, 9.0), seq=1)  # seq 1 again, other values: already applied
    trainer.publish(0, rows(0, 9.0), seq=0)
    trainer.publish(0, rows(100, 3.0), seq=2)
    wait_until(lambda: watermarks(follower) == [2], what="seq 2")
    assert (serving_lookup([store], user, np.arange(10, dtype=np.uint64)) == 2.0).all()
    assert follower.stats()["packets_applied"] == 3


@pytest.mark.unit
def test_gap_waits_raises_the_alarm_after_the_timeout_and_applies_once_filled(
    emb, tmp_path, followers, caplog, wait_until
):
    caplog.set_level(logging.INFO, logger="ctrserve.embedding_server.modelroot.hotload")
    trainer = Trainer(emb, tmp_path, num_shards=1)
    registry = CollectorRegistry()
    changed = [trainer.step()[0] for _ in range(3)]
    trainer.publish(0, changed[0], seq=0)
    trainer.publish(0, changed[2], seq=2)
    options = FollowOptions(poll_interval_s=0.05, rescan_interval_s=0.5, gap_timeout_s=0.3)
    store = infer_stores(emb)[0]
    follower = followers(store, str(tmp_path), options, registry=registry, labels={"shard": "0"})
    alarm = 'ctrserve_embedding_packet_gap_alarm{shard="0",training_shard="0",training_shards="1"}'
    assert f"{alarm} 0.0" in generate_latest(registry).decode()
    wait_until(lambda: follower.stats()["streams"][0]["gap_alarm"], what="the gap alarm")
    assert f"{alarm} 1.0" in generate_latest(registry).decode()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("packet seq 1 still missing" in m for m in warnings), warnings
    assert watermarks(follower) == [0]  # 2 is not applied out of order

    trainer.publish(0, changed[1], seq=1)
    wait_until(lambda: watermarks(follower) == [2], what="the gap to close")
    assert f"{alarm} 0.0" in generate_latest(registry).decode()
    assert_serves_trainer_state(emb, trainer, [store])


@pytest.mark.unit
def test_missing_model_root_and_late_packet_folders_are_waited_for(emb, tmp_path, followers, caplog, wait_until):
    caplog.set_level(logging.INFO, logger="ctrserve.embedding_server.modelroot.hotload")
    root = tmp_path / "not-yet" / "model"
    store = infer_stores(emb)[0]
    follower = followers(store, str(root))  # synced: there is nothing to load yet
    assert follower.stats()["streams"] == []
    trainer = Trainer(emb, root, num_shards=2)
    trainer.checkpoint(1)  # no packet yet: the folders come later
    wait_until(lambda: follower.stats()["checkpoint"] == f"{1:020d}", what="the first checkpoint")
    trainer.step_and_publish()
    trainer.step_and_publish()
    wait_until(lambda: watermarks(follower) == trainer.seq, what="the late packet folders")
    assert_serves_trainer_state(emb, trainer, [store])
    waiting = [r for r in caplog.records if "has no checkpoints/ or incremental/ yet" in r.getMessage()]
    assert len(waiting) == 1  # said once, not once per poll


def other_format_version(data: bytes) -> bytes:
    """The packet as if written by a newer writer (format_version 2)."""
    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    meta = {**table.schema.metadata, b"format_version": b"2"}
    sink = pa.BufferOutputStream()
    table = table.replace_schema_metadata(meta)
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


@pytest.mark.unit
def test_corrupt_truncated_and_foreign_packets_hold_their_shard_until_an_operator_skips_them(
    emb, tmp_path, followers, caplog, wait_until
):
    caplog.set_level(logging.INFO, logger="ctrserve.embedding_server.modelroot.hotload")
    trainer = Trainer(emb, tmp_path, num_shards=1)
    store = infer_stores(emb)[0]
    registry = CollectorRegistry()
    trainer.step_and_publish()
    options = dataclasses.replace(FAST, unreadable_retry_s=0.3)
    follower = followers(store, str(tmp_path), options, registry=registry)
    folder = packet_dir(0, 1)
    for seq, spoil in ((1, "corrupt"), (2, "truncated"), (3, "version"), (4, "misplaced")):
        data = trainer.encode(0, trainer.step()[0], seq)
        if spoil == "corrupt":
            data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :]
        elif spoil == "truncated":
            data = data[: len(data) - 100]
        elif spoil == "version":
            data = other_format_version(data)
        else:
            data = trainer.encode(0, [], seq + 1)  # says seq 5 but lies at seq 4
        trainer.storage.write_atomic(f"{folder}/{packet_name(seq)}", data)
    trainer.seq[0] = 4
    last = trainer.step_and_publish()[0]  # seq 5: fine
    for seq in (1, 2, 3, 4):  # each holds the shard (later packets wait) until the operator skips it
        wait_until(lambda seq=seq: stream_of(follower)["held"] and watermarks(follower) == [seq - 1], what=f"{seq}")
        stream = stream_of(follower)
        assert stream["gap_alarm"] and stream["waiting_for"] == seq and stream["unreadable_seq"] == seq
        with pytest.raises(InvalidRequestError, match=f"held at seq {seq}, not {seq + 1}"):
            follower.skip_packet(0, 1, seq + 1)
        assert follower.skip_packet(0, 1, seq) == {
            "watermark": seq,
            "skipped": list(range(1, seq + 1)),
            "already_skipped": False,
        }
    wait_until(lambda: watermarks(follower) == [5], what="the packet after the bad ones")
    assert follower.skip_packet(0, 1, 4)["already_skipped"]
    stats = follower.stats()
    assert stats["packets_quarantined"] == 4 and stats["packets_skipped"] == 4 and stats["packets_applied"] == 2
    assert len(stats["quarantined"]) == 4 and stats["streams"][0]["skipped"] == [1, 2, 3, 4]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4 and all("still cannot be read" in m and "holding the shard" in m for m in errors), errors
    assert "checksum mismatch" in errors[0] or "not a readable Arrow file" in errors[0]
    assert "not a readable Arrow file" in errors[1] or "checksum mismatch" in errors[1]
    assert "format version '2'" in errors[2] and "its place says" in errors[3]
    text = generate_latest(registry).decode()
    assert (
        "ctrserve_embedding_packets_quarantined_total 4.0" in text
        and "ctrserve_embedding_packets_skipped_total 4.0" in text
    )
    # The server kept serving, and the packet after the bad ones was applied bit for bit.
    for rows in last:
        got = serving_lookup([store], rows.table, rows.ids)
        assert got.tobytes() == rows.weights.tobytes()


def spoiled(data: bytes) -> bytes:
    """The packet with one byte in the middle flipped: its checksum no longer matches."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


@pytest.mark.unit
def test_replicas_at_one_watermark_serve_the_same_values_through_incomplete_and_corrupt_packets(
    emb, tmp_path, followers, caplog, wait_until
):
    """Replicas once served 0.0144 and 12.0 for one row: a packet seen while incomplete was
    quarantined (its rows never applied) on running replicas, while one started later had them.
    Now an incomplete packet is read again until it is whole, and a corrupt one holds its shard
    until a newer checkpoint includes it or an operator skips it on every replica, which they
    then name; a newer checkpoint that includes the skipped packet repairs them."""
    caplog.set_level(logging.INFO, logger="ctrserve.embedding_server.modelroot.hotload")
    options = dataclasses.replace(FAST, unreadable_retry_s=1.0)
    trainer = Trainer(emb, tmp_path, num_shards=2)
    trainer.step_and_publish()
    trainer.checkpoint(1)
    replicas = [followers(infer_stores(emb)[0], str(tmp_path), options) for _ in range(2)]

    def values(follower: ModelRootFollower) -> bytes:
        tables = emb.tables.values()
        return b"".join(serving_lookup([follower.store], t, trainer.expected(t.name)[0]).tobytes() for t in tables)

    def all_at(seqs: list[int], group: list[ModelRootFollower]) -> None:
        wait_until(lambda: all(watermarks(f) == seqs for f in group), what=f"every replica at {seqs}")

    # 1. Packet 1 of training shard 0 is written in place, in two halves 0.3 s apart.
    changed = trainer.step()
    data = trainer.encode(0, changed[0], 1)
    path = tmp_path / packet_dir(0, 2) / packet_name(1)
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    time.sleep(0.3)  # the replicas see the half (inotify: closed after writing)
    with open(path, "ab") as fh:
        fh.write(data[len(data) // 2 :])
    trainer.seq[0] = 1
    trainer.publish(1, changed[1])
    all_at([1, 1], replicas)
    for follower in replicas:
        assert_serves_trainer_state(emb, trainer, [follower.store])
    late = followers(infer_stores(emb)[0], str(tmp_path), options)  # a replica started now
    assert values(late) == values(replicas[0]) == values(replicas[1])
    assert not any(f.stats()["packets_quarantined"] for f in replicas)
    assert any("read and applied after" in r.getMessage() for r in caplog.records)
    replicas.append(late)

    # 2. Packet 2 of shard 0 is corrupt: every replica holds shard 0 at 1 (shard 1 goes on) until a
    # newer checkpoint includes it, from which they catch up.
    changed = trainer.step()
    trainer.storage.write_atomic(f"{packet_dir(0, 2)}/{packet_name(2)}", spoiled(trainer.encode(0, changed[0], 2)))
    trainer.seq[0] = 2
    trainer.publish(1, changed[1])
    trainer.step_and_publish()
    wait_until(lambda: all(stream_of(f)["held"] for f in replicas), what="shard 0 held at its corrupt packet")
    all_at([1, 3], replicas)
    assert all(stream_of(f)["gap_alarm"] and stream_of(f)["waiting_for"] == 2 for f in replicas)
    assert values(replicas[0]) == values(replicas[1]) == values(replicas[2])
    trainer.checkpoint(2)  # includes packet 2 (watermark [3, 3])
    all_at([3, 3], replicas)
    for follower in replicas:
        assert_serves_trainer_state(emb, trainer, [follower.store])
        assert not stream_of(follower)["held"] and not stream_of(follower)["gap_alarm"]

    # 3. Packet 4 of shard 1 is corrupt and no checkpoint includes it: held on every replica, and
    # on a replica started now too, until the operator skips it on each.
    changed = trainer.step()
    trainer.publish(0, changed[0])
    trainer.storage.write_atomic(f"{packet_dir(1, 2)}/{packet_name(4)}", spoiled(trainer.encode(1, changed[1], 4)))
    trainer.seq[1] = 4
    trainer.step_and_publish()
    restarted = followers(infer_stores(emb)[0], str(tmp_path), options)
    replicas.append(restarted)
    wait_until(lambda: all(stream_of(f, 1)["held"] for f in replicas), what="shard 1 held at its corrupt packet")
    all_at([5, 3], replicas)
    assert len({values(f) for f in replicas}) == 1
    for follower in replicas:
        assert follower.skip_packet(1, 2, 4)["skipped"] == [4]
    all_at([5, 5], replicas)
    assert len({values(f) for f in replicas}) == 1  # not the trainer's: packet 4's rows of shard 1 are missing ...
    assert all(stream_of(f, 1)["skipped"] == [4] for f in replicas)  # ... and every replica says so

    # 4. A newer checkpoint that includes the skipped packet repairs the replicas.
    trainer.checkpoint(3)
    wait_until(lambda: all(stream_of(f, 1)["skipped"] == [] for f in replicas), what="the repair")
    for follower in replicas:
        assert watermarks(follower) == [5, 5]
        assert_serves_trainer_state(emb, trainer, [follower.store])


SPECIAL_PACKETS = {
    "fifo": "is a FIFO, not a regular file",
    "dev-zero": "outside the storage root",
    "file-outside": "outside the storage root",
    "dir-outside": "outside the storage root",
}


def make_special(kind: str, target: Path, outside: Path) -> None:
    """Put a FIFO, or a symbolic link to /dev/zero, to a file or a directory outside the root, at ``target``."""
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to({"dev-zero": Path("/dev/zero"), "file-outside": outside / "packet.arrow"}.get(kind, outside))


@pytest.mark.unit
@pytest.mark.parametrize("kind", sorted(SPECIAL_PACKETS))
def test_a_special_file_as_the_next_packet_is_refused_at_once_and_its_shard_shows_as_held_and_stalled(
    kind, emb, tmp_path, followers, caplog, wait_until
):
    """A FIFO named as the next packet hung the follower forever; a link to /dev/zero was read up
    to the size bound on every pass; a link out of the model root was followed. Each is refused
    within a bound, with a log line naming it; later packets wait; stats and metrics show it."""
    caplog.set_level(logging.INFO, logger="ctrserve.embedding_server.modelroot.hotload")
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    trainer = Trainer(emb, root, num_shards=1)
    trainer.step_and_publish()
    options = dataclasses.replace(
        FAST, unreadable_retry_s=0.5, read_timeout_s=2.0, stall_timeout_s=1.0, max_packet_bytes=64 << 20
    )
    registry = CollectorRegistry()
    store = infer_stores(emb)[0]
    follower = followers(store, str(root), options, registry=registry, labels={"shard": "0"})
    good = trainer.encode(0, trainer.step()[0], 1)
    (outside / "packet.arrow").write_bytes(good)  # a valid packet, but not under the model root
    target = root / packet_dir(0, 1) / packet_name(1)
    make_special(kind, target, outside)
    trainer.seq[0] = 1
    trainer.step_and_publish()  # seq 2 waits behind it
    reason = SPECIAL_PACKETS[kind]
    wait_until(
        lambda: any(str(target) in r.getMessage() and reason in r.getMessage() for r in caplog.records),
        timeout=5,
        what="a log line refusing the special file",
    )
    assert stream_of(follower)["unreadable_seq"] == 1 and reason in stream_of(follower)["unreadable_reason"]
    wait_until(lambda: follower.stats()["stalled"], timeout=10, what="the follower to show it is stalled")
    stats = follower.stats()
    assert stats["streams"][0]["held"] and stats["streams"][0]["gap_alarm"] and stats["packets_pending"]
    assert "seq 1 cannot be read" in stats["stall_reason"] and watermarks(follower) == [0]
    text = generate_latest(registry).decode()
    assert 'ctrserve_embedding_hotload_stalled{shard="0"} 1.0' in text
    assert 'ctrserve_embedding_packets_pending{shard="0"} 1.0' in text
    assert 'ctrserve_embedding_packet_unreadable{shard="0",training_shard="0",training_shards="1"} 1.0' in text
    assert 'ctrserve_embedding_seconds_since_last_apply{shard="0"}' in text

    # The real packet replaces it: read at once (it changed), the shard goes on.
    trainer.storage.write_atomic(f"{packet_dir(0, 1)}/{packet_name(1)}", good)
    wait_until(lambda: watermarks(follower) == [2], timeout=10, what="the real packet and the next")
    assert_serves_trainer_state(emb, trainer, [store])
    stats = follower.stats()
    assert not stats["stalled"] and not stats["packets_pending"] and stats["streams"][0]["unreadable_seq"] == -1
    assert not stats["streams"][0]["gap_alarm"] and stats["seconds_since_last_apply"] < 10


class HangingStorage(LocalStorage):
    """A local model root where reading one file blocks until ``release`` is set (a stalled mount)."""

    def __init__(self, url: str, hang_on: str, release: threading.Event):
        super().__init__(url)
        self.hang_on, self.release = hang_on, release

    def read_buffer(self, path: str, max_bytes: int | None = None) -> memoryview:
        if path.endswith(self.hang_on):
            self.release.wait()
        return super().read_buffer(path, max_bytes)


@pytest.mark.unit
def test_a_read_that_hangs_is_bounded_in_time_and_the_follower_shows_it_stalled(emb, tmp_path, followers, wait_until):
    trainer = Trainer(emb, tmp_path, num_shards=1)
    trainer.step_and_publish()
    release = threading.Event()
    options = dataclasses.replace(FAST, read_timeout_s=0.3, unreadable_retry_s=30.0, stall_timeout_s=1.0)
    store = infer_stores(emb)[0]
    follower = followers(store, HangingStorage(str(tmp_path), packet_name(1), release), options)
    try:
        trainer.step_and_publish()  # seq 1: its read hangs
        trainer.step_and_publish()
        wait_until(
            lambda: "did not finish within" in stream_of(follower).get("unreadable_reason", ""),
            timeout=5,
            what="the read to time out",
        )
        wait_until(lambda: follower.stats()["stalled"], timeout=10, what="the follower to show it is stalled")
        assert "seq 1 cannot be read" in follower.stats()["stall_reason"] and watermarks(follower) == [0]
        assert not stream_of(follower)["held"]  # still within unreadable_retry_s
    finally:
        release.set()
    wait_until(lambda: watermarks(follower) == [2], what="the packets once the read returns")
    assert_serves_trainer_state(emb, trainer, [store])
    assert not follower.stats()["stalled"] and stream_of(follower)["unreadable_seq"] == -1


@pytest.mark.unit
def test_the_hotload_health_service_says_not_serving_while_the_follower_is_stalled(emb, tmp_path, wait_until):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from embedding_server.rpc.service import HOTLOAD_HEALTH_SERVICE, SERVICE_NAME, start_server

    trainer = Trainer(emb, tmp_path, num_shards=1)
    trainer.step_and_publish()
    options = dataclasses.replace(FAST, unreadable_retry_s=0.3, stall_timeout_s=0.6)
    server = start_server(
        emb, GlobalConfig.from_dict(INFER), model_root=str(tmp_path), follow_options=options, local_socket=None
    )
    try:
        channel = grpc.insecure_channel(server.address)
        health = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        assert status(HOTLOAD_HEALTH_SERVICE) == health_pb2.HealthCheckResponse.SERVING
        os.mkfifo(tmp_path / packet_dir(0, 1) / packet_name(1))
        trainer.seq[0] = 1
        trainer.step_and_publish()
        wait_until(
            lambda: status(HOTLOAD_HEALTH_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING,
            timeout=10,
            what="the hotload health to say NOT_SERVING",
        )
        for service in ("", SERVICE_NAME):  # lookups go on, from the last state applied
            assert status(service) == health_pb2.HealthCheckResponse.SERVING
        assert server.follower is not None and server.follower.skip_packet(0, 1, 1)["watermark"] == 1
        wait_until(
            lambda: status(HOTLOAD_HEALTH_SERVICE) == health_pb2.HealthCheckResponse.SERVING,
            timeout=10,
            what="the hotload health to recover",
        )
        assert watermarks(server.follower) == [2]
        channel.close()
    finally:
        server.stop(0)


@pytest.mark.unit
def test_a_reader_never_sees_half_of_a_packet(emb, tmp_path, followers, wait_until):
    """Packet k sets 40,000 stored rows to k and inserts 100 new rows of value k: one lookup of all
    of them sees packet k whole (its new rows k, later packets' new rows still absent: 0) or
    not at all. The store has room to stage, so packets apply while lookups run."""
    trainer = Trainer(emb, tmp_path, num_shards=1)
    user = emb.tables["user"]
    ids = np.arange(40_000, dtype=np.uint64)
    new_ids = [np.arange(100_000 + 100 * k, 100_100 + 100 * k, dtype=np.uint64) for k in range(40)]
    everything = np.concatenate([ids] + new_ids[1:])
    tabs = np.full(everything.shape[0], user.index, np.uint16)
    packet_of = np.concatenate([np.zeros(ids.shape[0])] + [np.full(100, k) for k in range(1, 40)])

    def constant(value: float) -> list[TableRows]:
        keys = np.concatenate([ids, new_ids[int(value)]]) if value else ids
        return [
            TableRows(
                user, keys, np.full((keys.shape[0], 8), value, np.float32), np.zeros((keys.shape[0], 0), np.float32)
            )
        ]

    trainer.publish(0, constant(0.0))
    store = infer_stores(emb, capacity=100_000)[0]
    follower = followers(store, str(tmp_path))
    torn, lookups, stop = [], [0], threading.Event()

    def reader():
        while not stop.is_set():
            values = store.lookup(everything, tabs)
            lookups[0] += 1
            k = values[0, 0]
            want = np.where(packet_of <= k, packet_of, 0.0)[:, None]  # packet j's new rows hold j
            if not (values[: ids.shape[0]] == k).all() or not (values[ids.shape[0] :] == want[ids.shape[0] :]).all():
                torn.append(np.unique(values))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for k in range(1, 40):
            trainer.publish(0, constant(float(k)))
            wait_until(lambda k=k: watermarks(follower) == [k], what=f"packet {k}")
    finally:
        stop.set()
        thread.join()
    assert not torn, f"a lookup saw a mix of packets: {torn[:3]}"
    assert lookups[0] > 40


@pytest.mark.unit
def test_once_synced_the_follower_applies_at_a_lower_cpu_priority(emb, tmp_path, followers, wait_until):
    trainer = Trainer(emb, tmp_path, num_shards=1)
    trainer.publish(
        0,
        [
            TableRows(
                emb.tables["user"],
                np.arange(3, dtype=np.uint64),
                np.ones((3, 8), np.float32),
                np.zeros((3, 0), np.float32),
            )
        ],
    )
    base = os.getpriority(os.PRIO_PROCESS, 0)
    follower = followers(infer_stores(emb)[0], str(tmp_path), FollowOptions(apply_niceness=5))
    tid = follower._thread.native_id
    wait_until(lambda: os.getpriority(os.PRIO_PROCESS, tid) == min(19, base + 5), what="the follower's niceness")
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the rest of the process keeps its priority
    with pytest.raises(ValueError, match="apply_niceness must be an integer in 0..19"):
        FollowOptions(apply_niceness=20)


@pytest.mark.unit
def test_once_synced_the_follower_applies_on_its_own_cpus_and_the_rest_of_the_process_keeps_its_own(
    emb, tmp_path, followers, wait_until
):
    trainer = Trainer(emb, tmp_path, num_shards=1)
    trainer.step_and_publish()
    process_cpus = usable_cpus()
    apply_cpus = frozenset({max(process_cpus)})
    follower = followers(infer_stores(emb)[0], str(tmp_path), dataclasses.replace(FAST, apply_cpus=apply_cpus))
    tid = follower._thread.native_id
    wait_until(lambda: os.sched_getaffinity(tid) == apply_cpus, what="the follower on its CPUs")
    assert usable_cpus() == process_cpus
    trainer.step_and_publish()  # still applied, in order, from the placed thread
    wait_until(lambda: watermarks(follower) == trainer.seq, what="the next packet")
    for bad in (set(), {-1}, {True}, 3):
        with pytest.raises(ValueError, match="apply_cpus must be a non-empty set of CPU numbers"):
            FollowOptions(apply_cpus=bad)


@pytest.mark.unit
def test_the_start_up_replay_commits_small_pages_and_serving_moves_them_onto_huge_pages(
    emb, tmp_path, caplog, wait_until, huge_page_bytes
):
    caplog.set_level(logging.INFO, logger="ctrserve.embedding_server.modelroot.hotload")
    trainer = Trainer(emb, tmp_path, num_shards=1)
    for _ in range(3):
        trainer.step_and_publish(rows=2000)
    store = infer_stores(emb, capacity=200_000)[0]
    follower = ModelRootFollower(store, str(tmp_path), FAST)
    assert not follower.wait_huge_pages(0.01)  # not started: nothing synced yet
    follower.start()
    try:
        assert follower.wait_synced(30) and follower.wait_huge_pages(30)
        assert not follower.stats()["huge_pages_pending"]
        assert huge_page_bytes(store._weights) >= HUGE_PAGE  # 64k committed rows of dim 8: 2 MiB
        assert f"rows of model root {follower.storage.url} moved onto huge pages in" in caplog.text
        assert_serves_trainer_state(emb, trainer, [store])
        trainer.step_and_publish(rows=2000)  # following goes on
        wait_until(lambda: watermarks(follower) == trainer.seq, what="the next packet")
        assert_serves_trainer_state(emb, trainer, [store])
    finally:
        follower.stop()


@pytest.mark.unit
def test_freshness_and_watermark_metrics(emb, tmp_path, followers, wait_until):
    trainer = Trainer(emb, tmp_path, num_shards=2)
    registry = CollectorRegistry()
    store = infer_stores(emb)[0]
    follower = followers(store, str(tmp_path), registry=registry, labels={"shard": "0"})
    old = time.time() - 5.0
    packets = [trainer.step()]
    for shard, tables in enumerate(packets[0]):
        trainer.publish(shard, tables, created_at=old)  # made 5 s ago
    packets += [trainer.step_and_publish() for _ in range(3)]
    wait_until(lambda: watermarks(follower) == trainer.seq, what="every packet")
    stats = follower.stats()
    rows = sum(t.ids.shape[0] for step in packets for shard in step for t in shard)
    assert stats["packets_applied"] == 8 and stats["rows_applied"] == rows
    assert 0.0 <= stats["freshness_p50_s"] < 5.0 <= stats["freshness_p99_s"] < 60.0
    text = generate_latest(registry).decode()
    assert 'ctrserve_embedding_packet_freshness_seconds_count{shard="0"} 8.0' in text
    assert 'ctrserve_embedding_watermark{shard="0",training_shard="1",training_shards="2"} 3.0' in text
    assert 'ctrserve_embedding_packets_applied_total{shard="0"} 8.0' in text
    assert 'ctrserve_embedding_hotload_synced{shard="0"} 1.0' in text
    assert follower.wait_huge_pages(30)
    assert 'ctrserve_embedding_huge_pages_pending{shard="0"} 0.0' in generate_latest(registry).decode()


@pytest.mark.unit
def test_newer_checkpoint_catches_up_a_shard_whose_packets_are_gone(emb, tmp_path, followers, wait_until):
    trainer = Trainer(emb, tmp_path, num_shards=2)
    trainer.step_and_publish()
    store = infer_stores(emb)[0]
    follower = followers(store, str(tmp_path))
    first = follower.stats()["checkpoint"]
    assert first == ""
    # Retention after a checkpoint removed packets 1..3 of both shards before the follower saw them.
    for _ in range(3):
        trainer.step_and_publish()
    name = trainer.checkpoint(1)
    for shard in range(2):
        for seq in (1, 2, 3):
            (tmp_path / packet_dir(shard, 2) / packet_name(seq)).unlink()
    trainer.step_and_publish()
    wait_until(lambda: watermarks(follower) == trainer.seq, what="the catch-up and packet 4")
    assert follower.stats()["checkpoint"] == name
    assert_serves_trainer_state(emb, trainer, [store])


@pytest.mark.unit
def test_a_resharded_trainer_is_followed_from_its_new_checkpoint(emb, tmp_path, followers, caplog, wait_until):
    caplog.set_level(logging.INFO, logger="ctrserve.embedding_server.modelroot.hotload")
    old = Trainer(emb, tmp_path, num_shards=2)
    old.step_and_publish()
    old.checkpoint(1)
    store = infer_stores(emb)[0]
    follower = followers(store, str(tmp_path))
    # The job restarts on 3 shards from the same rows: a new checkpoint, then packets of 3 shards.
    new = Trainer(emb, tmp_path, num_shards=3, seed=1)
    for name in emb.tables:
        ids, values = old.expected(name)
        spec = emb.tables[name]
        for store_new in new.stores:
            mine = store_new.owns(ids, np.full(ids.shape[0], spec.index, np.uint16))
            width = store_new.optimizer.state_width(spec.dim)
            store_new.put(TableRows(spec, ids[mine], values[mine], np.zeros((int(mine.sum()), width), np.float32)))
        new.keys[name] = set(old.keys[name])
    name = new.checkpoint(2)
    new.step_and_publish()
    wait_until(
        lambda: [(s["num_shards"], s["watermark"]) for s in follower.stats()["streams"]] == [(3, 0)] * 3,
        what="the switch to 3 training shards",
    )
    assert follower.stats()["checkpoint"] == name
    assert_serves_trainer_state(emb, new, [store])
    assert any("switched to checkpoint" in r.getMessage() for r in caplog.records)


# A child process follows model roots whose first packet is a special file, and prints how much
# its peak resident memory (VmHWM) grew meanwhile, after a warm-up on an ordinary root.
SPECIAL_FILES_CHILD = r"""
import json, os, sys, time
from pathlib import Path

import numpy as np

from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.modelroot.hotload import FollowOptions, ModelRootFollower
from embedding_server.modelroot.packets import encode_packet, packet_dir, packet_name
from embedding_server.store.store import EmbeddingStore, TableRows

work, emb_json, infer_json = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
emb = EmbeddingConfig.from_dict(json.loads(emb_json))
glob = GlobalConfig.from_dict(json.loads(infer_json))
options = FollowOptions(poll_interval_s=0.05, use_inotify=False, unreadable_retry_s=0.5, max_packet_bytes=512 << 20)


def hwm_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


def follow(root, seconds):
    follower = ModelRootFollower(EmbeddingStore(emb, glob, 0, 1), str(root), options).start()
    follower.wait_synced(30)
    time.sleep(seconds)
    stats = follower.stats()
    follower.stop(timeout=1.0)
    return stats


table = emb.tables["user"]
ids = np.arange(1000, dtype=np.uint64)
rows = TableRows(table, ids, np.ones((1000, table.dim), np.float32), np.zeros((1000, 0), np.float32))
warm = work / "warm"
(warm / packet_dir(0, 1)).mkdir(parents=True)
(warm / packet_dir(0, 1) / packet_name(0)).write_bytes(
    encode_packet([rows], shard=0, num_shards=1, seq=0, fingerprint=emb.fingerprint())
)
follow(warm, 0.5)
outside = work / "outside"
outside.mkdir()
with open(outside / "big.arrow", "wb") as fh:  # 256 MiB, sparse
    fh.truncate(256 << 20)
before = hwm_kib()
report = {}
for kind in ("fifo", "dev-zero", "file-outside", "dir-outside"):
    root = work / kind
    folder = root / packet_dir(0, 1)
    folder.mkdir(parents=True)
    target = folder / packet_name(0)
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to({"dev-zero": Path("/dev/zero"), "file-outside": outside / "big.arrow"}.get(kind, outside))
    stats = follow(root, 1.5)
    stream = stats["streams"][0] if stats["streams"] else {}
    report[kind] = {"reason": stream.get("unreadable_reason", ""), "watermark": stream.get("watermark")}
report["growth_kib"] = hwm_kib() - before
print(json.dumps(report))
"""


@pytest.mark.process  # a child process: its peak resident memory is measured
def test_special_files_as_packets_keep_the_followers_memory_bounded(emb, tmp_path):
    """A link to /dev/zero was read up to the size bound (2 GiB) on every pass, and a link to a big
    file outside the root read whole. Now neither is read at all: the peak resident memory of a
    process following such roots grows by less than 64 MiB (the bound here is 512 MiB)."""
    result = subprocess.run(
        [sys.executable, "-c", SPECIAL_FILES_CHILD, str(tmp_path), json.dumps(EMB), json.dumps(INFER)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["growth_kib"] < 64 << 10, f"peak resident memory grew by {report['growth_kib'] >> 10} MiB: {report}"
    for kind, reason in SPECIAL_PACKETS.items():
        assert reason in report[kind]["reason"], (kind, report[kind])
        assert report[kind]["watermark"] == FIRST_SEQ - 1, (kind, report[kind])


# ----------------------------------------------------------------------------- real server processes


@pytest.fixture(scope="module")
def config_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "emb.yml").write_text(yaml.safe_dump(EMB, sort_keys=False))
    (folder / "global.yml").write_text(yaml.safe_dump({"embedding_parameter_server_config": {"capacity": 20_000}}))
    return folder / "emb.yml", folder / "global.yml"


def hotload_health(address: str, service: str = "ctrserve.embedding.v1.Hotload") -> str:
    """The health status a server answers for ``service`` (its model-root follower by default)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def follow_args(root: str, gap_timeout: float = 30.0) -> list[str]:
    return ["--model-root", root, "--poll-interval", "0.1", "--rescan-interval", "1", "--gap-timeout", str(gap_timeout)]


def remote_lookup(client: RemoteEmbeddingClient, table, ids: np.ndarray) -> np.ndarray:
    return client.lookup_rows(ids, np.full(ids.shape[0], table.index, np.uint16), table.dim)


def assert_remote_serves_trainer_state(emb: EmbeddingConfig, trainer: Trainer, client: RemoteEmbeddingClient) -> None:
    for table in emb.tables.values():
        ids, want = trainer.expected(table.name)
        assert remote_lookup(client, table, ids).tobytes() == want.tobytes(), f"table {table.name} differs"


def server_watermarks(client: RemoteEmbeddingClient) -> list[list[int]]:
    return [[s["watermark"] for s in shard["hotload"]["streams"]] for shard in client.stats()]


@pytest.mark.process
def test_servers_are_ready_with_the_newest_state_then_follow_and_hold_at_a_corrupt_packet_until_it_is_skipped(
    emb, config_files, tmp_path, wait_until
):
    root = tmp_path / "model"
    trainer = Trainer(emb, root, num_shards=2)
    trainer.step_and_publish()
    trainer.checkpoint(1)
    trainer.step_and_publish()
    trainer.step_and_publish()
    with (
        ServerGroup.start(
            *config_files,
            num_shards=3,
            workdir=tmp_path / "servers",
            mode="infer",
            metrics=True,
            extra_args=follow_args(str(root)) + ["--unreadable-retry", "0.5", "--stall-timeout", "1"],
        ) as group,
        RemoteEmbeddingClient(emb, group.addresses) as client,
    ):
        # Ready means loaded: the very first lookups already answer the trainer's values.
        assert_remote_serves_trainer_state(emb, trainer, client)
        stats = client.stats()
        assert all(s["hotload"]["synced"] and s["hotload"]["checkpoint"] == f"{1:020d}" for s in stats)
        assert server_watermarks(client) == [trainer.seq] * 3
        assert stats[1]["watermark"] == {"0": trainer.seq[0], "1": trainer.seq[1]}  # what handlers report

        bad = trainer.seq[0] + 1
        trainer.storage.write_atomic(f"{packet_dir(0, 2)}/{packet_name(bad)}", b"not a packet at all")
        trainer.seq[0] += 1
        trainer.step_and_publish()
        # Every server holds training shard 0 before the bad packet (shard 1 goes on), alarms, and
        # its hotload health says NOT_SERVING once stalled, while lookups go on.
        wait_until(lambda: all(s["hotload"]["streams"][0]["held"] for s in client.stats()), what="every server to hold")
        assert server_watermarks(client) == [[bad - 1, trainer.seq[1]]] * 3
        assert all(s["hotload"]["streams"][0]["gap_alarm"] for s in client.stats())
        wait_until(
            lambda: [hotload_health(a) for a in group.addresses] == ["NOT_SERVING"] * 3, what="the stall to show"
        )
        assert all(s["hotload"]["stalled"] and s["hotload"]["packets_pending"] for s in client.stats())
        assert [hotload_health(a, "") for a in group.addresses] == ["SERVING"] * 3

        servers = ",".join(group.addresses)
        skip = ctrserve_command(
            "embedding-admin", "skip-packet", "--servers", servers, "--embedding-config", config_files[0]
        )
        skip += ["--training-shard", "0", "--training-shards", "2", "--seq", str(bad)]
        wrong = subprocess.run(skip[:-1] + [str(bad + 1)], capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 1 and f"held at seq {bad}, not {bad + 1}" in wrong.stderr
        done = subprocess.run(skip, capture_output=True, text=True, timeout=60, check=True)
        answers = json.loads(done.stdout)
        assert [[a["ok"] and a["skipped"] == [bad] for a in shard] for shard in answers] == [[True]] * 3
        wait_until(lambda: server_watermarks(client) == [trainer.seq] * 3, what="the servers to apply every packet")
        assert_remote_serves_trainer_state(emb, trainer, client)  # the bad packet held none of the trainer's rows
        stats = client.stats()
        assert [s["hotload"]["packets_quarantined"] for s in stats] == [1, 1, 1]
        assert [s["hotload"]["packets_skipped"] for s in stats] == [1, 1, 1]
        assert all(s["hotload"]["streams"][0]["skipped"] == [bad] for s in stats)
        assert all(s["skipped"] == {"0": [bad]} for s in stats)  # what handlers report as embedding_skipped
        wait_until(lambda: [hotload_health(a) for a in group.addresses] == ["SERVING"] * 3, what="the recovery")

        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{group.servers[0].metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        applied = client.stats()[0]["hotload"]["packets_applied"]
        assert applied == 6  # 2 steps after the checkpoint, then 1, of 2 training shards
        assert f'ctrserve_embedding_packet_freshness_seconds_count{{shard="0"}} {applied:.1f}' in metrics
        assert (
            f'ctrserve_embedding_watermark{{shard="0",training_shard="0",training_shards="2"}} {trainer.seq[0]:.1f}'
            in metrics
        )

        admin = subprocess.run(
            ctrserve_command("embedding-admin", "stats", "--servers", servers, "--embedding-config", config_files[0]),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        shown = json.loads(admin.stdout)
        assert [s["watermark"] for s in shown[2]["hotload"]["streams"]] == trainer.seq
        assert shown[2]["hotload"]["streams"][0]["skipped"] == [bad]
        assert shown[0]["hotload"]["freshness_p99_s"] >= shown[0]["hotload"]["freshness_p50_s"] >= 0.0
    log_text = group.servers[0].log_path.read_text()
    assert "still cannot be read" in log_text and "ERROR" in log_text and "skipped by an operator" in log_text
    assert "stalled" in log_text and "NOT_SERVING" in log_text


@pytest.mark.process
def test_server_with_a_gap_alarms_and_a_late_root_is_waited_for(emb, config_files, tmp_path, wait_until):
    root = tmp_path / "late" / "model"
    with (
        ServerGroup.start(
            *config_files,
            num_shards=1,
            workdir=tmp_path / "servers",
            mode="infer",
            extra_args=follow_args(str(root), gap_timeout=0.5),
        ) as group,
        RemoteEmbeddingClient(emb, group.addresses) as client,
    ):
        assert client.stats()[0]["hotload"]["streams"] == []  # serving (zeros) while the root is missing
        trainer = Trainer(emb, root, num_shards=1)
        steps = [trainer.step()[0] for _ in range(3)]
        trainer.publish(0, steps[0], seq=0)
        trainer.publish(0, steps[2], seq=2)
        wait_until(lambda: any(s["gap_alarm"] for s in client.stats()[0]["hotload"]["streams"]), what="the gap alarm")
        assert client.stats()[0]["hotload"]["streams"][0]["waiting_for"] == 1
        trainer.publish(0, steps[1], seq=1)
        wait_until(lambda: server_watermarks(client) == [[2]], what="the gap to close")
        assert not client.stats()[0]["hotload"]["streams"][0]["gap_alarm"]
        assert_remote_serves_trainer_state(emb, trainer, client)
    log_text = group.servers[0].log_path.read_text()
    assert "packet seq 1 still missing" in log_text and log_text.count("has no checkpoints/ or incremental/ yet") == 1


@pytest.mark.process
def test_server_killed_mid_stream_restarts_to_the_identical_state(emb, config_files, tmp_path, wait_until):
    root = tmp_path / "model"
    trainer = Trainer(emb, root, num_shards=2)
    trainer.step_and_publish()
    trainer.checkpoint(1)
    group = ServerGroup.start(
        *config_files, num_shards=1, workdir=tmp_path / "first", mode="infer", extra_args=follow_args(str(root))
    )
    try:
        stop = threading.Event()

        def publish_steadily() -> None:
            for _ in range(30):
                if stop.is_set():
                    return
                trainer.step_and_publish(500)

        publisher = threading.Thread(target=publish_steadily)
        publisher.start()
        with RemoteEmbeddingClient(emb, group.addresses) as client:
            wait_until(lambda: client.stats()[0]["hotload"]["packets_applied"] >= 4, what="packets to flow")
        group.servers[0].process.kill()  # SIGKILL while packets are being published and applied
        group.servers[0].process.wait(30)
        publisher.join()
    finally:
        stop.set()
        group.stop()
    trainer.step_and_publish()
    with (
        ServerGroup.start(
            *config_files, num_shards=1, workdir=tmp_path / "second", mode="infer", extra_args=follow_args(str(root))
        ) as again,
        RemoteEmbeddingClient(emb, again.addresses) as client,
    ):
        assert server_watermarks(client) == [trainer.seq]
        assert_remote_serves_trainer_state(emb, trainer, client)


@pytest.mark.process
def test_model_root_needs_infer_mode(config_files, tmp_path):
    result = subprocess.run(
        server_command(*config_files, "--model-root", tmp_path), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--model-root needs infer mode" in result.stderr


def thread_cpus(pid: int) -> dict[int, str]:
    """Each thread of process ``pid``: its CPU list, as the kernel shows it."""
    cpus = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                cpus[int(task.name)] = line.split(":", 1)[1].strip()
    return cpus


@pytest.mark.process
def test_server_applies_packets_on_its_apply_cpus_and_serves_on_the_others(emb, config_files, tmp_path, wait_until):
    root = tmp_path / "model"
    trainer = Trainer(emb, root, num_shards=1)
    trainer.step_and_publish()
    usable = usable_cpus()
    apply = frozenset({max(usable)})
    serve = usable - apply or apply  # a one-CPU machine: both on it, named explicitly
    flags = ["--apply-cpus", format_cpu_list(apply)] + (
        [] if usable - apply else ["--serve-cpus", format_cpu_list(serve)]
    )
    with (
        ServerGroup.start(
            *config_files,
            num_shards=1,
            workdir=tmp_path / "servers",
            mode="infer",
            extra_args=follow_args(str(root)) + flags,
        ) as group,
        RemoteEmbeddingClient(emb, group.addresses) as client,
    ):
        pid = group.servers[0].process.pid

        def placed_once_ready() -> dict[int, str] | None:
            cpus = thread_cpus(pid)
            return cpus if format_cpu_list(apply) in cpus.values() else None

        placed = wait_until(placed_once_ready, what="the applying thread on its CPUs")
        assert placed[pid] == format_cpu_list(serve)  # the main thread, and with it what it started
        assert set(placed.values()) <= {format_cpu_list(serve), format_cpu_list(apply)}
        assert list(placed.values()).count(format_cpu_list(serve)) >= 3  # gRPC's threads too
        trainer.step_and_publish()
        wait_until(lambda: server_watermarks(client) == [trainer.seq], what="a packet applied on the apply CPUs")
        assert_remote_serves_trainer_state(emb, trainer, client)
    assert f"applied on CPUs {format_cpu_list(apply)}" in group.servers[0].log_path.read_text()


@pytest.mark.process
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--apply-cpus", "0"], "--apply-cpus needs --model-root"),
        (["--model-root", "{root}", "--apply-cpus", "{all}"], "leaves no CPU to serve on"),
        (["--model-root", "{root}", "--apply-cpus", "{none}"], "is not available to this process"),
        (["--serve-cpus", "{none}"], "is not available to this process"),
        (["--model-root", "{root}", "--apply-cpus", "3-1"], "argument --apply-cpus: CPU list '3-1'"),
    ],
)
def test_cpu_placement_flags_that_cannot_hold_are_refused(config_files, tmp_path, flags, message):
    fill = {"root": str(tmp_path), "all": format_cpu_list(usable_cpus()), "none": str(max(usable_cpus()) + 64)}
    result = subprocess.run(
        server_command(*config_files, "--mode", "infer", *(f.format(**fill) for f in flags)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.process
@pytest.mark.ceph
def test_server_follows_an_s3_model_root_on_ceph(emb, config_files, tmp_path, ceph_s3, monkeypatch, wait_until):
    for name, value in ceph_s3.env().items():
        monkeypatch.setenv(name, value)  # the server processes inherit them
    root = f"s3://{ceph_s3.bucket}/hotload-{uuid.uuid4().hex[:8]}"
    trainer = Trainer(emb, open_storage(root, ceph_s3.options()), num_shards=2)
    trainer.step_and_publish()
    trainer.checkpoint(1)
    trainer.step_and_publish()
    with (
        ServerGroup.start(
            *config_files, num_shards=2, workdir=tmp_path / "servers", mode="infer", extra_args=follow_args(root)
        ) as group,
        RemoteEmbeddingClient(emb, group.addresses) as client,
    ):
        assert_remote_serves_trainer_state(emb, trainer, client)
        for _ in range(2):
            trainer.step_and_publish()
        wait_until(lambda: server_watermarks(client) == [trainer.seq] * 2, what="the packets on S3")
        assert_remote_serves_trainer_state(emb, trainer, client)
        assert all(s["hotload"]["model_root"] == root for s in client.stats())
