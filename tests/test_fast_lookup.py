"""The fast lookup paths: the store's pipelined gather (``out=``, ``count_repeats=False``), its
cache-line-aligned rows, and the clients' one-id-per-bag pooling. Each is checked against the
general path it short-cuts: same vectors, same counters, same LRU order, same gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedding_server.core.batch import SparseFeature
from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.rpc.client import InProcessEmbeddingClient, _KeyGroup
from embedding_server.store import kernels
from embedding_server.store.store import EmbeddingStore, unique_keys

EMB = EmbeddingConfig.from_dict(
    {
        "slots_config": {
            "a": {"dim": 4},
            "b": {"dim": 4, "mean_scaling": True},
            "c": {"dim": 4, "sqrt_scaling": True},
            "d": {"dim": 16},
        }
    }
)


def glob(capacity: int = 64, mode: str = "train") -> GlobalConfig:
    return GlobalConfig.from_dict(
        {
            "common_config": {"job_type": mode},
            "embedding_parameter_server_config": {"capacity": capacity},
            "sparse_optimizer": {"type": "adagrad", "lr": 0.1},
        }
    )


def keys(rng: np.random.Generator, n: int, vocab: int, tables: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Random keys of the dim-4 tables, with many repeats."""
    return rng.integers(0, vocab, n).astype(np.uint64), rng.integers(0, tables, n).astype(np.uint16)


def state(store: EmbeddingStore):
    """Counters and every row (in LRU order) with its vector and optimizer state."""
    return store.counters(), [
        (r.table.name, r.ids.tolist(), r.weights.tolist(), r.state.tolist()) for r in store.rows()
    ]


# --------------------------------------------------------------------------- store


def test_rows_start_on_cache_line_boundaries():
    store = EmbeddingStore(EMB, glob())
    assert store._weights.ctypes.data % 64 == 0 and store._state.ctypes.data % 64 == 0
    assert store._weights.shape == (65, 16) and not store._weights.any()


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_count_repeats_false_matches_a_deduplicated_request(mode):
    """Vectors, counters, inserts, evictions and LRU order are those of asking for the distinct
    keys (what a client that deduplicates does), including requests that must evict."""
    rng = np.random.default_rng(1)
    fast, reference = EmbeddingStore(EMB, glob(40, mode)), EmbeddingStore(EMB, glob(40, mode))
    for _ in range(30):
        ids, tables = keys(rng, int(rng.integers(1, 41)), 30)  # at most capacity keys
        got = fast.lookup(ids, tables, count_repeats=False)
        uniq_ids, uniq_tabs, inverse = unique_keys(ids, tables)
        want = reference.lookup(uniq_ids, uniq_tabs)[inverse]
        np.testing.assert_array_equal(got, want)
        assert state(fast) == state(reference)
    assert fast.counters()["evictions"] > 0 or mode == "infer"


def test_counting_every_key_matches_a_key_by_key_reference():
    """With count_repeats (the default) a repeated key is one miss then hits, as before."""
    store = EmbeddingStore(EMB, glob())
    store.lookup(np.array([5], np.uint64), np.array([0], np.uint16))
    ids = np.array([5, 7, 7, 5, 9], np.uint64)
    out = store.lookup(ids, np.zeros(5, np.uint16))
    c = store.counters()
    assert (c["hits"], c["misses"], c["inserts"], c["rows"]) == (3, 3, 3, 3)
    np.testing.assert_array_equal(out[0], out[3])
    np.testing.assert_array_equal(out[1], out[2])


def test_lookup_writes_into_the_given_buffer():
    store = EmbeddingStore(EMB, glob())
    ids, tables = np.array([1, 2, 1], np.uint64), np.zeros(3, np.uint16)
    out = np.full((3, 4), np.nan, np.float32)
    assert store.lookup(ids, tables, out=out) is out
    np.testing.assert_array_equal(out, store.lookup(ids, tables))
    for bad in (np.zeros((3, 5), np.float32), np.zeros((3, 4), np.float64), np.zeros((4, 3), np.float32).T):
        with pytest.raises(ValueError, match="out must be"):
            store.lookup(ids, tables, out=bad)


