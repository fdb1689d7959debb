"""EmbeddingStore: LRU eviction, deterministic initialisation, infer mode, request validation,
checkpoints (dump/load through InProcessEmbeddingClient), and the fast lookup paths (the
pipelined gather with ``out=`` and ``count_repeats=False``, cache-line-aligned rows) against the
general path they short-cut."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pytest

from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import InvalidRequestError
from embedding_server.core.optimizers import Adagrad, Adam
from embedding_server.rpc.client import InProcessEmbeddingClient
from embedding_server.store import kernels
from embedding_server.store.store import EmbeddingStore, TableRows, unique_keys

pytestmark = pytest.mark.unit

EMB = EmbeddingConfig.from_dict({"slots_config": {"a": {"dim": 4}, "b": {"dim": 4}, "c": {"dim": 8}}})
A, B, C = 0, 1, 2  # table indexes


def glob(capacity=64, mode="train", optimizer=None, init=None, max_ids=1000, weight_bound=0.0) -> GlobalConfig:
    data = {
        "common_config": {"job_type": mode},
        "embedding_parameter_server_config": {
            "capacity": capacity,
            "max_ids_per_request": max_ids,
            "weight_bound": weight_bound,
        },
        "sparse_optimizer": optimizer or {"type": "adagrad", "lr": 0.1},
    }
    if init is not None:
        data["initialization"] = init
    return GlobalConfig.from_dict(data)


def u64(*ids) -> np.ndarray:
    return np.array(ids, np.uint64)


def tab(n: int, t: int = A) -> np.ndarray:
    return np.full(n, t, np.uint16)


def held(store: EmbeddingStore, table: int = A) -> set[int]:
    """The ids a store holds for one table (read without touching LRU order or counters)."""
    rows = [r for r in store.rows() if r.table.index == table][0]
    return set(rows.ids.tolist())


def counters(store: EmbeddingStore) -> tuple:
    c = store.counters()
    return c["rows"], c["hits"], c["misses"], c["evictions"], c["inserts"]


def snapshot(store: EmbeddingStore):
    return store.counters(), [(r.table.name, r.ids.copy(), r.weights.copy(), r.state.copy()) for r in store.rows()]


def assert_same_snapshot(before, after):
    assert before[0] == after[0]
    assert len(before[1]) == len(after[1])
    for (n1, i1, w1, s1), (n2, i2, w2, s2) in zip(before[1], after[1]):
        assert n1 == n2
        np.testing.assert_array_equal(np.sort(i1), np.sort(i2))
        np.testing.assert_array_equal(w1[np.argsort(i1)], w2[np.argsort(i2)])
        np.testing.assert_array_equal(s1[np.argsort(i1)], s2[np.argsort(i2)])


def fill_one_by_one(store: EmbeddingStore, ids, table: int = A) -> None:
    """Look ids up one request each, so each gets its own LRU tick."""
    for i in ids:
        store.lookup(u64(i), tab(1, table))


# --------------------------------------------------------------------------- LRU eviction


def test_small_store_evicts_one_row_per_sweep():
    assert EmbeddingStore(EMB, glob(capacity=64)).evictions_per_sweep == 1
    assert EmbeddingStore(EMB, glob(capacity=640)).evictions_per_sweep == 10


def test_filling_to_capacity_counts_misses_and_inserts_without_evicting():
    store = EmbeddingStore(EMB, glob(capacity=64))
    fill_one_by_one(store, range(64))
    assert counters(store) == (64, 0, 64, 0, 64)
    assert len(store) == 64
    assert held(store) == set(range(64))


def test_least_recently_used_row_is_evicted_first():
    store = EmbeddingStore(EMB, glob(capacity=64))
    fill_one_by_one(store, range(64))
    fill_one_by_one(store, [0, 2])  # 0 and 2 become the most recently used
    fill_one_by_one(store, [100])  # evicts 1, the oldest untouched
    assert held(store) == (set(range(64)) - {1}) | {100}
    fill_one_by_one(store, [101])  # evicts 3
    assert held(store) == (set(range(64)) - {1, 3}) | {100, 101}
    # rows, hits, misses, evictions, inserts
    assert counters(store) == (64, 2, 66, 2, 66)


def test_repeated_id_in_one_request_is_one_miss_and_one_hit():
    store = EmbeddingStore(EMB, glob(capacity=64))
    out = store.lookup(u64(9, 9, 9), tab(3))
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    assert counters(store) == (1, 2, 1, 0, 1)


def test_same_id_in_two_tables_is_two_rows():
    store = EmbeddingStore(EMB, glob(capacity=64))
    store.lookup(u64(5, 5), np.array([A, B], np.uint16))
    assert counters(store) == (2, 0, 2, 0, 2)
    assert held(store, A) == {5} and held(store, B) == {5}


def test_evicted_id_comes_back_with_its_initial_value():
    store = EmbeddingStore(EMB, glob(capacity=64))
    initial = store.lookup(u64(0), tab(1)).copy()
    store.apply_gradients(u64(0), tab(1), np.ones((1, 4), np.float32))
    assert not np.array_equal(store.lookup(u64(0), tab(1)), initial)
    fill_one_by_one(store, range(1, 65))  # 64 newer ids push 0 out
    assert 0 not in held(store)
    np.testing.assert_array_equal(store.lookup(u64(0), tab(1)), initial)


def test_lru_matches_reference_model_under_churn():
    # Single-id requests: every row has its own tick, so the store must behave exactly like
    # an LRU cache. Churn also exercises deletion from the hash index.
    store = EmbeddingStore(EMB, glob(capacity=64))
    model: OrderedDict[tuple[int, int], None] = OrderedDict()
    rng = np.random.default_rng(0)
    hits = misses = evictions = 0
    for _ in range(1500):
        key = (int(rng.integers(0, 2)), int(rng.integers(0, 120)))
        store.lookup(u64(key[1]), tab(1, key[0]))
        if key in model:
            hits += 1
            model.move_to_end(key)
        else:
            misses += 1
            model[key] = None
            if len(model) > 64:
                model.popitem(last=False)
                evictions += 1
    assert counters(store) == (64, hits, misses, evictions, misses)
    assert held(store, A) == {i for t, i in model if t == A}
    assert held(store, B) == {i for t, i in model if t == B}


def test_rows_are_listed_from_least_to_most_recently_used():
    store = EmbeddingStore(EMB, glob(capacity=64))
    fill_one_by_one(store, [5, 6, 7, 8])
    fill_one_by_one(store, [6])
    rows = [r for r in store.rows() if r.table.index == A][0]
    assert rows.ids.tolist() == [5, 7, 8, 6]


def test_lookup_never_evicts_a_row_the_same_request_uses():
    store = EmbeddingStore(EMB, glob(capacity=64, optimizer={"type": "sgd", "lr": 1.0}))
    fill_one_by_one(store, range(64))
    initial0 = store.lookup(u64(0), tab(1)).copy()
    store.apply_gradients(u64(0), tab(1), np.ones((1, 4), np.float32))
    trained0 = store.lookup(u64(0), tab(1)).copy()
    fill_one_by_one(store, range(1, 64))  # id 0 is the least recently used again
    out = store.lookup(u64(1000, 0), tab(2))
    # The request uses id 0: its trained row must survive the eviction made for id 1000.
    np.testing.assert_array_equal(out[1], trained0[0])
    assert not np.array_equal(out[1], initial0[0])
    assert held(store) == (set(range(64)) - {1}) | {1000}
    c = store.counters()
    assert (c["evictions"], c["inserts"]) == (1, 65)


def test_gradient_push_never_evicts_a_row_it_updates():
    store = EmbeddingStore(EMB, glob(capacity=64, optimizer={"type": "adagrad", "lr": 0.1}))
    fill_one_by_one(store, range(64))  # id 0 is the least recently used
    reference = EmbeddingStore(EMB, glob(capacity=64, optimizer={"type": "adagrad", "lr": 0.1}))
    reference.apply_gradients(u64(0, 1000), tab(2), np.ones((2, 4), np.float32))
    expected = reference.lookup(u64(0, 1000), tab(2))
    state_of_63 = [r for r in store.rows() if r.table.index == A][0].state[-1].copy()

    store.apply_gradients(u64(0, 1000), tab(2), np.ones((2, 4), np.float32))

    assert held(store) == (set(range(64)) - {1}) | {1000}
    rows = [r for r in store.rows() if r.table.index == A][0]
    by_id = dict(zip(rows.ids.tolist(), range(rows.ids.shape[0])))
    np.testing.assert_array_equal(rows.weights[by_id[0]], expected[0])
    np.testing.assert_array_equal(rows.weights[by_id[1000]], expected[1])
    # No other row's optimizer state is touched by the push.
    np.testing.assert_array_equal(rows.state[by_id[63]], state_of_63)


# --------------------------------------------------------------------------- deterministic initialisation


def test_same_id_gets_same_vector_in_two_stores_in_any_order():
    ids = np.array([0, 1, 2**63, 2**64 - 1, 42, 7, 123456789], np.uint64)
    first = EmbeddingStore(EMB, glob(capacity=64)).lookup(ids, tab(ids.shape[0]))
    perm = np.array([6, 3, 0, 5, 1, 4, 2])
    second_store = EmbeddingStore(EMB, glob(capacity=64))
    fill_one_by_one(second_store, [999, 998])  # different history
    second = second_store.lookup(ids[perm], tab(ids.shape[0]))
    np.testing.assert_array_equal(second, first[perm])
    assert len({tuple(r) for r in first.tolist()}) == ids.shape[0]


def test_same_id_gets_same_vector_for_one_or_three_shards():
    g = glob(capacity=256)
    one = InProcessEmbeddingClient(EMB, g, num_shards=1)
    three = InProcessEmbeddingClient(EMB, g, num_shards=3)
    ids = np.arange(0, 300, 3, dtype=np.uint64) * np.uint64(2**40 + 1)
    tables = np.arange(ids.shape[0], dtype=np.uint16) % 2
    a = one.lookup_rows(ids, tables, 4)
    rev = np.arange(ids.shape[0])[::-1].copy()
    b = three.lookup_rows(ids[rev], tables[rev], 4)
    np.testing.assert_array_equal(b, a[rev])
    # The three shards really split the keys.
    assert all(s["rows"] > 0 for s in three.stats())
    assert sum(s["rows"] for s in three.stats()) == ids.shape[0]


def test_different_tables_give_different_vectors_for_same_id():
    store = EmbeddingStore(EMB, glob(capacity=64))
    out = store.lookup(u64(5, 5), np.array([A, B], np.uint16))
    assert not np.array_equal(out[0], out[1])


def test_seed_changes_initial_vectors():
    a = EmbeddingStore(EMB, glob(init={"seed": 0})).lookup(u64(1, 2), tab(2))
    b = EmbeddingStore(EMB, glob(init={"seed": 1})).lookup(u64(1, 2), tab(2))
    assert not np.array_equal(a, b)


def test_bounded_uniform_initialisation_fills_lower_to_upper():
    store = EmbeddingStore(EMB, glob(capacity=1024, init={"method": "bounded_uniform", "lower": -0.3, "upper": 0.7}))
    v = store.lookup(np.arange(1000, dtype=np.uint64), tab(1000, C))  # dim 8: 8000 values
    assert v.min() >= np.float32(-0.3)
    assert v.max() < np.float32(0.7)
    assert v.min() < -0.29 and v.max() > 0.69
    assert abs(float(v.mean()) - 0.2) < 0.02
    # Roughly flat: each tenth of the range holds about a tenth of the values.
    hist, _ = np.histogram(v, bins=10, range=(-0.3, 0.7))
    assert hist.min() > 650 and hist.max() < 950


def test_bounded_normal_initialisation_is_clipped_to_bounds():
    init = {"method": "bounded_normal", "lower": -0.4, "upper": 0.6, "mean": 0.1, "std": 0.5}
    store = EmbeddingStore(EMB, glob(capacity=1024, init=init))
    v = store.lookup(np.arange(1000, dtype=np.uint64), tab(1000, C))
    assert v.min() >= np.float32(-0.4) and v.max() <= np.float32(0.6)
    # With std this wide, many draws fall outside and are clipped onto the bounds.
    assert (v == np.float32(-0.4)).mean() > 0.1
    assert (v == np.float32(0.6)).mean() > 0.1


def test_bounded_normal_initialisation_has_mean_and_std():
    init = {"method": "bounded_normal", "lower": -1.0, "upper": 1.0, "mean": 0.05, "std": 0.02}
    store = EmbeddingStore(EMB, glob(capacity=1024, init=init))
    v = store.lookup(np.arange(1000, dtype=np.uint64), tab(1000, C))
    assert abs(float(v.mean()) - 0.05) < 0.002
    assert abs(float(v.std()) - 0.02) < 0.002


# --------------------------------------------------------------------------- infer mode


def test_infer_mode_reads_zeros_and_inserts_nothing():
    store = EmbeddingStore(EMB, glob(mode="infer"))
    out = store.lookup(u64(1, 2, 3, 1), tab(4))
    np.testing.assert_array_equal(out, np.zeros((4, 4), np.float32))
    assert len(store) == 0
    assert counters(store) == (0, 0, 4, 0, 0)
    out8 = store.lookup(u64(1), tab(1, C))
    np.testing.assert_array_equal(out8, np.zeros((1, 8), np.float32))
    assert counters(store) == (0, 0, 5, 0, 0)


@pytest.mark.parametrize("count_repeats", [True, False])
def test_train_mode_lookup_without_insert_reads_zeros_for_unseen_ids_and_changes_no_row(count_repeats):
    """Evaluation lookups (``insert=False``): held rows as they are, unseen ids as the zeros an
    infer-mode store answers; no row is inserted or evicted, whatever the store's fill."""
    store = EmbeddingStore(EMB, glob(capacity=4))
    trained = store.lookup(u64(1, 2, 3, 4), tab(4))  # full: an insert now would evict
    rows_before = [(r.table.name, r.ids.copy(), r.weights.copy(), r.state.copy()) for r in store.rows()]
    out = store.lookup(u64(9, 2, 10, 9, 4), tab(5), count_repeats=count_repeats, insert=False)
    np.testing.assert_array_equal(out[[0, 2, 3]], np.zeros((3, 4), np.float32))
    np.testing.assert_array_equal(out[[1, 4]], trained[[1, 3]])
    np.testing.assert_array_equal(store.lookup(u64(7), tab(1, C), insert=False), np.zeros((1, 8), np.float32))
    assert len(store) == 4 and held(store) == {1, 2, 3, 4}
    assert store.counters()["inserts"] == 4 and store.counters()["evictions"] == 0
    assert_same_snapshot((None, rows_before), (None, [(r.table.name, r.ids, r.weights, r.state) for r in store.rows()]))
    infer = EmbeddingStore(EMB, glob(mode="infer"))
    rows_a = next(r for r in store.rows() if r.table.index == A)
    infer.put(TableRows(rows_a.table, rows_a.ids, rows_a.weights, np.zeros((4, 0), np.float32)))
    np.testing.assert_array_equal(out, infer.lookup(u64(9, 2, 10, 9, 4), tab(5)))
    # Training's own lookups still insert.
    store.lookup(u64(9), tab(1))
    assert 9 in held(store) and store.counters()["inserts"] == 5


