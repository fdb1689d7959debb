"""Serving follows training: an infer-mode store hot-loads a model root's checkpoints and packets.

A :class:`ModelRootFollower` keeps one infer-mode :class:`~embedding_server.store.store.EmbeddingStore`
equal to the newest state the trainer published under a model root
(:mod:`~embedding_server.modelroot.packets` describes the layout)::

    <root>/checkpoints/<20-digit name>/manifest.json   complete once the manifest is there; its
                                                      "watermark" maps training shard -> last seq
    <root>/incremental/shard-SSSSS-of-NNNNN/<seq>.arrow

At start it loads the newest complete checkpoint (falling back to older ones when one cannot be
read), then replays every newer packet of each training shard, strictly in sequence order; only
then is it *synced* (a server says ready after that). It then keeps following in one background
thread: local roots through inotify (the ``watchdog`` package) plus a slow safety rescan,
``s3://`` and ``hdfs://`` roots by listing every ``poll_interval_s`` seconds.

What happens on each irregularity (the server keeps serving through all of them):

* duplicates (a packet at or below the shard's watermark) are ignored;
* a packet file that appears at or below the watermark (one not in the folder's previous
  listing) carrying another trainer run id than the packet this follower applied at that seq
  (a trainer that numbered its packets again from a lower seq): not applied, but one WARNING per
  file, the ``ctrserve_embedding_foreign_run_packets`` counter and ``foreign_runs`` in
  :meth:`stats`;
* names in the listings that are not exactly what the writers make (``[0-9]{20}.arrow``,
  ``shard-SSSSS-of-NNNNN``, 20-digit checkpoint folders, ASCII digits only) are ignored, one
  WARNING per name;
* a gap (the next seq missing while a later one exists) is waited for; after ``gap_timeout_s``
  a WARNING names the missing seq and the ``ctrserve_embedding_packet_gap_alarm`` gauge goes to
  1. Nothing is ever applied out of order. If a newer checkpoint includes the missing packet
  (retention removed it), that shard catches up from the checkpoint's files instead;
* a missing model root or packet folder is waited for (logged once);
* an unreadable packet (incomplete: written in place or copied in parts by an outside tool, or
  listed by S3 before its content can be read; corrupt, truncated, foreign or misplaced; one the
  store refuses; not a regular file: a FIFO, a device, a directory; a symbolic link leading out
  of the model root; larger than ``max_packet_bytes``; a read not done within
  ``read_timeout_s``) is never skipped silently. It is retried with backoff (0.1 s doubling, at
  most 5 s apart, and at once when its size or modification time changes) for
  ``unreadable_retry_s`` seconds (one WARNING line when it first fails); later packets of its
  training shard wait. Still unreadable after that, it is declared bad: one ERROR line, the
  ``..._packets_quarantined`` counter, an entry in :meth:`stats`, and the shard is *held* at that
  sequence number with the gap alarm up. It stays held (the packet is still retried every 60 s
  and whenever it changes) until a newer checkpoint includes it, from which the shard catches
  up as for a packet retention removed, or an operator skips it (:meth:`skip_packet`, the
  ``SkipPacket`` RPC, ``ctrserve embedding-admin skip-packet``; a missing packet a gap waits on
  can be skipped the same way). Skipped sequence numbers are listed per training shard in
  :meth:`stats` (and from there in every handler response) until a newer checkpoint that
  includes them is caught up from; they are not remembered across restarts (a restarted server
  holds at the same packet again). The file is left where it is (a serving host may only have
  read access). So replicas at the same watermark serve the same values, or say which packets
  they skipped;
* a follower that cannot make progress shows it: :meth:`stall_reason` (``stalled`` in
  :meth:`stats`, the ``ctrserve_embedding_hotload_stalled`` gauge, and the server's health
  service ``ctrserve.embedding.v1.Hotload``, which goes ``NOT_SERVING``) once packets are
  pending and none has been applied for ``stall_timeout_s``, or one pass over the model root has
  run that long; ``seconds_since_last_apply`` and ``packets_pending`` are in :meth:`stats` and
  the metrics too;
* a newer checkpoint of the same training shard count is not loaded (the packets carry the same
  values, fresher); it is used only to catch up a shard whose needed packet is gone or held
  unreadable, or that skipped a packet it includes (see above). A newer
  checkpoint of another training shard count (the trainer was resharded) is switched to: its
  rows are applied in one atomic update and its packet folders followed from its watermark;
* packet folders of a shard count other than the checkpoint's are ignored (WARNING once);
  without any checkpoint, every packet folder is followed.

Each packet is applied atomically (:meth:`EmbeddingStore.put_many`): a lookup sees all of its
rows or none. Only the rows this serving shard owns are applied, so training and serving may
have different shard counts. A full serving shard evicts least recently used rows to make room
(counted in ``rows_evicted``).

Example:
    >>> follower = ModelRootFollower(store, "s3://models/ctr", FollowOptions(poll_interval_s=0.5))
    >>> follower.start()
    >>> follower.wait_synced()      # the newest checkpoint and every packet after it are loaded
    >>> follower.stats()["streams"][0]["watermark"]
    41
    >>> follower.stop()
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from embedding_server.core.config import JobType
from embedding_server.core.errors import InvalidRequestError
from embedding_server.modelroot import checkpoint
from embedding_server.modelroot.packets import (
    CHECKPOINTS_DIR,
    FIRST_SEQ,
    INCREMENTAL_DIR,
    Packet,
    PacketError,
    decode_packet,
    list_checkpoints,
    list_packets,
    list_shard_dirs,
    packet_dir,
    packet_name,
    read_packet_origin,
)
from embedding_server.storage.base import (
    LocalStorage,
    Storage,
    StorageError,
    StorageNotFoundError,
    UnreadableFileError,
)
from embedding_server.storage.urls import open_storage
from embedding_server.store.cpus import format_cpu_list, pin_this_thread, usable_cpus
from embedding_server.store.store import EmbeddingStore, TableRows

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

log = logging.getLogger("ctrserve.embedding_server.modelroot.hotload")

_MAX_RUN_RANGES = 256  # per stream: which run's packets were applied at which seqs
_RECENT_DELAYS = 2048  # freshness samples kept for the p50/p99 in stats
_RECENT_QUARANTINED = 20
_RETRY_FIRST_S = 0.1  # an unreadable packet is read again after this, then twice as long each time ...
_RETRY_MAX_S = 5.0  # ... up to this, until unreadable_retry_s is over
_HELD_RETRY_S = 60.0  # a packet declared bad is still read again this often (and whenever it changes)
_MAX_SKIPPED = 100  # skipped seqs kept per training shard (the most recent)
SKIP_WAIT_S = 30.0  # skip_packet waits this long for the follower thread to take the request
_FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class HotloadError(RuntimeError):
    """The model root cannot be served: no complete checkpoint under it could be loaded."""


@dataclass(frozen=True)
class FollowOptions:
    """How a :class:`ModelRootFollower` watches its model root.

    Attributes:
        poll_interval_s: seconds between listings of ``s3://`` and ``hdfs://`` roots (and of a
            local root that does not exist yet, or where inotify is unavailable).
        rescan_interval_s: seconds between safety rescans of a local root watched by inotify.
        gap_timeout_s: seconds a missing packet is waited for before the gap alarm goes off
            (the follower keeps waiting after that).
        max_packet_bytes: larger packet files are refused unread (the size the storage reports is
            checked before reading), as unreadable packets (see ``unreadable_retry_s``).
        unreadable_retry_s: seconds an unreadable packet is retried with backoff before it is
            declared bad; its training shard is then held at it, with the gap alarm up, until a
            newer checkpoint includes it or an operator skips it (see the module docstring).
        read_timeout_s: one read of a packet file that takes longer counts as unreadable (the
            read goes on in a thread of its own; no other read starts until it ends).
        stall_timeout_s: packets pending and none applied for this long, or one pass over the
            model root running this long, make the follower *stalled* (:meth:`ModelRootFollower.stall_reason`).
        use_inotify: watch local roots with inotify (else poll them like remote ones).
        apply_niceness: once synced (serving), the follower thread runs this many nice levels
            below the process (0 to 19; Linux schedules threads on their own), so that packet
            applies take CPU that lookups leave over instead of slowing them down. 0 keeps the
            process's priority.
        apply_cpus: once synced, the follower thread (and the threads it starts) runs only on
            these CPUs (Linux); None leaves it where the process runs. Until synced it may also
            use them beside its own, so the start-up replay is not slowed. Pair it with serving
            threads kept off these CPUs (``embedding-server --apply-cpus``, :mod:`~embedding_server.store.cpus`).

    Raises:
        ValueError: a non-positive interval or timeout, a niceness outside 0..19, or an empty
            ``apply_cpus`` or one with a negative CPU number.
    """

    poll_interval_s: float = 1.0
    rescan_interval_s: float = 10.0
    gap_timeout_s: float = 30.0
    max_packet_bytes: int = 2**31
    unreadable_retry_s: float = 60.0
    read_timeout_s: float = 60.0
    stall_timeout_s: float = 120.0
    use_inotify: bool = True
    apply_niceness: int = 10
    apply_cpus: frozenset[int] | None = None

    def __post_init__(self) -> None:
        for name in (
            "poll_interval_s",
            "rescan_interval_s",
            "gap_timeout_s",
            "max_packet_bytes",
            "unreadable_retry_s",
            "read_timeout_s",
            "stall_timeout_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if (
            not isinstance(self.apply_niceness, int)
            or isinstance(self.apply_niceness, bool)
            or not 0 <= self.apply_niceness <= 19
        ):
            raise ValueError(f"apply_niceness must be an integer in 0..19, got {self.apply_niceness!r}")
        if self.apply_cpus is not None:
            try:
                cpus = frozenset(self.apply_cpus)
            except TypeError:  # not a collection (e.g. one CPU number given bare)
                cpus = frozenset()
            if not cpus or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cpus):
                raise ValueError(f"apply_cpus must be a non-empty set of CPU numbers, got {self.apply_cpus!r}")
            object.__setattr__(self, "apply_cpus", cpus)


@dataclass
class _Stream:
    """One training shard's packets, as followed: what is applied and whether a gap is open."""

    shard: int
    num_shards: int
    watermark: int  # last seq applied or included in the loaded checkpoint
    waiting_for: int | None = None
    gap_since: float | None = None  # time.monotonic() when the gap was first seen
    alarmed: bool = False
    unreadable: _Unreadable | None = None  # the next packet, while it cannot be read
    skipped: list[int] = field(default_factory=list)  # seqs an operator skipped (the most recent)
    pending_since: float | None = None  # time.monotonic() since packets above the watermark are listed
    advanced_at: float = field(default_factory=time.monotonic)  # when the watermark last moved
    listed: set[int] | None = None  # the seqs of the folder's previous listing (None: not listed yet)
    runs: list[list] = field(default_factory=list)  # [first seq, last seq, run id] of applied packets

    def applied_run(self, seq: int) -> str | None:
        """The run id of the packet applied at ``seq`` (None: none was applied there by this
        follower, e.g. the seq came with a checkpoint)."""
        for first, last, run_id in reversed(self.runs):
            if first <= seq <= last:
                return run_id
        return None

    def record_run(self, seq: int, run_id: str) -> None:
        if self.runs and self.runs[-1][2] == run_id and self.runs[-1][1] == seq - 1:
            self.runs[-1][1] = seq
        else:
            self.runs.append([seq, seq, run_id])
            del self.runs[:-_MAX_RUN_RANGES]

    @property
    def folder(self) -> str:
        return packet_dir(self.shard, self.num_shards)

    @property
    def label(self) -> str:
        return f"training shard {self.shard}/{self.num_shards}"


