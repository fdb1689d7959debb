"""No update lost: a training shard's packet sequence numbers strictly increase across restarts,
retention, resharding and a trainer whose local state is gone, and a server alarms when a packet
of another trainer run lands at or below its watermark.

The end-to-end test trains with the real TrainCtx (in-process shards publishing packets), real
checkpoints with retention and a real follower; the others drive PacketPublisher and the
follower on a local model root with the real storage layer.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from prometheus_client import CollectorRegistry, generate_latest

from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.optimizers import Adagrad
from embedding_server.modelroot import checkpoint
from embedding_server.modelroot.hotload import ModelRootFollower
from embedding_server.modelroot.incremental import PacketPublisher, publish_checkpoint, read_published_packet
from embedding_server.modelroot.packets import (
    LAST_SEQ_FILE,
    PacketError,
    decode_packet,
    encode_packet,
    packet_dir,
    packet_name,
    parse_packet_name,
)
from embedding_server.storage.base import LocalStorage, StorageError
from embedding_server.store.store import EmbeddingStore, TableRows
from trainer.batch import PyPersiaBatchData
from trainer.ctx import TrainCtx
from trainer.models import DeepCTR

pytestmark = pytest.mark.unit

EMB = {"slots_config": {"user": {"dim": 4}, "item": {"dim": 4}}}
CONFIG = EmbeddingConfig.from_dict(EMB)
USER = CONFIG.tables["user"]
DENSE_WIDTH = 2


def train_config(root: Path, **server) -> GlobalConfig:
    return GlobalConfig.from_dict(
        {
            "embedding_parameter_server_config": {
                "capacity": 100_000,
                "enable_incremental_update": True,
                "incremental_dir": f"{root}/incremental",
                "incremental_buffer_size": 1_000_000,
                "incremental_flush_interval": 3600,
                **server,
            },
            "sparse_optimizer": {"type": "adagrad", "lr": 0.1},
        }
    )


def infer_store(capacity: int = 100_000) -> EmbeddingStore:
    glob = GlobalConfig.from_dict(
        {"common_config": {"job_type": "infer"}, "embedding_parameter_server_config": {"capacity": capacity}}
    )
    return EmbeddingStore(CONFIG, glob)


def make_batch(rng: np.random.Generator, size: int = 32, vocab: int = 400) -> PyPersiaBatchData:
    b = PyPersiaBatchData()
    b.add_dense_f32(rng.standard_normal((size, DENSE_WIDTH), dtype=np.float32))
    b.add_sparse(
        [
            (name, [rng.integers(0, vocab, rng.integers(1, 4)).astype(np.uint64) for _ in range(size)])
            for name in EMB["slots_config"]
        ]
    )
    b.add_target(rng.integers(0, 2, (size, 1)).astype(np.float32))
    return b


def new_ctx(root: Path) -> TrainCtx:
    torch.manual_seed(0)
    model = DeepCTR(DENSE_WIDTH, [4, 4], hidden=(8,))
    return TrainCtx(
        model=model,
        dense_optimizer=torch.optim.Adam(model.parameters(), 1e-2),
        sparse_optimizer=Adagrad(lr=0.1),
        embedding_config=CONFIG,
        global_config=train_config(root),
        num_shards=2,
    )


def follower_watermarks(follower: ModelRootFollower) -> list[int]:
    return [s["watermark"] for s in follower.stats()["streams"]]


def trainer_rows(ctx: TrainCtx) -> list[TableRows]:
    return [rows for store in ctx.client.stores for rows in store.rows() if rows.ids.shape[0]]


def assert_serves(store: EmbeddingStore, rows: list[TableRows]) -> None:
    """Every row of the trainer, exactly, in the serving store."""
    compared = 0
    for part in rows:
        tabs = np.full(part.ids.shape[0], part.table.index, np.uint16)
        served = store.lookup(part.ids, tabs)
        assert served.tobytes() == part.weights.tobytes(), f"table {part.table.name}: served rows differ"
        compared += part.ids.shape[0]
    assert compared > 0


def test_a_resumed_trainer_continues_its_sequence_after_retention_and_serving_sees_every_update(
    polling_follow, tmp_path, wait_until
):
    """The incident: a job publishes packets and checkpoints (keep=1, so retention deletes every
    packet the newest checkpoint includes), stops, and is resumed from its checkpoint. The
    resumed job must number its packets above the old ones; a follower that followed the whole
    time serves exactly the trainer's final rows, and so does a server started afterwards."""
    root, run = tmp_path / "root", tmp_path / "run"
    rng = np.random.default_rng(0)
    store = infer_store()
    follower = ModelRootFollower(store, str(root), polling_follow).start()  # a serving shard, there all along
    assert follower.wait_synced(30)

    def train(ctx: TrainCtx, steps: int) -> None:
        for step in range(1, steps + 1):
            out, target = ctx.forward(make_batch(rng))
            ctx.backward(F.binary_cross_entropy(out, target))
            if step % 2 == 0:
                seqs = [p.flush() for p in ctx.client.publishers]
                wait_until(lambda seqs=seqs: follower_watermarks(follower) == seqs, what=f"the follower at {seqs}")
            if step % 4 == 0:
                publish_checkpoint(ctx.client, str(root), keep=1)

    first = new_ctx(root)
    train(first, 8)
    first.dump_checkpoint(run)  # what resume_from reads
    publish_checkpoint(first.client, str(root), keep=1)
    first_seqs = [p.last_seq for p in first.client.publishers]
    first.close()
    assert follower_watermarks(follower) == first_seqs and min(first_seqs) >= 3
    for shard in range(2):  # retention removed every packet the newest checkpoint includes
        assert [parse_packet_name(p.name) for p in (root / packet_dir(shard, 2)).glob("*.arrow")] == []

    resumed = new_ctx(root)  # a new process: its publishers know nothing of the first run
    resumed.load_checkpoint(run)
    try:
        train(resumed, 6)
        last = [p.flush() for p in resumed.client.publishers]
        assert all(b > a for a, b in zip(first_seqs, last)), (first_seqs, last)
        wait_until(lambda: follower_watermarks(follower) == last, what=f"the follower at the resumed run's {last}")
        assert_serves(store, trainer_rows(resumed))
        assert follower.stats()["foreign_run_packets"] == 0
        restarted = infer_store()  # a server started now: newest checkpoint plus newer packets
        with ModelRootFollower(restarted, str(root), polling_follow) as fresh:
            assert fresh.wait_synced(30)
            assert follower_watermarks(fresh) == last
            assert_serves(restarted, trainer_rows(resumed))
    finally:
        resumed.close()
        follower.stop()