def test_infer_mode_refuses_gradients():
    store = EmbeddingStore(EMB, glob(mode="infer"))
    before = snapshot(store)
    with pytest.raises(InvalidRequestError, match="runs in infer mode and does not accept gradients"):
        store.apply_gradients(u64(1), tab(1), np.ones((1, 4), np.float32))
    assert_same_snapshot(before, snapshot(store))


@pytest.mark.parametrize("job_type", ["Eval", "eval"])
def test_eval_job_inserts_nothing_and_applies_no_gradient(job_type, tmp_path):
    """PERSIA's job_type Eval: a trained checkpoint loads, held rows read as trained, unseen ids
    read as zeros without being inserted, and gradients are refused with the rows unchanged."""
    from embedding_server.modelroot.checkpoint import dump_stores, load_store

    trained = EmbeddingStore(EMB, glob())
    trained.apply_gradients(u64(1, 2, 3), tab(3), np.ones((3, 4), np.float32))
    weights = trained.lookup(u64(1, 2, 3), tab(3))
    dump_stores([trained], str(tmp_path / "ckpt"))
    store = EmbeddingStore(EMB, glob(mode=job_type))
    assert load_store(store, str(tmp_path / "ckpt")) == 3
    loaded = store.counters()["inserts"]
    out = store.lookup(u64(2, 7, 1, 3), tab(4))
    np.testing.assert_array_equal(out[[0, 2, 3]], weights[[1, 0, 2]])
    np.testing.assert_array_equal(out[1], np.zeros(4, np.float32))
    assert len(store) == 3 and held(store) == {1, 2, 3} and store.counters()["inserts"] == loaded
    before = snapshot(store)
    with pytest.raises(InvalidRequestError, match="does not accept gradients"):
        store.apply_gradients(u64(1), tab(1), np.ones((1, 4), np.float32))
    assert_same_snapshot(before, snapshot(store))