@dataclass
class _Unreadable:
    """A stream's next packet while it cannot be read (see the module docstring)."""

    seq: int
    where: str
    since: float  # time.monotonic() of the first failed read
    attempts: int = 0
    reason: str = ""
    next_try: float = 0.0
    stamp: tuple[int, float | None] | None = None  # (size, mtime) when it last failed
    held: bool = False  # declared bad: retried for unreadable_retry_s in vain


@dataclass(frozen=True)
class _Checkpoint:
    """A complete checkpoint's name and the manifest facts the follower needs."""

    name: str
    num_shards: int
    watermark: dict[int, int]
    files: tuple[str, ...]

    @property
    def path(self) -> str:
        return f"{CHECKPOINTS_DIR}/{self.name}"

    def files_of(self, shards: set[int]) -> list[str]:
        """The table files of the given training shards."""
        prefixes = tuple(f"{checkpoint.shard_dir(s, self.num_shards)}/" for s in shards)
        return [f for f in self.files if f.startswith(prefixes)]


@dataclass
class _Counters:
    packets_applied: int = 0
    rows_applied: int = 0
    packets_quarantined: int = 0
    packets_skipped: int = 0
    rows_evicted: int = 0
    foreign_run_packets: int = 0
    delays: deque = field(default_factory=lambda: deque(maxlen=_RECENT_DELAYS))
    quarantined: deque = field(default_factory=lambda: deque(maxlen=_RECENT_QUARANTINED))
    foreign_runs: deque = field(default_factory=lambda: deque(maxlen=_RECENT_QUARANTINED))