def held_rows(stores) -> dict[str, tuple[bytes, bytes]]:
    """Every row of every table the stores hold, ordered by id: (ids, weights) as bytes."""
    parts: dict[str, list[TableRows]] = {}
    for store in stores:
        for rows in store.rows():
            parts.setdefault(rows.table.name, []).append(rows)
    out = {}
    for name, group in parts.items():
        ids = np.concatenate([g.ids for g in group])
        weights = np.concatenate([g.weights for g in group])
        order = np.argsort(ids, kind="stable")
        out[name] = (ids[order].tobytes(), np.ascontiguousarray(weights[order]).tobytes())
    return out


def held_state(stores) -> dict[tuple[str, int], bytes]:
    """The optimizer state of every row the stores hold."""
    return {
        (rows.table.name, int(i)): rows.state[k].tobytes()
        for store in stores
        for rows in store.rows()
        for k, i in enumerate(rows.ids)
    }


@pytest.mark.parametrize("packets_gone", [False, True], ids=["packets-kept", "packets-retained-away"])
def test_a_trainer_resumed_after_a_kill_adopts_what_the_killed_run_published(
    packets_gone, polling_follow, tmp_path, wait_until
):
    """A run publishes packets past its training checkpoint (changed and new rows), is killed,
    and is resumed from that checkpoint: it adopts those rows (from the packets, or from the newer
    model-root checkpoint retention left instead), so a follower that lived through the kill and
    a fresh one serve exactly the resumed trainer's rows, every row of every table."""
    root, run = tmp_path / "root", tmp_path / "run"
    rng = np.random.default_rng(1)
    store = infer_store()
    follower = ModelRootFollower(store, str(root), polling_follow).start()
    assert follower.wait_synced(30)

    def train(ctx: TrainCtx, steps: int, vocab: int) -> list[int]:
        for _ in range(steps):
            out, target = ctx.forward(make_batch(rng, vocab=vocab))
            ctx.backward(F.binary_cross_entropy(out, target))
        seqs = [p.flush() for p in ctx.client.publishers]
        wait_until(lambda: follower_watermarks(follower) == seqs, what=f"the follower at {seqs}")
        return seqs

    first = new_ctx(root)
    resumed = None
    try:
        train(first, 3, vocab=200)
        publish_checkpoint(first.client, str(root))
        first.dump_checkpoint(run)  # resume_from
        checkpointed = held_state(first.client.stores)
        train(first, 3, vocab=600)  # past the checkpoint: rows changed again, new ids
        if packets_gone:  # a newer model-root checkpoint; retention deletes the packets it includes
            publish_checkpoint(first.client, str(root), keep=1)
            train(first, 2, vocab=800)
        killed = held_rows(first.client.stores)
        assert held_rows([store]) == killed  # the follower serves the killed run's rows
        # SIGKILL: nothing more of the first run is published; a new process resumes.
        resumed = new_ctx(root)
        resumed.load_checkpoint(run)
        assert held_rows(resumed.client.stores) == killed  # it adopted what was published
        zero = np.zeros(4, np.float32).tobytes()  # Adagrad: one accumulator per dim
        state = held_state(resumed.client.stores)
        assert state == {key: checkpointed.get(key, zero) for key in state}  # new ids: zero state
        assert len(state) > len(checkpointed)
        train(resumed, 3, vocab=200)
        publish_checkpoint(resumed.client, str(root))
        last = [p.flush() for p in resumed.client.publishers]
        final = held_rows(resumed.client.stores)
        assert held_rows([store]) == final
        restarted = infer_store()  # a replica started now: newest checkpoint plus newer packets
        with ModelRootFollower(restarted, str(root), polling_follow) as fresh:
            assert fresh.wait_synced(30)
            assert follower_watermarks(fresh) == follower_watermarks(follower) == last
            assert held_rows([restarted]) == final
    finally:
        if resumed is not None:
            resumed.close()
        first.close()
        follower.stop()