# --------------------------------------------------------------------------- request validation


@pytest.fixture
def populated():
    store = EmbeddingStore(EMB, glob(capacity=64, max_ids=100))
    store.lookup(np.arange(10, dtype=np.uint64), tab(10))
    store.apply_gradients(np.arange(5, dtype=np.uint64), tab(5), np.ones((5, 4), np.float32))
    store.lookup(np.arange(3, dtype=np.uint64), tab(3, C))
    return store


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda s: s.lookup(np.array([1, 2], np.int64), tab(2)),
            "ids must be a 1-D uint64 array, got int64 array of shape (2,)",
        ),
        (lambda s: s.lookup([1, 2], tab(2)), "ids must be a 1-D uint64 array, got list"),
        (
            lambda s: s.lookup(np.zeros((2, 1), np.uint64), tab(2)),
            "ids must be a 1-D uint64 array, got uint64 array of shape (2, 1)",
        ),
        (
            lambda s: s.lookup(u64(1, 2), tab(3)),
            "tables must be a uint16 array shaped like ids (2,), got uint16 array of shape (3,)",
        ),
        (
            lambda s: s.lookup(u64(1, 2), np.zeros(2, np.int32)),
            "tables must be a uint16 array shaped like ids (2,), got int32 array",
        ),
        (lambda s: s.lookup(np.zeros(0, np.uint64), tab(0)), "empty request: no ids"),
        (
            lambda s: s.lookup(np.arange(101, dtype=np.uint64), tab(101)),
            "request carries 101 ids; the limit is 100 (max_ids_per_request)",
        ),
        (
            lambda s: s.lookup(np.arange(65, dtype=np.uint64), tab(65)),
            "request has more distinct ids than this shard's capacity of 64 rows",
        ),
        (lambda s: s.lookup(u64(1, 2), np.array([A, 3], np.uint16)), "table index 3 out of range: 3 tables configured"),
        (
            lambda s: s.lookup(u64(1, 2), np.array([A, C], np.uint16)),
            "one request must address tables of one dim, got dims [4, 8]",
        ),
        (
            lambda s: s.apply_gradients(u64(1, 2), tab(2), np.ones((2, 8), np.float32)),
            "gradient shape (2, 8) does not match 2 ids of dim 4",
        ),
        (
            lambda s: s.apply_gradients(u64(1, 2), tab(2), np.ones((3, 4), np.float32)),
            "gradient shape (3, 4) does not match 2 ids of dim 4",
        ),
        (
            lambda s: s.apply_gradients(u64(1, 2), tab(2), np.ones((2, 4), np.float64)),
            "gradients must be float32, got float64",
        ),
        (
            lambda s: s.apply_gradients(u64(1, 2), tab(2), np.array([[0, 0, 0, np.nan]] * 2, np.float32)),
            "gradients contain NaN or infinity",
        ),
        (
            lambda s: s.apply_gradients(u64(1, 2), tab(2), np.array([[0, np.inf, 0, 0]] * 2, np.float32)),
            "gradients contain NaN or infinity",
        ),
        (
            lambda s: s.apply_gradients(np.array([1, 2], np.int64), tab(2), np.ones((2, 4), np.float32)),
            "ids must be a 1-D uint64 array",
        ),
        (
            lambda s: s.apply_gradients(np.arange(101, dtype=np.uint64), tab(101), np.ones((101, 4), np.float32)),
            "the limit is 100",
        ),
        (
            lambda s: s.apply_gradients(
                np.arange(65, dtype=np.uint64) + np.uint64(500), tab(65), np.ones((65, 4), np.float32)
            ),
            "more distinct ids than this shard's capacity of 64 rows",
        ),
    ],
)
def test_bad_request_is_refused_and_leaves_store_unchanged(populated, call, message):
    before = snapshot(populated)
    with pytest.raises(InvalidRequestError) as info:
        call(populated)
    assert message in str(info.value)
    assert_same_snapshot(before, snapshot(populated))


