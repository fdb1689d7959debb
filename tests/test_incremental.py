"""Training side of incremental updates: change tracking, packets, publishing triggers,
checkpoint watermarks, retention, and replay reproducing the trainer's rows exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.modelroot import checkpoint
from embedding_server.modelroot.incremental import PacketPublisher, complete_checkpoints, publish_checkpoint, retain
from embedding_server.modelroot.packets import (
    PacketError,
    decode_packet,
    encode_packet,
    packet_dir,
    packet_name,
    parse_packet_name,
)
from embedding_server.rpc.client import InProcessEmbeddingClient
from embedding_server.rpc.launcher import ServerGroup
from embedding_server.rpc.remote import RemoteEmbeddingClient
from embedding_server.store.store import EmbeddingStore, TableRows

EMB = {"slots_config": {"user": {"dim": 4}, "item": {"dim": 8}}}
CONFIG = EmbeddingConfig.from_dict(EMB)
USER, ITEM = CONFIG.tables["user"].index, CONFIG.tables["item"].index


def global_config(root: Path | str, **server) -> GlobalConfig:
    return GlobalConfig.from_dict(
        {
            "embedding_parameter_server_config": {
                "capacity": 1000,
                "enable_incremental_update": True,
                "incremental_dir": f"{root}/incremental",
                "incremental_buffer_size": 10_000,
                "incremental_flush_interval": 3600,
                **server,
            },
            "sparse_optimizer": {"type": "adagrad", "lr": 0.1},
        }
    )


def keys(ids, table: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, np.uint64)
    return ids, np.full(ids.shape[0], table, np.uint16)


def push(store: EmbeddingStore, ids, table: int, seed: int = 0) -> None:
    i, t = keys(ids, table)
    dim = CONFIG.slots_config["user" if table == USER else "item"].dim
    store.lookup(i, t)
    store.apply_gradients(i, t, np.random.default_rng(seed).standard_normal((i.shape[0], dim)).astype(np.float32))


def as_dict(tables: list[TableRows]) -> dict[tuple[str, int], np.ndarray]:
    return {(t.table.name, int(i)): w for t in tables for i, w in zip(t.ids, t.weights)}


def packets_of(root: Path, shard: int = 0, num_shards: int = 1) -> list[int]:
    folder = root / packet_dir(shard, num_shards)
    return (
        sorted(s for s in (parse_packet_name(p.name) for p in folder.glob("*")) if s is not None)
        if folder.exists()
        else []
    )


@pytest.mark.unit
def test_changed_rows_are_taken_once_with_their_current_values(tmp_path):
    store = EmbeddingStore(CONFIG, global_config(tmp_path))
    push(store, [1, 2, 2, 3], USER)
    push(store, [7], ITEM, seed=1)
    store.lookup(*keys([50, 51], USER))  # looked up only: not a change
    assert store.pending_changes == 4
    changes = as_dict(store.take_changes())
    assert set(changes) == {("user", 1), ("user", 2), ("user", 3), ("item", 7)}
    for (name, i), w in changes.items():
        np.testing.assert_array_equal(w, store.lookup(*keys([i], CONFIG.tables[name].index))[0])
    assert store.pending_changes == 0 and store.take_changes() == []


@pytest.mark.unit
def test_rows_evicted_before_a_flush_are_published_with_their_last_value(tmp_path):
    store = EmbeddingStore(CONFIG, global_config(tmp_path, capacity=64))
    push(store, [1, 2], USER)
    before = store.lookup(*keys([1, 2], USER)).copy()
    for start in range(100, 400, 30):  # enough new rows to evict ids 1 and 2
        store.lookup(*keys(range(start, start + 30), USER))
    assert store.counters()["evictions"] > 0
    changes = as_dict(store.take_changes())
    np.testing.assert_array_equal(changes[("user", 1)], before[0])
    np.testing.assert_array_equal(changes[("user", 2)], before[1])


@pytest.mark.unit
def test_an_evicted_row_updated_again_publishes_its_newest_value(tmp_path):
    store = EmbeddingStore(CONFIG, global_config(tmp_path, capacity=64))
    push(store, [1], USER)
    for start in range(100, 400, 30):
        store.lookup(*keys(range(start, start + 30), USER))
    push(store, [1], USER, seed=5)  # re-inserted with its initial value, then updated
    changes = store.take_changes()
    assert sum(t.ids.shape[0] for t in changes) == 1
    np.testing.assert_array_equal(as_dict(changes)[("user", 1)], store.lookup(*keys([1], USER))[0])


@pytest.mark.unit
def test_stores_without_incremental_updates_do_not_track(tmp_path):
    plain = EmbeddingStore(CONFIG, GlobalConfig.from_dict({}))
    infer = EmbeddingStore(CONFIG, GlobalConfig.from_dict({"common_config": {"job_type": "infer"}}))
    for store in (plain, infer):
        assert not store.tracks_changes
        with pytest.raises(RuntimeError, match="does not track changes"):
            store.take_changes()
    with pytest.raises(ValueError, match="does not track changes"):
        PacketPublisher(plain, str(tmp_path))


@pytest.mark.unit
def test_a_full_buffer_publishes_a_packet_without_waiting_for_the_interval(tmp_path, wait_until):
    store = EmbeddingStore(CONFIG, global_config(tmp_path, incremental_buffer_size=3))
    publisher = PacketPublisher(store).start()
    try:
        push(store, [1, 2], USER)
        assert packets_of(tmp_path) == []  # below the buffer size: nothing yet
        push(store, [3, 4], USER)
        wait_until(lambda: packets_of(tmp_path) == [0], what="packet 0")
    finally:
        publisher.close()


@pytest.mark.unit
def test_the_interval_publishes_pending_rows(tmp_path, wait_until):
    store = EmbeddingStore(CONFIG, global_config(tmp_path, incremental_flush_interval=0.2))
    publisher = PacketPublisher(store).start()
    try:
        push(store, [1], USER)
        wait_until(lambda: packets_of(tmp_path) == [0], what="packet 0 by interval")
    finally:
        publisher.close()


@pytest.mark.unit
def test_close_publishes_pending_rows_and_a_restart_continues_the_sequence(tmp_path):
    store = EmbeddingStore(CONFIG, global_config(tmp_path))
    publisher = PacketPublisher(store).start()
    push(store, [1], USER)
    publisher.close()
    assert packets_of(tmp_path) == [0]
    restarted = PacketPublisher(store).start()
    assert restarted.last_seq == 0
    push(store, [2], USER)
    restarted.close()
    assert packets_of(tmp_path) == [0, 1]
    assert restarted.stats()["packets_published"] == 1 and restarted.stats()["pending_rows"] == 0


@pytest.mark.unit
def test_packets_are_plain_arrow_files_with_their_metadata(tmp_path):
    store = EmbeddingStore(CONFIG, global_config(tmp_path))
    push(store, [1, 2], USER)
    push(store, [9], ITEM)
    expected = as_dict(store.take_changes())
    data = encode_packet(
        [
            TableRows(CONFIG.tables[n], np.array([i], np.uint64), w[None], np.zeros((1, 0), np.float32))
            for (n, i), w in expected.items()
        ],
        shard=0,
        num_shards=1,
        seq=5,
        fingerprint=CONFIG.fingerprint(),
        created_at=1234.5,
    )
    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()  # no ctrserve code needed to read it
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert (meta["format"], meta["seq"], meta["shard"], meta["created_at"]) == ("ctrserve-packet", "5", "0", "1234.5")
    rows = {(r["table"], r["id"]): np.array(r["weight"], np.float32) for r in table.to_pylist()}
    assert rows.keys() == expected.keys()
    for k in rows:
        np.testing.assert_array_equal(rows[k], expected[k])
    packet = decode_packet(data, CONFIG)
    assert (packet.seq, packet.rows, packet.created_at) == (5, 3, 1234.5)
    assert as_dict(packet.tables).keys() == expected.keys()


def _sample_packet() -> bytes:
    rows = [
        TableRows(
            CONFIG.tables["user"],
            np.arange(5, dtype=np.uint64),
            np.arange(20, dtype=np.float32).reshape(5, 4),
            np.zeros((5, 0), np.float32),
        )
    ]
    return encode_packet(rows, shard=0, num_shards=1, seq=1, fingerprint=CONFIG.fingerprint())


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 255))
def test_a_flipped_byte_is_detected_or_harmless(position, flip):
    data = bytearray(_sample_packet())
    data[position % len(data)] ^= flip
    expected = as_dict(decode_packet(_sample_packet(), CONFIG).tables)
    try:
        packet = decode_packet(bytes(data), CONFIG)
    except PacketError:
        return
    got = as_dict(packet.tables)  # decoded despite the flip: it hit padding, the data is intact
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)


_EVERY_BYTE_SCAN = """
import json, struct, sys
import numpy as np
from embedding_server.core.config import EmbeddingConfig
from embedding_server.modelroot.packets import PacketError, decode_packet, encode_packet
from embedding_server.store.store import TableRows
config = EmbeddingConfig.from_dict(json.loads(sys.argv[1]))
rows = [TableRows(config.tables[name], np.arange(7, dtype=np.uint64) * (k + 3),
                  np.arange(7 * dim, dtype=np.float32).reshape(7, dim) + k, np.zeros((7, 0), np.float32))
        for k, (name, dim) in enumerate([("user", 4), ("item", 8)])]