def push(store: EmbeddingStore, ids, seed: int = 0) -> None:
    keys = np.asarray(ids, np.uint64)
    tabs = np.full(keys.shape[0], USER.index, np.uint16)
    store.lookup(keys, tabs)
    store.apply_gradients(keys, tabs, np.random.default_rng(seed).standard_normal((keys.shape[0], 4), np.float32))


def publish_rounds(root: Path, rounds: int, shard: int = 0, num_shards: int = 1) -> PacketPublisher:
    store = EmbeddingStore(CONFIG, train_config(root), shard, num_shards)
    publisher = PacketPublisher(store)
    candidates = np.arange(1000, dtype=np.uint64)
    mine = candidates[store.owns(candidates, np.full(candidates.shape[0], USER.index, np.uint16))]
    for i in range(rounds):
        push(store, mine[3 * i : 3 * i + 3], seed=i)
        publisher.flush()
    return publisher


def delete_packets(root: Path, shard: int = 0, num_shards: int = 1) -> None:
    for path in (root / packet_dir(shard, num_shards)).glob("*.arrow"):
        path.unlink()


def test_the_marker_keeps_the_sequence_when_every_packet_is_gone(tmp_path):
    first = publish_rounds(tmp_path, 5)
    assert first.last_seq == 4
    delete_packets(tmp_path)  # retention (or an operator) deleted them; no checkpoint says anything
    second = publish_rounds(tmp_path, 1)
    assert second.last_seq == 5 and second.run_id != first.run_id
    marker = json.loads((tmp_path / packet_dir(0, 1) / LAST_SEQ_FILE).read_text())
    assert (marker["seq"], marker["run_id"], marker["shard"], marker["num_shards"]) == (5, second.run_id, 0, 1)
    assert decode_packet((tmp_path / packet_dir(0, 1) / packet_name(5)).read_bytes(), CONFIG).run_id == second.run_id


