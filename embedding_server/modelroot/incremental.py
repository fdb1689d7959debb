"""The training side of incremental updates: publish changed rows as packets, checkpoints with
their watermark, and retention of old ones.

A train-mode store with ``enable_incremental_update`` records which rows its gradient updates
changed (and the last value of changed rows it evicts). A :class:`PacketPublisher` turns them
into a packet (:mod:`embedding_server.modelroot.packets`) when ``incremental_buffer_size`` rows are
pending, when ``incremental_flush_interval`` seconds have passed, and at shutdown. Sequence
numbers continue from the packets already in the folder, so a restarted server never reuses one.

Example:
    >>> publisher = PacketPublisher(store, "/models/ctr/incremental")
    >>> publisher.start()
    >>> ...                       # training: store.apply_gradients(...)
    >>> publisher.close()         # publishes what is pending
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from embedding_server.modelroot import checkpoint
from embedding_server.modelroot.packets import (
    CHECKPOINTS_DIR,
    INCREMENTAL_DIR,
    encode_packet,
    packet_name,
    parse_packet_name,
)
from embedding_server.storage.base import Storage, StorageError
from embedding_server.storage.urls import open_storage
from embedding_server.store.store import EmbeddingStore, TableRows, last_occurrences

log = logging.getLogger(__name__)

CHECKPOINT_DIGITS = 20


class PacketPublisher:
    """Publishes one train-mode store's changed rows as packets of its shard.

    Args:
        store: a train-mode store with ``enable_incremental_update`` on.
        incremental_dir: the model root's packet folder (``<model root>/incremental``), as a
            URL or an open :class:`Storage`; packets go to ``shard-XXXXX-of-YYYYY/`` under it.
        buffer_size: pending rows that trigger a packet (default: the store's config).
        flush_interval: seconds at most between a change and its packet (default: the config).
        storage_options: options for ``s3://`` and ``hdfs://`` (default: the config's ``storage``).

    Raises:
        ValueError: the store does not track changes.
    """

    def __init__(
        self,
        store: EmbeddingStore,
        incremental_dir: str | Storage | None = None,
        buffer_size: int | None = None,
        flush_interval: float | None = None,
        storage_options: dict | None = None,
    ):
        if not store.tracks_changes:
            raise ValueError("the store does not track changes (train mode with enable_incremental_update needed)")
        server = store.global_config.server
        self.store = store
        root = incremental_dir if incremental_dir is not None else server.incremental_dir
        options = server.storage if storage_options is None and not isinstance(root, Storage) else storage_options
        self.storage = open_storage(root, options).child(checkpoint.shard_dir(store.shard_index, store.num_shards))
        self.buffer_size = buffer_size or server.incremental_buffer_size
        self.flush_interval = flush_interval or server.incremental_flush_interval
        self.last_seq = max((s for s in map(parse_packet_name, self._existing()) if s is not None), default=-1)
        self.packets_published = 0
        self.rows_published = 0
        self.failures = 0
        self._retry: list[TableRows] = []
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _existing(self) -> list[str]:
        try:
            return self.storage.list_dir("")
        except (FileNotFoundError, StorageError):
            return []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> PacketPublisher:
        """Flush in a background thread from now on; the store wakes it when its buffer fills."""
        self.store.change_listener = self._on_change
        self._thread = threading.Thread(target=self._run, name=f"packets-shard{self.store.shard_index}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread and publish whatever is pending."""
        self.store.change_listener = None
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()

    def _on_change(self) -> None:
        if self.store.pending_changes >= self.buffer_size:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.flush()
            except Exception:  # a storage outage must not kill the publisher: retried next time
                log.exception("publishing a packet of shard %d failed; retrying later", self.store.shard_index)

    # ------------------------------------------------------------------ publishing

    def flush(self) -> int:
        """Publish the pending rows as the next packet (nothing when none are pending).

        Returns:
            The last sequence number published by this shard (-1 when none).

        Raises:
            StorageError: the packet could not be written; its rows are kept for the next flush.
        """
        with self._flush_lock:
            tables = merge_newest(self._retry, self.store.take_changes())
            self._retry = []
            if not tables:
                return self.last_seq
            seq = self.last_seq + 1
            data = encode_packet(
                tables,
                shard=self.store.shard_index,
                num_shards=self.store.num_shards,
                seq=seq,
                fingerprint=self.store.config.fingerprint(),
            )
            try:
                self.storage.write_atomic(packet_name(seq), data)
            except Exception:
                self._retry = tables
                self.failures += 1
                raise
            rows = sum(t.ids.shape[0] for t in tables)
            self.last_seq = seq
            self.packets_published += 1
            self.rows_published += rows
            log.debug("published packet %d of shard %d: %d rows", seq, self.store.shard_index, rows)
            return seq

    def stats(self) -> dict[str, int]:
        return {
            "last_seq": self.last_seq,
            "packets_published": self.packets_published,
            "rows_published": self.rows_published,
            "publish_failures": self.failures,
            "pending_rows": self.store.pending_changes + sum(t.ids.shape[0] for t in self._retry),
        }


def merge_newest(older: list[TableRows], newer: list[TableRows]) -> list[TableRows]:
    """Rows of both lists per table, a key present in both taking its ``newer`` value."""
    if not older:
        return newer
    by_table: dict[str, list[TableRows]] = {}
    for rows in older + newer:
        by_table.setdefault(rows.table.name, []).append(rows)
    out = []
    for parts in by_table.values():
        ids = np.concatenate([p.ids for p in parts])
        weights = np.concatenate([p.weights for p in parts])
        keep = last_occurrences(ids, np.zeros(ids.shape[0], np.uint16))
        out.append(TableRows(parts[0].table, ids[keep], weights[keep], np.zeros((keep.shape[0], 0), np.float32)))
    return out


# --------------------------------------------------------------------------- checkpoints


def checkpoint_name(number: int) -> str:
    return f"{number:0{CHECKPOINT_DIGITS}d}"


def complete_checkpoints(model_root: str | Storage, storage_options: dict | None = None) -> list[str]:
    """Names of the complete checkpoints under ``<model root>/checkpoints``, oldest first."""
    storage = open_storage(model_root, storage_options if not isinstance(model_root, Storage) else None)
    names = _checkpoint_dirs(storage)
    return [n for n in names if storage.exists(f"{CHECKPOINTS_DIR}/{n}/{checkpoint.MANIFEST}")]


def _checkpoint_dirs(storage: Storage) -> list[str]:
    try:
        names = storage.list_dir(CHECKPOINTS_DIR)
    except (FileNotFoundError, StorageError):
        return []
    return sorted(n for n in names if len(n) == CHECKPOINT_DIGITS and n.isdigit())


def next_checkpoint_dir(model_root: str | Storage, storage_options: dict | None = None) -> str:
    """The URL of a new checkpoint folder, numbered above every existing one (complete or not)."""
    storage = open_storage(model_root, storage_options if not isinstance(model_root, Storage) else None)
    names = _checkpoint_dirs(storage)
    number = int(names[-1]) + 1 if names else 1
    return storage.join_url(f"{CHECKPOINTS_DIR}/{checkpoint_name(number)}")


def retain(model_root: str | Storage, keep: int, storage_options: dict | None = None) -> dict[str, int]:
    """Delete checkpoints beyond the newest ``keep`` complete ones, and the packets every kept
    checkpoint already includes.

    Safe for starting servers: a server starts from the newest complete checkpoint and replays
    packets above its watermark; those packets are above the *oldest* kept checkpoint's
    watermark, which is all that is ever deleted up to. A checkpoint is made incomplete (its
    manifest removed) before its files go. Unfinished checkpoints older than the newest complete
    one (a writer that died) are removed too.

    Returns:
        ``{"checkpoints": n, "packets": m}`` deleted.

    Raises:
        ValueError: ``keep`` < 1.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    storage = open_storage(model_root, storage_options if not isinstance(model_root, Storage) else None)
    complete = complete_checkpoints(storage)
    if not complete:
        return {"checkpoints": 0, "packets": 0}
    kept = complete[-keep:]
    doomed = [n for n in _checkpoint_dirs(storage) if n < kept[0]]
    for name in doomed:
        storage.delete(f"{CHECKPOINTS_DIR}/{name}/{checkpoint.MANIFEST}")
        storage.delete(f"{CHECKPOINTS_DIR}/{name}")
    manifest = checkpoint.read_manifest(storage.child(f"{CHECKPOINTS_DIR}/{kept[0]}"))
    packets = _delete_packets_upto(storage, manifest.get("watermark", {}), manifest["num_shards"])
    return {"checkpoints": len(doomed), "packets": packets}


def _delete_packets_upto(storage: Storage, watermark: dict[str, int], num_shards: int) -> int:
    deleted = 0
    for shard, upto in watermark.items():
        folder = f"{INCREMENTAL_DIR}/{checkpoint.shard_dir(int(shard), num_shards)}"
        try:
            names = storage.list_dir(folder)
        except (FileNotFoundError, StorageError):
            continue
        for name in names:
            seq = parse_packet_name(name)
            if seq is not None and seq <= upto:
                storage.delete(f"{folder}/{name}")
                deleted += 1
    return deleted


def publish_checkpoint(client, model_root: str, keep: int = 3, storage_options: dict | None = None) -> str:
    """Dump every shard (each first publishing its pending packet) as the next checkpoint under
    ``<model root>/checkpoints`` with its watermark, then apply retention; returns its URL."""
    url = next_checkpoint_dir(model_root, storage_options)
    client.dump(url)
    retain(model_root, keep, storage_options)
    return url


def watermark_of(publishers: Sequence[PacketPublisher | None]) -> dict[str, int]:
    """Flush each shard's publisher and return ``{shard: last seq}`` (shards without one omitted)."""
    return {str(p.store.shard_index): p.flush() for p in publishers if p is not None}