data = encode_packet(rows, shard=0, num_shards=1, seq=1, fingerprint=config.fingerprint())
expected = [(t.table.name, t.ids.tolist(), t.weights.tolist()) for t in decode_packet(data, config).tables]
inputs = [data[:n] for n in range(len(data))]
for at in range(len(data)):
    for flip in (0x01, 0x80, 0xFF):
        changed = bytearray(data); changed[at] ^= flip; inputs.append(bytes(changed))
for at in range(len(data) - 7):
    for word in (2**31 - 1, 2**32, 2**63 - 1):
        changed = bytearray(data); changed[at : at + 8] = struct.pack("<q", word); inputs.append(bytes(changed))
decoded = refused = 0
for item in inputs:
    try:
        got = [(t.table.name, t.ids.tolist(), t.weights.tolist()) for t in decode_packet(item, config).tables]
    except PacketError:
        refused += 1
        continue
    assert got == expected, "a corrupt packet decoded to other rows"
    decoded += 1
print(json.dumps({"decoded": decoded, "refused": refused}))
"""


@pytest.mark.process
def test_every_byte_of_a_packet_flipped_truncated_or_overwritten_is_refused_or_harmless():
    """Every single-byte flip, truncation and 8-byte huge value at every offset of a packet: it
    decodes to the original rows (padding was hit) or is refused with PacketError; in a child
    process, so a crash inside pyarrow fails this test instead of ending the run."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _EVERY_BYTE_SCAN, json.dumps(EMB)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["refused"] > counts["decoded"] > 0


