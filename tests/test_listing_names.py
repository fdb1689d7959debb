"""Odd names in a model root's listings: every reader takes only the exact ASCII names the
writers make and ignores anything else with one WARNING per name, never per pass.

``str.isdigit()`` and ``int()`` take digits of every script: ``int("²")`` raises, ``int("０7")``
is 7. Each test plants such names (and names with spaces, ``..`` and very long ones) in every
listed folder of a real model root on local storage, written by the real publisher, checkpoint
and export code, and drives a real reader: the follower, a server start, the archiver's
publisher, retention, the next checkpoint folder and the packet publisher.
"""

from __future__ import annotations

import collections
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from archiver.publish import Publisher, PublishSettings
from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.modelroot.hotload import ModelRootFollower
from embedding_server.modelroot.incremental import (
    PacketPublisher,
    complete_checkpoints,
    next_checkpoint_dir,
    publish_checkpoint,
    retain,
)
from embedding_server.modelroot.packets import packet_dir, packet_name
from embedding_server.rpc.client import InProcessEmbeddingClient
from embedding_server.rpc.service import start_server
from embedding_server.store.store import EmbeddingStore
from trainer.export import latest_version

pytestmark = pytest.mark.unit

EMB = {"slots_config": {"user": {"dim": 4}, "item": {"dim": 8}}}
CONFIG = EmbeddingConfig.from_dict(EMB)
INFER = {"common_config": {"job_type": "infer"}, "embedding_parameter_server_config": {"capacity": 50_000}}
LONG = 200  # characters: far beyond every real name, within a file system's 255 bytes

ODD = {
    "incremental": [
        "shard-²-of-00002",
        "shard-0000٣-of-00004",
        "shard-０0000-of-00003",
        "shard-00000-of-00002 ",
        "shard-00000-of-00002..",
        "shard-" + "0" * LONG + "-of-00002",
    ],
    "packets": [
        "0" * 19 + "².arrow",
        "0" * 19 + "٣.arrow",
        "０" + "0" * 17 + "99.arrow",
        "0" * 10 + " " + "0" * 9 + ".arrow",
        "0" * 19 + "..arrow",
        "1" * LONG + ".arrow",
    ],
    "checkpoints": [
        "0" * 19 + "²",
        "٣" * 20,
        "９" * 20,
        "0" * 10 + " " + "0" * 8 + "1",
        "0" * 18 + "..",
        "9" * LONG,
    ],
    "dense": ["v0000000²", "v0000000٣", "v０0000009", "v0000 009", "v000000..", "v" + "9" * LONG],
}


def train_config(root: Path) -> GlobalConfig:
    return GlobalConfig.from_dict(
        {
            "embedding_parameter_server_config": {
                "capacity": 50_000,
                "enable_incremental_update": True,
                "incremental_dir": f"{root}/incremental",
                "incremental_flush_interval": 3600,
            },
            "sparse_optimizer": {"type": "adagrad", "lr": 0.1},
        }
    )


