"""One shard's embedding rows: bounded, LRU-evicting, thread-safe.

An :class:`EmbeddingStore` holds the rows of every table of ``embedding_config.yml`` that hash to
its shard. Keys are ``(table index, uint64 id)`` pairs given as two parallel arrays; all keys of
one call must belong to tables of the same ``dim``. Every public method validates its input and
raises :class:`~embedding_server.core.errors.InvalidRequestError` before touching any state, so a bad
request never half-applies.

Example:
    >>> from embedding_server.core.config import EmbeddingConfig, GlobalConfig
    >>> emb = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 4}}})
    >>> store = EmbeddingStore(emb, GlobalConfig.from_dict({}))
    >>> store.lookup(np.array([7], np.uint64), np.array([0], np.uint16)).shape
    (1, 4)
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from embedding_server.core.config import EmbeddingConfig, GlobalConfig, JobType, TableSpec
from embedding_server.core.errors import InvalidRequestError, describe_value
from embedding_server.core.optimizers import SGD, SparseOptimizer
from embedding_server.store import kernels
from embedding_server.store.memory import collapse, fresh_buffer, populate, use_huge_pages


@dataclass
class TableRows:
    """All rows of one table held by a store (a checkpoint's unit)."""

    table: TableSpec
    ids: np.ndarray  # uint64 [n]
    weights: np.ndarray  # float32 [n, dim]
    state: np.ndarray  # float32 [n, state_width]


class EmbeddingStore:
    """The rows of one shard.

    Args:
        config: features and tables.
        global_config: capacity, mode, optimizer, initialisation, limits.
        shard_index: which shard this store is; ids routed elsewhere are refused.
        num_shards: how many shards the tables are split across.

    Raises:
        InvalidRequestError: from every method, for malformed ids, tables or gradients.
    """

    _state: np.ndarray  # float32 [capacity, state width]; set (and resized) by _set_optimizer_locked

    def __init__(self, config: EmbeddingConfig, global_config: GlobalConfig, shard_index: int = 0, num_shards: int = 1):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
        self.config = config
        self.global_config = global_config
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.mode = global_config.mode.store_mode  # an eval job reads as infer mode does
        self.capacity = global_config.server.capacity
        # _lock guards the index against concurrent lookups; _write_lock serialises whole-store
        # writers and readers (packet applies, dumps), so a staged apply (see put_many) is never
        # seen half done by them. Order: _write_lock, then _lock.
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        tables = list(config.tables.values())
        self._tables = tables
        self._salts = np.array([t.salt for t in tables], np.uint64)
        self._dims = np.array([t.dim for t in tables], np.int64)
        self._single_dim = len(set(self._dims.tolist())) == 1
        # Each table's initializer (its own, else the global one) as the kernels take it.
        init = global_config.initialization
        inits = [(t.initializer or init.as_initializer()).kernel_params(init.seed) for t in tables]
        self._init_kinds = np.array([kind for kind, _ in inits], np.int64)
        self._init_params = np.stack([params for _, params in inits])
        if self.capacity >= 2**31 - 1:
            raise ValueError(f"capacity {self.capacity} is too large for one shard; use more shards")
        max_dim = int(self._dims.max())
        self.tracks_changes = self.mode is JobType.TRAIN and global_config.server.enable_incremental_update
        # Every capacity-sized array, as store_layout() describes it (ctrserve plan sizes shards from it).
        layout = store_layout(self.capacity, max_dim, 0, self.mode, self.tracks_changes)
        self._slots = _zeroed(*layout["slots"])
        self._row_slot = _zeroed(*layout["row_slot"])
        self._row_tick = _zeroed(*layout["row_tick"])
        # Zeroed memory is mapped lazily: memory is committed as rows are actually used.
        # One extra all-zero row: the answer for ids an infer-mode store does not hold.
        self._weights = _zeroed(*layout["weights"])
        self._meta = np.zeros(kernels.META_LEN, np.int64)
        # Free rows (evicted, or replaced by a staged apply) are a stack in [FREE_POS, FREE_LEN);
        # a row is on it at most once, so capacity entries always suffice.
        self._free = _zeroed(*layout["free"])
        # Infer mode: a staged packet apply's fresh row of each replaced row (row + 1, 0 = none).
        self._next_row = _zeroed(*layout["next_row"])
        self._fold: tuple[np.ndarray, ...] | None = None  # see _fold_arrays
        self._committed_rows = 0  # rows whose memory _commit_rows committed ahead of staged applies
        self._committing: threading.Thread | None = None  # see _commit_rows
        # Staged applies commit the next packet's fresh rows in a second thread (see _commit_rows).
        # A follower turns it on for its start-up replay, where nothing is served yet; while
        # serving it would be one more busy thread beside the lookups on the same cores, for no
        # gain in lookup latency.
        self.commit_ahead = False
        self._huge_pages_deferred = False  # see defer_huge_pages
        self.evictions_per_sweep = max(1, self.capacity // 64)
        # Incremental updates: rows changed since the last packet, and the last values of changed
        # rows evicted before it (so an eviction never loses an update).
        shape, dtype = layout["dirty"]
        self._dirty: np.ndarray = np.zeros(shape, dtype)
        self._dirty_count = 0
        self._evicted_changes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        # Called (outside the lock) after each gradient update while changes are tracked.
        self.change_listener: Callable[[], None] | None = None
        # Serving needs no optimizer state: an infer-mode store keeps none (SGD has none).
        self._set_optimizer_locked(global_config.sparse_optimizer if self.mode is JobType.TRAIN else SGD())

    # ------------------------------------------------------------------ optimizer

    @property
    def optimizer(self) -> SparseOptimizer:
        """The store's sparse optimizer: that of every table without its own (see
        :meth:`table_optimizer`)."""
        return self._optimizer

    def table_optimizer(self, table: TableSpec) -> SparseOptimizer:
        """The optimizer that updates ``table``'s rows: the table's own (``optimizer`` in
        embedding_config.yml; train mode), else :attr:`optimizer`."""
        return self._table_optimizers[self.config.tables[table.name].index]

    def state_width(self, table: TableSpec) -> int:
        """Optimizer state floats per row of ``table`` (0 in infer mode and for SGD)."""
        return int(self._state_widths[self.config.tables[table.name].index])

    def set_optimizer(self, optimizer: SparseOptimizer) -> None:
        """Switch the sparse optimizer of every table that has none of its own. Allowed only
        while the store is empty, or when the new optimizer keeps the same per-row state layout
        (e.g. a new learning rate)."""
        with self._lock:
            if len(self) and any(
                optimizer.state_width(t.dim) != self._optimizer.state_width(t.dim)
                or type(optimizer) is not type(self._optimizer)
                for t in self._tables
                if not self._own_optimizer(t)
            ):
                raise InvalidRequestError(
                    f"cannot switch the sparse optimizer from {type(self._optimizer).__name__} to "
                    f"{type(optimizer).__name__} on a store that already holds {len(self)} rows"
                )
            self._set_optimizer_locked(optimizer)

    def _own_optimizer(self, table: TableSpec) -> bool:
        """Whether ``table`` is updated by its own optimizer (serving keeps no state: never)."""
        return table.optimizer is not None and self.mode is JobType.TRAIN

    def _set_optimizer_locked(self, optimizer: SparseOptimizer) -> None:
        self._optimizer = optimizer
        self._table_optimizers = [
            t.optimizer if t.optimizer is not None and self._own_optimizer(t) else optimizer for t in self._tables
        ]
        # One kernel selector and one parameter row per table (rows padded to the longest).
        params = [opt.params() for opt in self._table_optimizers]
        self._kinds = np.array([kind for kind, _ in params], np.int64)
        self._opt_params = np.zeros((len(params), max(len(p) for _, p in params)), np.float64)
        for i, (_, p) in enumerate(params):
            self._opt_params[i, : len(p)] = p
        self._state_widths = np.array(
            [opt.state_width(t.dim) for opt, t in zip(self._table_optimizers, self._tables)], np.int64
        )
        width = max(1, int(self._state_widths.max()))
        if not hasattr(self, "_state") or self._state.shape[1] != width:
            self._state = _zeroed(*store_layout(self.capacity, 1, width, self.mode, self.tracks_changes)["state"])
        state_init = np.zeros((len(self._tables), width), np.float32)
        for i, (opt, t) in enumerate(zip(self._table_optimizers, self._tables)):
            init = opt.initial_state(t.dim)
            state_init[i, : len(init)] = init
        self._state_init = state_init

    def warm_up(self) -> None:
        """Load (or, on a fresh install, compile) every compiled kernel this store's mode runs,
        on a small scratch store of the same tables, so that the first request or packet does
        not wait for it (seconds when compiling). A server calls this before it says ready."""
        server = dataclasses.replace(self.global_config.server, capacity=64, enable_incremental_update=False)
        scratch = EmbeddingStore(
            self.config, dataclasses.replace(self.global_config, embedding_parameter_server_config=server)
        )
        table = self._tables[0]
        width = int(scratch._state_widths[0])
        ids = np.arange(1, 41, dtype=np.uint64)
        tables = np.full(ids.shape[0], table.index, np.uint16)
        frozen_ids, frozen_tables = ids.copy(), tables.copy()  # requests arrive as read-only buffers
        frozen_ids.setflags(write=False)
        frozen_tables.setflags(write=False)
        rows = TableRows(
            table, ids, np.ones((ids.shape[0], table.dim), np.float32), np.zeros((ids.shape[0], width), np.float32)
        )
        scratch.put_many([rows])  # 2 x 40 rows > 64: the one-step path
        scratch.put_many([TableRows(table, ids[:8], rows.weights[:8], rows.state[:8])])  # staged in infer mode
        stages = (
            (kernels.STAGE_NONE, kernels.STAGE_STAGING, kernels.STAGE_COMMITTED)
            if self.mode is JobType.INFER
            else (kernels.STAGE_NONE,)
        )
        for stage in stages:
            scratch._meta[kernels.META_STAGE] = stage
            for keys, tabs in ((ids, tables), (frozen_ids, frozen_tables)):
                for count_repeats in (True, False):
                    scratch.lookup(keys, tabs, count_repeats=count_repeats)
                    scratch.lookup(keys + np.uint64(1000), tabs, count_repeats=count_repeats)  # not stored
        scratch._meta[kernels.META_STAGE] = kernels.STAGE_NONE
        if self.mode is JobType.TRAIN:
            scratch.apply_gradients(frozen_ids, frozen_tables, np.ones((ids.shape[0], table.dim), np.float32))
        list(scratch.rows())

    # ------------------------------------------------------------------ lookups and updates

    def __len__(self) -> int:
        return int(self._meta[kernels.META_LIVE])

    def lookup(
        self,
        ids: np.ndarray,
        tables: np.ndarray,
        out: np.ndarray | Callable[[int], np.ndarray] | None = None,
        count_repeats: bool = True,
        insert: bool = True,
    ) -> np.ndarray:
        """Vectors of the given keys as float32 ``[n, dim]``.

        In train mode unseen keys are inserted with their deterministic initial value (the
        least recently used rows make room when the store is full); in infer mode, or with
        ``insert=False``, they read as zeros and are not inserted.

        Args:
            out: a C-contiguous float32 ``[n, dim]`` array to write the vectors into, or a
                function that returns one given ``dim``, called once the request is validated
                (a server allocates its response buffer so); a new array when not given.
            count_repeats: count every key in the hit and miss counters (the default). When
                false, a key repeated within the request counts once, as if the caller had
                deduplicated the request first (what the batch clients do).
            insert: train mode: insert unseen keys (the default). False reads them as zeros and
                leaves the store's rows as they are, exactly what an infer-mode server answers
                for them (evaluation during training). Infer mode never inserts.

        Returns:
            ``out``, or the new array.
        """
        dim = self._check_keys(ids, tables)
        if out is None:
            out = np.empty((ids.shape[0], dim), np.float32)
        elif callable(out):
            out = out(dim)
        if (
            out.dtype != np.float32
            or out.shape != (ids.shape[0], dim)
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise ValueError(
                f"out must be a writable C-contiguous float32 array of shape {(ids.shape[0], dim)}, got {describe_value(out)}"
            )
        insert = insert and self.mode is JobType.TRAIN
        if insert:
            self._check_fits(ids, tables)
        with self._lock:
            self._meta[kernels.META_TICK] += 1
            rows = np.empty(ids.shape[0], np.int64)
            request = ids, tables, count_repeats, out, rows
            if self._meta[kernels.META_STAGE] != kernels.STAGE_NONE:
                missing = kernels.gather_staged(
                    self._slots, self._row_tick, self._weights, self._next_row, self._meta, self._salts, *request
                )
            else:
                missing = kernels.gather_hits(
                    self._slots, self._row_tick, self._weights, self._meta, self._salts, *request
                )
            if missing:
                sel = np.flatnonzero(rows < 0)
                if not insert:  # infer mode or insert=False: keys not stored read as zeros
                    out[sel] = 0
                    misses = sel.shape[0] if count_repeats else unique_keys(ids[sel], tables[sel])[0].shape[0]
                    self._meta[kernels.META_LOOKUPS] += misses
                    self._meta[kernels.META_MISSES] += misses
                    return out
                # Rare once a table is warm: insert the missing keys in request order.
                if count_repeats:
                    found = self._find_or_insert_locked(ids[sel], tables[sel], True)
                else:
                    uniq_ids, uniq_tabs, inverse = unique_keys(ids[sel], tables[sel])
                    found = self._find_or_insert_locked(uniq_ids, uniq_tabs, True)[inverse]
                out[sel] = self._weights[found, :dim]
        return out

    def apply_gradients(self, ids: np.ndarray, tables: np.ndarray, grads: np.ndarray) -> None:
        """One optimizer step for each key; gradients of repeated keys are summed first.

        Keys that are not stored (never looked up, or evicted since) are inserted with their
        initial value first, as a lookup would have done.
        """
        if self.mode is not JobType.TRAIN:
            raise InvalidRequestError("this embedding server runs in infer mode and does not accept gradients")
        dim = self._check_keys(ids, tables)
        grads = np.asarray(grads)
        if grads.dtype != np.float32:
            raise InvalidRequestError(f"gradients must be float32, got {grads.dtype}")
        if grads.shape != (ids.shape[0], dim):
            raise InvalidRequestError(
                f"gradient shape {tuple(grads.shape)} does not match {ids.shape[0]} ids of dim {dim}"
            )
        if not np.isfinite(grads).all():
            raise InvalidRequestError("gradients contain NaN or infinity")
        uniq_ids, uniq_tabs, inverse = unique_keys(ids, tables)
        if uniq_ids.shape[0] != ids.shape[0]:
            summed = np.zeros((uniq_ids.shape[0], dim), np.float32)
            np.add.at(summed, inverse, grads)
            ids, tables, grads = uniq_ids, uniq_tabs, summed
        self._check_fits(ids, tables)
        with self._lock:
            # Inserts what is missing; every key is marked as used first, so none is evicted.
            self._meta[kernels.META_TICK] += 1
            rows = self._find_or_insert_locked(ids, tables, True)
            kernels.apply_gradients(
                self._weights,
                self._state,
                rows,
                self._dims,
                tables,
                np.ascontiguousarray(grads),
                self._kinds,
                self._opt_params,
                float(self.global_config.server.weight_bound),
            )
            if self.tracks_changes:
                self._dirty_count += int(rows.shape[0] - np.count_nonzero(self._dirty[rows]))
                self._dirty[rows] = True
        listener = self.change_listener
        if listener is not None:
            listener()

    def _find_or_insert_locked(self, ids: np.ndarray, tables: np.ndarray, insert: bool) -> np.ndarray:
        """The row of every key, as part of the request the current tick stands for; with
        ``insert`` unseen keys are inserted (evicting when full), else they get the zero row."""
        self._meta[kernels.META_LOOKUPS] += ids.shape[0]
        rows = np.empty(ids.shape[0], np.int64)
        start = 0
        while True:
            start = kernels.lookup(
                *self._insert_arrays(),
                ids,
                tables,
                start,
                insert,
                self._init_kinds,
                self._init_params,
                self._state_init,
                rows,
            )
            if start == ids.shape[0]:
                return rows
            kernels.touch_rows(self._slots, self._row_tick, self._meta, self._salts, ids, tables, start)
            self._evict_locked()

    def _evict_locked(self) -> None:
        """Free the least recently used rows (a sweep of ``evictions_per_sweep``), sparing every
        row the current request uses (the caller has touched them all with the current tick).
        Sweeping in bulk keeps the cost per insert small."""
        ticks = self._row_tick
        k = min(self.evictions_per_sweep, ticks.shape[0])
        victims = np.argpartition(ticks, k - 1)[:k]
        victims = victims[ticks[victims] < self._meta[kernels.META_TICK]].astype(np.int64)
        if victims.shape[0] == 0:  # _check_fits makes this unreachable; keep the store consistent anyway
            raise InvalidRequestError(f"no row can be evicted: the request uses all {self.capacity} rows")
        if self.tracks_changes:
            self._keep_evicted_changes(victims)
        kernels.evict_rows(self._slots, self._row_slot, self._row_tick, self._meta, self._salts, victims)
        self._push_free(victims)

    def _push_free(self, rows: np.ndarray) -> None:
        # Rows still on the free list stay there (put_many may sweep before the list is used up).
        pos, end = int(self._meta[kernels.META_FREE_POS]), int(self._meta[kernels.META_FREE_LEN])
        if end + rows.shape[0] > self._free.shape[0]:  # move the rest to the front first
            self._free[: end - pos] = self._free[pos:end]
            pos, end = 0, end - pos
        self._free[end : end + rows.shape[0]] = rows
        self._meta[kernels.META_FREE_POS] = pos
        self._meta[kernels.META_FREE_LEN] = end + rows.shape[0]

    def _available_rows(self) -> int:
        """Rows a new key can take without an eviction: never used, or on the free list."""
        m = self._meta
        return int(self.capacity - m[kernels.META_SIZE] + m[kernels.META_FREE_LEN] - m[kernels.META_FREE_POS])

    # ------------------------------------------------------------------ incremental updates

    @property
    def pending_changes(self) -> int:
        """Changed rows not yet taken by :meth:`take_changes` (evicted ones included)."""
        return self._dirty_count + sum(ids.shape[0] for ids, _, _ in self._evicted_changes)

    def _keep_evicted_changes(self, victims: np.ndarray) -> None:
        changed = victims[self._dirty[victims]]
        if changed.shape[0] == 0:
            return
        ids = np.empty(changed.shape[0], np.uint64)
        tabs = np.empty(changed.shape[0], np.uint16)
        kernels.row_keys(self._slots, self._row_slot, changed, ids, tabs)
        self._evicted_changes.append((ids, tabs, self._weights[changed].copy()))
        self._dirty[changed] = False
        self._dirty_count -= changed.shape[0]

    def take_changes(self) -> list[TableRows]:
        """The current values of every row changed since the last call (rows evicted since then
        with the value they had), per table, each key once; the store forgets them as taken.

        Raises:
            RuntimeError: the store does not track changes (infer mode, or incremental updates off).
        """
        if not self.tracks_changes:
            raise RuntimeError(
                "this store does not track changes: enable_incremental_update is off or it serves (infer mode)"
            )
        with self._lock:
            live = np.flatnonzero(self._dirty).astype(np.int64)
            ids = np.empty(live.shape[0], np.uint64)
            tabs = np.empty(live.shape[0], np.uint16)
            kernels.row_keys(self._slots, self._row_slot, live, ids, tabs)
            parts = self._evicted_changes + [(ids, tabs, self._weights[live])]
            self._dirty[live] = False
            self._dirty_count = 0
            self._evicted_changes = []
        all_ids = np.concatenate([p[0] for p in parts])
        all_tabs = np.concatenate([p[1] for p in parts])
        all_weights = np.concatenate([p[2] for p in parts])
        latest = last_occurrences(all_ids, all_tabs)  # parts are oldest first: keep the newest value
        out = []
        for i, table in enumerate(self._tables):
            sel = latest[all_tabs[latest] == i]
            if sel.shape[0]:
                out.append(
                    TableRows(
                        table,
                        all_ids[sel],
                        np.ascontiguousarray(all_weights[sel, : table.dim]),
                        np.zeros((sel.shape[0], 0), np.float32),
                    )
                )
        return out

    # ------------------------------------------------------------------ whole-table access

    def rows(self) -> Iterator[TableRows]:
        """A consistent copy of every table's rows, in least- to most-recently-used order."""
        with self._write_lock, self._lock:
            size = int(self._meta[kernels.META_SIZE])
            live = np.flatnonzero(self._row_tick[:size] != kernels.FREE_TICK)
            order = live[np.argsort(self._row_tick[live], kind="stable")]
            row_ids = np.empty(order.shape[0], np.uint64)
            row_tabs = np.empty(order.shape[0], np.uint16)
            kernels.row_keys(self._slots, self._row_slot, order, row_ids, row_tabs)
            weights = self._weights[order]
            state = self._state[order]
        for i, table in enumerate(self._tables):
            sel = row_tabs == i
            yield TableRows(
                table,
                row_ids[sel],
                np.ascontiguousarray(weights[sel, : table.dim]),
                np.ascontiguousarray(state[sel, : self._state_widths[i]]),
            )

    def put(self, rows: TableRows) -> None:
        """Insert or overwrite the given rows with their vectors and optimizer state.

        Raises:
            InvalidRequestError: wrong shapes, ids of another shard, or more rows than capacity.
        """
        self.put_many([rows], evict=False)

    def put_many(self, batch: Sequence[TableRows], evict: bool | None = None) -> int:
        """Insert or overwrite the rows of several tables as one update: a concurrent lookup sees
        all of ``batch`` or none of it (how an incremental packet is applied).

        In infer mode, when the shard has a free row for every row of ``batch`` (or can make
        room by evicting, with ``evict``) and ``batch`` is at most half its capacity, the update
        is staged: the new values go to fresh rows while lookups keep running on the old ones,
        then one store makes all of them visible at once (see ``kernels.stage_rows``). Lookups
        wait only for a few short critical sections, never for the length of the update. Size an
        infer server's capacity as the rows it serves plus its largest packet to stay on this
        path. Otherwise (train mode, checkpoint loads bigger than half the shard) the rows are
        written under one acquisition of the store lock.

        Args:
            batch: rows per table, with optimizer state of the store's width (width 0 in infer
                mode; a table may appear more than once, later rows win).
            evict: make room by evicting least recently used rows (never rows of ``batch``)
                instead of refusing when the shard is full; default: in infer mode only.

        Returns:
            How many rows were evicted to make room.

        Raises:
            InvalidRequestError: an unknown table, wrong shapes, ids of another shard, more
                distinct rows than capacity, or (without ``evict``) more new rows than free
                rows. Nothing is written then.

        Example:
            >>> store.put_many(packet.tables)  # an infer-mode store: all rows or none visible
            0
        """
        evict = self.mode is JobType.INFER if evict is None else evict
        parts = [part for part in map(self._checked_rows, batch) if part[0].shape[0]]
        if not parts:
            return 0
        n = sum(part[0].shape[0] for part in parts)
        if n > self.capacity and unique_keys(*_keys_of(parts))[0].shape[0] > self.capacity:
            raise InvalidRequestError(f"{n} rows: more distinct rows than this shard's capacity of {self.capacity}")
        with self._write_lock:
            if self.mode is JobType.INFER and 2 * n <= self.capacity and (evict or self._available_rows() >= n):
                return self._put_staged(parts, n)
            with self._lock:
                return self._put_locked(parts, *_keys_of(parts), evict)

    def _put_locked(self, parts: list, ids: np.ndarray, tables: np.ndarray, evict: bool) -> int:
        """(Holding both locks.) ``put_many`` in one step."""
        existing = np.empty(ids.shape[0], np.int64)
        kernels.find_rows(self._slots, self._salts, ids, tables, existing)
        missing = existing < 0
        new = unique_keys(ids[missing], tables[missing])[0].shape[0] if missing.any() else 0
        if len(self) + new > self.capacity and not evict:
            names = "', '".join(sorted({self._tables[int(t)].name for t in np.unique(tables)}))
            raise InvalidRequestError(
                f"loading {new} new rows of table '{names}' would exceed this shard's capacity of "
                f"{self.capacity} rows ({len(self)} held); raise capacity or use more shards"
            )
        self._meta[kernels.META_TICK] += 1
        evictions = int(self._meta[kernels.META_EVICTIONS])
        if len(self) + new > self.capacity:
            # Every stored row of the batch gets the current tick first, so no sweep takes one.
            kernels.touch_rows(self._slots, self._row_tick, self._meta, self._salts, ids, tables, 0)
            while len(self) + new > self.capacity:
                self._evict_locked()
        for part_ids, part_tables, weights, state in parts:
            kernels.put_rows(*self._insert_arrays(), self._state_widths, part_ids, part_tables, weights, state)
        return int(self._meta[kernels.META_EVICTIONS]) - evictions

    def _put_staged(self, parts: list, n: int) -> int:
        """(Holding ``_write_lock``, infer mode.) ``put_many`` of ``n`` rows staged; the phases
        are described in ``kernels``. Lookups run between the short critical sections."""
        meta = self._meta
        keys = _keys_of(parts) if self._available_rows() < n else None
        with self._lock:
            evictions = int(meta[kernels.META_EVICTIONS])
            if keys is not None:
                # Room for a fresh row per key; the batch's stored rows are spared (2n <= capacity
                # guarantees enough other rows).
                meta[kernels.META_TICK] += 1
                kernels.touch_rows(self._slots, self._row_tick, meta, self._salts, *keys, 0)
                while self._available_rows() < n:
                    self._evict_locked()
            evicted = int(meta[kernels.META_EVICTIONS]) - evictions
            meta[kernels.META_STAGE] = kernels.STAGE_STAGING
        self._commit_rows(
            int(meta[kernels.META_SIZE]) + n, ahead=n if self.commit_ahead else 0
        )  # the next is likely as big
        fold_slot, fold_info, fold_old, fold_new, freed = self._fold_arrays(n)
        count = 0
        for part_ids, part_tables, weights, _ in parts:
            count = kernels.stage_rows(
                self._slots,
                self._row_slot,
                self._row_tick,
                self._weights,
                self._next_row,
                meta,
                self._free,
                self._salts,
                part_ids,
                part_tables,
                weights,
                fold_slot,
                fold_info,
                fold_old,
                fold_new,
                count,
            )
        with self._lock:
            meta[kernels.META_STAGE] = kernels.STAGE_COMMITTED  # the whole batch becomes visible here
        kernels.fold_rows(self._slots, self._row_slot, fold_slot, fold_info, fold_new, count)
        with self._lock:
            meta[kernels.META_STAGE] = kernels.STAGE_NONE
        # Lookups that could still reach a replaced row held the lock before this point.
        self._push_free(freed[: kernels.free_rows(self._row_tick, self._next_row, fold_old, count, freed)])
        return evicted

    def _commit_rows(self, end: int, ahead: int = 0) -> None:
        """Commit the memory a staged apply may write next (never-used rows up to ``end``, and
        the whole index the first time: random inserts touch all of its pages early anyway) in
        a few calls instead of one page fault at a time (see ``memory.populate``). Then, in a
        thread of its own, the rows up to ``end + ahead``: the next packet's fresh rows are
        committed while this one is staged (huge pages fault in slowly, and committing them in
        line would be a large share of a growing store's apply time). The next call waits for it."""
        if self._committing is not None:
            self._committing.join()  # (without the GIL)
            self._committing = None
        self._commit_now(end)
        if ahead > 0 and end + ahead > self._committed_rows and self._committed_rows < self.capacity:
            self._committing = threading.Thread(
                target=self._commit_now, args=(end + ahead,), name="commit-ahead", daemon=True
            )
            self._committing.start()

    def _commit_now(self, end: int) -> None:
        """(The writer, or the one commit-ahead thread: never both.) See :meth:`_commit_rows`."""
        if end <= self._committed_rows:
            return
        end = min(self.capacity, max(end, self._committed_rows + _COMMIT_CHUNK_ROWS))
        if self._committed_rows == 0:
            populate(self._slots, 0, self._slots.shape[0])
        for array in self._row_arrays():
            populate(array, self._committed_rows, end)
        self._committed_rows = end

    def defer_huge_pages(self) -> bool:
        """Commit this empty store's rows on 4 KiB pages until :meth:`adopt_huge_pages`.

        A follower's start-up replay fills a new store at the rate memory is committed; memory the
        machine has not touched lately can commit several times faster on 4 KiB pages than on
        huge pages (see :mod:`~embedding_server.store.memory`), while lookups run best on huge pages
        (fewer TLB misses). So the replay commits small pages and the rows move onto huge pages
        once serving, in the background.

        Returns:
            Whether huge pages are now deferred: False once the store holds or committed
            anything (its pages are already chosen).
        """
        if self._committed_rows or len(self):
            return False
        for array in (self._slots, *self._row_arrays()):
            use_huge_pages(array, False)
        self._huge_pages_deferred = True
        return True

    @property
    def huge_pages_pending(self) -> bool:
        """Whether :meth:`defer_huge_pages` was called and :meth:`adopt_huge_pages` is not done."""
        return self._huge_pages_deferred

    def adopt_huge_pages(self, stopped: Callable[[], bool] = lambda: False) -> bool:
        """Undo :meth:`defer_huge_pages`: move the rows committed so far onto huge pages (the
        kernel copies them 2 MiB at a time; lookups and applies go on meanwhile) and commit later
        rows on huge pages. Meant for the thread that applies packets, or one beside it on the
        same CPUs; ``stopped`` is checked every 16 MB and ends it early (call again to finish).

        Returns:
            False when ``stopped`` ended it early; True when done (or nothing was deferred).
            Where the kernel cannot collapse on request (Linux < 6.1), "done" means new memory
            commits on huge pages and khugepaged moves the rest in its own time.
        """
        if not self._huge_pages_deferred:
            return True
        committed = self._committed_rows  # the writer only grows it; rows past it commit on huge pages
        # The index is committed whole with the first rows (see _commit_now).
        ranges = [(self._slots, self._slots.shape[0] if committed else 0)] + [
            (a, committed) for a in self._row_arrays()
        ]
        for array, rows in ranges:
            if not collapse(array, 0, rows, stopped=stopped):  # huge pages on even where nothing is committed yet
                return False
        self._huge_pages_deferred = False
        return True

    def _insert_arrays(self) -> _InsertArrays:
        """The arrays the inserting kernels (``lookup``, ``put_rows``) take first, in their order."""
        return (
            self._slots,
            self._row_slot,
            self._row_tick,
            self._weights,
            self._state,
            self._meta,
            self._free,
            self._salts,
            self._dims,
        )

    def _row_arrays(self) -> tuple[np.ndarray, ...]:
        """The per-row arrays a growing infer-mode store commits ahead of its rows (``_commit_now``)."""
        return self._weights, self._row_slot, self._row_tick, self._next_row

    def _fold_arrays(self, n: int) -> tuple[np.ndarray, ...]:
        """Scratch arrays of a staged apply of ``n`` rows, kept for the next one (fresh 16 MB
        arrays per 500k-row packet cost page faults every time)."""
        if self._fold is None or self._fold[0].shape[0] < n:
            self._fold = tuple(np.empty(n, dtype) for dtype in (np.int64, np.uint64, np.int64, np.int64, np.int64))
        return self._fold

    def _checked_rows(self, rows: TableRows) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``rows`` as contiguous (ids, table indexes, weights, state) arrays, validated."""
        table = self.config.tables.get(rows.table.name)
        if table is None:
            raise InvalidRequestError(f"unknown table '{rows.table.name}'")
        n = rows.ids.shape[0]
        width = int(self._state_widths[table.index])
        if rows.weights.shape != (n, table.dim):
            raise InvalidRequestError(f"table '{table.name}': weights shape {rows.weights.shape} != ({n}, {table.dim})")
        if rows.state.shape != (n, width):
            raise InvalidRequestError(
                f"table '{table.name}': optimizer state shape {rows.state.shape} != ({n}, {width}) "
                f"for {type(self._table_optimizers[table.index]).__name__}"
            )
        tables = np.full(n, table.index, np.uint16)
        ids = np.ascontiguousarray(rows.ids, np.uint64)
        self._check_shard(ids, tables)
        weights = np.ascontiguousarray(rows.weights, np.float32)
        return ids, tables, weights, np.ascontiguousarray(rows.state, np.float32)

    def clear(self) -> None:
        """Drop every row (counters are kept)."""
        with self._write_lock, self._lock:
            self._slots.fill(0)
            for key in (kernels.META_SIZE, kernels.META_LIVE, kernels.META_FREE_POS, kernels.META_FREE_LEN):
                self._meta[key] = 0
            self._dirty[:] = False
            self._dirty_count = 0
            self._evicted_changes = []

    def counters(self) -> dict[str, int]:
        """rows, capacity, hits, misses, evictions and inserts since start."""
        m = self._meta
        return {
            "rows": int(m[kernels.META_LIVE]),
            "capacity": self.capacity,
            "hits": int(m[kernels.META_LOOKUPS] - m[kernels.META_MISSES]),
            "misses": int(m[kernels.META_MISSES]),
            "evictions": int(m[kernels.META_EVICTIONS]),
            "inserts": int(m[kernels.META_INSERTS]),
        }

    def memory_bytes(self) -> int:
        """Bytes of every array the store allocated (touched or not)."""
        return sum(a.nbytes for a in self.arrays().values())

    def arrays(self) -> dict[str, np.ndarray]:
        """The store's capacity-sized arrays by their :func:`store_layout` names."""
        return {
            "slots": self._slots,
            "row_slot": self._row_slot,
            "row_tick": self._row_tick,
            "weights": self._weights,
            "state": self._state,
            "free": self._free,
            "next_row": self._next_row,
            "dirty": self._dirty,
        }

    # ------------------------------------------------------------------ validation

    def _check_keys(self, ids: np.ndarray, tables: np.ndarray) -> int:
        if not isinstance(ids, np.ndarray) or ids.dtype != np.uint64 or ids.ndim != 1:
            raise InvalidRequestError(f"ids must be a 1-D uint64 array, got {describe_value(ids)}")
        if not isinstance(tables, np.ndarray) or tables.dtype != np.uint16 or tables.shape != ids.shape:
            raise InvalidRequestError(
                f"tables must be a uint16 array shaped like ids {ids.shape}, got {describe_value(tables)}"
            )
        if ids.shape[0] == 0:
            raise InvalidRequestError("empty request: no ids")
        limit = self.global_config.server.max_ids_per_request
        if ids.shape[0] > limit:
            raise InvalidRequestError(f"request carries {ids.shape[0]} ids; the limit is {limit} (max_ids_per_request)")
        dim = self._request_dim(tables)
        self._check_shard(ids, tables)
        return dim

    def _request_dim(self, tables: np.ndarray) -> int:
        if int(tables.max()) >= len(self._tables):
            raise InvalidRequestError(
                f"table index {int(tables.max())} out of range: {len(self._tables)} tables configured"
            )
        if self._single_dim:
            return int(self._dims[0])
        used = np.flatnonzero(np.bincount(tables, minlength=len(self._tables)))
        dims = np.unique(self._dims[used])
        if dims.shape[0] != 1:
            raise InvalidRequestError(f"one request must address tables of one dim, got dims {dims.tolist()}")
        return int(dims[0])

    def owns(self, ids: np.ndarray, tables: np.ndarray) -> np.ndarray:
        """Boolean mask of the keys that hash to this shard."""
        if self.num_shards == 1:
            return np.ones(ids.shape[0], np.bool_)
        owners = np.empty(ids.shape[0], np.int64)
        kernels.shard_of(ids, tables, self._salts, self.num_shards, owners)
        return owners == self.shard_index

    def _check_shard(self, ids: np.ndarray, tables: np.ndarray) -> None:
        if self.num_shards == 1:
            return
        wrong = np.flatnonzero(~self.owns(ids, tables))
        if wrong.size:
            i = int(wrong[0])
            raise InvalidRequestError(
                f"id {int(ids[i])} of table '{self._tables[int(tables[i])].name}' does not belong to "
                f"shard {self.shard_index} of {self.num_shards}; the client's shard list is wrong"
            )

    def _check_fits(self, ids: np.ndarray, tables: np.ndarray) -> None:
        # Before an eviction sweep every stored key of the request gets the current tick, so the
        # sweep only takes rows this request does not use, as long as its distinct keys fit.
        if ids.shape[0] > self.capacity and unique_keys(ids, tables)[0].shape[0] > self.capacity:
            raise InvalidRequestError(
                f"request has more distinct ids than this shard's capacity of {self.capacity} rows"
            )


_COMMIT_CHUNK_ROWS = 1 << 16
#: What ``EmbeddingStore._insert_arrays`` returns: nine arrays, spelled out so that mypy counts the
#: kernels' arguments.
_InsertArrays = tuple[
    np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray
]


def _keys_of(parts: list) -> tuple[np.ndarray, np.ndarray]:
    """(ids, table indexes) of ``put_many``'s checked parts, concatenated."""
    return np.concatenate([part[0] for part in parts]), np.concatenate([part[1] for part in parts])


def store_layout(
    capacity: int, max_dim: int, state_width: int, mode: JobType, tracks_changes: bool
) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shape and dtype of each array an :class:`EmbeddingStore` of ``capacity`` rows allocates.

    The store allocates from this, and ``ctrserve plan`` (:mod:`embedding_server.store.plan`)
    sizes shards from it, so the two cannot drift apart.

    Args:
        capacity: rows.
        max_dim: the widest table's dim (every row is that wide).
        state_width: optimizer state floats per row (the widest table's; 0 for SGD and serving).
        mode: train or infer (infer keeps a next-row link per row for staged packet applies).
        tracks_changes: train mode with incremental updates (one changed flag per row).
    """
    num_slots = max(16, int(capacity / kernels.LOAD_FACTOR) + 1)  # the open-addressing index
    return {
        "slots": ((num_slots, 2), np.uint64),  # (key, row) per slot
        "row_slot": ((capacity,), np.int32),  # a row's slot in the index
        "row_tick": ((capacity,), np.uint32),  # a row's last use, for LRU eviction
        "weights": ((capacity + 1, max_dim), np.float32),  # + the all-zero row of unheld ids
        "state": ((capacity, max(1, state_width)), np.float32),
        "free": ((capacity,), np.int64),  # the free-row stack
        "next_row": ((capacity if mode is JobType.INFER else 0,), np.int32),
        "dirty": ((capacity if tracks_changes else 0,), np.bool_),
    }


def _zeroed(shape: int | tuple[int, ...], dtype: type) -> np.ndarray:
    """A zeroed array on its own page-aligned memory map (a 16-float32 row spans one cache line,
    not two), with huge pages asked for when it is large (see ``memory``)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    count = int(np.prod(shape))
    return np.frombuffer(fresh_buffer(count * np.dtype(dtype).itemsize), dtype, count).reshape(shape)


def last_occurrences(ids: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Index of the last occurrence of each distinct (table, id) key."""
    n = ids.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    _, _, inverse = unique_keys(ids, tables)
    last = np.full(int(inverse.max()) + 1, -1, np.int64)
    np.maximum.at(last, inverse, np.arange(n))
    return last


def unique_keys(ids: np.ndarray, tables: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (table, id) pairs in first-seen order, and each input's position among them."""
    n = ids.shape[0]
    uniq_ids = np.empty(n, np.uint64)
    uniq_tabs = np.empty(n, np.uint16)
    inverse = np.empty(n, np.int64)
    count = kernels.unique_keys(ids, tables, uniq_ids, uniq_tabs, inverse)
    return uniq_ids[:count], uniq_tabs[:count], inverse
