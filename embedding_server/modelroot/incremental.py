"""The training side of incremental updates: publish changed rows as packets, checkpoints with
their watermark, and retention of old ones.

A train-mode store with ``enable_incremental_update`` records which rows its gradient updates
changed (and the last value of changed rows it evicts). A :class:`PacketPublisher` turns them
into a packet (:mod:`embedding_server.modelroot.packets`) when ``incremental_buffer_size`` rows are
pending, when ``incremental_flush_interval`` seconds have passed, and at shutdown.

Sequence numbers of a training shard strictly increase across restarts, retention, resharding
and a trainer whose local state is gone: a publisher continues above the largest of the packets
in the shard's folder, the shard's seq in the newest complete checkpoint of the same training
shard count (retention may have deleted every packet it includes), and the shard's durable
``last-seq.json`` marker, rewritten after every packet (:mod:`~embedding_server.modelroot.packets`).
Every packet carries the publisher's run id, so a server can tell a packet of another run that
lands at or below its watermark (:mod:`~embedding_server.modelroot.hotload` raises an alarm).

Retention, :func:`complete_checkpoints` and :func:`next_checkpoint_dir` read only exact ASCII
names (20-digit checkpoint folders, 20-digit packet files); other names are ignored with one
WARNING per name.

Example:
    >>> publisher = PacketPublisher(store, "/models/ctr/incremental")
    >>> publisher.start()
    >>> ...                       # training: store.apply_gradients(...)
    >>> publisher.close()         # publishes what is pending
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence

import numpy as np

from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.errors import InvalidRequestError
from embedding_server.modelroot import checkpoint
from embedding_server.modelroot.packets import (
    CHECKPOINTS_DIR,
    FIRST_SEQ,
    INCREMENTAL_DIR,
    LAST_SEQ_FILE,
    Packet,
    PacketError,
    checkpoint_name,
    decode_last_seq,
    decode_packet,
    encode_last_seq,
    encode_packet,
    list_checkpoints,
    list_packets,
    packet_name,
    parse_checkpoint_name,
)
from embedding_server.storage.base import (
    LocalStorage,
    Storage,
    StorageError,
    StorageNotFoundError,
    UnreadableFileError,
)
from embedding_server.storage.urls import open_storage
from embedding_server.store.store import EmbeddingStore, TableRows, last_occurrences

log = logging.getLogger(__name__)

#: Seconds a resumed trainer reads an unreadable published packet again before giving up.
ADOPT_RETRY_S = 60.0
#: Listings a resumed trainer tries when retention deletes what it listed before it is read.
_ADOPT_ATTEMPTS = 5


class PacketPublisher:
    """Publishes one train-mode store's changed rows as packets of its shard.

    Args:
        store: a train-mode store with ``enable_incremental_update`` on.
        incremental_dir: the model root's packet folder (``<model root>/incremental``), as a
            URL or an open :class:`Storage`; packets go to ``shard-XXXXX-of-YYYYY/`` under it.
        buffer_size: pending rows that trigger a packet (default: the store's config).
        flush_interval: seconds at most between a change and its packet (default: the config).
        storage_options: options for ``s3://`` and ``hdfs://`` (default: the config's ``storage``).
        model_root: where the checkpoints are (their watermarks count for the first seq; see
            below); default: the folder above ``incremental_dir`` when that is named
            ``incremental`` (an open remote :class:`Storage` gives none: pass it here).
        run_id: written into every packet, so servers can tell runs apart (default: a fresh
            random id for this publisher).

    The first packet's seq is one above the largest of the packets listed in the shard's folder,
    the shard's seq in the newest complete checkpoint of the same training shard count, and the
    shard's ``last-seq.json`` marker (:mod:`~embedding_server.modelroot.packets`), which is
    rewritten after every published packet. When the storage cannot be read at construction,
    this is retried before the first packet is written (``flush`` raises until it can be read).

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
        model_root: str | Storage | None = None,
        run_id: str | None = None,
    ):
        if not store.tracks_changes:
            raise ValueError("the store does not track changes (train mode with enable_incremental_update needed)")
        server = store.global_config.server
        self.store = store
        root = incremental_dir if incremental_dir is not None else server.incremental_dir
        options = server.storage if storage_options is None and not isinstance(root, Storage) else storage_options
        self.storage = open_storage(root, options).child(checkpoint.shard_dir(store.shard_index, store.num_shards))
        if model_root is not None:
            self.model_root: Storage | None = open_storage(
                model_root, None if isinstance(model_root, Storage) else options
            )
        else:
            self.model_root = _model_root_above(root, options)
        self.run_id = run_id or uuid.uuid4().hex
        self.buffer_size = buffer_size or server.incremental_buffer_size
        self.flush_interval = flush_interval or server.incremental_flush_interval
        self.last_seq = FIRST_SEQ - 1
        self.packets_published = 0
        self.rows_published = 0
        self.failures = 0
        self.marker_failures = 0
        self._resumed = False  # last_seq is known (see _resume)
        self._marker_stale = False  # the last packet's seq is not in the marker yet
        self._retry: list[TableRows] = []
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            with self._flush_lock:
                self._resume()
        except StorageError as exc:
            log.warning(
                "%s: cannot read where shard %d's packets stopped yet (%s); its first packet waits for it",
                self.storage.url,
                store.shard_index,
                exc,
            )

    @property
    def label(self) -> str:
        return f"training shard {self.store.shard_index}/{self.store.num_shards}"

    def _resume(self) -> None:
        """(Holding ``_flush_lock``.) Set ``last_seq`` above everything this shard ever published.

        Raises:
            StorageError: the packet folder, its marker or the checkpoints could not be read.
        """
        if self._resumed:
            return
        listed = max(list_packets(self.storage, "", log), default=FIRST_SEQ - 1)
        marker = self._read_marker()
        checkpointed, name = self._checkpoint_watermark()
        self.last_seq = max(self.last_seq, listed, marker, checkpointed)
        self._resumed = True
        log.info(
            "%s publishes packets from seq %d on, run id %s (last packet listed %d, marker %d, checkpoint %s %d)",
            self.label,
            self.last_seq + 1,
            self.run_id,
            listed,
            marker,
            name or "(none)",
            checkpointed,
        )

    def _read_marker(self) -> int:
        try:
            return decode_last_seq(
                self.storage.read_bytes(LAST_SEQ_FILE, max_bytes=1 << 16), self.storage.join_url(LAST_SEQ_FILE)
            )
        except StorageNotFoundError:
            return FIRST_SEQ - 1
        except (PacketError, UnreadableFileError) as exc:  # rewritten with the next packet; the others still count
            log.error("%s: ignoring an unreadable marker: %s", self.label, exc)
            return FIRST_SEQ - 1

    def _checkpoint_watermark(self) -> tuple[int, str]:
        """This shard's seq in the newest complete checkpoint written by as many training shards
        as this one's (and that checkpoint's name), or ``(FIRST_SEQ - 1, "")``."""
        if self.model_root is None:
            return FIRST_SEQ - 1, ""
        for name in reversed(list_checkpoints(self.model_root, log)):
            try:
                manifest = checkpoint.read_manifest(self.model_root.child(f"{CHECKPOINTS_DIR}/{name}"))
                if int(manifest["num_shards"]) != self.store.num_shards:
                    continue
                watermark = manifest.get("watermark") or {}
                return int(watermark.get(str(self.store.shard_index), FIRST_SEQ - 1)), name
            except InvalidRequestError:  # not complete (yet), or not a checkpoint of this format
                continue
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                log.error("checkpoint %s has a malformed manifest (%s); ignoring it", name, exc)
        return FIRST_SEQ - 1, ""

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
            self._resume()  # raises while it cannot be known where the shard's packets stopped
            tables = merge_newest(self._retry, self.store.take_changes())
            self._retry = []
            if not tables:
                if self._marker_stale:
                    self._write_marker()
                return self.last_seq
            seq = self.last_seq + 1
            data = encode_packet(
                tables,
                shard=self.store.shard_index,
                num_shards=self.store.num_shards,
                seq=seq,
                fingerprint=self.store.config.fingerprint(),
                run_id=self.run_id,
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
            self._write_marker()
            return seq

    def _write_marker(self) -> None:
        """(Holding ``_flush_lock``.) Record ``last_seq`` in the shard's marker; a failure is
        retried with the next flush (the packet itself is published either way)."""
        shard, count = self.store.shard_index, self.store.num_shards
        try:
            self.storage.write_atomic(LAST_SEQ_FILE, encode_last_seq(self.last_seq, self.run_id, shard, count))
        except Exception as exc:
            self._marker_stale = True
            self.marker_failures += 1
            log.warning("%s: writing %s failed (%s); retried with the next flush", self.label, LAST_SEQ_FILE, exc)
        else:
            self._marker_stale = False

    def stats(self) -> dict[str, int]:
        return {
            "last_seq": self.last_seq,
            "packets_published": self.packets_published,
            "rows_published": self.rows_published,
            "publish_failures": self.failures,
            "marker_failures": self.marker_failures,
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


def complete_checkpoints(model_root: str | Storage, storage_options: dict | None = None) -> list[str]:
    """Names of the complete checkpoints under ``<model root>/checkpoints``, oldest first."""
    storage = open_storage(model_root, storage_options if not isinstance(model_root, Storage) else None)
    names = _checkpoint_dirs(storage)
    return [n for n in names if storage.exists(f"{CHECKPOINTS_DIR}/{n}/{checkpoint.MANIFEST}")]


def _checkpoint_dirs(storage: Storage) -> list[str]:
    """Checkpoint folder names, oldest first; other names are ignored (one WARNING each)."""
    try:
        return list_checkpoints(storage, log)
    except (FileNotFoundError, StorageError):
        return []


def next_checkpoint_dir(model_root: str | Storage, storage_options: dict | None = None) -> str:
    """The URL of a new checkpoint folder, numbered above every existing one (complete or not)."""
    storage = open_storage(model_root, storage_options if not isinstance(model_root, Storage) else None)
    names = _checkpoint_dirs(storage)
    number = (parse_checkpoint_name(names[-1]) or 0) + 1 if names else 1
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
    """Delete the packets at or below each shard's watermark (never the shard's marker, never
    names that are not packets)."""
    deleted = 0
    for shard, upto in watermark.items():
        folder = f"{INCREMENTAL_DIR}/{checkpoint.shard_dir(int(shard), num_shards)}"
        try:
            seqs = list_packets(storage, folder, log)
        except (FileNotFoundError, StorageError):
            continue
        for seq in seqs:
            if seq <= upto:
                storage.delete(f"{folder}/{packet_name(seq)}")
                deleted += 1
    return deleted


def publish_checkpoint(client, model_root: str, keep: int = 3, storage_options: dict | None = None) -> str:
    """Dump every shard (each first publishing its pending packet) as the next checkpoint under
    ``<model root>/checkpoints`` with its watermark, then apply retention; returns its URL.
    ``storage_options`` open the model root and the checkpoint (file modes included); None: the
    client's own global config's where it has one (embedding servers use their own either way)."""
    url = next_checkpoint_dir(model_root, storage_options)
    client.dump(url, storage_options)
    retain(model_root, keep, storage_options)
    return url


# --------------------------------------------------------------------------- resuming a trainer


def adopt_published(publishers: Sequence[PacketPublisher], manifest: dict) -> dict[int, int]:
    """Bring train-mode stores just loaded from a training checkpoint (``manifest``: its sparse
    manifest) up to what their shards already published, so that the resumed trainer holds
    what every follower serves (DESIGN.md durability: one watermark, one set of values).

    A killed run may have published packets above the checkpoint's watermark, with rows the
    checkpoint does not have; followers that applied them keep them, so the trainer adopts them:
    per shard, the packets above the checkpoint's watermark are replayed in seq order (existing
    rows take the packet's weights and keep their optimizer state; new ids get zero state). When
    packets needed are gone (retention, a newer model-root checkpoint covering them), that
    checkpoint's rows of the shard are loaded first (weights only, as packets), then the rest
    of the packets. Only for a checkpoint of the publishers' training shard count (otherwise
    logged and skipped).

    Returns:
        ``{shard: seq the store now includes}`` for the shards brought forward.

    Raises:
        StorageError: the packets or the model root could not be read.
        InvalidRequestError: a packet or checkpoint file needed is unreadable or does not fit.
    """
    if not publishers:
        return {}
    count = publishers[0].store.num_shards
    watermark = manifest.get("watermark") or {}
    if int(manifest.get("num_shards", -1)) != count:
        log.warning(
            "the training checkpoint has %s shards, this trainer %d: not replaying the packets the previous run "
            "published after it (followers may serve rows of that run this trainer does not have)",
            manifest.get("num_shards"),
            count,
        )
        return {}
    out = {}
    for publisher in publishers:
        shard = publisher.store.shard_index
        if str(shard) not in watermark:
            log.warning(
                "the training checkpoint records no packet watermark for %s: not replaying its packets",
                publisher.label,
            )
            continue
        for attempt in range(_ADOPT_ATTEMPTS):
            try:
                out[shard] = _replay_shard(publisher, int(watermark[str(shard)]))
                break
            except StorageNotFoundError as exc:
                # Retention removed a packet or checkpoint between the listing and the read (a
                # newer checkpoint covers it): list again; nothing was put into the store yet.
                if attempt + 1 == _ADOPT_ATTEMPTS:
                    raise
                log.warning("%s: %s; listing the model root again", publisher.label, exc)
    return out


def _replay_shard(publisher: PacketPublisher, watermark: int) -> int:
    """Adopt into ``publisher.store`` the rows its shard published above ``watermark``; returns
    the seq the store includes afterwards."""
    store, storage = publisher.store, publisher.storage
    seqs = [q for q in list_packets(storage, "", log) if q > watermark]
    merged: list[TableRows] = []
    base, source = watermark, ""
    newer = _newer_checkpoint(publisher, watermark)
    if newer is not None:
        name, covered, folder, files = newer
        if not set(range(watermark + 1, covered + 1)) <= set(seqs):  # packets needed are gone
            for path in files:
                rows = checkpoint.read_table_file(folder, path, store)
                merged = merge_newest(merged, [TableRows(rows.table, rows.ids, rows.weights, rows.state[:, :0])])
            base, source = covered, f"checkpoint {name} (seq {covered}) and "
    replayed = 0
    for seq in seqs:
        if seq <= base:
            continue
        if seq != base + replayed + 1:
            log.error(
                "%s: packet %d is missing; replaying the packets after the training checkpoint only up to %d",
                publisher.label,
                base + replayed + 1,
                base + replayed,
            )
            break
        where = storage.join_url(packet_name(seq))
        packet = read_published_packet(storage, seq, store.config, where)
        if (packet.shard, packet.num_shards) != (store.shard_index, store.num_shards):
            raise InvalidRequestError(f"{where}: a packet of shard {packet.shard}/{packet.num_shards}")
        merged = merge_newest(merged, packet.tables)
        replayed += 1
    adopted = _put_keeping_state(store, merged)
    if adopted:
        log.warning(
            "%s: adopted %d rows the previous run published after the training checkpoint (seq %d): %s%d packet(s) "
            "up to seq %d",
            publisher.label,
            adopted,
            watermark,
            source,
            replayed,
            base + replayed,
        )
    return base + replayed


def read_published_packet(
    storage: Storage, seq: int, config: EmbeddingConfig, where: str, retry_s: float = ADOPT_RETRY_S
) -> Packet:
    """Packet ``seq`` of a shard folder, read again with backoff for up to ``retry_s`` seconds
    while it is unreadable: an outside tool may be copying it in place, as followers also allow
    for (:class:`~embedding_server.modelroot.hotload.FollowOptions`' ``unreadable_retry_s``).

    Raises:
        PacketError, UnreadableFileError: still unreadable after ``retry_s`` seconds.
    """
    deadline = time.monotonic() + retry_s
    pause = 0.05
    while True:
        try:
            return decode_packet(storage.read_buffer(packet_name(seq)), config, where)
        except (PacketError, UnreadableFileError) as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("%s unreadable (%s); reading it again in %.2f s", where, exc, pause)
            time.sleep(pause)  # backoff between reads of a file another process may be writing
            pause = min(2 * pause, 2.0)


def _newer_checkpoint(publisher: PacketPublisher, watermark: int) -> tuple[str, int, Storage, list[str]] | None:
    """The newest complete model-root checkpoint of the publisher's training shard count when
    it includes packets of its shard above ``watermark``: (name, its seq, folder, the shard's
    files)."""
    root, store = publisher.model_root, publisher.store
    if root is None:
        return None
    prefix = checkpoint.shard_dir(store.shard_index, store.num_shards) + "/"
    for name in reversed(_checkpoint_dirs(root)):
        folder = root.child(f"{CHECKPOINTS_DIR}/{name}")
        try:
            manifest = checkpoint.read_manifest(folder)
        except InvalidRequestError:  # not complete (yet)
            continue
        if int(manifest["num_shards"]) != store.num_shards:
            continue
        covered = int((manifest.get("watermark") or {}).get(str(store.shard_index), FIRST_SEQ - 1))
        if covered <= watermark:
            return None
        return name, covered, folder, [f for f in manifest["files"] if f.startswith(prefix)]
    return None


def _put_keeping_state(store: EmbeddingStore, tables: list[TableRows]) -> int:
    """Write ``tables``' weights into a train-mode store: rows it holds keep their optimizer
    state, new ones start from zero state. Returns the rows written."""
    if not tables:
        return 0
    held = {rows.table.name: rows for rows in store.rows()}
    parts = []
    for rows in tables:
        n = rows.ids.shape[0]
        state = np.zeros((n, store.state_width(rows.table)), np.float32)
        have = held.get(rows.table.name)
        if have is not None and have.ids.shape[0] and state.shape[1]:
            order = np.argsort(have.ids, kind="stable")
            pos = np.minimum(np.searchsorted(have.ids[order], rows.ids), order.shape[0] - 1)
            hit = have.ids[order[pos]] == rows.ids
            state[hit] = have.state[order[pos[hit]]]
        parts.append(TableRows(rows.table, rows.ids, rows.weights, state))
    store.put_many(parts, evict=True)
    return sum(p.ids.shape[0] for p in parts)


def _model_root_above(incremental_dir: str | Storage, options: dict | None) -> Storage | None:
    """The model root of a packet folder named ``incremental`` (None when it is named otherwise,
    or is an open remote storage whose connection options are not known here)."""
    url = incremental_dir.url if isinstance(incremental_dir, Storage) else os.fspath(incremental_dir)
    head, _, tail = url.rstrip("/").rpartition("/")
    if tail != INCREMENTAL_DIR or not head or head.endswith(("/", ":")):
        return None
    if isinstance(incremental_dir, LocalStorage):
        return LocalStorage(head)
    if isinstance(incremental_dir, Storage):
        return None
    try:
        return open_storage(head, options)
    except StorageError:
        return None


def watermark_of(publishers: Sequence[PacketPublisher | None]) -> dict[str, int]:
    """Flush each shard's publisher and return ``{shard: last seq}`` (shards without one omitted)."""
    return {str(p.store.shard_index): p.flush() for p in publishers if p is not None}