class ModelRootFollower:
    """Keeps an infer-mode store equal to the newest state published under a model root.

    Args:
        store: the infer-mode store to fill (other users may look rows up concurrently).
        root: the model root: a local path, ``file://``, ``s3://`` or ``hdfs://`` URL, or an open
            :class:`~embedding_server.storage.base.Storage`.
        options: intervals and timeouts (:class:`FollowOptions`).
        storage_options: connection options for ``s3://``/``hdfs://`` URLs (see
            :func:`~embedding_server.storage.urls.open_storage`; the environment fills the rest).
        registry: a Prometheus registry to export the freshness metrics in (e.g. the server's
            ``ServerMetrics.registry``); none when not given.
        labels: constant labels of every exported series (e.g. ``{"shard": "0"}``).

    Raises:
        ValueError: ``store`` is not in infer mode.
        StorageError: ``root`` is not a valid storage URL or its options are invalid.
    """

    def __init__(
        self,
        store: EmbeddingStore,
        root: str | Storage,
        options: FollowOptions | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        registry: CollectorRegistry | None = None,
        labels: Mapping[str, str] | None = None,
    ):
        if store.mode is not JobType.INFER:
            raise ValueError(f"a model root is followed by an infer-mode store, not a {store.mode}-mode one")
        self.store = store
        self.options = options or FollowOptions()
        self.storage = open_storage(root, None if isinstance(root, Storage) else storage_options)
        self._checkpoint: _Checkpoint | None = None
        self._manifests: dict[str, _Checkpoint] = {}  # complete checkpoints are immutable: cached
        self._broken: set[str] = set()  # checkpoints that failed to load
        self._streams: dict[tuple[int, int], _Stream] = {}
        self._counters = _Counters()
        self._lock = threading.Lock()  # guards _streams, _counters and _checkpoint for stats()
        self._said: set[str] = set()  # conditions already logged once
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._huge_pages: threading.Thread | None = None  # see _move_to_huge_pages
        self._readahead: ThreadPoolExecutor | None = None  # reads the next packet during the initial replay
        self._observer: BaseObserver | None = None
        self._reader = _BoundedReader()  # packet reads, bounded in time (read_timeout_s)
        self._requests: deque[tuple[Callable[[], Any], Future]] = deque()  # run on the follower thread
        self._last_apply = time.monotonic()  # of the last packet applied (or the start)
        self._pass_started: float | None = None  # time.monotonic() of the pass in progress, once synced
        labels = dict(labels or {})
        self._freshness = None
        if registry is not None:
            self._freshness = Histogram(
                "ctrserve_embedding_packet_freshness_seconds",
                "packet creation to applied in this server",
                list(labels),
                buckets=_FRESHNESS_BUCKETS,
                registry=registry,
            )
            if labels:
                self._freshness = self._freshness.labels(**labels)
            registry.register(_FollowerCollector(self, labels))

    # ------------------------------------------------------------------ lifecycle

    @property
    def synced(self) -> bool:
        """Whether the initial checkpoint load and packet replay are done."""
        return self._synced.is_set() and self._error is None

    def start(self) -> ModelRootFollower:
        """Start the background thread: the initial load and replay, then following."""
        if self._thread is not None:
            raise RuntimeError("the follower was already started")
        self._thread = threading.Thread(target=self._run, name="model-root-follower", daemon=True)
        self._thread.start()
        return self

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Block until the initial load and replay are done; False when ``timeout`` passed first.

        Raises:
            HotloadError: no complete checkpoint could be loaded (the thread has stopped).
        """
        done = self._synced.wait(timeout)
        if self._error is not None:
            raise self._error
        return done

    def wait_huge_pages(self, timeout: float | None = None) -> bool:
        """Block until the rows loaded at start-up are on huge pages (see
        :meth:`EmbeddingStore.defer_huge_pages`), which happens in the background once synced;
        False when ``timeout`` passed first or the follower stopped before."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._synced.wait(timeout):
            return False
        thread = self._huge_pages
        if thread is not None:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.store.huge_pages_pending

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following (an apply in progress finishes first)."""
        self._stopping.set()
        self._wake.set()
        for thread in (self._thread, self._huge_pages):
            if thread is not None:
                thread.join(timeout)
        self._stop_observer()
        self._reader.close()

    def __enter__(self) -> ModelRootFollower:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        self._place(widen=True)
        try:
            self._initial_sync()
        except Exception as exc:  # HotloadError, or a bug: either way wait_synced() must not hang
            if not isinstance(exc, HotloadError):
                log.exception("loading model root %s failed", self.storage.url)
                exc = HotloadError(f"model root {self.storage.url}: loading failed: {type(exc).__name__}: {exc}")
            log.error("%s", exc)
            self._error = exc
            self._synced.set()
            return
        self._lower_priority()
        self._place(widen=False)
        self._reader.recycle()  # reads go on in a thread of these CPUs and this priority
        if self.store.huge_pages_pending:  # started before _synced is set: wait_huge_pages() sees it
            self._huge_pages = threading.Thread(target=self._move_to_huge_pages, name="huge-pages", daemon=True)
            self._huge_pages.start()  # on this thread's CPUs and priority, which it inherits
        self._last_apply = time.monotonic()
        self._synced.set()
        while not self._stopping.is_set():
            self._wake.wait(self._wait_seconds())
            self._wake.clear()
            if self._stopping.is_set():
                return
            self._pass_started = time.monotonic()
            try:
                self._run_requests()
                self._pass_safely()
            finally:
                self._pass_started = None

    def _initial_sync(self) -> None:
        # Nothing is served yet: read the next packet, and commit its rows' memory, beside the
        # apply; commit on 4 KiB pages, several times faster, and move to huge pages once serving.
        self.store.defer_huge_pages()
        self.store.commit_ahead = True
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="packet-readahead") as self._readahead:
                self._initial_load()
        finally:
            self._readahead = None
            self.store.commit_ahead = False

    def _initial_load(self) -> None:
        loaded = False
        while not self._stopping.is_set():
            try:
                if not loaded:
                    self._load_newest_checkpoint()
                    loaded = True
                self._follow_pass()
            except StorageError as exc:
                self._say(
                    "storage",
                    logging.WARNING,
                    "model root %s: %s; retrying in %.1f s",
                    self.storage.url,
                    exc,
                    self.options.poll_interval_s,
                )
                self._stopping.wait(self.options.poll_interval_s)
                continue
            self._forget("storage")
            with self._lock:
                streams = ", ".join(f"{s.label} at seq {s.watermark}" for s in self._streams.values()) or "no packets"
            log.info(
                "model root %s loaded: checkpoint %s, %s",
                self.storage.url,
                self._checkpoint.name if self._checkpoint else "(none)",
                streams,
            )
            return

    def _lower_priority(self) -> None:
        """Run this thread ``apply_niceness`` levels below the process (see FollowOptions)."""
        if not self.options.apply_niceness or not hasattr(os, "setpriority"):
            return
        try:
            tid = threading.get_native_id()
            os.setpriority(
                os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.options.apply_niceness)
            )
        except OSError as exc:  # e.g. a sandbox that forbids it: applies then compete with lookups
            log.warning("cannot lower the priority of the packet-applying thread: %s", exc)

    def _place(self, widen: bool) -> None:
        """Run this thread on the ``apply_cpus`` (see FollowOptions): beside the CPUs it has
        while the start-up replay runs (``widen``), only on them once serving."""
        cpus = self.options.apply_cpus
        if cpus is None:
            return
        try:
            pin_this_thread(cpus | usable_cpus() if widen else cpus)
        except OSError as exc:  # e.g. CPUs a container does not grant: applies then share the serving CPUs
            log.warning("cannot run the packet-applying thread on CPUs %s: %s", format_cpu_list(cpus), exc)
        else:
            if not widen:
                log.info("packets of model root %s are applied on CPUs %s", self.storage.url, format_cpu_list(cpus))

    def _move_to_huge_pages(self) -> None:
        """(Its own thread, once synced.) See :meth:`EmbeddingStore.adopt_huge_pages`."""
        t0 = time.monotonic()
        try:
            done = self.store.adopt_huge_pages(self._stopping.is_set)
        except Exception:  # lookups run as well on 4 KiB pages, only a little slower
            log.exception("moving the rows of model root %s onto huge pages failed", self.storage.url)
            return
        if done:
            log.info("rows of model root %s moved onto huge pages in %.2f s", self.storage.url, time.monotonic() - t0)

    def _pass_safely(self) -> None:
        try:
            self._follow_pass()
            self._forget("storage")
        except StorageError as exc:  # an outage: the next pass retries
            self._say("storage", logging.WARNING, "model root %s: %s; retrying", self.storage.url, exc)
        except Exception:  # a bug must not stop serving: log it and keep following
            log.exception("following model root %s failed; retrying", self.storage.url)

    def _wait_seconds(self) -> float:
        self._ensure_observer()
        wait = self.options.rescan_interval_s if self._observer is not None else self.options.poll_interval_s
        now = time.monotonic()
        with self._lock:
            for s in self._streams.values():
                if s.gap_since is not None and not s.alarmed:
                    wait = min(wait, max(0.0, s.gap_since + self.options.gap_timeout_s - now) + 0.01)
                if s.unreadable is not None:
                    wait = min(wait, max(0.0, s.unreadable.next_try - now) + 0.01)
        return wait

    # ------------------------------------------------------------------ checkpoints

    def _load_newest_checkpoint(self) -> None:
        """Load the newest complete checkpoint that loads, newest first."""
        tried = False
        for ckpt in self._complete_checkpoints():
            tried = True
            load = functools.partial(checkpoint.load_store, self.store, self.storage.child(ckpt.path))
            rows = self._loaded_or_broken(ckpt, load, ", trying an older one", StorageNotFoundError)
            if rows is None:
                continue
            self._adopt(ckpt)
            log.info(
                "loaded checkpoint %s: %d rows for shard %d of %d (training shards %d, watermark %s)",
                ckpt.name,
                rows,
                self.store.shard_index,
                self.store.num_shards,
                ckpt.num_shards,
                ckpt.watermark or "none",
            )
            return
        if tried:
            raise HotloadError(
                f"model root {self.storage.url}: no complete checkpoint could be loaded (see the errors above)"
            )

    def _complete_checkpoints(self) -> Iterator[_Checkpoint]:
        """Complete, loadable-looking checkpoints, newest first (manifests read lazily)."""
        for name in reversed(list_checkpoints(self.storage, log)):
            if name in self._broken:
                continue
            ckpt = self._manifests.get(name) or self._read_manifest(name)
            if ckpt is not None:
                yield ckpt

    def _read_manifest(self, name: str) -> _Checkpoint | None:
        """The checkpoint's facts; None while incomplete (no manifest yet) or broken."""
        folder = self.storage.child(f"{CHECKPOINTS_DIR}/{name}")
        try:
            manifest = checkpoint.read_manifest(folder)
            ckpt = _Checkpoint(
                name, int(manifest["num_shards"]), _parse_watermark(manifest.get("watermark")), tuple(manifest["files"])
            )
        except InvalidRequestError as exc:
            if "no manifest.json" in str(exc):
                return None  # still being written
            log.error("checkpoint %s is unusable: %s", name, exc)
            self._broken.add(name)
            return None
        except (KeyError, TypeError, ValueError) as exc:
            log.error("checkpoint %s has a malformed manifest (%s: %s); ignoring it", name, type(exc).__name__, exc)
            self._broken.add(name)
            return None
        self._manifests[name] = ckpt
        return ckpt

    def _loaded_or_broken(
        self, ckpt: _Checkpoint, load: Callable[[], int], instead: str, *errors: type[Exception]
    ) -> int | None:
        """The rows ``load`` wrote from ``ckpt``; None when it raised InvalidRequestError or one of
        ``errors``: then ``ckpt`` is broken (never tried again) and the error is logged, saying
        what happens ``instead``."""
        caught: tuple[type[Exception], ...] = (InvalidRequestError, *errors)
        try:
            return load()
        except caught as exc:
            log.error("checkpoint %s cannot be loaded%s: %s", ckpt.name, instead, exc)
            self._broken.add(ckpt.name)
            return None

    def _adopt(self, ckpt: _Checkpoint) -> None:
        """Follow ``ckpt``'s training shards from its watermark on."""
        with self._lock:
            self._checkpoint = ckpt
            self._streams = {
                (s, ckpt.num_shards): _Stream(s, ckpt.num_shards, ckpt.watermark.get(s, FIRST_SEQ - 1))
                for s in range(ckpt.num_shards)
            }

    def _apply_checkpoint_shards(self, ckpt: _Checkpoint, shards: set[int]) -> int:
        """Write the rows of ``shards``' files that this serving shard owns, as one atomic update."""
        folder = self.storage.child(ckpt.path)
        parts = []
        for path in ckpt.files_of(shards):
            rows = self._owned(checkpoint.read_table_file(folder, path, self.store))
            if rows.ids.shape[0]:  # serving keeps no optimizer state
                width = self.store.state_width(rows.table)
                parts.append(
                    TableRows(rows.table, rows.ids, rows.weights, np.zeros((rows.ids.shape[0], width), np.float32))
                )
        evicted = self.store.put_many(parts)
        with self._lock:
            self._counters.rows_evicted += evicted
        return sum(p.ids.shape[0] for p in parts)

    def _check_newer_checkpoint(self) -> None:
        """React to a checkpoint newer than the adopted one (see the module docstring): switch
        to it when it has another training shard count, else catch up only the shards whose
        next packet it includes and which is gone."""
        newest = next(self._complete_checkpoints(), None)
        if newest is None or (self._checkpoint is not None and newest.name <= self._checkpoint.name):
            return
        if {n for _, n in self._streams} != {newest.num_shards}:
            self._switch_to(newest)
            return
        with self._lock:
            for s in range(newest.num_shards):  # a shard whose folder retention emptied away
                self._streams.setdefault((s, newest.num_shards), _Stream(s, newest.num_shards, FIRST_SEQ - 1))
        gone = {s.shard for s in self._streams.values() if self._needs_catch_up(s, newest)}
        if gone:
            self._catch_up(newest, gone)
        elif self._checkpoint is None:
            with self._lock:  # its rows already came through the packets: follow its layout only
                self._checkpoint = newest

    def _needs_catch_up(self, stream: _Stream, newest: _Checkpoint) -> bool:
        """Whether the stream catches up from ``newest``: it includes the stream's next packet and
        that packet is gone or unreadable, or it includes a packet an operator skipped and is not
        behind the stream (catching up repairs the skip)."""
        covered = newest.watermark.get(stream.shard, FIRST_SEQ - 1)
        if covered < stream.watermark or (covered == stream.watermark and not stream.skipped):
            return False
        if any(q <= covered for q in stream.skipped):
            return True
        if covered == stream.watermark:
            return False
        unreadable = stream.unreadable
        if unreadable is not None and unreadable.seq == stream.watermark + 1:
            return True
        return not self.storage.exists(f"{stream.folder}/{packet_name(stream.watermark + 1)}")

    def _switch_to(self, ckpt: _Checkpoint) -> None:
        before = f"{self._checkpoint.num_shards} training shards" if self._checkpoint else "no checkpoint"
        load = functools.partial(self._apply_checkpoint_shards, ckpt, set(range(ckpt.num_shards)))
        rows = self._loaded_or_broken(ckpt, load, "; staying on the current state")
        if rows is None:
            return
        self._adopt(ckpt)
        log.warning(
            "switched to checkpoint %s (%s before, %d training shards now): applied %d rows; following its packets",
            ckpt.name,
            before,
            ckpt.num_shards,
            rows,
        )

    def _catch_up(self, ckpt: _Checkpoint, shards: set[int]) -> None:
        load = functools.partial(self._apply_checkpoint_shards, ckpt, shards)
        rows = self._loaded_or_broken(ckpt, load, " to catch up")
        if rows is None:
            return
        with self._lock:
            for s in self._streams.values():
                if s.shard in shards:
                    s.watermark = ckpt.watermark.get(s.shard, FIRST_SEQ - 1)
                    s.unreadable = None
                    s.skipped = [q for q in s.skipped if q > s.watermark]  # the checkpoint has their rows
                    s.advanced_at = time.monotonic()
                    self._close_gap(s)
            self._checkpoint = ckpt
        log.warning(
            "packets of training shard(s) %s needed next are gone, unreadable or skipped; caught up from "
            "checkpoint %s (%d rows)",
            sorted(shards),
            ckpt.name,
            rows,
        )

    # ------------------------------------------------------------------ packets

    def _follow_pass(self) -> None:
        """One look at the model root: checkpoints, then every followed shard's new packets."""
        top = self.storage.list_dir("")
        if CHECKPOINTS_DIR not in top and INCREMENTAL_DIR not in top:
            self._say(
                "root",
                logging.WARNING,
                "model root %s has no %s/ or %s/ yet; waiting for it",
                self.storage.url,
                CHECKPOINTS_DIR,
                INCREMENTAL_DIR,
            )
            return
        self._forget("root")
        if self._synced.is_set():
            self._check_newer_checkpoint()
        self._discover_streams()
        for stream in list(self._streams.values()):
            if self._stopping.is_set():
                return
            self._follow_stream(stream)

    def _discover_streams(self) -> None:
        """Add streams of packet folders that appear; say once about folders that are ignored."""
        for layout in list_shard_dirs(self.storage, log):  # other names: one WARNING each
            name = checkpoint.shard_dir(*layout)
            if layout not in self._streams:
                if self._checkpoint is not None:
                    self._say(
                        f"foreign:{name}",
                        logging.WARNING,
                        "ignoring packets in %s/%s: checkpoint %s was written by %d training shards",
                        INCREMENTAL_DIR,
                        name,
                        self._checkpoint.name,
                        self._checkpoint.num_shards,
                    )
                    continue
                with self._lock:
                    self._streams[layout] = _Stream(layout[0], layout[1], FIRST_SEQ - 1)
        counts = {n for _, n in self._streams}
        if len(counts) > 1:
            self._say(
                "layouts",
                logging.WARNING,
                "packets of several training shard counts %s and no checkpoint: following each folder on its own",
                sorted(counts),
            )

    def _follow_stream(self, stream: _Stream) -> None:
        """Apply the stream's next packets in order; open, alarm or close its gap.

        During the initial replay the next packet is read and decoded in a second thread while
        the current one is applied (a starting server catches up sooner, and it serves nothing
        yet). Once synced, one thread does both and leaves the other cores to lookups.
        """
        seqs = set(list_packets(self.storage, stream.folder, log))
        self._check_foreign_runs(stream, seqs)
        if not seqs:
            self._say(
                f"empty:{stream.folder}", logging.INFO, "waiting for packets in %s/%s", self.storage.url, stream.folder
            )
            self._note_pending(stream, seqs)
            return
        self._forget(f"empty:{stream.folder}")
        ahead: Future | None = None
        try:
            while stream.watermark + 1 in seqs and not self._stopping.is_set():
                seq = stream.watermark + 1
                if not self._due(stream, seq):
                    return  # unreadable: read again once its backoff is over or it changed
                loaded = ahead.result() if ahead is not None else self._read_bounded(stream, seq)
                ahead = None
                if self._readahead is not None and seq + 1 in seqs:
                    ahead = self._readahead.submit(self._read_bounded, stream, seq + 1)
                if not self._apply(stream, seq, loaded):
                    return  # unreadable for now: retried with backoff, later packets wait
        finally:
            if ahead is not None:
                ahead.cancel()
            self._note_pending(stream, seqs)
        if stream.unreadable is not None:  # it was the next packet and is no longer listed
            with self._lock:
                stream.unreadable = None
        if any(s > stream.watermark + 1 for s in seqs):
            self._open_gap(stream)
        elif stream.waiting_for is not None:
            with self._lock:
                self._close_gap(stream)

    def _note_pending(self, stream: _Stream, seqs: set[int]) -> None:
        """Remember since when packets above the stream's watermark are listed (see stall_reason)."""
        pending = any(s > stream.watermark for s in seqs)
        with self._lock:
            if not pending:
                stream.pending_since = None
            elif stream.pending_since is None:
                stream.pending_since = time.monotonic()

    def _due(self, stream: _Stream, seq: int) -> bool:
        """Whether packet ``seq`` is to be read now: it has not failed, its backoff is over, or the
        file changed since it failed."""
        unreadable = stream.unreadable
        if unreadable is None or unreadable.seq != seq or time.monotonic() >= unreadable.next_try:
            return True
        return self._stamp(f"{stream.folder}/{packet_name(seq)}") != unreadable.stamp

    def _stamp(self, path: str) -> tuple[int, float | None] | None:
        """(size, mtime) of a packet file as the storage reports it; None when it cannot say."""
        try:
            st = self.storage.stat(path)
        except StorageError:
            return None
        return st.size, st.mtime

    def _read_bounded(self, stream: _Stream, seq: int) -> Packet | str | None:
        """:meth:`_read` within ``read_timeout_s``: a read that takes longer is a reason to retry."""
        where = self.storage.join_url(f"{stream.folder}/{packet_name(seq)}")
        try:
            return self._reader.run(where, functools.partial(self._read, stream, seq), self.options.read_timeout_s)
        except _ReadTimeout as exc:
            return str(exc)

    def _read(self, stream: _Stream, seq: int) -> Packet | str | None:
        """Packet ``seq`` read and checked: the packet, a reason to quarantine it, or None when it
        could not be read (vanished).

        Raises:
            StorageError: an outage (retried by the next pass).
        """
        path = f"{stream.folder}/{packet_name(seq)}"
        where = self.storage.join_url(path)
        try:
            data = self.storage.read_buffer(path, max_bytes=self.options.max_packet_bytes)
        except StorageNotFoundError:
            return None
        except UnreadableFileError as exc:  # too large, not a regular file, outside the root
            return str(exc)
        try:
            packet = decode_packet(data, self.store.config, where)
        except PacketError as exc:
            return str(exc)
        if (packet.shard, packet.num_shards, packet.seq) != (stream.shard, stream.num_shards, seq):
            return (
                f"{where}: the packet says shard {packet.shard} of {packet.num_shards}, seq {packet.seq}; its "
                f"place says shard {stream.shard} of {stream.num_shards}, seq {seq}"
            )
        return packet

    def _apply(self, stream: _Stream, seq: int, loaded: Packet | str | None) -> bool:
        """Apply packet ``seq`` as :meth:`_read` left it; False (and retried later, see
        :meth:`_unreadable`) when it could not be read or applied."""
        where = self.storage.join_url(f"{stream.folder}/{packet_name(seq)}")
        if loaded is None:
            loaded = f"{where}: listed, but not found when read"
        if isinstance(loaded, str):
            self._unreadable(stream, seq, where, loaded)
            return False
        packet = loaded
        try:
            parts = [self._owned(t) for t in packet.tables]
            evicted = self.store.put_many([p for p in parts if p.ids.shape[0]])
        except InvalidRequestError as exc:
            self._unreadable(stream, seq, where, str(exc))
            return False
        delay = max(0.0, time.time() - packet.created_at)
        rows = sum(p.ids.shape[0] for p in parts)
        with self._lock:
            stream.watermark = seq
            stream.advanced_at = self._last_apply = time.monotonic()
            recovered, stream.unreadable = stream.unreadable, None
            stream.record_run(seq, packet.run_id)
            if stream.waiting_for == seq:
                self._close_gap(stream)
            c = self._counters
            c.packets_applied += 1
            c.rows_applied += rows
            c.rows_evicted += evicted
            c.delays.append(delay)
        if self._freshness is not None:
            self._freshness.observe(delay)
        if recovered is not None:
            log.info(
                "packet %s (%s, seq %d) read and applied after %d failed attempt(s) over %.1f s",
                where,
                stream.label,
                seq,
                recovered.attempts,
                time.monotonic() - recovered.since,
            )
        if evicted:
            log.info(
                "packet %s: evicted %d least recently used rows to make room (capacity %d)",
                where,
                evicted,
                self.store.capacity,
            )
        log.debug(
            "applied packet %s: %d of %d rows are this shard's, %.3f s after it was made",
            where,
            rows,
            packet.rows,
            delay,
        )
        return True

    def _owned(self, rows: TableRows) -> TableRows:
        """The rows this serving shard owns."""
        mine = self.store.owns(rows.ids, np.full(rows.ids.shape[0], rows.table.index, np.uint16))
        if mine.all():
            return rows
        return TableRows(rows.table, rows.ids[mine], rows.weights[mine], rows.state[mine])

    def _unreadable(self, stream: _Stream, seq: int, where: str, reason: str) -> None:
        """Packet ``seq`` could not be read or applied: schedule its next try, and once
        ``unreadable_retry_s`` is over declare it bad and hold the stream at it (module docstring)."""
        stamp = self._stamp(f"{stream.folder}/{packet_name(seq)}")
        now = time.monotonic()
        retry_s = self.options.unreadable_retry_s
        first = declared = False
        with self._lock:
            state = stream.unreadable
            if state is None or state.seq != seq:
                state = stream.unreadable = _Unreadable(seq, where, now)
                first = True
            state.attempts += 1
            state.reason, state.stamp = reason, stamp
            deadline = state.since + retry_s
            if not state.held and now >= deadline:
                state.held = declared = True
                stream.waiting_for, stream.gap_since, stream.alarmed = seq, state.since, True
                self._counters.packets_quarantined += 1
                self._counters.quarantined.append(f"{where}: {reason}")
            if state.held:
                state.next_try = now + _HELD_RETRY_S
            else:
                state.next_try = min(now + min(_RETRY_MAX_S, _RETRY_FIRST_S * 2 ** (state.attempts - 1)), deadline)
            attempts, since = state.attempts, state.since
        if first and not declared:
            log.warning(
                "packet %s (%s, seq %d) cannot be read: %s; retrying for up to %.0f s, later packets of the shard wait",
                where,
                stream.label,
                seq,
                reason,
                retry_s,
            )
        if declared:
            log.error(
                "packet %s (%s, seq %d) still cannot be read after %.1f s and %d attempt(s): %s; holding the shard "
                "at seq %d (gap alarm up, later packets wait) until a newer checkpoint includes it or an operator "
                "skips it (ctrserve embedding-admin skip-packet --training-shard %d --training-shards %d --seq %d)",
                where,
                stream.label,
                seq,
                now - since,
                attempts,
                reason,
                seq,
                stream.shard,
                stream.num_shards,
                seq,
            )

    # ------------------------------------------------------------------ operator requests

    def skip_packet(self, shard: int, num_shards: int, seq: int, timeout: float = SKIP_WAIT_S) -> dict[str, Any]:
        """Give up on packet ``seq`` of training shard ``shard`` of ``num_shards``, which the
        follower is held at (declared bad, still being retried, or missing while later packets
        exist): its rows are not applied, the shard goes on from ``seq + 1``, and ``seq`` is listed
        in the stream's ``skipped`` (stats, handler responses) until a newer checkpoint that
        includes it is caught up from. Skipping a seq already skipped is a no-op. Runs on the
        follower thread, between passes.

        Returns:
            ``{"watermark": the shard's watermark now, "skipped": its skipped seqs,
            "already_skipped": bool}``.

        Raises:
            InvalidRequestError: no such training shard is followed, ``seq`` is not the packet it
                is held at, or the follower did not take the request within ``timeout`` seconds.
        """
        thread = self._thread
        if thread is None or not thread.is_alive() or self._stopping.is_set():
            raise InvalidRequestError(f"model root {self.storage.url}: the follower is not running; nothing skipped")
        request: Future = Future()
        self._requests.append((functools.partial(self._skip, shard, num_shards, seq), request))
        self._wake.set()
        try:
            return request.result(timeout)
        except FutureTimeout:
            if not request.cancel():  # taken just now: its answer comes
                return request.result()
            raise InvalidRequestError(
                f"model root {self.storage.url}: the follower did not take the request within {timeout:.0f} s (it is "
                "still loading, busy or stalled: see its stats); nothing skipped"
            ) from None

    def _run_requests(self) -> None:
        """(The follower thread.) Run the operator requests queued by :meth:`skip_packet`."""
        while self._requests:
            fn, request = self._requests.popleft()
            if not request.set_running_or_notify_cancel():
                continue
            try:
                request.set_result(fn())
            except Exception as exc:  # the refusal goes back to the caller
                request.set_exception(exc)

    def _skip(self, shard: int, num_shards: int, seq: int) -> dict[str, Any]:
        stream = self._streams.get((shard, num_shards))
        if stream is None:
            following = ", ".join(s.label for s in self._streams.values()) or "none"
            raise InvalidRequestError(
                f"not following training shard {shard} of {num_shards} (following: {following}); nothing skipped"
            )
        if seq in stream.skipped:
            return {"watermark": stream.watermark, "skipped": list(stream.skipped), "already_skipped": True}
        if seq <= stream.watermark:
            raise InvalidRequestError(
                f"{stream.label}: packet seq {seq} is already applied or included in the checkpoint (watermark "
                f"{stream.watermark}); nothing skipped"
            )
        next_seq = stream.watermark + 1
        unreadable = stream.unreadable
        if unreadable is not None and unreadable.seq == next_seq:
            why = f"it cannot be read: {unreadable.reason}"
        elif stream.waiting_for == next_seq:
            why = "it is missing while later packets exist"
        else:
            raise InvalidRequestError(
                f"{stream.label}: not held at any packet (it waits for seq {next_seq} in order); nothing skipped"
            )
        if seq != next_seq:
            raise InvalidRequestError(
                f"{stream.label}: held at seq {next_seq}, not {seq}; packets are skipped one at a time, the one "
                "held at first; nothing skipped"
            )
        with self._lock:
            stream.watermark = seq
            stream.skipped = (stream.skipped + [seq])[-_MAX_SKIPPED:]
            stream.unreadable = None
            stream.advanced_at = time.monotonic()
            self._close_gap(stream)
            self._counters.packets_skipped += 1
        log.warning(
            "%s: packet seq %d skipped by an operator (%s); its rows are not applied, the shard goes on from seq %d",
            stream.label,
            seq,
            why,
            seq + 1,
        )
        return {"watermark": stream.watermark, "skipped": list(stream.skipped), "already_skipped": False}

    def _check_foreign_runs(self, stream: _Stream, seqs: set[int]) -> None:
        """Alarm for each packet file that appeared since the previous listing at or below the
        stream's watermark, where this follower applied a packet of another run: a trainer that
        numbered its packets again from a lower seq. Its rows are not applied (nothing applies
        out of order), but they are not dropped silently either."""
        before, stream.listed = stream.listed, seqs
        if before is None:  # the first listing: nothing to compare with
            return
        for seq in sorted(s for s in seqs - before if s <= stream.watermark):
            applied = stream.applied_run(seq)
            if applied is None:
                continue
            path = f"{stream.folder}/{packet_name(seq)}"
            where = self.storage.join_url(path)
            try:
                _, _, _, run_id = read_packet_origin(
                    self.storage.read_buffer(path, max_bytes=self.options.max_packet_bytes), where
                )
            except (StorageError, PacketError):  # gone again, or not a packet: nothing to compare
                continue
            if run_id == applied:
                continue
            log.warning(
                "%s: packet %s of trainer run %r appeared at or below the watermark %d, where a packet of run %r "
                "was applied; not applying it (did a trainer number its packets again from a lower seq?)",
                stream.label,
                where,
                run_id,
                stream.watermark,
                applied,
            )
            with self._lock:
                self._counters.foreign_run_packets += 1
                self._counters.foreign_runs.append(f"{where}: run {run_id!r}, applied there: run {applied!r}")

    def _open_gap(self, stream: _Stream) -> None:
        missing = stream.watermark + 1
        now = time.monotonic()
        with self._lock:
            if stream.waiting_for != missing:
                stream.waiting_for, stream.gap_since, stream.alarmed = missing, now, False
                log.info("%s: packet seq %d is missing while later ones exist; waiting for it", stream.label, missing)
            since = stream.gap_since
            if since is None:  # never: set together with waiting_for
                raise RuntimeError(f"{stream.label}: waiting for packet seq {missing} with no start time")
            if not stream.alarmed and now - since >= self.options.gap_timeout_s:
                stream.alarmed = True
                log.warning(
                    "%s: packet seq %d still missing after %.0f s (%s/%s); not applying later packets until it arrives",
                    stream.label,
                    missing,
                    now - since,
                    self.storage.url,
                    f"{stream.folder}/{packet_name(missing)}",
                )

    def _close_gap(self, stream: _Stream) -> None:
        """(Holding ``_lock``.) The gap the stream waited on is over."""
        if stream.waiting_for is not None and stream.gap_since is not None and stream.alarmed:
            log.info(
                "%s: gap at seq %d closed after %.1f s",
                stream.label,
                stream.waiting_for,
                time.monotonic() - stream.gap_since,
            )
        stream.waiting_for, stream.gap_since, stream.alarmed = None, None, False

    # ------------------------------------------------------------------ watching

    def _ensure_observer(self) -> None:
        """Watch a local root with inotify once it exists (until then it is polled)."""
        if self._observer is not None or not self.options.use_inotify or not isinstance(self.storage, LocalStorage):
            return
        root: Path = self.storage.root
        if not root.is_dir():
            return
        try:
            from watchdog.observers import Observer

            # watchdog warns when a folder created under the watch is added twice (once by its
            # creation event, once by the recursive walk of its parent): harmless here.
            warnings.filterwarnings("ignore", "Callback with id", RuntimeWarning, "watchdog.observers.inotify")
            observer = Observer()
            observer.schedule(_WakeOnPublish(self._wake), str(root), recursive=True)
            observer.start()
        except (OSError, RuntimeError) as exc:
            self._say(
                "inotify",
                logging.WARNING,
                "cannot watch %s with inotify (%s); polling every %.1f s instead",
                root,
                exc,
                self.options.poll_interval_s,
            )
            return
        self._observer = observer
        self._wake.set()  # anything published before the watch started is picked up now

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5.0)
            self._observer = None

    # ------------------------------------------------------------------ reporting

    def stats(self) -> dict[str, Any]:
        """What is loaded and how fresh it is (the Stats RPC's ``hotload``).

        Returns:
            ``model_root``, ``checkpoint`` (name or ""), ``synced``, ``huge_pages_pending``
            (rows loaded at start-up are still being moved onto huge pages), ``streams`` (per training
            shard: ``shard``, ``num_shards``, ``watermark``, ``waiting_for`` (-1: no gap),
            ``gap_seconds``, ``gap_alarm``, ``unreadable_seq`` (the next packet while it cannot be
            read, -1: none), ``unreadable_seconds``, ``unreadable_reason``, ``held`` (declared bad,
            see the module docstring), ``skipped`` (seqs an operator skipped)), ``packets_applied``, ``rows_applied``,
            ``packets_quarantined``, ``rows_evicted``, ``freshness_p50_s``, ``freshness_p99_s``
            (0 before any packet), ``quarantined`` (recent "url: reason" lines),
            ``foreign_run_packets`` (packet files of another trainer run found at or below a
            watermark) and ``foreign_runs`` (recent such files).
            Also ``packets_skipped`` (by an operator), ``seconds_since_last_apply`` (since the last
            packet applied, or the start), ``packets_pending`` (packets above a watermark are
            listed), ``stalled`` and ``stall_reason`` (:meth:`stall_reason`). ``packets_quarantined``
            counts packets declared bad.
        """
        now = time.monotonic()
        with self._lock:
            c = self._counters
            delays = np.array(c.delays) if c.delays else np.zeros(1)
            streams = [
                {
                    "shard": s.shard,
                    "num_shards": s.num_shards,
                    "watermark": s.watermark,
                    "waiting_for": -1 if s.waiting_for is None else s.waiting_for,
                    "gap_seconds": 0.0 if s.gap_since is None else now - s.gap_since,
                    "gap_alarm": s.alarmed,
                    "unreadable_seq": -1 if s.unreadable is None else s.unreadable.seq,
                    "unreadable_seconds": 0.0 if s.unreadable is None else now - s.unreadable.since,
                    "unreadable_reason": "" if s.unreadable is None else s.unreadable.reason,
                    "held": s.unreadable is not None and s.unreadable.held,
                    "skipped": list(s.skipped),
                }
                for _, s in sorted(self._streams.items(), key=lambda kv: (kv[0][1], kv[0][0]))
            ]
            stall = self._stall_reason(now)
            return {
                "model_root": self.storage.url,
                "checkpoint": self._checkpoint.name if self._checkpoint else "",
                "synced": self.synced,
                "huge_pages_pending": self.store.huge_pages_pending,
                "streams": streams,
                "packets_applied": c.packets_applied,
                "rows_applied": c.rows_applied,
                "packets_quarantined": c.packets_quarantined,
                "packets_skipped": c.packets_skipped,
                "rows_evicted": c.rows_evicted,
                "freshness_p50_s": float(np.percentile(delays, 50)),
                "freshness_p99_s": float(np.percentile(delays, 99)),
                "quarantined": list(c.quarantined),
                "seconds_since_last_apply": now - self._last_apply,
                "packets_pending": any(s.pending_since is not None for s in self._streams.values()),
                "stalled": bool(stall),
                "stall_reason": stall,
                "foreign_run_packets": c.foreign_run_packets,
                "foreign_runs": list(c.foreign_runs),
            }

    def stall_reason(self) -> str:
        """Why the follower is stalled, or "" when it is not: once synced, a training shard has
        packets pending (listed above its watermark) and none applied for ``stall_timeout_s``
        (a packet held or retried, a gap), or one pass over the model root has run that long (a
        read, listing or apply that does not return), or the follower thread ended."""
        with self._lock:
            return self._stall_reason(time.monotonic())

    def _stall_reason(self, now: float) -> str:
        """(Holding ``_lock``.) See :meth:`stall_reason`."""
        if not self._synced.is_set() or self._error is not None or self._stopping.is_set():
            return ""
        limit = self.options.stall_timeout_s
        if self._thread is not None and not self._thread.is_alive():
            return "the follower thread has ended"
        started = self._pass_started
        if started is not None and now - started >= limit:
            return f"one pass over the model root has run for {now - started:.0f} s (a read, listing or apply hangs)"
        for s in self._streams.values():
            if s.pending_since is None:
                continue
            quiet = now - max(s.pending_since, s.advanced_at)
            if quiet < limit:
                continue
            if s.unreadable is not None:
                why = f"seq {s.unreadable.seq} cannot be read: {s.unreadable.reason}"
            elif s.waiting_for is not None:
                why = f"seq {s.waiting_for} is missing"
            else:
                why = "packets wait to be applied"
            return f"{s.label}: packets pending and none applied for {quiet:.0f} s ({why})"
        return ""

    def _say(self, key: str, level: int, message: str, *args: Any) -> None:
        """Log ``message`` once until :meth:`_forget` ``key`` (the condition ended)."""
        if key not in self._said:
            self._said.add(key)
            log.log(level, message, *args)

    def _forget(self, key: str) -> None:
        self._said.discard(key)


