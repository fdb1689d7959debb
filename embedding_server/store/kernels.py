"""Compiled kernels of the embedding store: hash index, LRU ticks, initialisation, optimizers.

Why numba: a lookup must map ~100k uint64 ids per batch to rows at a rate close to a plain
``numpy.take`` of the same rows. A Python dict is far slower per key, and a vectorised numpy
open-addressing table needs several passes over the batch. numba compiles
these loops to machine code from plain Python (no C toolchain at install time, results cached
on disk), releases the GIL so gRPC threads keep serving, and is a widely used dependency.

Layout of one store (capacity ``C`` rows, ``S`` ~ C / 0.7 slots):

* ``slots``    uint64[S, 2]  open addressing, linear probing. ``[s, 0]`` = id, ``[s, 1]`` =
  ``(row + 1) << 16 | table`` (0 = empty; bit 63: ``HIDDEN``, a staged insert). Key, table and
  row share one 16-byte record, so a probe costs one cache miss.
* ``row_slot`` int32[C]      where each row's key lives (for eviction and dumps).
* ``row_tick`` uint32[C]     the request counter of the row's last use: LRU order.
  ``FREE_TICK`` marks a row on the free list.
* ``weights``  float32[C, D] the vectors; ``state`` float32[C, W] optimizer state.
* ``next_row`` int32[C]      infer mode: a row's staged successor during a packet apply.
* ``meta``     int64[META_LEN] sizes, the tick, counters, the free-list cursor, the stage.

Deletion uses backward-shift (no tombstones), so probe chains stay short under churn. An exact
linked-list LRU costs four scattered writes per hit; ticks cost one write and give the same
order at request granularity.

A lookup of a large batch is bound by memory latency: every key costs a cache miss on its slot,
one on its tick and one on its vector, each depending on the one before. :func:`gather_hits`
therefore runs the keys through a software pipeline with explicit prefetches (numba has no
prefetch of its own, so :func:`_prefetch` emits LLVM's), keeping dozens of misses in flight.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

(
    META_SIZE,  # rows ever handed out (high-water mark); rows < SIZE are live or free
    META_LIVE,  # rows holding a key
    META_TICK,  # request counter
    META_LOOKUPS,  # keys looked up (hits = lookups - misses)
    META_MISSES,
    META_EVICTIONS,
    META_INSERTS,
    META_FREE_POS,  # next entry of the free list to hand out
    META_FREE_LEN,
    META_SINK,  # receives a value derived from the warming loads so they are not optimised away
    META_STAGE,  # a staged packet apply: STAGE_NONE, STAGE_STAGING or STAGE_COMMITTED (see stage_rows)
) = range(11)
META_LEN = 11
STAGE_NONE, STAGE_STAGING, STAGE_COMMITTED = 0, 1, 2
LOAD_FACTOR = 0.7
FREE_TICK = np.uint32(0xFFFFFFFF)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S11, _S16, _S27, _S30, _S31, _S32 = (np.uint64(k) for k in (11, 16, 27, 30, 31, 32))
_TAB_MASK = np.uint64(0xFFFF)
_ROW_MASK = np.uint64(0xFFFFFFFF)
# Set in a slot's info word while its key is a staged insert, not yet visible to lookups.
HIDDEN = np.uint64(1 << 63)
_ONE = np.uint64(1)


@njit(cache=True, inline="always")
def mix64(x):
    """splitmix64's finaliser: a bijective, well-distributed 64-bit hash."""
    x = np.uint64(x)
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


@njit(cache=True, inline="always")
def _home(h, num_slots):
    # Lemire's multiply-shift range reduction on the high 32 bits: any slot count works.
    return np.int64(((h >> _S32) * np.uint64(num_slots)) >> _S32)


@njit(cache=True, nogil=True)
def mix_array(values, out):
    """out[i] = mix64(values[i])."""
    for i in range(values.shape[0]):
        out[i] = mix64(values[i])