def test_mixed_hits_and_misses_in_one_request_keep_request_order():
    store = EmbeddingStore(EMB, glob())
    first = store.lookup(np.array([3, 4], np.uint64), np.zeros(2, np.uint16))
    ids = np.array([10, 3, 11, 4, 10], np.uint64)
    out = store.lookup(ids, np.zeros(5, np.uint16))
    np.testing.assert_array_equal(out[[1, 3]], first)
    np.testing.assert_array_equal(out[0], out[4])
    # New keys got rows in order of first appearance: 10 before 11.
    rows = np.empty(2, np.int64)
    kernels.find_rows(store._slots, store._salts, np.array([10, 11], np.uint64), np.zeros(2, np.uint16), rows)
    assert rows.tolist() == [2, 3] and store.counters()["inserts"] == 4


# --------------------------------------------------------------------------- client pooling


def batch(rng: np.random.Generator, batch_size: int, names=("a", "b", "c")) -> list[SparseFeature]:
    offsets = np.arange(batch_size + 1, dtype=np.int64)
    return [SparseFeature(n, rng.integers(0, 20, batch_size).astype(np.uint64), offsets) for n in names]


def reference_pooling(group: _KeyGroup, features: list[SparseFeature], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """embedding_bag over the distinct rows, as the general path pools (mean / sqrt weight 1)."""
    by_key = {(int(t), int(i)): k for k, (i, t) in enumerate(zip(group.ids, group.tables))}
    out = {}
    for f in features:
        t = EMB.table_of(f.name).index
        idx = torch.tensor([by_key[(t, int(i))] for i in f.ids])
        out[f.name] = F.embedding_bag(idx, rows, torch.from_numpy(f.offsets[:-1]), mode="sum")
    return out


@pytest.mark.parametrize("num_shards", [1, 3])
def test_one_id_per_bag_gives_embedding_bag_values_bit_for_bit(num_shards):
    rng = np.random.default_rng(2)
    client = InProcessEmbeddingClient(EMB, glob(200), num_shards)
    features = batch(rng, 50)
    fast = client.lookup(features)
    assert not fast.groups  # nothing to push: no distinct-row tensor was built
    general = client.lookup(features, requires_grad=True)
    (group,) = general.groups
    expected = reference_pooling(group, features, group.rows.detach())
    for f in features:
        assert torch.equal(fast[f.name], expected[f.name])
        assert torch.equal(general[f.name].detach(), expected[f.name])
        assert fast[f.name].shape == (50, 4) and fast[f.name].dtype == torch.float32


def test_one_id_per_bag_counts_distinct_keys_like_the_general_path():
    rng = np.random.default_rng(3)
    fast, general = InProcessEmbeddingClient(EMB, glob(200)), InProcessEmbeddingClient(EMB, glob(200), 2)
    for _ in range(5):
        features = batch(rng, 40)
        fast.lookup(features)
        general.lookup(features)
    totals = [sum(s[k] for s in c.stats()) for c in (fast, general) for k in ("hits", "misses", "inserts")]
    assert totals[:3] == totals[3:]


def test_one_id_per_bag_gradients_match_embedding_bag():
    """index_select's backward sums the gradients of repeated ids into their row, as
    embedding_bag's does; push_gradients then updates each row once."""
    rng = np.random.default_rng(4)
    client = InProcessEmbeddingClient(EMB, glob(200))
    features = batch(rng, 30)
    result = client.lookup(features, requires_grad=True)
    (group,) = result.groups
    weights = torch.from_numpy(rng.standard_normal((30, 4)).astype(np.float32))
    sum((result[f.name] * weights * (k + 1)).sum() for k, f in enumerate(features)).backward()

    rows = group.rows.detach().clone().requires_grad_(True)
    expected = reference_pooling(group, features, rows)
    sum((expected[f.name] * weights * (k + 1)).sum() for k, f in enumerate(features)).backward()
    torch.testing.assert_close(group.rows.grad, rows.grad, atol=1e-6, rtol=1e-6)


def test_mixed_bag_sizes_still_pool_with_embedding_bag():
    client = InProcessEmbeddingClient(EMB, glob(200))
    single = SparseFeature.from_lists("a", [[1], [2]])
    double = SparseFeature.from_lists("b", [[1, 2], [3]])  # mean of two ids in sample 0
    result = client.lookup([single, double])
    rows = client.lookup_rows(np.array([1, 2, 3], np.uint64), np.array([1, 1, 1], np.uint16), 4)
    torch.testing.assert_close(result["b"], torch.from_numpy(np.stack([(rows[0] + rows[1]) / 2, rows[2]])))


def test_non_pooled_single_ids_take_the_general_path():
    emb = EmbeddingConfig.from_dict(
        {"slots_config": {"r": {"dim": 4, "embedding_summation": False, "sample_fixed_size": 1}}}
    )
    client = InProcessEmbeddingClient(emb, glob(50))
    result = client.lookup([SparseFeature.from_lists("r", [[1], [2]])])
    assert result["r"].values.shape == (2, 1, 4) and result["r"].mask.all()


def sparse_batch(rng: np.random.Generator, batch_size: int, names=("a", "b", "c")) -> list[SparseFeature]:
    """Zero or one id per sample (Criteo-style missing values)."""
    out = []
    for n in names:
        present = rng.random(batch_size) < 0.7
        offsets = np.zeros(batch_size + 1, np.int64)
        np.cumsum(present, out=offsets[1:])
        out.append(SparseFeature(n, rng.integers(0, 20, int(present.sum())).astype(np.uint64), offsets))
    return out


def test_bags_of_zero_or_one_id_match_embedding_bag_values_and_gradients():
    rng = np.random.default_rng(5)
    client = InProcessEmbeddingClient(EMB, glob(200))
    features = sparse_batch(rng, 40)
    assert any((f.lengths == 0).any() for f in features) and any((f.lengths == 1).any() for f in features)
    result = client.lookup(features, requires_grad=True)
    (group,) = result.groups
    rows = group.rows.detach().clone().requires_grad_(True)
    expected = reference_pooling(group, features, rows)
    for f in features:
        assert torch.equal(result[f.name].detach(), expected[f.name].detach())
        assert not result[f.name][torch.from_numpy(f.lengths == 0)].any()  # missing: zeros
    weights = torch.from_numpy(rng.standard_normal((40, 4)).astype(np.float32))
    sum((result[f.name] * weights * (k + 1)).sum() for k, f in enumerate(features)).backward()
    sum((expected[f.name] * weights * (k + 1)).sum() for k, f in enumerate(features)).backward()
    torch.testing.assert_close(group.rows.grad, rows.grad, atol=1e-6, rtol=1e-6)


def test_serving_pooling_equals_embedding_bag_for_bags_of_any_size_and_scaling():
    """Without gradients every pooled dim group is summed by kernels.pool_bags; the training path
    (requires_grad) pools the same rows with embedding_bag and its per-id weights."""
    rng = np.random.default_rng(6)
    client = InProcessEmbeddingClient(EMB, glob(400))
    features = []
    for name in ("a", "b", "c"):  # sum, mean, sqrt
        lengths = rng.integers(0, 5, 60)
        samples = [rng.integers(0, 30, n).astype(np.uint64) for n in lengths]
        features.append(SparseFeature.from_lists(name, samples))
    assert all((f.lengths == 0).any() and (f.lengths > 1).any() for f in features)
    served = client.lookup(features)
    trained = client.lookup(features, requires_grad=True)
    assert not served.groups
    for f in features:
        torch.testing.assert_close(served[f.name], trained[f.name].detach(), rtol=1e-6, atol=1e-7)
        assert not served[f.name][torch.from_numpy(f.lengths == 0)].any()
        one = torch.from_numpy(f.lengths == 1)
        assert torch.equal(served[f.name][one], trained[f.name].detach()[one])  # a lone id's row, bit for bit