@pytest.mark.unit
@pytest.mark.parametrize("cut", [1, 50, 200])
def test_truncated_packets_are_refused(cut):
    with pytest.raises(PacketError, match="not a readable Arrow file|checksum"):
        decode_packet(_sample_packet()[:-cut], CONFIG)


@pytest.mark.unit
def test_packets_of_other_tables_are_refused():
    other = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 2}}})
    with pytest.raises(PacketError, match="fingerprint"):
        decode_packet(_sample_packet(), other)


@pytest.mark.unit
def test_checkpoint_plus_newer_packets_reproduce_the_trainers_rows(tmp_path):
    """The whole published life: packets, a checkpoint with its watermark, more packets; a reader
    that loads the checkpoint and replays only packets above the watermark gets every row the
    trainer changed bit for bit, also those evicted in between."""
    glob = global_config(tmp_path, capacity=200)
    rng = np.random.default_rng(0)
    client = InProcessEmbeddingClient(CONFIG, glob, num_shards=2)
    try:

        def train_round():
            ids = rng.integers(0, 150, 60).astype(np.uint64)
            tables = np.full(60, USER, np.uint16)
            client.lookup_rows(ids, tables, 4)
            client.push_rows(ids, tables, rng.standard_normal((60, 4)).astype(np.float32))
            for p in client.publishers:
                p.flush()

        for _ in range(3):
            train_round()
        url = publish_checkpoint(client, str(tmp_path))
        for _ in range(4):
            train_round()
        client.close()
        final = {}
        for store in client.stores:
            for rows in store.rows():
                final.update(as_dict([rows]))
    finally:
        client.close()
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    assert manifest["watermark"] == {"0": 2, "1": 2}
    reader = EmbeddingStore(
        CONFIG,
        GlobalConfig.from_dict(
            {"common_config": {"job_type": "infer"}, "embedding_parameter_server_config": {"capacity": 1000}}
        ),
    )
    checkpoint.load_store(reader, url)
    for shard in (0, 1):
        for seq in packets_of(tmp_path, shard, 2):
            if seq > manifest["watermark"][str(shard)]:
                packet = decode_packet((tmp_path / packet_dir(shard, 2) / packet_name(seq)).read_bytes(), CONFIG)
                for rows in packet.tables:
                    reader.put(
                        TableRows(rows.table, rows.ids, rows.weights, np.zeros((rows.ids.shape[0], 0), np.float32))
                    )
    ids = np.array([i for _, i in final], np.uint64)
    served = reader.lookup(ids, np.full(ids.shape[0], USER, np.uint16))
    np.testing.assert_array_equal(served, np.stack([final[("user", int(i))] for i in ids]))