@njit(cache=True, nogil=True)
def shard_of(ids, tables, salts, num_shards, out):
    """out[i] = the shard that owns (tables[i], ids[i])."""
    n = np.uint64(num_shards)
    for i in range(ids.shape[0]):
        out[i] = np.int64(mix64(ids[i] ^ salts[tables[i]] ^ _GOLDEN) % n)


@njit(cache=True, nogil=True)
def unique_keys(ids, tables, uniq_ids, uniq_tables, inverse):
    """Deduplicate (table, id) pairs in first-seen order; returns the number of unique pairs.

    ``inverse[i]`` is the position of pair ``i`` in the unique arrays.
    """
    n = ids.shape[0]
    num_slots = 16
    while num_slots < 2 * n:
        num_slots *= 2
    mask = np.uint64(num_slots - 1)
    slots = np.full(num_slots, -1, np.int32)
    count = 0
    for i in range(n):
        key = ids[i]
        tab = tables[i]
        s = mix64(key ^ (np.uint64(tab) * _GOLDEN)) & mask
        while True:
            u = slots[s]
            if u < 0:
                slots[s] = count
                uniq_ids[count] = key
                uniq_tables[count] = tab
                inverse[i] = count
                count += 1
                break
            if uniq_ids[u] == key and uniq_tables[u] == tab:
                inverse[i] = u
                break
            s = (s + _ONE) & mask
    return count


@njit(cache=True, nogil=True)
def pool_bags(values, rows, lengths, weights, out):
    """Sum pooling without autograd: ``out[j]`` = the sum of ``values[rows[k]]`` over bag ``j``'s
    ``lengths[j]`` keys (keys in bag order), each times ``weights[k]`` unless ``weights`` is
    empty; an empty bag is zeros. One pass, instead of a gather, an appended zero row and a
    split in torch (the serving path; training pools with torch to get gradients)."""
    dim = values.shape[1]
    weighted = weights.shape[0] > 0
    k = 0
    for j in range(lengths.shape[0]):
        if lengths[j] == 0:
            for d in range(dim):
                out[j, d] = 0.0
            continue
        # The first key is copied, not added to zero: a bag of one id is its row bit for bit.
        first, end = k, k + lengths[j]
        w = weights[first] if weighted else np.float32(1.0)
        for d in range(dim):
            out[j, d] = values[rows[first], d] * w
        for i in range(first + 1, end):
            w = weights[i] if weighted else np.float32(1.0)
            for d in range(dim):
                out[j, d] += values[rows[i], d] * w
        k = end


@njit(cache=True, inline="always")
def _row_of(info):
    """The row an info word points at; -1 for an empty slot (info 0)."""
    return np.int64((info >> _S16) & _ROW_MASK) - 1


@njit(cache=True, inline="always")
def _probe(slots, key, tab, h):
    """(slot, info word) of the key, or (first empty slot on its probe path, 0)."""
    num_slots = slots.shape[0]
    s = _home(h, num_slots)
    want = np.uint64(tab)
    while True:
        info = slots[s, 1]
        if info == 0:
            return s, info
        if slots[s, 0] == key and (info & _TAB_MASK) == want:
            return s, info
        s += 1
        if s == num_slots:
            s = 0


@njit(cache=True, inline="always")
def _find(slots, key, tab, h):
    """(slot, row) of the key, or (first empty slot on its probe path, -1)."""
    s, info = _probe(slots, key, tab, h)
    return s, _row_of(info)


@njit(cache=True, inline="always")
def _slot_delete(slots, row_slot, salts, s):
    """Backward-shift deletion: pull later entries of the cluster into the hole."""
    num_slots = slots.shape[0]
    hole = s
    j = s
    while True:
        j += 1
        if j == num_slots:
            j = 0
        info = slots[j, 1]
        if info == 0:
            break
        home = _home(mix64(slots[j, 0] ^ salts[info & _TAB_MASK]), num_slots)
        # Move entry j into the hole unless its home lies cyclically in (hole, j].
        if hole <= j:
            stays = hole < home <= j
        else:
            stays = home > hole or home <= j
        if not stays:
            slots[hole, 0] = slots[j, 0]
            slots[hole, 1] = info
            row_slot[_row_of(info)] = hole
            hole = j
    slots[hole, 0] = 0
    slots[hole, 1] = 0


