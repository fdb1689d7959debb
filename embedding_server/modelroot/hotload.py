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
* a gap (the next seq missing while a later one exists) is waited for; after ``gap_timeout_s``
  a WARNING names the missing seq and the ``ctrserve_embedding_packet_gap_alarm`` gauge goes to
  1. Nothing is ever applied out of order. If a newer checkpoint includes the missing packet
  (retention removed it), that shard catches up from the checkpoint's files instead;
* a missing model root or packet folder is waited for (logged once);
* a corrupt, truncated, foreign or misplaced packet (or one the store refuses) is quarantined:
  one ERROR line, the ``..._packets_quarantined`` counter, an entry in :meth:`stats`; it counts
  as consumed, so later packets still apply. The file is left where it is (a serving host may
  only have read access);
* a newer checkpoint of the same training shard count is not loaded (the packets carry the same
  values, fresher); it is used only to catch up a shard whose needed packets are gone. A newer
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
    packet_dir,
    packet_name,
    parse_packet_name,
    parse_shard_dir,
)
from embedding_server.storage.base import LocalStorage, Storage, StorageError, StorageNotFoundError
from embedding_server.storage.urls import open_storage
from embedding_server.store.cpus import format_cpu_list, pin_this_thread, usable_cpus
from embedding_server.store.store import EmbeddingStore, TableRows

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

log = logging.getLogger("ctrserve.embedding_server.modelroot.hotload")