def _parse_watermark(value: Any) -> dict[int, int]:
    """The manifest's ``{"shard": seq}`` as ints (absent: no packet included)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"watermark must be a mapping of training shard to seq, got {json.dumps(value)}")
    return {int(k): int(v) for k, v in value.items()}


class _ReadTimeout(Exception):
    """A read did not finish within its time bound (see :class:`_BoundedReader`)."""


class _BoundedReader:
    """Runs reads on a daemon thread of its own, so that a read that hangs (a stalled mount, a
    storage request that never answers) holds the follower no longer than a bound. A hung read
    is left to finish on that thread; no other read starts until it has. The thread is started by
    the caller of the first read after :meth:`recycle`, whose CPUs and priority it inherits."""

    def __init__(self):
        self._cond = threading.Condition()
        self._job: tuple[Callable[[], Any], Future] | None = None
        self._busy: str | None = None  # what is being read
        self._busy_since = 0.0
        self._thread: threading.Thread | None = None
        self._generation = 0  # a thread of an older generation ends once idle
        self._closed = False

    def run(self, what: str, fn: Callable[[], Any], timeout: float) -> Any:
        """``fn()``, run on the reader thread.

        Raises:
            _ReadTimeout: it did not finish within ``timeout`` seconds, or an earlier read still
                runs after that long.
        """
        deadline = time.monotonic() + timeout
        result: Future = Future()
        with self._cond:
            while self._busy is not None:
                now = time.monotonic()
                if now >= deadline or now - self._busy_since >= timeout:
                    raise _ReadTimeout(
                        f"{what}: not read: the read of {self._busy} has not returned after "
                        f"{now - self._busy_since:.0f} s, and no other read starts until it does"
                    )
                self._cond.wait(min(deadline - now, timeout - (now - self._busy_since)))
            self._busy, self._busy_since, self._job = what, time.monotonic(), (fn, result)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, args=(self._generation,), name="packet-reader", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        try:
            return result.result(max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise _ReadTimeout(f"{what}: the read did not finish within {timeout:.0f} s") from None

    def recycle(self) -> None:
        """End the reader thread once idle; the next read starts a new one from its caller (the
        follower thread once it runs on its own CPUs and priority)."""
        with self._cond:
            self._generation += 1
            self._thread = None
            self._cond.notify_all()

    def close(self) -> None:
        """End the reader thread once its read (if any) returns."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _loop(self, generation: int) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._closed and generation == self._generation:
                    self._cond.wait()
                job = self._job
                if job is None or self._closed or generation != self._generation:
                    return
                self._job = None
            fn, result = job
            try:
                result.set_result(fn())
            except BaseException as exc:  # handed to the waiting caller
                result.set_exception(exc)
            with self._cond:
                self._busy = None
                self._cond.notify_all()