@njit(cache=True, inline="always")
def _init_row(weights, state, r, key, salt, dim, init_kind, init_params, state_init):
    # Counter-based generator: element j of a row depends only on (seed, table, id, j), so any
    # shard or replica initialises an id identically, in any order. init_kind and init_params
    # are the table's (see core.initializers): 0 uniform in [lower, upper), 1 normal clipped to
    # [lower, upper] (unbounded: +-inf), 2 truncated normal (drawn again beyond 2 std), 3 constant.
    base = mix64(key ^ salt ^ np.uint64(init_params[4]))
    lo = init_params[0]
    hi = init_params[1]
    mean = init_params[2]
    std = init_params[3]
    for j in range(dim):
        x = mix64(base + np.uint64(j + 1) * _GOLDEN)
        u = np.float64(x >> _S11) * (1.0 / 9007199254740992.0)
        if init_kind == 0:
            v = lo + (hi - lo) * u
        elif init_kind == 3:
            v = init_params[5]
        else:
            x2 = mix64(x ^ _M2)
            u2 = np.float64(x2 >> _S11) * (1.0 / 9007199254740992.0)
            z = np.sqrt(-2.0 * np.log(1.0 - u)) * np.cos(2.0 * np.pi * u2)
            if init_kind == 2:
                # Further draws continue the same counter stream; after 64 (odds 0.046^64) clip.
                attempt = 0
                while abs(z) > 2.0 and attempt < 64:
                    attempt += 1
                    x = mix64(x + _GOLDEN)
                    x2 = mix64(x ^ _M2)
                    u = np.float64(x >> _S11) * (1.0 / 9007199254740992.0)
                    u2 = np.float64(x2 >> _S11) * (1.0 / 9007199254740992.0)
                    z = np.sqrt(-2.0 * np.log(1.0 - u)) * np.cos(2.0 * np.pi * u2)
                v = mean + std * min(max(z, -2.0), 2.0)
            else:
                v = min(max(mean + std * z, lo), hi)
        weights[r, j] = np.float32(v)
    for j in range(state_init.shape[0]):
        state[r, j] = state_init[j]


@njit(cache=True, inline="always")
def _new_row(meta, free, capacity):
    """A row for a new key: never-used rows first, then the free list; -1 when none is left."""
    if meta[META_SIZE] < capacity:
        r = meta[META_SIZE]
        meta[META_SIZE] += 1
        return r
    if meta[META_FREE_POS] < meta[META_FREE_LEN]:
        r = free[meta[META_FREE_POS]]
        meta[META_FREE_POS] += 1
        return r
    return -1


@njit(cache=True, inline="always")
def _claim(slots, row_slot, row_tick, meta, s, r, key, tab, tick):
    slots[s, 0] = key
    slots[s, 1] = (np.uint64(r + 1) << _S16) | np.uint64(tab)
    row_slot[r] = s
    row_tick[r] = tick
    meta[META_LIVE] += 1
    meta[META_INSERTS] += 1


def _prefetch_intrinsic(for_write: bool):
    """A numba intrinsic ``f(array, i)`` that prefetches the cache line of ``array[i, 0, ...]``
    (``llvm.prefetch``; ``for_write`` asks for the line in a writable state)."""

    @intrinsic
    def prefetch(typingctx, array, index):
        def codegen(context, builder, signature, args):
            array_type = signature.args[0]
            array_struct = context.make_array(array_type)(context, builder, args[0])
            zero = context.get_constant(types.intp, 0)
            ptr = cgutils.get_item_pointer(
                context, builder, array_type, array_struct, [args[1]] + [zero] * (array_type.ndim - 1), wraparound=False
            )
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
            )
            # (address, 0 = read / 1 = write, locality 3 = keep in all cache levels, 1 = data)
            builder.call(
                fn,
                [builder.bitcast(ptr, i8p), ir.Constant(i32, int(for_write)), ir.Constant(i32, 3), ir.Constant(i32, 1)],
            )
            return context.get_dummy_value()

        return types.void(array, index), codegen

    return prefetch