def test_request_with_many_repeats_of_few_ids_is_accepted_beyond_capacity():
    store = EmbeddingStore(EMB, glob(capacity=64, max_ids=1000))
    ids = np.tile(np.arange(64, dtype=np.uint64), 3)  # 192 ids, 64 distinct
    out = store.lookup(ids, tab(192))
    np.testing.assert_array_equal(out[:64], out[128:])
    assert counters(store) == (64, 128, 64, 0, 64)


def test_ids_of_another_shard_are_refused():
    store = EmbeddingStore(EMB, glob(capacity=64), shard_index=0, num_shards=3)
    candidates = np.arange(50, dtype=np.uint64)
    owned = store.owns(candidates, tab(50))
    assert owned.any() and not owned.all()
    mine = candidates[owned][:3]
    foreign = int(candidates[~owned][0])
    store.lookup(mine, tab(3))
    before = snapshot(store)
    request = np.concatenate([mine, u64(foreign)])
    with pytest.raises(InvalidRequestError) as info:
        store.lookup(request, tab(4))
    assert str(info.value) == (
        f"id {foreign} of table 'a' does not belong to shard 0 of 3; the client's shard list is wrong"
    )
    with pytest.raises(InvalidRequestError, match=f"id {foreign} of table 'a' does not belong to shard 0 of 3"):
        store.apply_gradients(request, tab(4), np.ones((4, 4), np.float32))
    assert_same_snapshot(before, snapshot(store))