class _WakeOnPublish(FileSystemEventHandler):
    """watchdog handler: wake the follower when a file is published or removed under the root.

    Only creations, renames, deletions and closes after writing count; the follower's own reads
    (opened, closed without writing) do not, or each read would wake it again.
    """

    _EVENTS = frozenset({"created", "moved", "deleted", "closed"})

    def __init__(self, wake: threading.Event):
        self._wake = wake

    def dispatch(self, event: FileSystemEvent) -> None:
        if event.event_type in self._EVENTS:
            self._wake.set()


class _FollowerCollector:
    """Exports the follower's counters and per-stream gauges at scrape time."""

    def __init__(self, follower: ModelRootFollower, labels: dict[str, str]):
        self._follower = follower
        self._labels = labels

    def collect(self):
        stats = self._follower.stats()
        names, values = list(self._labels), list(self._labels.values())
        for key, help_text in (
            ("packets_applied", "incremental packets applied"),
            ("rows_applied", "packet rows of this shard applied"),
            ("packets_quarantined", "packets declared bad: still unreadable after the retry time (the shard is held)"),
            ("packets_skipped", "packets an operator skipped (SkipPacket): their rows were not applied"),
            ("rows_evicted", "rows evicted to make room for packet rows"),
            ("foreign_run_packets", "packets of another trainer run found at or below the watermark (not applied)"),
        ):
            family = CounterMetricFamily(f"ctrserve_embedding_{key}", help_text, labels=names)
            family.add_metric(values, stats[key])
            yield family
        synced = GaugeMetricFamily(
            "ctrserve_embedding_hotload_synced", "initial checkpoint load and replay done", labels=names
        )
        synced.add_metric(values, 1.0 if stats["synced"] else 0.0)
        yield synced
        for name, help_text, value in (
            (
                "seconds_since_last_apply",
                "seconds since the last packet was applied (or the follower started)",
                stats["seconds_since_last_apply"],
            ),
            (
                "packets_pending",
                "1 while packets above a watermark are listed but not applied",
                stats["packets_pending"],
            ),
            ("hotload_stalled", "1 while the follower is stalled (see stats' stall_reason)", stats["stalled"]),
        ):
            gauge = GaugeMetricFamily(f"ctrserve_embedding_{name}", help_text, labels=names)
            gauge.add_metric(values, float(value))
            yield gauge
        pending = GaugeMetricFamily(
            "ctrserve_embedding_huge_pages_pending",
            "1 while rows loaded at start-up are being moved onto huge pages",
            labels=names,
        )
        pending.add_metric(values, 1.0 if stats["huge_pages_pending"] else 0.0)
        yield pending
        stream_labels = names + ["training_shard", "training_shards"]
        watermark = GaugeMetricFamily(
            "ctrserve_embedding_watermark", "last packet seq applied per training shard", labels=stream_labels
        )
        alarm = GaugeMetricFamily(
            "ctrserve_embedding_packet_gap_alarm",
            "1 while a missing packet has been waited for longer than the gap timeout",
            labels=stream_labels,
        )
        unreadable = GaugeMetricFamily(
            "ctrserve_embedding_packet_unreadable",
            "1 while the next packet of a training shard cannot be read (retried, or held once declared bad)",
            labels=stream_labels,
        )
        for s in stats["streams"]:
            label_values = values + [str(s["shard"]), str(s["num_shards"])]
            watermark.add_metric(label_values, s["watermark"])
            alarm.add_metric(label_values, 1.0 if s["gap_alarm"] else 0.0)
            unreadable.add_metric(label_values, 1.0 if s["unreadable_seq"] >= 0 else 0.0)
        yield watermark
        yield alarm
        yield unreadable
