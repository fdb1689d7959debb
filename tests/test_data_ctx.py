"""DataCtx and the data flow (persia.dataflow): real data-loader processes sending to nn
workers' StreamingDataset over TCP; spreading, back-pressure, a clean end, lost loaders and
refused frames."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from persia import env
from persia.data import StreamingDataset
from persia.data_ctx import DataCtx
from persia.dataflow import BATCH, ERROR, HELLO, DataflowError, read_frame, write_frame
from persia.registry import RegistryServer

pytestmark = pytest.mark.process

LOADER = """
import json, os, sys
import numpy as np
from persia.ctx import DataCtx
from persia.embedding.data import IDTypeFeatureWithSingleID, Label, NonIDTypeFeature, PersiaBatch

count, fail_after = int(sys.argv[1]), int(sys.argv[2])
index = int(os.environ["REPLICA_INDEX"])
with DataCtx() as ctx:
    for seq in range(count):
        if seq == fail_after:
            raise RuntimeError("the loader's source broke")
        ids = np.full(4, index * 1000 + seq, np.uint64)  # who sent it, and its place in the stream
        ctx.send_data(PersiaBatch([IDTypeFeatureWithSingleID("user", ids)],
                                  non_id_type_features=[NonIDTypeFeature(np.ones((4, 2), np.float32))],
                                  labels=[Label(np.zeros((4, 1), np.float32))]))