def test_shard_index_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"shard_index must be in \[0, 2\), got 2"):
        EmbeddingStore(EMB, glob(), shard_index=2, num_shards=2)


# --------------------------------------------------------------------------- checkpoints


def trained_client(
    num_shards: int, capacity: int = 256, optimizer=None, seed: int = 0
) -> tuple[InProcessEmbeddingClient, list]:
    g = glob(capacity=capacity, optimizer=optimizer or {"type": "adagrad", "lr": 0.1})
    client = InProcessEmbeddingClient(EMB, g, num_shards=num_shards)
    rng = np.random.default_rng(seed)
    keys = []
    for t, dim in ((A, 4), (B, 4), (C, 8)):
        ids = rng.integers(0, 2**63, 20, dtype=np.uint64)
        tables = tab(20, t)
        client.lookup_rows(ids, tables, dim)
        client.push_rows(ids[:10], tables[:10], rng.standard_normal((10, dim)).astype(np.float32))
        keys.append((ids, tables, dim))
    return client, keys


def lookups(client: InProcessEmbeddingClient, keys) -> list[np.ndarray]:
    return [client.lookup_rows(ids, tables, dim) for ids, tables, dim in keys]


def total_rows(client: InProcessEmbeddingClient) -> int:
    return sum(s["rows"] for s in client.stats())


def test_dump_then_load_gives_bit_identical_lookups(tmp_path):
    src, keys = trained_client(1)
    expected = lookups(src, keys)
    src.dump(str(tmp_path / "ckpt"))
    dst = InProcessEmbeddingClient(EMB, glob(capacity=256), num_shards=1)
    dst.lookup_rows(u64(77), tab(1), 4)  # a row not in the checkpoint is dropped by load
    dst.load(str(tmp_path / "ckpt"))
    assert total_rows(dst) == total_rows(src) == 60
    before = [dict(s) for s in dst.stats()]
    for got, want in zip(lookups(dst, keys), expected):
        np.testing.assert_array_equal(got, want)
    assert [s["inserts"] for s in dst.stats()] == [b["inserts"] for b in before]  # all were hits
    assert 77 not in held(dst.stores[0])


@pytest.mark.parametrize("src_shards, dst_shards", [(1, 3), (3, 1), (3, 2)])
def test_load_into_other_shard_count_redistributes_rows(tmp_path, src_shards, dst_shards):
    src, keys = trained_client(src_shards)
    expected = lookups(src, keys)
    src.dump(str(tmp_path / "ckpt"))
    dst = InProcessEmbeddingClient(EMB, glob(capacity=256), num_shards=dst_shards)
    dst.load(str(tmp_path / "ckpt"))
    assert total_rows(dst) == total_rows(src) == 60
    for store in dst.stores:
        for rows in store.rows():
            assert store.owns(rows.ids, tab(rows.ids.shape[0], rows.table.index)).all()
    for got, want in zip(lookups(dst, keys), expected):
        np.testing.assert_array_equal(got, want)
    assert total_rows(dst) == 60  # the lookups found every row