@pytest.mark.unit
def test_retention_keeps_the_newest_checkpoints_and_the_packets_they_need(tmp_path):
    client = InProcessEmbeddingClient(CONFIG, global_config(tmp_path))
    try:
        watermarks = []
        for round_ in range(4):
            push(client.stores[0], [round_ * 10 + 1], USER)
            client.publishers[0].flush()
            push(client.stores[0], [round_ * 10 + 2], USER)
            url = publish_checkpoint(client, str(tmp_path), keep=10)
            watermarks.append(json.loads((Path(url) / "manifest.json").read_text())["watermark"]["0"])
        (tmp_path / "checkpoints/00000000000000000000").mkdir()  # a writer that died before its manifest
        # Even keeping every checkpoint, packets the oldest one includes are not needed any more.
        assert watermarks == [1, 3, 5, 7] and packets_of(tmp_path) == list(range(2, 8))
        result = retain(str(tmp_path), keep=2)
    finally:
        client.close()
    assert complete_checkpoints(str(tmp_path)) == ["00000000000000000003", "00000000000000000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "00000000000000000003",
        "00000000000000000004",
    ]
    assert packets_of(tmp_path) == [6, 7]  # the oldest kept checkpoint (3) includes packets up to 5
    assert result == {"checkpoints": 3, "packets": 4}


@pytest.mark.process
def test_servers_publish_packets_and_checkpoint_watermarks(tmp_path):
    (tmp_path / "emb.yml").write_text(yaml.safe_dump(EMB, sort_keys=False))
    root = tmp_path / "root"
    server_cfg = {
        "capacity": 1000,
        "enable_incremental_update": True,
        "incremental_dir": f"{root}/incremental",
        "incremental_flush_interval": 3600,
    }
    (tmp_path / "global.yml").write_text(yaml.safe_dump({"embedding_parameter_server_config": server_cfg}))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 10_000, 50).astype(np.uint64)
    tables = np.full(50, USER, np.uint16)
    group = ServerGroup.start(
        tmp_path / "emb.yml", tmp_path / "global.yml", num_shards=2, workdir=tmp_path / "srv", admin_roots=[root]
    )
    try:
        with RemoteEmbeddingClient(CONFIG, group.addresses) as client:
            client.lookup_rows(ids, tables, 4)
            client.push_rows(ids, tables, rng.standard_normal((50, 4)).astype(np.float32))
            url = publish_checkpoint(client, str(root))
            client.push_rows(ids[:5], tables[:5], np.ones((5, 4), np.float32))
            after = client.lookup_rows(ids[:5], tables[:5], 4)
    finally:
        codes = group.stop()  # SIGTERM: each server publishes what is pending before it exits
    assert codes == [0, 0]
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    assert manifest["watermark"] == {"0": 0, "1": 0}
    last = {}
    for shard in (0, 1):
        for seq in packets_of(root, shard, 2):
            last.update(
                as_dict(decode_packet((root / packet_dir(shard, 2) / packet_name(seq)).read_bytes(), CONFIG).tables)
            )
    for i, row in zip(ids[:5], after):
        np.testing.assert_array_equal(last[("user", int(i))], row)