_prefetch = _prefetch_intrinsic(False)
_prefetch_for_write = _prefetch_intrinsic(True)


def _row_copy_intrinsic(width_of_dst: bool):
    """A numba intrinsic ``f(dst, j, src, r)``: ``dst[j, :w] = src[r, :w]`` as one memcpy
    (C-contiguous rows), ``w`` the row width of ``dst`` (or of ``src``). A loop of 16 float32
    copies compiles to scalar moves, since numba cannot tell that the arrays never alias."""

    @intrinsic
    def copy_row(typingctx, dst, j, src, r):
        def codegen(context, builder, signature, args):
            dst_type, _, src_type, _ = signature.args
            dst_struct = context.make_array(dst_type)(context, builder, args[0])
            src_struct = context.make_array(src_type)(context, builder, args[2])
            zero = context.get_constant(types.intp, 0)
            dst_ptr = cgutils.get_item_pointer(
                context, builder, dst_type, dst_struct, [args[1], zero], wraparound=False
            )
            src_ptr = cgutils.get_item_pointer(
                context, builder, src_type, src_struct, [args[3], zero], wraparound=False
            )
            width = cgutils.unpack_tuple(builder, (dst_struct if width_of_dst else src_struct).shape, 2)[1]
            itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(dst_type.dtype)))
            cgutils.raw_memcpy(builder, dst_ptr, src_ptr, builder.mul(width, itemsize), 1)
            return context.get_dummy_value()

        return types.void(dst, j, src, r), codegen

    return copy_row


_copy_row = _row_copy_intrinsic(True)  # an output row from a (wider) store row
_store_row = _row_copy_intrinsic(False)  # a store row from a (narrower) input row


@njit(cache=True, inline="always")
def _hash_and_prefetch(slots, salts, ids, tables, i, hashes):
    """First stage of the pipelined kernels: hash key ``i`` into the ring and prefetch its home slot."""
    h = mix64(ids[i] ^ salts[tables[i]])
    hashes[i & (_RING - 1)] = h
    _prefetch(slots, _home(h, slots.shape[0]))


# Keys between the stages of gather_hits' pipeline: enough cache misses in flight to hide memory
# latency, few enough that the prefetched lines are still cached when their stage comes.
_AHEAD = 8
_RING = 32  # >= 2 * _AHEAD, a power of two


@njit(cache=True, nogil=True)
def gather_hits(slots, row_tick, weights, meta, salts, ids, tables, count_repeats, out, rows):
    """Copy the vector of every stored key to ``out[i]`` and mark its row used; returns how
    many keys are not stored (their ``rows[i]`` is -1 and ``out[i]`` is left as it was).

    The caller handles the missing keys (insert, or the zero row) with :func:`lookup`, so this
    loop stays free of inserts and evictions. Counts every found key in ``META_LOOKUPS``; with
    ``count_repeats`` false a key repeated within the request counts once, as if the caller had
    deduplicated the request first: its row already carries this request's tick.

    Three stages, ``_AHEAD`` keys apart: hash the key and prefetch its home slot; probe the
    (now cached) slots and prefetch the row's vector and tick; copy the vector and write the
    tick. Probing and gathering in separate passes would wait on each key's cache misses in turn.
    """
    n = ids.shape[0]
    tick = np.uint32(meta[META_TICK])
    hashes = np.empty(_RING, np.uint64)
    found = 0
    missing = 0
    for i in range(n + 2 * _AHEAD):
        if i < n:
            _hash_and_prefetch(slots, salts, ids, tables, i, hashes)
        j = i - _AHEAD
        if 0 <= j < n:
            _, r = _find(slots, ids[j], tables[j], hashes[j & (_RING - 1)])
            rows[j] = r
            if r >= 0:
                _prefetch(weights, r)
                _prefetch_for_write(row_tick, r)
        j = i - 2 * _AHEAD
        if j >= 0:
            r = rows[j]
            if r < 0:
                missing += 1
                continue
            if count_repeats or row_tick[r] != tick:
                found += 1
                row_tick[r] = tick
            _copy_row(out, j, weights, r)
    meta[META_LOOKUPS] += found
    return missing