def test_checkpoint_files_are_arrow_with_id_weight_state_columns(tmp_path):
    src, _ = trained_client(2)
    src.dump(str(tmp_path / "ckpt"))
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["num_shards"] == 2
    assert manifest["rows"] == 60
    assert manifest["optimizer"] == Adagrad(lr=0.1).to_dict()
    assert len(manifest["files"]) == 6  # 2 shards x 3 tables
    expected = {}
    for store in src.stores:
        for rows in store.rows():
            for i, w, s in zip(rows.ids.tolist(), rows.weights, rows.state):
                expected[(rows.table.name, i)] = (w, s)
    seen = 0
    for rel in manifest["files"]:
        with pa.ipc.open_file(str(tmp_path / "ckpt" / rel)) as reader:
            table = reader.read_all()
        name = table.schema.metadata[b"table"].decode()
        dim = EMB.tables[name].dim
        assert table.column_names == ["id", "weight", "state"]
        assert table.schema.field("id").type == pa.uint64()
        assert table.schema.field("weight").type == pa.list_(pa.float32(), dim)
        assert table.schema.field("state").type == pa.list_(pa.float32(), dim)  # Adagrad: one per element
        for i, w, s in zip(
            table.column("id").to_pylist(), table.column("weight").to_pylist(), table.column("state").to_pylist()
        ):
            want_w, want_s = expected[(name, i)]
            np.testing.assert_array_equal(np.array(w, np.float32), want_w)
            np.testing.assert_array_equal(np.array(s, np.float32), want_s)
            seen += 1
    assert seen == len(expected) == 60


@pytest.mark.parametrize(
    "optimizer",
    [
        {"type": "adagrad", "lr": 0.1, "g_square_momentum": 0.9},
        {"type": "adam", "lr": 0.05},
        {"type": "adagrad", "lr": 0.1, "vectorwise_shared": True},
    ],
)
def test_training_continues_identically_after_dump_and_load(tmp_path, optimizer):
    src, keys = trained_client(1, optimizer=optimizer)
    src.dump(str(tmp_path / "ckpt"))
    # The loading client is configured with another optimizer: it adopts the checkpoint's.
    dst = InProcessEmbeddingClient(EMB, glob(capacity=256, optimizer={"type": "sgd", "lr": 1.0}), num_shards=3)
    dst.load(str(tmp_path / "ckpt"))
    assert all(s.optimizer == src.stores[0].optimizer for s in dst.stores)
    rng = np.random.default_rng(1)
    for _ in range(3):
        for ids, tables, dim in keys:
            grads = rng.standard_normal((ids.shape[0], dim)).astype(np.float32)
            src.push_rows(ids, tables, grads)
            dst.push_rows(ids, tables, grads)
    for got, want in zip(lookups(dst, keys), lookups(src, keys)):
        np.testing.assert_array_equal(got, want)


def test_load_into_infer_mode_serves_weights_without_state(tmp_path):
    src, keys = trained_client(1)
    expected = lookups(src, keys)
    src.dump(str(tmp_path / "ckpt"))
    dst = InProcessEmbeddingClient(EMB, glob(capacity=256, mode="infer"), num_shards=2)
    dst.load(str(tmp_path / "ckpt"))
    for got, want in zip(lookups(dst, keys), expected):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(dst.lookup_rows(u64(12345), tab(1), 4), np.zeros((1, 4), np.float32))
    assert total_rows(dst) == 60


def test_load_without_manifest_is_refused(tmp_path):
    src, keys = trained_client(1)
    src.dump(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "manifest.json").unlink()
    dst = InProcessEmbeddingClient(EMB, glob(capacity=256), num_shards=1)
    with pytest.raises(InvalidRequestError, match="no manifest.json; not a complete checkpoint"):
        dst.load(str(tmp_path / "ckpt"))
    with pytest.raises(InvalidRequestError, match="no manifest.json"):
        dst.load(str(tmp_path / "empty"))


def test_load_with_too_small_capacity_is_refused_and_keeps_current_rows(tmp_path):
    src, _ = trained_client(1)
    src.dump(str(tmp_path / "ckpt"))
    dst = InProcessEmbeddingClient(EMB, glob(capacity=16), num_shards=1)
    dst.stores[0].lookup(np.arange(5, dtype=np.uint64), np.zeros(5, np.uint16))
    before = list(dst.stores[0].rows())
    with pytest.raises(InvalidRequestError, match="60 rows belong to shard 0 of 1, more than its capacity of 16 rows"):
        dst.load(str(tmp_path / "ckpt"))
    after = list(dst.stores[0].rows())
    assert len(dst.stores[0]) == 5
    for a, b in zip(before, after):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.weights, b.weights)


def test_load_with_dim_mismatch_is_refused(tmp_path):
    src, _ = trained_client(1)
    src.dump(str(tmp_path / "ckpt"))
    other = EmbeddingConfig.from_dict({"slots_config": {"a": {"dim": 4}, "b": {"dim": 4}, "c": {"dim": 16}}})
    dst = InProcessEmbeddingClient(other, glob(capacity=256), num_shards=1)
    with pytest.raises(InvalidRequestError, match="table 'c' has dim 8 in the checkpoint but 16 in the config"):
        dst.load(str(tmp_path / "ckpt"))


def test_load_with_unknown_table_is_refused(tmp_path):
    src, _ = trained_client(1)
    src.dump(str(tmp_path / "ckpt"))
    other = EmbeddingConfig.from_dict({"slots_config": {"a": {"dim": 4}, "b": {"dim": 4}}})
    dst = InProcessEmbeddingClient(other, glob(capacity=256), num_shards=1)
    with pytest.raises(InvalidRequestError, match="table 'c' is not in this server's embedding_config.yml"):
        dst.load(str(tmp_path / "ckpt"))