def test_a_corrupt_marker_is_reported_and_the_other_sources_still_count(tmp_path, caplog):
    publish_rounds(tmp_path, 3)
    (tmp_path / packet_dir(0, 1) / LAST_SEQ_FILE).write_text("{not json")
    assert publish_rounds(tmp_path, 1).last_seq == 3
    assert any("ignoring an unreadable marker" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / packet_dir(0, 1) / LAST_SEQ_FILE).read_text())["seq"] == 3  # rewritten


def write_checkpoint(root: Path, number: int, num_shards: int, watermark: dict[str, int]) -> None:
    glob = train_config(root)
    stores = [EmbeddingStore(CONFIG, glob, s, num_shards) for s in range(num_shards)]
    checkpoint.dump_stores(stores, str(root / "checkpoints" / f"{number:020d}"), watermark)


def test_the_newest_checkpoint_of_the_same_shard_count_keeps_the_sequence(tmp_path):
    """Packets and marker gone (a model root restored from its checkpoints): the newest complete
    checkpoint of the same training shard count says where the shard stopped; one of another
    shard count, or one without its manifest, does not count."""
    write_checkpoint(tmp_path, 1, 2, {"0": 3, "1": 9})
    write_checkpoint(tmp_path, 2, 2, {"0": 7, "1": 11})
    write_checkpoint(tmp_path, 3, 3, {"0": 50, "1": 50, "2": 50})  # a resharded job's: other streams
    (tmp_path / "checkpoints" / f"{4:020d}").mkdir()  # a writer that died before its manifest
    publisher = publish_rounds(tmp_path, 1, shard=1, num_shards=2)
    assert publisher.last_seq == 12
    assert publish_rounds(tmp_path, 1, shard=0, num_shards=2).last_seq == 8


def test_a_resharded_job_going_back_continues_above_its_old_streams(tmp_path):
    for shard in range(2):
        publish_rounds(tmp_path, 3, shard, 2)
    for shard in range(3):
        assert publish_rounds(tmp_path, 2, shard, 3).last_seq == 1  # new streams start at 0
    for shard in range(2):
        delete_packets(tmp_path, shard, 2)
    for shard in range(2):
        assert publish_rounds(tmp_path, 1, shard, 2).last_seq == 3


class _Flaky(LocalStorage):
    """A local storage whose reads fail while ``down`` is set."""

    down = True

    def list_dir(self, path: str = "") -> list[str]:
        if _Flaky.down:
            raise StorageError(f"{self.url}: listing failed: connection refused")
        return super().list_dir(path)

    def child(self, path: str) -> LocalStorage:
        return _Flaky(self.join_url(path))


def test_an_unreadable_folder_at_start_delays_the_first_packet_instead_of_restarting_at_zero(tmp_path):
    publish_rounds(tmp_path, 3)
    folder = tmp_path / packet_dir(0, 1)
    before = {p.name: p.read_bytes() for p in folder.glob("*.arrow")}
    store = EmbeddingStore(CONFIG, train_config(tmp_path))
    _Flaky.down = True
    publisher = PacketPublisher(store, _Flaky(str(tmp_path / "incremental")))
    push(store, [1, 2])
    with pytest.raises(StorageError):
        publisher.flush()
    assert {p.name: p.read_bytes() for p in folder.glob("*.arrow")} == before  # nothing overwritten
    _Flaky.down = False
    assert publisher.flush() == 3  # the rows waited; numbering continues above the old packets
    got = decode_packet((tmp_path / packet_dir(0, 1) / packet_name(3)).read_bytes(), CONFIG)
    assert sorted(got.tables[0].ids.tolist()) == [1, 2]


def test_packets_carry_their_run_id_and_older_packets_without_one_still_decode():
    rows = [TableRows(USER, np.arange(3, dtype=np.uint64), np.ones((3, 4), np.float32), np.zeros((3, 0), np.float32))]
    data = encode_packet(rows, shard=0, num_shards=1, seq=4, fingerprint=CONFIG.fingerprint(), run_id="job-7")
    assert decode_packet(data, CONFIG).run_id == "job-7"
    older = encode_packet(rows, shard=0, num_shards=1, seq=4, fingerprint=CONFIG.fingerprint())
    assert decode_packet(older, CONFIG).run_id == ""
    with pytest.raises(ValueError, match="run_id"):
        encode_packet(rows, shard=0, num_shards=1, seq=4, fingerprint=CONFIG.fingerprint(), run_id="a\nb")