_GROUP = 64


@njit(cache=True, nogil=True)
def lookup(
    slots,
    row_slot,
    row_tick,
    weights,
    state,
    meta,
    free,
    salts,
    dims,
    ids,
    tables,
    start,
    insert,
    init_kinds,
    init_params,
    state_init,
    rows,
):
    """Find the row of every (tables[i], ids[i]), i >= start, and write it to rows[i].

    ``init_kinds`` (int64 per table), ``init_params`` (float64 ``[tables, 6]``) and
    ``state_init`` (float32 ``[tables, width]``) initialise a new key's row by its table.

    With ``insert``: unseen ids are added and initialised. Without: they get the row index
    ``capacity``, which the store keeps as an all-zero row, and nothing is inserted. Returns
    ``len(ids)`` when done, or the index of the first id for which no free row was left: the
    caller evicts (see :func:`evict_rows`) and calls again from there. Lookups of stored keys
    go through :func:`gather_hits`; this kernel handles the keys it did not find, and gradient
    pushes (which need rows, not vectors).

    Keys go in groups of ``_GROUP``: first every key's home slot is loaded (independent loads
    the CPU overlaps), then the probes run on warm cache lines, instead of probing one key at a
    time, where each cache miss waits for the previous one.
    """
    capacity = row_slot.shape[0]
    num_slots = slots.shape[0]
    tick = np.uint32(meta[META_TICK])
    n = ids.shape[0]
    hashes = np.empty(_GROUP, np.uint64)
    warm = np.uint64(0)
    for base in range(start, n, _GROUP):
        end = min(base + _GROUP, n)
        for i in range(base, end):
            h = mix64(ids[i] ^ salts[tables[i]])
            hashes[i - base] = h
            warm += slots[_home(h, num_slots), 1]
        for i in range(base, end):
            key = ids[i]
            tab = tables[i]
            s, r = _find(slots, key, tab, hashes[i - base])
            if r >= 0:
                row_tick[r] = tick
            elif insert:
                r = _new_row(meta, free, capacity)
                if r < 0:
                    meta[META_SINK] = np.int64(warm & np.uint64(0x7FFFFFFF))
                    return i
                meta[META_MISSES] += 1
                _claim(slots, row_slot, row_tick, meta, s, r, key, tab, tick)
                _init_row(
                    weights, state, r, key, salts[tab], dims[tab], init_kinds[tab], init_params[tab], state_init[tab]
                )
            else:
                meta[META_MISSES] += 1
                r = capacity
            rows[i] = r
    # Keep the warming loads observable so the compiler cannot drop them.
    meta[META_SINK] = np.int64(warm & np.uint64(0x7FFFFFFF))
    return n


@njit(cache=True, nogil=True)
def touch_rows(slots, row_tick, meta, salts, ids, tables, start):
    """Mark every stored key of ids[start:] as used by the current request, so that an eviction
    sweep run in the middle of the request never takes a row the request still needs."""
    tick = np.uint32(meta[META_TICK])
    for i in range(start, ids.shape[0]):
        key = ids[i]
        tab = tables[i]
        _, r = _find(slots, key, tab, mix64(key ^ salts[tab]))
        if r >= 0:
            row_tick[r] = tick


@njit(cache=True, nogil=True)
def evict_rows(slots, row_slot, row_tick, meta, salts, rows):
    """Remove the given rows' keys from the index and mark the rows free."""
    for i in range(rows.shape[0]):
        r = rows[i]
        _slot_delete(slots, row_slot, salts, row_slot[r])
        row_tick[r] = FREE_TICK
    meta[META_LIVE] -= rows.shape[0]
    meta[META_EVICTIONS] += rows.shape[0]


@njit(cache=True, nogil=True)
def find_rows(slots, salts, ids, tables, out_rows):
    """Row index of each key, -1 when absent. Touches neither LRU order nor counters."""
    for i in range(ids.shape[0]):
        key = ids[i]
        tab = tables[i]
        _, r = _find(slots, key, tab, mix64(key ^ salts[tab]))
        out_rows[i] = r