def test_set_optimizer_on_populated_store_keeps_rows_with_new_lr():
    store = EmbeddingStore(EMB, glob(capacity=64, optimizer={"type": "adam", "lr": 0.1}))
    store.lookup(u64(1), tab(1))
    store.set_optimizer(Adam(lr=0.5))
    assert store.optimizer == Adam(lr=0.5)
    assert len(store) == 1


# ---------------------------------------------------------------------- the fast paths: pipelined gather, aligned rows
# Checked against the general path they short-cut: same vectors, same counters, same LRU order.

# The tables: conftest's pooling_emb (three of dim 4 with sum, mean, sqrt pooling, one of dim 16).


def repeated_keys(rng: np.random.Generator, n: int, vocab: int, tables: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Random keys of the dim-4 tables, with many repeats."""
    return rng.integers(0, vocab, n).astype(np.uint64), rng.integers(0, tables, n).astype(np.uint16)


def lru_state(store: EmbeddingStore):
    """Counters and every row (in LRU order) with its vector and optimizer state."""
    return store.counters(), [
        (r.table.name, r.ids.tolist(), r.weights.tolist(), r.state.tolist()) for r in store.rows()
    ]


def test_rows_start_on_cache_line_boundaries(pooling_emb):
    store = EmbeddingStore(pooling_emb, glob())
    assert store._weights.ctypes.data % 64 == 0 and store._state.ctypes.data % 64 == 0
    assert store._weights.shape == (65, 16) and not store._weights.any()


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_count_repeats_false_matches_a_deduplicated_request(mode, pooling_emb):
    """Vectors, counters, inserts, evictions and LRU order are those of asking for the distinct
    keys (what a client that deduplicates does), including requests that must evict."""
    rng = np.random.default_rng(1)
    fast, reference = EmbeddingStore(pooling_emb, glob(40, mode)), EmbeddingStore(pooling_emb, glob(40, mode))
    for _ in range(30):
        ids, tables = repeated_keys(rng, int(rng.integers(1, 41)), 30)  # at most capacity keys
        got = fast.lookup(ids, tables, count_repeats=False)
        uniq_ids, uniq_tabs, inverse = unique_keys(ids, tables)
        want = reference.lookup(uniq_ids, uniq_tabs)[inverse]
        np.testing.assert_array_equal(got, want)
        assert lru_state(fast) == lru_state(reference)
    assert fast.counters()["evictions"] > 0 or mode == "infer"


def test_counting_every_key_matches_a_key_by_key_reference(pooling_emb):
    """With count_repeats (the default) a repeated key is one miss then hits, as before."""
    store = EmbeddingStore(pooling_emb, glob())
    store.lookup(np.array([5], np.uint64), np.array([0], np.uint16))
    ids = np.array([5, 7, 7, 5, 9], np.uint64)
    out = store.lookup(ids, np.zeros(5, np.uint16))
    c = store.counters()
    assert (c["hits"], c["misses"], c["inserts"], c["rows"]) == (3, 3, 3, 3)
    np.testing.assert_array_equal(out[0], out[3])
    np.testing.assert_array_equal(out[1], out[2])


def test_lookup_writes_into_the_given_buffer(pooling_emb):
    store = EmbeddingStore(pooling_emb, glob())
    ids, tables = np.array([1, 2, 1], np.uint64), np.zeros(3, np.uint16)
    out = np.full((3, 4), np.nan, np.float32)
    assert store.lookup(ids, tables, out=out) is out
    np.testing.assert_array_equal(out, store.lookup(ids, tables))
    for bad in (np.zeros((3, 5), np.float32), np.zeros((3, 4), np.float64), np.zeros((4, 3), np.float32).T):
        with pytest.raises(ValueError, match="out must be"):
            store.lookup(ids, tables, out=bad)


def test_mixed_hits_and_misses_in_one_request_keep_request_order(pooling_emb):
    store = EmbeddingStore(pooling_emb, glob())
    first = store.lookup(np.array([3, 4], np.uint64), np.zeros(2, np.uint16))
    ids = np.array([10, 3, 11, 4, 10], np.uint64)
    out = store.lookup(ids, np.zeros(5, np.uint16))
    np.testing.assert_array_equal(out[[1, 3]], first)
    np.testing.assert_array_equal(out[0], out[4])
    # New keys got rows in order of first appearance: 10 before 11.
    rows = np.empty(2, np.int64)
    kernels.find_rows(store._slots, store._salts, np.array([10, 11], np.uint64), np.zeros(2, np.uint16), rows)
    assert rows.tolist() == [2, 3] and store.counters()["inserts"] == 4


# --------------------------------------------------------------------------- per-table settings


def table_config(**slots) -> EmbeddingConfig:
    return EmbeddingConfig.from_dict({"slots_config": slots})


@pytest.mark.parametrize("shards", [1, 3])
def test_table_initializers_draw_their_own_distributions(shards):
    cfg = table_config(
        n={"dim": 8, "initializer": {"type": "normal", "mean": 0.5, "std": 0.2}},
        t={"dim": 8, "initializer": {"type": "truncated_normal", "mean": -1.0, "std": 0.1}},
        u={"dim": 8, "initializer": {"type": "uniform", "lower": 2.0, "upper": 3.0}},
        c={"dim": 8, "initializer": {"type": "constant", "value": 0.25}},
        z={"dim": 8, "initializer": {"type": "zeros"}},
        g={"dim": 8},  # the global initialization
    )
    client = InProcessEmbeddingClient(cfg, glob(capacity=30_000, max_ids=10_000), num_shards=shards)
    ids = np.arange(1, 2001, dtype=np.uint64)
    got = {name: client.lookup_rows(ids, tab(2000, cfg.table_of(name).index), 8) for name in "ntucz" + "g"}
    assert got["n"].mean() == pytest.approx(0.5, abs=0.01) and got["n"].std() == pytest.approx(0.2, rel=0.03)
    assert got["n"].max() > 0.5 + 3 * 0.2  # unbounded, unlike bounded_normal
    # A normal truncated at 2 std: within the bounds, std 0.8796 of the untruncated one.
    assert np.abs(got["t"] + 1.0).max() <= 0.2 + 1e-6
    assert got["t"].mean() == pytest.approx(-1.0, abs=0.005)
    assert got["t"].std() == pytest.approx(0.1 * 0.8796, rel=0.03)
    assert got["u"].min() >= 2.0 and got["u"].max() < 3.0 and got["u"].mean() == pytest.approx(2.5, abs=0.01)
    assert (got["c"] == np.float32(0.25)).all() and (got["z"] == 0).all()
    assert got["g"].min() >= -0.01 and got["g"].max() < 0.01  # bounded_uniform's defaults
    # The same id gets the same vector in a fresh store (a restart) with any shard count.
    again = InProcessEmbeddingClient(cfg, glob(capacity=30_000, max_ids=10_000), num_shards=4 - shards)
    for name, values in got.items():
        np.testing.assert_array_equal(again.lookup_rows(ids, tab(2000, cfg.table_of(name).index), 8), values)


def test_default_initialisation_is_unchanged_by_table_initializers():
    plain = EmbeddingStore(table_config(a={"dim": 4}), glob())
    mixed = EmbeddingStore(table_config(a={"dim": 4}, b={"dim": 4, "initializer": {"type": "zeros"}}), glob())
    ids = u64(1, 2, 3)
    np.testing.assert_array_equal(plain.lookup(ids, tab(3)), mixed.lookup(ids, tab(3)))


def test_a_tables_own_optimizer_overrides_the_global_one():
    cfg = table_config(own={"dim": 4, "optimizer": {"type": "sgd", "lr": 0.5}}, shared={"dim": 4})
    store = EmbeddingStore(cfg, glob(optimizer={"type": "adagrad", "lr": 0.1, "initial_accumulator_value": 0.0}))
    ids = u64(5, 6)
    before = [store.lookup(ids, tab(2, t)).copy() for t in (0, 1)]
    grads = np.array([[1.0, -2.0, 0.5, 0.0], [0.25, 1.0, -1.0, 3.0]], np.float32)
    for t in (0, 1):
        store.apply_gradients(ids, tab(2, t), grads)
    np.testing.assert_allclose(store.lookup(ids, tab(2, 0)), before[0] - 0.5 * grads, rtol=1e-6)
    # Adagrad from a zero accumulator: the first step is lr * g / |g| (0 where g is 0).
    np.testing.assert_allclose(store.lookup(ids, tab(2, 1)), before[1] - 0.1 * np.sign(grads), rtol=1e-6)
    assert [store.state_width(t) for t in cfg.tables.values()] == [0, 4]
    # A new global optimizer reaches the table without its own only.
    store.set_optimizer(Adagrad(lr=0.2, initial_accumulator_value=0.0))
    assert store.table_optimizer(cfg.tables["own"]).lr == 0.5 and store.table_optimizer(cfg.tables["shared"]).lr == 0.2


def test_table_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    cfg = table_config(
        a={"dim": 4, "optimizer": {"type": "adam", "lr": 0.05}},
        b={"dim": 4},
        c={"dim": 8, "optimizer": {"type": "sgd", "lr": 0.3}},
    )
    src = InProcessEmbeddingClient(cfg, glob(capacity=256), num_shards=2)
    rng = np.random.default_rng(4)
    keys = [(rng.integers(0, 2**63, 12, dtype=np.uint64), tab(12, t), d) for t, d in ((0, 4), (1, 4), (2, 8))]
    for ids, tables, dim in keys:
        src.push_rows(ids, tables, rng.standard_normal((12, dim)).astype(np.float32))
    src.dump(str(tmp_path / "ckpt"))
    manifest = json.loads((tmp_path / "ckpt/manifest.json").read_text())
    assert manifest["embedding_config"]["slots_config"]["a"]["optimizer"] == {"type": "adam", "lr": 0.05}
    dst = InProcessEmbeddingClient(cfg, glob(capacity=256), num_shards=3)
    dst.load(str(tmp_path / "ckpt"))
    widths = {r.table.name: r.state.shape[1] for s in dst.stores for r in s.rows()}
    assert widths == {"a": 9, "b": 4, "c": 0}
    for _ in range(2):
        for ids, tables, dim in keys:
            grads = rng.standard_normal((12, dim)).astype(np.float32)
            src.push_rows(ids, tables, grads)
            dst.push_rows(ids, tables, grads)
    for got, want in zip(lookups(dst, keys), lookups(src, keys)):
        np.testing.assert_array_equal(got, want)