def write_packet(root: Path, seq: int, run_id: str, ids, value: float) -> None:
    keys = np.asarray(ids, np.uint64)
    rows = [
        TableRows(USER, keys, np.full((keys.shape[0], 4), value, np.float32), np.zeros((keys.shape[0], 0), np.float32))
    ]
    data = encode_packet(rows, shard=0, num_shards=1, seq=seq, fingerprint=CONFIG.fingerprint(), run_id=run_id)
    LocalStorage(str(root)).write_atomic(f"{packet_dir(0, 1)}/{packet_name(seq)}", data)


def test_a_packet_of_another_run_at_or_below_the_watermark_raises_the_alarm(
    polling_follow, tmp_path, caplog, wait_until
):
    """What the follower saw in the incident: run A's packets 0..3 applied and then deleted by
    retention, and a restarted run B numbering again from 0. Its packets are not applied (that
    would be out of order) but each one is reported: a WARNING, the stats counter and the
    Prometheus counter. A rewrite by the same run is a plain duplicate."""
    caplog.set_level(logging.INFO, logger="ctrserve.embedding_server.modelroot.hotload")
    for seq in range(4):
        write_packet(tmp_path, seq, "run-A", [seq, 100], float(seq))
    registry = CollectorRegistry()
    store = infer_store()
    with ModelRootFollower(store, str(tmp_path), polling_follow, registry=registry, labels={"shard": "0"}) as follower:
        assert follower.wait_synced(30) and follower_watermarks(follower) == [3]
        delete_packets(tmp_path)  # retention, long before the restarted run writes
        wait_until(lambda: any("waiting for packets" in r.getMessage() for r in caplog.records), what="a look")
        write_packet(tmp_path, 2, "run-A", [2, 100], 2.0)  # the same run's packet again: a duplicate
        write_packet(tmp_path, 0, "run-B", [0, 100], 50.0)
        write_packet(tmp_path, 1, "run-B", [1, 100], 51.0)
        wait_until(lambda: follower.stats()["foreign_run_packets"] == 2, what="the foreign-run alarm")
        write_packet(tmp_path, 4, "run-B", [7], 4.0)  # above the watermark: applied as usual
        wait_until(lambda: follower_watermarks(follower) == [4], what="packet 4")
        stats = follower.stats()
        metrics = generate_latest(registry).decode()
    assert stats["foreign_run_packets"] == 2
    assert [line.split(": ")[0].rsplit("/", 1)[1] for line in stats["foreign_runs"]] == [packet_name(0), packet_name(1)]
    assert 'ctrserve_embedding_foreign_run_packets_total{shard="0"} 2.0' in metrics
    warnings = [r.getMessage() for r in caplog.records if "appeared at or below the watermark" in r.getMessage()]
    assert len(warnings) == 2 and all("'run-B'" in w and "'run-A'" in w for w in warnings)
    tabs = np.full(2, USER.index, np.uint16)
    np.testing.assert_array_equal(store.lookup(np.array([0, 100], np.uint64), tabs)[:, 0], [0.0, 3.0])


def test_a_resumed_trainer_reads_a_packet_being_copied_in_place_again_until_it_is_whole(tmp_path):
    """Found by benchmarks/chaos.py: a resumed trainer adopting what its killed run published met
    a packet that an outside tool was rewriting in place, and exited. It reads it again with
    backoff until whole; a packet that stays unreadable is still refused, naming it."""
    write_packet(tmp_path, 4, "run-A", [1, 2, 3], 7.0)
    path = tmp_path / packet_dir(0, 1) / packet_name(4)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # the first half of a slow copy
    storage = LocalStorage(str(tmp_path / packet_dir(0, 1)))
    rest = threading.Timer(0.3, lambda: path.write_bytes(whole))
    rest.start()
    try:
        packet = read_published_packet(storage, 4, CONFIG, str(path), retry_s=30.0)
    finally:
        rest.join()
    assert packet.seq == 4 and packet.tables[0].weights.tolist() == [[7.0] * 4] * 3
    path.write_bytes(whole[: len(whole) // 2])  # a copy that never completes
    with pytest.raises(PacketError, match=packet_name(4)):
        read_published_packet(storage, 4, CONFIG, str(path), retry_s=0.3)