@njit(cache=True, nogil=True)
def put_rows(
    slots, row_slot, row_tick, weights, state, meta, free, salts, dims, state_widths, ids, tables, values, states
):
    """Insert or overwrite rows with given vectors and optimizer state (checkpoint loading).

    The caller guarantees enough free rows; the rows count as used by the current request.
    """
    capacity = row_slot.shape[0]
    tick = np.uint32(meta[META_TICK])
    for i in range(ids.shape[0]):
        key = ids[i]
        tab = tables[i]
        s, r = _find(slots, key, tab, mix64(key ^ salts[tab]))
        if r < 0:
            r = _new_row(meta, free, capacity)
            _claim(slots, row_slot, row_tick, meta, s, r, key, tab, tick)
        row_tick[r] = tick
        for j in range(dims[tab]):
            weights[r, j] = values[i, j]
        for j in range(state_widths[tab]):
            state[r, j] = states[i, j]


# ---------------------------------------------------------------------- staged packet applies
#
# An infer-mode store applies a packet without stopping lookups for its length, and still
# atomically (a lookup sees all of the packet or none of it). The store's single writer:
#
# 1. sets META_STAGE = STAGE_STAGING (under the store lock), then, without the lock,
#    :func:`stage_rows` writes every new value into a fresh row. A stored key's fresh row hangs
#    off its current row in ``next_row``; a new key is inserted with the ``HIDDEN`` bit set.
#    Lookups (:func:`gather_staged`) ignore both: they still see the old state.
# 2. commits: META_STAGE = STAGE_COMMITTED under the lock, one store. From then on lookups follow
#    ``next_row`` and see hidden keys: the new state, all of it at once.
# 3. without the lock, :func:`fold_rows` points every slot straight at its fresh row and clears
#    the hidden bits, one aligned 8-byte store per slot (a lookup sees the slot before or after,
#    both lead to the new value).
# 4. sets META_STAGE = STAGE_NONE under the lock: every lookup that could still hold an old row
#    has finished, so :func:`free_rows` then recycles the old rows without the lock.
#
# Slots are only ever added to (into empty slots, which leaves every other key's probe path as
# it was) while lookups run; evictions, which move slots, happen under the lock before staging.


@njit(cache=True, nogil=True)
def gather_staged(slots, row_tick, weights, next_row, meta, salts, ids, tables, count_repeats, out, rows):
    """:func:`gather_hits` while a packet is staged: hidden keys count as not stored until the
    commit; after it, a row's staged successor in ``next_row`` (row + 1, 0 = none) is read
    instead of the row. One more pipeline stage resolves the successor. (Its last stage repeats
    gather_hits' on purpose: sharing it through an inlined helper that counts into an array
    slows gather_hits, the hot path of every lookup, markedly.)"""
    n = ids.shape[0]
    tick = np.uint32(meta[META_TICK])
    committed = meta[META_STAGE] == STAGE_COMMITTED
    hashes = np.empty(_RING, np.uint64)
    found = 0
    missing = 0
    for i in range(n + 3 * _AHEAD):
        if i < n:
            _hash_and_prefetch(slots, salts, ids, tables, i, hashes)
        j = i - _AHEAD
        if 0 <= j < n:
            _, info = _probe(slots, ids[j], tables[j], hashes[j & (_RING - 1)])
            r = _row_of(info)
            if r >= 0 and (info & HIDDEN) != 0 and not committed:
                r = -1
            rows[j] = r
            if r >= 0 and committed:
                _prefetch(next_row, r)
            elif r >= 0:  # before the commit the row is final: no successor to resolve
                _prefetch(weights, r)
                _prefetch_for_write(row_tick, r)
        j = i - 2 * _AHEAD
        if 0 <= j < n and committed:
            r = rows[j]
            if r >= 0:
                if next_row[r] != 0:
                    r = np.int64(next_row[r]) - 1
                    rows[j] = r
                _prefetch(weights, r)
                _prefetch_for_write(row_tick, r)
        j = i - 3 * _AHEAD
        if j >= 0:
            r = rows[j]
            if r < 0:
                missing += 1
                continue
            if count_repeats or row_tick[r] != tick:
                found += 1
                row_tick[r] = tick
            _copy_row(out, j, weights, r)
    meta[META_LOOKUPS] += found
    return missing