class Training:
    """Two in-process training shards publishing packets (and checkpoints) under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.client = InProcessEmbeddingClient(CONFIG, train_config(root), num_shards=2)
        self.rng = np.random.default_rng(0)

    def round(self) -> list[int]:
        """One gradient step on random keys of every table, then a packet of every shard."""
        for table in CONFIG.tables.values():
            ids = np.unique(self.rng.integers(0, 2000, 300).astype(np.uint64))
            tabs = np.full(ids.shape[0], table.index, np.uint16)
            self.client.lookup_rows(ids, tabs, table.dim)
            grads = self.rng.standard_normal((ids.shape[0], table.dim)).astype(np.float32)
            self.client.push_rows(ids, tabs, grads)
        return [p.flush() for p in self.client.publishers]

    def assert_served_by(self, lookup) -> None:
        """Every row of the trainer, exactly, from ``lookup(ids, tables)``."""
        for store in self.client.stores:
            for rows in store.rows():
                tabs = np.full(rows.ids.shape[0], rows.table.index, np.uint16)
                assert lookup(rows.ids, tabs).tobytes() == rows.weights.tobytes(), rows.table.name

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def training(tmp_path):
    training = Training(tmp_path)
    training.round()
    training.round()
    publish_checkpoint(training.client, str(tmp_path), keep=5)
    training.round()
    yield training
    training.close()


def plant(root: Path) -> list[str]:
    """Every odd name in its folder (folders for folder listings, files for packet listings);
    returns their paths relative to the root."""
    planted = []
    for name in ODD["incremental"]:
        (root / "incremental" / name).mkdir(parents=True)
        planted.append(f"incremental/{name}")
    for shard in range(2):
        for name in ODD["packets"]:
            (root / packet_dir(shard, 2)).mkdir(parents=True, exist_ok=True)
            (root / packet_dir(shard, 2) / name).write_bytes(b"not a packet")
            planted.append(f"{packet_dir(shard, 2)}/{name}")
    for name in ODD["checkpoints"]:
        (root / "checkpoints" / name).mkdir(parents=True)
        planted.append(f"checkpoints/{name}")
    for name in ODD["dense"]:
        (root / "dense" / name).mkdir(parents=True)
        planted.append(f"dense/{name}")
    return planted


def warned(caplog, logger: str) -> collections.Counter:
    """How many WARNING lines ``logger`` wrote about each ignored listing entry (by its URL)."""
    return collections.Counter(
        r.args[0]
        for r in caplog.records
        if r.name == logger and r.levelno == logging.WARNING and r.msg.startswith("ignoring %r")
    )


def assert_once_each(caplog, logger: str, root: Path, paths: list[str]) -> None:
    counts = warned(caplog, logger)
    assert {p: counts[f"{root}/{p}"] for p in paths} == dict.fromkeys(paths, 1), logger


def test_a_follower_keeps_applying_past_odd_names_and_warns_once_each(
    polling_follow, training, tmp_path, caplog, wait_until
):
    caplog.set_level(logging.WARNING)
    planted = plant(tmp_path)
    store = EmbeddingStore(CONFIG, GlobalConfig.from_dict(INFER))
    with ModelRootFollower(store, str(tmp_path), polling_follow) as follower:
        assert follower.wait_synced(30)
        for _ in range(3):  # each packet is at least one more pass over the odd names
            seqs = training.round()
            wait_until(lambda seqs=seqs: [s["watermark"] for s in follower.stats()["streams"]] == seqs, what=seqs)
        stats = follower.stats()
    assert not any(s["gap_alarm"] or s["waiting_for"] != -1 for s in stats["streams"])
    assert stats["packets_quarantined"] == 0 and stats["checkpoint"] == "00000000000000000001"
    training.assert_served_by(store.lookup)
    listed = [p for p in planted if not p.startswith("dense/")]  # the follower does not read dense/
    assert_once_each(caplog, "ctrserve.embedding_server.modelroot.hotload", tmp_path, listed)


def test_a_server_starts_past_odd_names(polling_follow, training, tmp_path):
    plant(tmp_path)
    server = start_server(
        CONFIG,
        GlobalConfig.from_dict(INFER),
        model_root=str(tmp_path),
        follow_options=polling_follow,
        local_socket=None,
    )
    try:
        training.assert_served_by(server.store.lookup)
    finally:
        server.stop(0)


def test_retention_checkpoints_and_the_packet_publisher_ignore_odd_names(training, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    planted = plant(tmp_path)
    for _ in range(2):  # a second pass adds no warning
        assert complete_checkpoints(str(tmp_path)) == ["00000000000000000001"]
        assert next_checkpoint_dir(str(tmp_path)).endswith("/checkpoints/00000000000000000002")
        last = [PacketPublisher(store).last_seq for store in training.client.stores]
        assert last == [p.last_seq for p in training.client.publishers] == [2, 2]
    publish_checkpoint(training.client, str(tmp_path), keep=1)  # retention: checkpoint 1 and packets 0..2 go
    assert retain(str(tmp_path), keep=1) == {"checkpoints": 0, "packets": 0}
    assert complete_checkpoints(str(tmp_path)) == ["00000000000000000002"]
    for shard in range(2):
        left = sorted(p.name for p in (tmp_path / packet_dir(shard, 2)).iterdir())
        assert left == sorted([*ODD["packets"], "last-seq.json"])  # only real packets were deleted
    assert all((tmp_path / p).exists() for p in planted)
    logger = "embedding_server.modelroot.incremental"
    listed = ("checkpoints/", f"{packet_dir(0, 2)}/", f"{packet_dir(1, 2)}/")  # incremental/ itself is not read
    assert_once_each(caplog, logger, tmp_path, [p for p in planted if p.startswith(listed)])
    assert not (tmp_path / packet_dir(0, 2) / packet_name(3)).exists()


class FakeManagement:
    """What Publisher asks TorchServe's management API, answered from memory."""

    def __init__(self):
        self.registered: list[int] = []

    def versions(self, name: str) -> list[str]:
        return [str(v) for v in self.registered]

    def default_version(self, name: str) -> str | None:
        return str(max(self.registered)) if self.registered else None


def test_the_archivers_publisher_and_the_next_export_ignore_odd_version_folders(tmp_path, tiny_ctr, caplog):
    caplog.set_level(logging.WARNING)
    for version in (1, 3):
        tiny_ctr.export_version(tmp_path, version, seed=version)
    planted = plant(tmp_path)
    management = FakeManagement()
    publisher = Publisher(management, PublishSettings(str(tmp_path), str(tmp_path / "store"), poll_s=0.01))
    publisher.publish = management.registered.append  # registering is test_torchserve.py's business
    polls, stop = [], threading.Event()
    poll_once = publisher.poll_once

    def counted_poll():
        polls.append(poll_once())
        if len(polls) == 4:
            stop.set()

    publisher.poll_once = counted_poll
    publisher.watch(stop)  # returns once stopped; an exception would end it early
    assert polls == [3, None, None, None] and management.registered == [3]
    assert latest_version(str(tmp_path)) == 3
    dense = [p for p in planted if p.startswith("dense/")]
    assert_once_each(caplog, "ctrserve.publish", tmp_path, dense)
    assert_once_each(caplog, "ctrserve.embedding_server.core.model_spec", tmp_path, dense)