print(json.dumps({"sent": ctx.sent, "waited_sends": ctx.waited_sends}))
"""


@pytest.fixture()
def registry(monkeypatch):
    server = RegistryServer(("127.0.0.1", 0))
    server.start()
    monkeypatch.setenv("EMBEDDING_WORKER_SERVICE", server.address)
    monkeypatch.delenv("PERSIA_NN_WORKER_ADDRS", raising=False)
    yield server
    server.stop()
    env.reload_env()


def start_loader(tmp_path: Path, index: int, size: int, count: int, fail_after: int = -1) -> subprocess.Popen:
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.update(REPLICA_INDEX=str(index), REPLICA_SIZE=str(size))
    return subprocess.Popen(
        [sys.executable, str(script), str(count), str(fail_after)],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, dict | None, str]:
    out, err = proc.communicate(timeout=60)
    line = out.strip().splitlines()[-1] if out.strip() else ""
    return proc.returncode, json.loads(line) if line.startswith("{") else None, err


def make_rank(rank: int, world_size: int, buffer_size: int) -> StreamingDataset:
    env.set_env(rank=rank, world_size=world_size, local_rank=rank)
    return StreamingDataset(buffer_size)


def sender_of(batch) -> tuple[int, int]:
    value = int(batch.sparse[0].ids[0])
    return value // 1000, value % 1000


def test_two_loaders_feed_two_ranks_round_robin_and_end_cleanly(tmp_path, registry):
    ranks = [make_rank(r, 2, buffer_size=3) for r in range(2)]
    loaders = [start_loader(tmp_path, i, 2, count=9) for i in range(2)]
    got: dict[int, list[tuple[int, int]]] = {0: [], 1: []}

    def consume(rank: int) -> None:
        for batch in ranks[rank].batches(timeout=60):
            got[rank].append(sender_of(batch))

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a rank's stream did not end after both loaders finished"
    for proc in loaders:
        code, stats, err = finish(proc)
        assert code == 0, err
        assert stats["sent"] == 9
    for rank in range(2):
        # loader i's batch k goes to rank k % 2; each loader's batches arrive in order
        for loader in range(2):
            assert [k for i, k in got[rank] if i == loader] == list(range(rank, 9, 2))
        assert ranks[rank].stats()["max_depth"] <= 3
    # the streams' end closed both ranks, and closing deregistered them
    assert registry.entries.read("nn-worker", None, 0.0)["services"] == []


def test_a_full_buffer_blocks_the_sender_and_nothing_is_dropped(tmp_path, registry, wait_until):
    rank = make_rank(0, 1, buffer_size=2)
    loader = start_loader(tmp_path, 0, 1, count=12)
    # nobody consumes: the third batch waits for room, so the loader cannot get further
    wait_until(lambda: rank.stats()["waited_puts"] >= 1, what="a batch waiting for room")
    stats = rank.stats()
    assert stats["received"] == 2 and stats["depth"] == 2
    assert loader.poll() is None  # blocked: its next send needs the answer to that batch
    order = [sender_of(b) for b in rank.batches(timeout=60)]
    assert order == [(0, k) for k in range(12)]
    code, sent, err = finish(loader)
    assert code == 0, err
    assert sent["waited_sends"] >= 1 and sent["waited_sends"] == rank.stats()["waited_puts"]
    assert rank.stats()["max_depth"] == 2


def test_a_loader_that_fails_is_reported_instead_of_ending_the_stream(tmp_path, registry):
    rank = make_rank(0, 1, buffer_size=4)
    # the healthy loader's 3 batches fit the buffer, so it finishes before anything is read; had
    # it batches left when the error stops the reading, it would wait on a full buffer
    healthy = start_loader(tmp_path, 0, 2, count=3)
    assert finish(healthy)[0] == 0
    failing = start_loader(tmp_path, 1, 2, count=5, fail_after=3)
    seen = []
    try:
        with pytest.raises(DataflowError, match="data loader 1 of 2 went away before it finished"):
            for batch in rank.batches(timeout=60):
                seen.append(sender_of(batch))
    finally:
        rank.close()
    assert sorted(k for i, k in seen if i == 1) == [0, 1, 2]  # what it sent before failing arrived
    code, _, err = finish(failing)
    assert code != 0 and "the loader's source broke" in err


def test_no_loader_within_the_timeout_raises_timeout(registry):
    rank = make_rank(0, 1, buffer_size=2)
    with pytest.raises(TimeoutError, match="no batch from the data loaders"):
        next(rank.batches(timeout=0.3))
    rank.close()


def refusal(address: str, *frames: tuple[int, bytes]) -> str:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for kind, payload in frames:
            write_frame(sock, kind, payload)
        while True:
            kind, payload = read_frame(sock, 1 << 20)
            if kind == ERROR:
                return payload.decode()


def hello(index: int, size: int) -> tuple[int, bytes]:
    body = {"protocol": "persia-dataflow", "version": 1, "replica_index": index, "replica_size": size}
    return HELLO, json.dumps(body).encode()


def test_malformed_frames_are_refused_and_the_worker_keeps_receiving(monkeypatch, wait_until):
    monkeypatch.setenv("PERSIA_NN_WORKER_ADDRS", "127.0.0.1:0")
    monkeypatch.setenv("PERSIA_DATAFLOW_MAX_BATCH_BYTES", "4096")
    rank = make_rank(0, 1, buffer_size=4)
    address = rank.address
    try:
        assert "first frame must be HELLO" in refusal(address, (BATCH, struct.pack("<Q", 0)))
        assert "unknown frame kind 9" in refusal(address, (9, b""))
        assert "must hold exactly the keys" in refusal(address, (HELLO, b'{"replica_index": 0}'))
        assert "replica_index 3 must be less than replica_size 2" in refusal(address, hello(3, 2))
        # a batch over the size limit is refused before it is read
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            write_frame(sock, *hello(0, 2))
            assert read_frame(sock, 1 << 20)[0] != ERROR
            sock.sendall(struct.pack("<BI", BATCH, 10_000_000))
            kind, payload = read_frame(sock, 1 << 20)
            assert kind == ERROR and "exceeds the limit of 4104 bytes" in payload.decode()
        # corrupted batch bytes: the codec's message names the problem and the batch
        message = refusal(address, hello(1, 2), (BATCH, struct.pack("<Q", 0) + b"CTRB-garbage"))
        assert message.startswith("batch 0 from data loader 1:")
        # both indices went away; a fresh index-taken check and a real sender still work
        with pytest.raises(DataflowError, match="data loader 0 went away before it finished"):
            DataCtx([address], replica_index=0, replica_size=2)
    finally:
        rank.close()
    monkeypatch.setenv("PERSIA_NN_WORKER_ADDRS", "127.0.0.1:0")
    fresh = make_rank(0, 1, buffer_size=4)
    try:
        with DataCtx([fresh.address], replica_index=0, replica_size=1) as ctx:
            with pytest.raises(TypeError, match="expects a PersiaBatch"):
                ctx.send_data(np.zeros(3))
        assert list(fresh.batches(timeout=10)) == []  # a loader with no batches ends the stream
    finally:
        fresh.close()