@njit(cache=True, inline="always")
def _peek_row(meta, free, capacity, ahead):
    """The row :func:`_new_row` will hand out ``ahead`` calls from now (-1 if none), to prefetch."""
    fresh = capacity - meta[META_SIZE]
    if ahead < fresh:
        return meta[META_SIZE] + ahead
    k = meta[META_FREE_POS] + ahead - fresh
    return free[k] if k < meta[META_FREE_LEN] else -1


@njit(cache=True, nogil=True)
def stage_rows(
    slots,
    row_slot,
    row_tick,
    weights,
    next_row,
    meta,
    free,
    salts,
    ids,
    tables,
    values,
    fold_slot,
    fold_info,
    fold_old,
    fold_new,
    count,
):
    """Write each key's value into a fresh row, invisible to lookups until the commit (see above).

    Appends one fold entry per distinct key from index ``count`` on (slot, final info word, old
    row or -1 for a new key, fresh row) and returns the new count. A key repeated in the packet
    reuses its fresh row: later values win. The caller guarantees a free row per key.

    Pipelined like :func:`gather_hits`: hash and prefetch the home slot; probe (warming the
    slots) and prefetch the row's ``next_row`` entry; then probe again on warm lines (an earlier
    key may have taken the empty slot the first probe ended at) and write, prefetching the
    vector and tick of the fresh row the key ``_AHEAD`` places on will get, so its write finds
    them cached.
    """
    capacity = row_slot.shape[0]
    tick = np.uint32(meta[META_TICK])
    n = ids.shape[0]
    hashes = np.empty(_RING, np.uint64)
    for i in range(n + 2 * _AHEAD):
        if i < n:
            _hash_and_prefetch(slots, salts, ids, tables, i, hashes)
        j = i - _AHEAD
        if 0 <= j < n:
            _, info = _probe(slots, ids[j], tables[j], hashes[j & (_RING - 1)])
            if info != 0:
                _prefetch_for_write(next_row, _row_of(info))
        j = i - 2 * _AHEAD
        if j < 0:
            continue
        ahead = _peek_row(meta, free, capacity, _AHEAD)
        if ahead >= 0:
            _prefetch_for_write(weights, ahead)
            _prefetch_for_write(row_tick, ahead)
        key = ids[j]
        tab = tables[j]
        s, info = _probe(slots, key, tab, hashes[j & (_RING - 1)])
        if info == 0:  # a new key: insert it hidden, pointing at its fresh row
            r2 = _new_row(meta, free, capacity)
            final = (np.uint64(r2 + 1) << _S16) | np.uint64(tab)
            slots[s, 0] = key
            slots[s, 1] = final | HIDDEN
            row_slot[r2] = s
            row_tick[r2] = tick
            meta[META_LIVE] += 1
            meta[META_INSERTS] += 1
            fold_slot[count], fold_info[count], fold_old[count], fold_new[count] = s, final, -1, r2
            count += 1
        elif (info & HIDDEN) != 0:  # inserted earlier in this packet
            r2 = _row_of(info)
        else:
            r = _row_of(info)
            if next_row[r] != 0:  # staged earlier in this packet
                r2 = np.int64(next_row[r]) - 1
            else:
                r2 = _new_row(meta, free, capacity)
                next_row[r] = r2 + 1
                row_tick[r2] = tick
                final = (np.uint64(r2 + 1) << _S16) | np.uint64(tab)
                fold_slot[count], fold_info[count], fold_old[count], fold_new[count] = s, final, r, r2
                count += 1
        _store_row(weights, r2, values, j)
    return count