_CHECKPOINT_DIGITS = 20
_RECENT_DELAYS = 2048  # freshness samples kept for the p50/p99 in stats
_RECENT_QUARANTINED = 20
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
        max_packet_bytes: larger packet files are quarantined unread.
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
    use_inotify: bool = True
    apply_niceness: int = 10
    apply_cpus: frozenset[int] | None = None

    def __post_init__(self) -> None:
        for name in ("poll_interval_s", "rescan_interval_s", "gap_timeout_s", "max_packet_bytes"):
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

    @property
    def folder(self) -> str:
        return packet_dir(self.shard, self.num_shards)

    @property
    def label(self) -> str:
        return f"training shard {self.shard}/{self.num_shards}"


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
    rows_evicted: int = 0
    delays: deque = field(default_factory=lambda: deque(maxlen=_RECENT_DELAYS))
    quarantined: deque = field(default_factory=lambda: deque(maxlen=_RECENT_QUARANTINED))


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
        if self.store.huge_pages_pending:  # started before _synced is set: wait_huge_pages() sees it
            self._huge_pages = threading.Thread(target=self._move_to_huge_pages, name="huge-pages", daemon=True)
            self._huge_pages.start()  # on this thread's CPUs and priority, which it inherits
        self._synced.set()
        while not self._stopping.is_set():
            self._wake.wait(self._wait_seconds())
            self._wake.clear()
            if self._stopping.is_set():
                return
            self._pass_safely()

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
        names = [n for n in self.storage.list_dir(CHECKPOINTS_DIR) if len(n) == _CHECKPOINT_DIGITS and n.isdigit()]
        for name in sorted(names, reverse=True):
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
                width = self.store.optimizer.state_width(rows.table.dim)
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
        gone = {s.shard for s in self._streams.values() if self._next_is_gone(s, newest)}
        if gone:
            self._catch_up(newest, gone)
        elif self._checkpoint is None:
            with self._lock:  # its rows already came through the packets: follow its layout only
                self._checkpoint = newest

    def _next_is_gone(self, stream: _Stream, newest: _Checkpoint) -> bool:
        """Whether ``newest`` includes the stream's next packet and that packet is not there."""
        if newest.watermark.get(stream.shard, FIRST_SEQ - 1) <= stream.watermark:
            return False
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
                    self._close_gap(s)
            self._checkpoint = ckpt
        log.warning(
            "packets of training shard(s) %s needed next are gone; caught up from checkpoint %s (%d rows)",
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
        for name in self.storage.list_dir(INCREMENTAL_DIR):
            layout = parse_shard_dir(name)
            if layout is None:
                self._say(
                    f"odd:{name}",
                    logging.WARNING,
                    "ignoring %s/%s: not a shard-SSSSS-of-NNNNN folder",
                    INCREMENTAL_DIR,
                    name,
                )
            elif layout not in self._streams:
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
        seqs = {s for s in map(parse_packet_name, self.storage.list_dir(stream.folder)) if s is not None}
        if not seqs:
            self._say(
                f"empty:{stream.folder}", logging.INFO, "waiting for packets in %s/%s", self.storage.url, stream.folder
            )
            return
        self._forget(f"empty:{stream.folder}")
        ahead: Future | None = None
        try:
            while stream.watermark + 1 in seqs and not self._stopping.is_set():
                seq = stream.watermark + 1
                loaded = ahead.result() if ahead is not None else self._read(stream, seq)
                ahead = None
                if self._readahead is not None and seq + 1 in seqs:
                    ahead = self._readahead.submit(self._read, stream, seq + 1)
                if not self._apply(stream, seq, loaded):
                    return  # gone or unreadable for now: the next pass looks again
        finally:
            if ahead is not None:
                ahead.cancel()
        if any(s > stream.watermark + 1 for s in seqs):
            self._open_gap(stream)
        elif stream.waiting_for is not None:
            with self._lock:
                self._close_gap(stream)

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
        except StorageError as exc:
            if self.storage.size(path) <= self.options.max_packet_bytes:
                raise
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
        """Apply packet ``seq`` as :meth:`_read` left it, or quarantine it when it is bad. False
        when it could not be read."""
        where = self.storage.join_url(f"{stream.folder}/{packet_name(seq)}")
        if loaded is None:
            return False
        if isinstance(loaded, str):
            self._quarantine(stream, seq, where, loaded)
            return True
        packet = loaded
        try:
            parts = [self._owned(t) for t in packet.tables]
            evicted = self.store.put_many([p for p in parts if p.ids.shape[0]])
        except InvalidRequestError as exc:
            self._quarantine(stream, seq, where, str(exc))
            return True
        delay = max(0.0, time.time() - packet.created_at)
        rows = sum(p.ids.shape[0] for p in parts)
        with self._lock:
            stream.watermark = seq
            if stream.waiting_for == seq:
                self._close_gap(stream)
            c = self._counters
            c.packets_applied += 1
            c.rows_applied += rows
            c.rows_evicted += evicted
            c.delays.append(delay)
        if self._freshness is not None:
            self._freshness.observe(delay)
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

    def _quarantine(self, stream: _Stream, seq: int, where: str, reason: str) -> None:
        log.error(
            "quarantined packet %s (%s, seq %d): %s; skipping it, later packets still apply",
            where,
            stream.label,
            seq,
            reason,
        )
        with self._lock:
            stream.watermark = seq
            if stream.waiting_for == seq:
                self._close_gap(stream)
            self._counters.packets_quarantined += 1
            self._counters.quarantined.append(f"{where}: {reason}")

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
            ``gap_seconds``, ``gap_alarm``), ``packets_applied``, ``rows_applied``,
            ``packets_quarantined``, ``rows_evicted``, ``freshness_p50_s``, ``freshness_p99_s``
            (0 before any packet) and ``quarantined`` (recent "url: reason" lines).
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
                }
                for _, s in sorted(self._streams.items(), key=lambda kv: (kv[0][1], kv[0][0]))
            ]
            return {
                "model_root": self.storage.url,
                "checkpoint": self._checkpoint.name if self._checkpoint else "",
                "synced": self.synced,
                "huge_pages_pending": self.store.huge_pages_pending,
                "streams": streams,
                "packets_applied": c.packets_applied,
                "rows_applied": c.rows_applied,
                "packets_quarantined": c.packets_quarantined,
                "rows_evicted": c.rows_evicted,
                "freshness_p50_s": float(np.percentile(delays, 50)),
                "freshness_p99_s": float(np.percentile(delays, 99)),
                "quarantined": list(c.quarantined),
            }

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
            ("packets_quarantined", "corrupt, truncated or foreign packets skipped"),
            ("rows_evicted", "rows evicted to make room for packet rows"),
        ):
            family = CounterMetricFamily(f"ctrserve_embedding_{key}", help_text, labels=names)
            family.add_metric(values, stats[key])
            yield family
        synced = GaugeMetricFamily(
            "ctrserve_embedding_hotload_synced", "initial checkpoint load and replay done", labels=names
        )
        synced.add_metric(values, 1.0 if stats["synced"] else 0.0)
        yield synced
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
        for s in stats["streams"]:
            label_values = values + [str(s["shard"]), str(s["num_shards"])]
            watermark.add_metric(label_values, s["watermark"])
            alarm.add_metric(label_values, 1.0 if s["gap_alarm"] else 0.0)
        yield watermark
        yield alarm