@njit(cache=True, nogil=True)
def fold_rows(slots, row_slot, fold_slot, fold_info, fold_new, count):
    """After the commit: point every staged key's slot at its fresh row, hidden bits cleared."""
    for k in range(count + _AHEAD):
        if k + _AHEAD < count:
            _prefetch_for_write(slots, fold_slot[k + _AHEAD])
            _prefetch_for_write(row_slot, fold_new[k + _AHEAD])
        if k < count:
            s = fold_slot[k]
            slots[s, 1] = fold_info[k]
            row_slot[fold_new[k]] = s


@njit(cache=True, nogil=True)
def free_rows(row_tick, next_row, fold_old, count, freed):
    """Once no lookup can reach them: mark the replaced rows free; returns how many (in ``freed``)."""
    m = 0
    for k in range(count):
        if k + _AHEAD < count and fold_old[k + _AHEAD] >= 0:
            _prefetch_for_write(next_row, fold_old[k + _AHEAD])
            _prefetch_for_write(row_tick, fold_old[k + _AHEAD])
        r = fold_old[k]
        if r >= 0:
            next_row[r] = 0
            row_tick[r] = FREE_TICK
            freed[m] = r
            m += 1
    return m


@njit(cache=True, nogil=True)
def row_keys(slots, row_slot, rows, out_ids, out_tables):
    """The (id, table) held by each given live row."""
    for i in range(rows.shape[0]):
        s = row_slot[rows[i]]
        out_ids[i] = slots[s, 0]
        out_tables[i] = np.uint16(slots[s, 1] & _TAB_MASK)


@njit(cache=True, nogil=True)
def apply_gradients(weights, state, rows, dims, tabs, grads, kinds, params, weight_bound):
    """Run one optimizer step on each (unique) row with its summed gradient, by the optimizer
    of the row's table: ``kinds[table]`` selects it, ``params[table]`` holds its parameters.

    Arithmetic follows torch.optim's float32 formulas so results match it to ~1e-7.
    """
    for i in range(rows.shape[0]):
        r = rows[i]
        tab = tabs[i]
        dim = dims[tab]
        kind = kinds[tab]
        lr = params[tab, 0]
        wd = params[tab, 1]
        if kind == 0:  # SGD
            for j in range(dim):
                g = grads[i, j] + wd * weights[r, j]
                weights[r, j] = weights[r, j] - lr * g
        elif kind == 1:  # Adagrad
            gsm = params[tab, 2]
            eps = params[tab, 3]
            if params[tab, 4] != 0.0:  # vectorwise_shared
                sq = 0.0
                for j in range(dim):
                    g = grads[i, j] + wd * weights[r, j]
                    sq += g * g
                acc = np.float32(gsm * state[r, 0] + sq / dim)
                state[r, 0] = acc
                denom = np.sqrt(acc) + eps
                for j in range(dim):
                    g = grads[i, j] + wd * weights[r, j]
                    weights[r, j] = weights[r, j] - lr * g / denom
            else:
                for j in range(dim):
                    g = grads[i, j] + wd * weights[r, j]
                    acc = np.float32(gsm * state[r, j] + g * g)
                    state[r, j] = acc
                    weights[r, j] = weights[r, j] - lr * g / (np.sqrt(acc) + eps)
        else:  # Adam, with the row's own step count in its last state column
            b1 = params[tab, 2]
            b2 = params[tab, 3]
            eps = params[tab, 4]
            t = state[r, 2 * dim] + 1.0
            state[r, 2 * dim] = t
            bc1 = 1.0 - b1**t
            bc2 = 1.0 - b2**t
            for j in range(dim):
                g = grads[i, j] + wd * weights[r, j]
                m = np.float32(b1 * state[r, j] + (1.0 - b1) * g)
                v = np.float32(b2 * state[r, dim + j] + (1.0 - b2) * g * g)
                state[r, j] = m
                state[r, dim + j] = v
                denom = np.sqrt(v) / np.sqrt(bc2) + eps
                weights[r, j] = weights[r, j] - (lr / bc1) * m / denom
        if weight_bound > 0.0:
            for j in range(dim):
                weights[r, j] = min(max(weights[r, j], -weight_bound), weight_bound)
