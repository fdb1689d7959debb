"""Batch lookups through InProcessEmbeddingClient: pooling, raw slots, hash stacking, gradient
pushes, request validation, independence from the shard count, and the fast pooling paths (one
id per bag, ``pool_bags`` when serving) against ``embedding_bag``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedding_server.core.batch import KeyedIds, SparseFeature
from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.errors import InvalidRequestError
from embedding_server.rpc.client import InProcessEmbeddingClient, RawEmbedding, _KeyGroup
from embedding_server.store.store import TableRows

pytestmark = pytest.mark.unit

EMB = EmbeddingConfig.from_dict(
    {
        "slots_config": {
            "user": {"dim": 4},
            "item": {"dim": 4, "mean_scaling": True},
            "tag": {"dim": 4, "sqrt_scaling": True},
            "hist": {"dim": 4, "embedding_summation": False, "sample_fixed_size": 3},
            "clicked": {"dim": 8},
            "candidate": {"dim": 8},
            "city": {"dim": 8, "hash_stack_config": {"hash_stack_rounds": 3, "embedding_size": 50}},
        },
        "feature_groups": {"items8": ["clicked", "candidate"]},
    }
)


def glob(capacity: int = 512, optimizer=None, mode: str = "train") -> GlobalConfig:
    return GlobalConfig.from_dict(
        {
            "common_config": {"job_type": mode},
            "embedding_parameter_server_config": {"capacity": capacity},
            "sparse_optimizer": optimizer or {"type": "sgd", "lr": 0.5},
            "initialization": {"lower": -1.0, "upper": 1.0},
        }
    )


def client(num_shards: int = 1, **kw) -> InProcessEmbeddingClient:
    return InProcessEmbeddingClient(EMB, glob(**kw), num_shards=num_shards)


def feat(name: str, samples) -> SparseFeature:
    return SparseFeature.from_lists(name, samples)


def row(c: InProcessEmbeddingClient, feature: str, i: int) -> np.ndarray:
    """One id's vector, read straight from the store (independent of the client's pooling)."""
    table = EMB.table_of(feature)
    (store,) = c.stores
    return store.lookup(np.array([i], np.uint64), np.array([table.index], np.uint16))[0].copy()


def rows_of(c: InProcessEmbeddingClient, feature: str, ids) -> np.ndarray:
    dim = EMB.table_of(feature).dim
    return np.stack([row(c, feature, i) for i in ids]) if len(ids) else np.zeros((0, dim), np.float32)


def all_rows(c: InProcessEmbeddingClient) -> dict[tuple[str, int], np.ndarray]:
    out = {}
    for store in c.stores:
        for r in store.rows():
            for i, w in zip(r.ids.tolist(), r.weights):
                out[(r.table.name, i)] = w.copy()
    return out


def close(actual: torch.Tensor, expected: np.ndarray) -> None:
    torch.testing.assert_close(actual, torch.from_numpy(np.asarray(expected, np.float32)), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- pooling


def test_pooled_sum_equals_sum_of_rows():
    c = client()
    samples = [[1, 2, 3], [2], [7, 7, 2**64 - 1]]
    out = c.lookup([feat("user", samples)])["user"]
    assert out.shape == (3, 4) and out.dtype == torch.float32
    expected = np.stack([rows_of(c, "user", s).sum(axis=0) for s in samples])
    close(out, expected)


def test_mean_scaling_divides_by_number_of_ids():
    c = client()
    samples = [[1, 2, 3], [4], [5, 5]]
    out = c.lookup([feat("item", samples)])["item"]
    close(out, np.stack([rows_of(c, "item", s).mean(axis=0) for s in samples]))


def test_sqrt_scaling_divides_by_sqrt_of_number_of_ids():
    c = client()
    samples = [[1, 2, 3, 4], [9], [5, 6]]
    out = c.lookup([feat("tag", samples)])["tag"]
    close(out, np.stack([rows_of(c, "tag", s).sum(axis=0) / np.sqrt(len(s)) for s in samples]))


def test_features_with_different_pooling_in_one_batch_are_independent():
    c = client()
    batch = [feat("user", [[1, 2], [3]]), feat("item", [[1, 2], [3]]), feat("tag", [[1, 2], [3]])]
    out = c.lookup(batch)
    u = [rows_of(c, "user", s) for s in ([1, 2], [3])]
    i = [rows_of(c, "item", s) for s in ([1, 2], [3])]
    t = [rows_of(c, "tag", s) for s in ([1, 2], [3])]
    close(out["user"], np.stack([x.sum(0) for x in u]))
    close(out["item"], np.stack([x.mean(0) for x in i]))
    close(out["tag"], np.stack([x.sum(0) / np.sqrt(x.shape[0]) for x in t]))
    # Same ids in different tables are different rows.
    assert not np.array_equal(row(c, "user", 1), row(c, "item", 1))


@pytest.mark.parametrize("feature", ["user", "item", "tag"])
def test_empty_samples_give_zero_vectors(feature):
    c = client()
    out = c.lookup([feat(feature, [[], [1, 2], []])])[feature]
    assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[2]) == 0
    assert torch.count_nonzero(out[1]) > 0


def test_batch_with_only_empty_samples_gives_zeros():
    c = client()
    out = c.lookup([feat("user", [[], []]), feat("hist", [[], []])])
    torch.testing.assert_close(out["user"], torch.zeros(2, 4))
    torch.testing.assert_close(out["hist"].values, torch.zeros(2, 3, 4))
    assert not out["hist"].mask.any()
    assert sum(s["rows"] for s in c.stats()) == 0


def test_grouped_features_share_rows():
    c = client()
    out = c.lookup([feat("clicked", [[5, 6]]), feat("candidate", [[5, 6]])])
    torch.testing.assert_close(out["clicked"], out["candidate"], atol=0, rtol=0)
    assert sum(s["rows"] for s in c.stats()) == 2


# --------------------------------------------------------------------------- raw slots


def test_raw_slot_gives_values_and_mask():
    c = client()
    samples = [[1, 2], [], [3, 4, 5]]
    out = c.lookup([feat("hist", samples)])["hist"]
    assert isinstance(out, RawEmbedding)
    assert out.values.shape == (3, 3, 4) and out.mask.shape == (3, 3)
    assert out.mask.dtype == torch.bool
    assert out.mask.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    expected = np.zeros((3, 3, 4), np.float32)
    for b, s in enumerate(samples):
        for p, i in enumerate(s):
            expected[b, p] = row(c, "hist", i)
    close(out.values, expected)


def test_raw_slot_truncates_ids_beyond_sample_fixed_size():
    c = client()
    out = c.lookup([feat("hist", [[1, 2, 3, 4, 5], [6]])])["hist"]
    assert out.values.shape == (2, 3, 4)
    assert out.mask.tolist() == [[True, True, True], [True, False, False]]
    close(out.values[0], rows_of(c, "hist", [1, 2, 3]))
    close(out.values[1, 0], row(c, "hist", 6))
    assert torch.count_nonzero(out.values[1, 1:]) == 0


def test_raw_slot_keeps_repeated_ids_in_place():
    c = client()
    out = c.lookup([feat("hist", [[4, 9, 4]])])["hist"]
    torch.testing.assert_close(out.values[0, 0], out.values[0, 2], atol=0, rtol=0)
    assert not torch.equal(out.values[0, 0], out.values[0, 1])


# --------------------------------------------------------------------------- hash stacking


def test_hash_stacking_sums_one_row_per_round():
    c = client()
    out = c.lookup([feat("city", [[123456789]])])["city"]
    (table_rows,) = [r for r in c.stores[0].rows() if r.table.name == "city"]
    # One raw id became exactly `rounds` stored ids, one in each round's id range.
    assert table_rows.ids.shape[0] == 3
    rounds = sorted(int(i) // 50 for i in table_rows.ids)
    assert rounds == [0, 1, 2]
    close(out[0], table_rows.weights.sum(axis=0))


def test_hash_stacking_maps_raw_ids_deterministically():
    c = client()
    out = c.lookup([feat("city", [[2**64 - 1], [77], [2**64 - 1], [77, 2**64 - 1]])])["city"]
    torch.testing.assert_close(out[0], out[2], atol=0, rtol=0)
    assert not torch.equal(out[0], out[1])
    close(out[3], (out[0] + out[1]).numpy())
    held = {int(i) for r in c.stores[0].rows() if r.table.name == "city" for i in r.ids}
    assert len(held) <= 6
    assert all(0 <= i < 150 for i in held)


def test_hash_stacked_ids_stay_within_embedding_size_per_round():
    c = client(capacity=1024)
    c.lookup([feat("city", [list(range(1000, 1200))])])
    held = np.array([int(i) for r in c.stores[0].rows() if r.table.name == "city" for i in r.ids])
    assert held.max() < 150
    # Every round's range is used (the hash spreads raw ids over it).
    for r in range(3):
        in_round = held[(held >= 50 * r) & (held < 50 * (r + 1))]
        assert in_round.shape[0] > 40


# --------------------------------------------------------------------------- gradients


def test_push_gradients_changes_exactly_the_looked_up_rows():
    c = client(optimizer={"type": "sgd", "lr": 0.5})
    # Rows that exist but are not part of the batch must not move.
    c.lookup([feat("user", [[100, 101]]), feat("item", [[100]]), feat("hist", [[100]])])
    before = all_rows(c)
    user = [[1, 2], [2]]
    item = [[3, 4], []]
    hist = [[5, 6, 7, 8], [5]]  # 8 is beyond sample_fixed_size: looked up, gets no gradient
    batch = [feat("user", user), feat("item", item), feat("hist", hist)]
    result = c.lookup(batch, requires_grad=True)
    weights_u = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]])
    weights_h = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) / 10
    loss = (
        (result["user"] * weights_u).sum()
        + (result["item"] * weights_u).sum()
        + (result["hist"].values * weights_h).sum()
    )
    loss.backward()
    looked_up = all_rows(c)  # the lookup itself inserted the new rows
    c.push_gradients(result)
    after = all_rows(c)

    lr = 0.5
    w = weights_u.numpy()
    h = weights_h.numpy()
    expected = dict(looked_up)
    expected[("user", 1)] = looked_up[("user", 1)] - lr * w[0]
    expected[("user", 2)] = looked_up[("user", 2)] - lr * (w[0] + w[1])
    expected[("item", 3)] = looked_up[("item", 3)] - lr * w[0] / 2
    expected[("item", 4)] = looked_up[("item", 4)] - lr * w[0] / 2
    expected[("hist", 5)] = looked_up[("hist", 5)] - lr * (h[0, 0] + h[1, 0])
    expected[("hist", 6)] = looked_up[("hist", 6)] - lr * h[0, 1]
    expected[("hist", 7)] = looked_up[("hist", 7)] - lr * h[0, 2]
    assert set(after) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(after[key], value, atol=1e-6, rtol=0, err_msg=str(key))
    changed = {k for k in after if not np.array_equal(after[k], looked_up[k])}
    assert changed == {("user", 1), ("user", 2), ("item", 3), ("item", 4), ("hist", 5), ("hist", 6), ("hist", 7)}
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)


def test_push_gradients_without_backward_changes_nothing():
    c = client(optimizer={"type": "sgd", "lr": 0.5})
    result = c.lookup([feat("user", [[1, 2]])], requires_grad=True)
    before = all_rows(c)
    c.push_gradients(result)
    after = all_rows(c)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_lookup_without_requires_grad_gives_no_grad_tensors():
    c = client()
    result = c.lookup([feat("user", [[1]])])
    assert not result["user"].requires_grad
    result = c.lookup([feat("user", [[1]])], requires_grad=True)
    assert result["user"].requires_grad


def test_gradients_of_grouped_features_sum_into_shared_row():
    c = client(optimizer={"type": "sgd", "lr": 1.0})
    start = row(c, "clicked", 5)
    result = c.lookup([feat("clicked", [[5]]), feat("candidate", [[5]])], requires_grad=True)
    (result["clicked"].sum() + 2 * result["candidate"].sum()).backward()
    c.push_gradients(result)
    np.testing.assert_allclose(row(c, "clicked", 5), start - 3.0, atol=1e-6, rtol=0)


def test_infer_mode_client_reads_zeros():
    c = client(mode="infer")
    out = c.lookup([feat("user", [[1, 2]]), feat("hist", [[3]])])
    torch.testing.assert_close(out["user"], torch.zeros(1, 4))
    torch.testing.assert_close(out["hist"].values, torch.zeros(1, 3, 4))
    assert out["hist"].mask.tolist() == [[True, False, False]]


def infer_copy(stores) -> InProcessEmbeddingClient:
    """An infer-mode client holding exactly the rows of ``stores`` (what serving would load)."""
    served = client(mode="infer")
    for store in stores:
        for rows in store.rows():
            served.stores[0].put(
                TableRows(rows.table, rows.ids, rows.weights, np.zeros((rows.ids.shape[0], 0), np.float32))
            )
    return served


def keys_of(stores) -> set[tuple[str, int]]:
    return {(rows.table.name, int(i)) for store in stores for rows in store.rows() for i in rows.ids}


@pytest.mark.parametrize("transport", ["in-process", "grpc", "local socket"])
def test_lookup_without_insert_answers_what_serving_answers_and_inserts_nothing(transport):
    """``insert=False`` (evaluation): a train-mode shard answers unseen ids with zeros, as an
    infer-mode one does, and keeps its rows as they are; through the in-process client, the
    gRPC request's ``no_insert`` flag and the local socket alike."""
    from embedding_server.rpc.remote import RemoteEmbeddingClient
    from embedding_server.rpc.service import start_server

    trained_batch = [
        feat("user", [[1], [2], [3]]),
        feat("item", [[1, 2], [3], []]),
        feat("hist", [[4, 5], [6], [7, 8, 9, 4]]),
        feat("clicked", [[1], [2, 3], []]),
        feat("city", [[11], [12], [13]]),
    ]
    # Known and never-seen ids mixed, with repeats and empty bags; the second batch takes the
    # one-id-per-bag fast path.
    eval_batches = [
        [
            feat("user", [[1], [100], [3, 101]]),
            feat("item", [[100, 2], [], [3, 3, 102]]),
            feat("hist", [[104, 5], [6, 106], []]),
            feat("clicked", [[1, 200], [201], [2]]),
            feat("city", [[11, 300], [301], [13]]),
        ],
        [feat("user", [[1], [100], [2], [101]])],
    ]
    server = None
    if transport == "in-process":
        c = client(num_shards=3)
        stores = c.stores
    else:
        server = start_server(
            EMB, glob(), port=0, workers=2, local_socket="auto" if transport == "local socket" else None
        )
        c = RemoteEmbeddingClient(EMB, [server.address], local_lookups=transport == "local socket")
        stores = [server.store]
    try:
        if server is not None:
            assert c.replica_states()[0][0]["transport"] == ("local" if transport == "local socket" else "grpc")
        c.lookup(trained_batch, requires_grad=True)  # training's lookups insert, as before
        trained = keys_of(stores)
        rows = sum(len(s) for s in stores)
        assert rows == len(trained) > 0
        served = infer_copy(stores)
        for batch in eval_batches:
            got = as_numpy(c.lookup(batch, insert=False))
            want = as_numpy(served.lookup(batch))
            assert got.keys() == want.keys()
            for name in got:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        assert keys_of(stores) == trained and sum(len(s) for s in stores) == rows
        user = np.full(2, EMB.table_of("user").index, np.uint16)
        unseen = c.lookup_rows(np.array([100, 1000], np.uint64), user, 4, insert=False)
        np.testing.assert_array_equal(unseen, np.zeros((2, 4), np.float32))
        assert keys_of(stores) == trained
        c.lookup(eval_batches[1])  # without insert=False the unseen ids become rows
        assert keys_of(stores) - trained == {("user", 100), ("user", 101)}
    finally:
        c.close()
        if server is not None:
            server.stop(0)


# --------------------------------------------------------------------------- invalid requests


def test_unknown_feature_is_refused():
    c = client()
    with pytest.raises(InvalidRequestError, match="unknown feature 'usr'; embedding_config.yml defines: user, item"):
        c.lookup([feat("usr", [[1]])])


def test_disagreeing_batch_sizes_are_refused():
    c = client()
    with pytest.raises(InvalidRequestError, match=r"features disagree on the batch size: \{'user': 2, 'item': 3\}"):
        c.lookup([feat("user", [[1], [2]]), feat("item", [[1], [2], [3]])])
    assert sum(s["rows"] for s in c.stats()) == 0


def test_repeated_feature_is_refused():
    c = client()
    with pytest.raises(InvalidRequestError, match="feature 'user' appears twice in the batch"):
        c.lookup([feat("user", [[1]]), feat("user", [[2]])])


def test_empty_batch_is_refused():
    c = client()
    with pytest.raises(InvalidRequestError, match="empty batch: no sparse features given"):
        c.lookup([])
    with pytest.raises(InvalidRequestError, match="empty batch: batch size is 0"):
        c.lookup([feat("user", [])])


def test_uint32_ids_are_refused():
    with pytest.raises(InvalidRequestError, match="feature 'user', sample 1: ids must be uint64, got uint32"):
        SparseFeature.from_lists("user", [np.array([1], np.uint64), np.array([2], np.uint32)])
    with pytest.raises(InvalidRequestError, match="feature 'user': ids must be a 1-D uint64 array, got uint32 array"):
        SparseFeature("user", np.array([1, 2], np.uint32), np.array([0, 2], np.int64))


def test_signed_int64_id_arrays_are_refused():
    with pytest.raises(InvalidRequestError, match="ids must be uint64, got int64"):
        SparseFeature.from_lists("user", [np.array([-1, 2], np.int64)])


@pytest.mark.parametrize("sample", [[1, -2], [-(2**63)], [2**64]])
def test_ids_outside_uint64_in_lists_are_refused(sample):
    with pytest.raises(InvalidRequestError, match=r"feature 'user', sample 0: ids must be in \[0, 2\*\*64\)"):
        SparseFeature.from_lists("user", [sample])


@pytest.mark.parametrize("sample", [[1.5], [True], ["3"]])
def test_non_integer_ids_in_lists_are_refused(sample):
    with pytest.raises(InvalidRequestError, match="feature 'user', sample 0: ids must be integers"):
        SparseFeature.from_lists("user", [sample])


@pytest.mark.parametrize(
    "offsets",
    [np.array([0, 3], np.int64), np.array([1, 2], np.int64), np.array([0, 2, 1, 2], np.int64)],
)
def test_offsets_that_do_not_describe_ids_are_refused(offsets):
    with pytest.raises(InvalidRequestError, match="offsets must rise from 0 to the number of ids"):
        SparseFeature("user", np.array([1, 2], np.uint64), offsets)


@pytest.mark.parametrize("offsets", [np.array([1, 2, 2], np.int64), np.array([0, 2, 1], np.int64)])
def test_keyed_ids_name_the_feature_whose_offsets_do_not_rise_from_zero(offsets):
    table = np.stack([np.array([0, 1, 2], np.int64), offsets])
    with pytest.raises(InvalidRequestError, match="feature 'user': offsets must rise from 0 to the number of ids"):
        KeyedIds(["a", "user"], np.arange(4, dtype=np.uint64), table)


def test_keyed_ids_refuse_offsets_that_describe_more_or_fewer_ids_than_given():
    table = np.array([[0, 1, 2], [0, 2, 3]], np.int64)
    with pytest.raises(InvalidRequestError, match="offsets describe 5 ids, but 4 ids were given"):
        KeyedIds(["a", "user"], np.arange(4, dtype=np.uint64), table)
    with pytest.raises(InvalidRequestError, match="offsets must be an int64 array"):
        KeyedIds(["a", "user"], np.arange(5, dtype=np.uint64), table.astype(np.int32))
    with pytest.raises(InvalidRequestError, match="appears twice"):
        KeyedIds(["a", "a"], np.arange(5, dtype=np.uint64), table)


def test_keyed_ids_hold_the_features_they_were_built_from_and_select_reorders_them():
    parts = [SparseFeature.from_lists("a", [[1, 2], [], [3]]), SparseFeature.from_lists("b", [[], [4], [5, 6, 7]])]
    keyed = KeyedIds.from_features(parts)
    assert keyed.ids.tolist() == [1, 2, 3, 4, 5, 6, 7] and keyed.counts.tolist() == [3, 4] and keyed.batch_size == 3
    for one, other in zip(keyed, parts):
        assert (one.name, one.ids.tolist(), one.offsets.tolist()) == (
            other.name,
            other.ids.tolist(),
            other.offsets.tolist(),
        )
        assert one.lengths.tolist() == other.lengths.tolist() and one.batch_size == other.batch_size
    swapped = keyed.select(["b", "a"])
    assert swapped.names == ("b", "a") and swapped.ids.tolist() == [4, 5, 6, 7, 1, 2, 3]
    assert [f.offsets.tolist() for f in swapped] == [parts[1].offsets.tolist(), parts[0].offsets.tolist()]
    assert keyed.select(["a", "b"]) is keyed
    with pytest.raises(InvalidRequestError, match="disagree on the batch size"):
        KeyedIds.from_features([parts[0], SparseFeature.from_lists("c", [[1]])])


def test_offsets_of_wrong_dtype_are_refused():
    with pytest.raises(InvalidRequestError, match="offsets must be a 1-D int64 array"):
        SparseFeature("user", np.array([1, 2], np.uint64), np.array([0, 2], np.int32))


def test_sparse_feature_from_lists_builds_csr_layout():
    f = SparseFeature.from_lists("user", [[3, 5], [], np.array([7], np.uint64)])
    assert f.batch_size == 3
    assert f.ids.dtype == np.uint64 and f.ids.tolist() == [3, 5, 7]
    assert f.offsets.tolist() == [0, 2, 2, 3]
    assert f.lengths.tolist() == [2, 0, 1]


def test_request_beyond_server_limit_is_refused_by_lookup():
    g = GlobalConfig.from_dict({"embedding_parameter_server_config": {"capacity": 512, "max_ids_per_request": 5}})
    c = InProcessEmbeddingClient(EMB, g)
    with pytest.raises(InvalidRequestError, match="request carries 6 ids; the limit is 5"):
        c.lookup([feat("user", [[1, 2, 3, 4, 5, 6]])])


# --------------------------------------------------------------------------- shard count independence


FEATURES = ["user", "item", "tag", "hist", "clicked", "candidate", "city"]
ids_strategy = st.one_of(st.integers(0, 30), st.integers(0, 2**64 - 1))


@st.composite
def batches(draw):
    batch_size = draw(st.integers(1, 4))
    names = draw(st.lists(st.sampled_from(FEATURES), min_size=1, max_size=len(FEATURES), unique=True))
    return [(name, [draw(st.lists(ids_strategy, max_size=5)) for _ in range(batch_size)]) for name in names]


def as_numpy(result) -> dict[str, np.ndarray]:
    out = {}
    for name, value in result.embeddings.items():
        if isinstance(value, RawEmbedding):
            out[name] = value.values.detach().numpy().copy()
            out[name + ".mask"] = value.mask.numpy().copy()
        else:
            out[name] = value.detach().numpy().copy()
    return out


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), grad_seed=st.integers(0, 2**31 - 1))
def test_one_and_three_shards_give_identical_answers(batch, grad_seed):
    clients = [client(1, optimizer={"type": "adagrad", "lr": 0.1}), client(3, optimizer={"type": "adagrad", "lr": 0.1})]
    answers = []
    for c in clients:
        features = [SparseFeature.from_lists(name, samples) for name, samples in batch]
        result = c.lookup(features, requires_grad=True)
        first = as_numpy(result)
        # A gradient step routed through the shards, then a second lookup of the same batch.
        gen = torch.Generator().manual_seed(grad_seed)
        loss = 0
        for name in sorted(result.embeddings):
            value = result.embeddings[name]
            tensor = value.values if isinstance(value, RawEmbedding) else value
            loss = loss + (tensor * torch.randn(tensor.shape, generator=gen)).sum()
        if loss.requires_grad:  # false when every sample of the batch is empty
            loss.backward()
        c.push_gradients(result)
        second = as_numpy(c.lookup(features))
        answers.append((first, second, sum(s["rows"] for s in c.stats())))
    (first1, second1, rows1), (first3, second3, rows3) = answers
    assert first1.keys() == first3.keys() == {n for n, _ in batch} | {"hist.mask" for n, _ in batch if n == "hist"}
    for name in first1:
        np.testing.assert_array_equal(first1[name], first3[name], err_msg=name)
        np.testing.assert_array_equal(second1[name], second3[name], err_msg=name)
    assert rows1 == rows3


def test_hash_stacked_mean_scaling_divides_by_number_of_raw_ids():
    cfg = EmbeddingConfig.from_dict(
        {
            "slots_config": {
                "plain": {"dim": 4, "hash_stack_config": {"hash_stack_rounds": 2, "embedding_size": 100}},
                "meaned": {
                    "dim": 4,
                    "mean_scaling": True,
                    "hash_stack_config": {"hash_stack_rounds": 2, "embedding_size": 100},
                },
            },
            "feature_groups": {"shared": ["plain", "meaned"]},
        }
    )
    c = InProcessEmbeddingClient(cfg, glob())
    samples = [[5, 9, 13], [7]]
    out = c.lookup([feat("plain", samples), feat("meaned", samples)])
    # Both features share one table, so the mean is the plain sum over 3 raw ids (not 6 hashed ids).
    torch.testing.assert_close(out["meaned"][0], out["plain"][0] / 3, atol=1e-7, rtol=0)
    torch.testing.assert_close(out["meaned"][1], out["plain"][1], atol=1e-7, rtol=0)


def test_batch_of_only_empty_samples_still_backpropagates():
    c = client()
    result = c.lookup([feat("user", [[], []])], requires_grad=True)
    assert result["user"].requires_grad
    result["user"].sum().backward()
    c.push_gradients(result)
    assert sum(s["rows"] for s in c.stats()) == 0


def test_bags_of_zero_or_one_id_pool_to_the_row_or_zeros_and_backpropagate_into_each_row():
    # Criteo-like features: one id per sample or none (a missing value), ids repeated across samples.
    c = client()
    samples = {"user": [[3], [], [5], [3]], "clicked": [[], [9], [9], []]}
    expected = {
        name: np.stack([row(c, name, s[0]) if s else np.zeros(EMB.table_of(name).dim, np.float32) for s in lists])
        for name, lists in samples.items()
    }
    result = c.lookup([feat(name, lists) for name, lists in samples.items()], requires_grad=True)
    for name in samples:
        close(result[name], expected[name])
    weights = {name: torch.arange(1.0, 1.0 + result[name].numel()).reshape(result[name].shape) for name in samples}
    sum((result[name] * weights[name]).sum() for name in samples).backward()
    grads = {
        key: grad
        for g in result.groups  # one group per dim (4 and 8)
        for key, grad in zip(zip(g.tables.tolist(), g.ids.tolist()), g.rows.grad.numpy())
    }
    for name, lists in samples.items():  # a row's gradient: the sum of the weights of the bags holding it
        table = EMB.table_of(name).index
        for i in {s[0] for s in lists if s}:
            want = sum(weights[name][k].numpy() for k, s in enumerate(lists) if s == [i])
            np.testing.assert_allclose(grads[(table, i)], want)


# --------------------------------------------------------------------------- fast paths: one id per bag, pool_bags
# The clients' one-id-per-bag pooling and serving pooling, checked against embedding_bag (the
# general path they short-cut): same vectors, same counters, same gradients.

# The tables: conftest's pooling_emb (three of dim 4 with sum, mean, sqrt pooling, one of dim 16).


def pooling_glob(capacity: int = 64, mode: str = "train") -> GlobalConfig:
    return GlobalConfig.from_dict(
        {
            "common_config": {"job_type": mode},
            "embedding_parameter_server_config": {"capacity": capacity},
            "sparse_optimizer": {"type": "adagrad", "lr": 0.1},
        }
    )


def one_id_batch(rng: np.random.Generator, batch_size: int, names=("a", "b", "c")) -> list[SparseFeature]:
    offsets = np.arange(batch_size + 1, dtype=np.int64)
    return [SparseFeature(n, rng.integers(0, 20, batch_size).astype(np.uint64), offsets) for n in names]


def reference_pooling(
    emb: EmbeddingConfig, group: _KeyGroup, features: list[SparseFeature], rows: torch.Tensor
) -> dict[str, torch.Tensor]:
    """embedding_bag over the distinct rows, as the general path pools (mean / sqrt weight 1)."""
    by_key = {(int(t), int(i)): k for k, (i, t) in enumerate(zip(group.ids, group.tables))}
    out = {}
    for f in features:
        t = emb.table_of(f.name).index
        idx = torch.tensor([by_key[(t, int(i))] for i in f.ids])
        out[f.name] = F.embedding_bag(idx, rows, torch.from_numpy(f.offsets[:-1]), mode="sum")
    return out


@pytest.mark.parametrize("num_shards", [1, 3])
def test_one_id_per_bag_gives_embedding_bag_values_bit_for_bit(num_shards, pooling_emb):
    rng = np.random.default_rng(2)
    client = InProcessEmbeddingClient(pooling_emb, pooling_glob(200), num_shards)
    features = one_id_batch(rng, 50)
    fast = client.lookup(features)
    assert not fast.groups  # nothing to push: no distinct-row tensor was built
    general = client.lookup(features, requires_grad=True)
    (group,) = general.groups
    expected = reference_pooling(pooling_emb, group, features, group.rows.detach())
    for f in features:
        assert torch.equal(fast[f.name], expected[f.name])
        assert torch.equal(general[f.name].detach(), expected[f.name])
        assert fast[f.name].shape == (50, 4) and fast[f.name].dtype == torch.float32


def test_one_id_per_bag_counts_distinct_keys_like_the_general_path(pooling_emb):
    rng = np.random.default_rng(3)
    fast, general = (
        InProcessEmbeddingClient(pooling_emb, pooling_glob(200)),
        InProcessEmbeddingClient(pooling_emb, pooling_glob(200), 2),
    )
    for _ in range(5):
        features = one_id_batch(rng, 40)
        fast.lookup(features)
        general.lookup(features)
    totals = [sum(s[k] for s in c.stats()) for c in (fast, general) for k in ("hits", "misses", "inserts")]
    assert totals[:3] == totals[3:]


def test_one_id_per_bag_gradients_match_embedding_bag(pooling_emb):
    """index_select's backward sums the gradients of repeated ids into their row, as
    embedding_bag's does; push_gradients then updates each row once."""
    rng = np.random.default_rng(4)
    client = InProcessEmbeddingClient(pooling_emb, pooling_glob(200))
    features = one_id_batch(rng, 30)
    result = client.lookup(features, requires_grad=True)
    (group,) = result.groups
    weights = torch.from_numpy(rng.standard_normal((30, 4)).astype(np.float32))
    sum((result[f.name] * weights * (k + 1)).sum() for k, f in enumerate(features)).backward()

    rows = group.rows.detach().clone().requires_grad_(True)
    expected = reference_pooling(pooling_emb, group, features, rows)
    sum((expected[f.name] * weights * (k + 1)).sum() for k, f in enumerate(features)).backward()
    torch.testing.assert_close(group.rows.grad, rows.grad, atol=1e-6, rtol=1e-6)


def test_mixed_bag_sizes_still_pool_with_embedding_bag(pooling_emb):
    client = InProcessEmbeddingClient(pooling_emb, pooling_glob(200))
    single = SparseFeature.from_lists("a", [[1], [2]])
    double = SparseFeature.from_lists("b", [[1, 2], [3]])  # mean of two ids in sample 0
    result = client.lookup([single, double])
    rows = client.lookup_rows(np.array([1, 2, 3], np.uint64), np.array([1, 1, 1], np.uint16), 4)
    torch.testing.assert_close(result["b"], torch.from_numpy(np.stack([(rows[0] + rows[1]) / 2, rows[2]])))


def test_non_pooled_single_ids_take_the_general_path():
    emb = EmbeddingConfig.from_dict(
        {"slots_config": {"r": {"dim": 4, "embedding_summation": False, "sample_fixed_size": 1}}}
    )
    client = InProcessEmbeddingClient(emb, pooling_glob(50))
    result = client.lookup([SparseFeature.from_lists("r", [[1], [2]])])
    assert result["r"].values.shape == (2, 1, 4) and result["r"].mask.all()


def zero_or_one_id_batch(rng: np.random.Generator, batch_size: int, names=("a", "b", "c")) -> list[SparseFeature]:
    """Zero or one id per sample (Criteo-style missing values)."""
    out = []
    for n in names:
        present = rng.random(batch_size) < 0.7
        offsets = np.zeros(batch_size + 1, np.int64)
        np.cumsum(present, out=offsets[1:])
        out.append(SparseFeature(n, rng.integers(0, 20, int(present.sum())).astype(np.uint64), offsets))
    return out


def test_bags_of_zero_or_one_id_match_embedding_bag_values_and_gradients(pooling_emb):
    rng = np.random.default_rng(5)
    client = InProcessEmbeddingClient(pooling_emb, pooling_glob(200))
    features = zero_or_one_id_batch(rng, 40)
    assert any((f.lengths == 0).any() for f in features) and any((f.lengths == 1).any() for f in features)
    result = client.lookup(features, requires_grad=True)
    (group,) = result.groups
    rows = group.rows.detach().clone().requires_grad_(True)
    expected = reference_pooling(pooling_emb, group, features, rows)
    for f in features:
        assert torch.equal(result[f.name].detach(), expected[f.name].detach())
        assert not result[f.name][torch.from_numpy(f.lengths == 0)].any()  # missing: zeros
    weights = torch.from_numpy(rng.standard_normal((40, 4)).astype(np.float32))
    sum((result[f.name] * weights * (k + 1)).sum() for k, f in enumerate(features)).backward()
    sum((expected[f.name] * weights * (k + 1)).sum() for k, f in enumerate(features)).backward()
    torch.testing.assert_close(group.rows.grad, rows.grad, atol=1e-6, rtol=1e-6)


def test_serving_pooling_equals_embedding_bag_for_bags_of_any_size_and_scaling(pooling_emb):
    """Without gradients every pooled dim group is summed by kernels.pool_bags; the training path
    (requires_grad) pools the same rows with embedding_bag and its per-id weights."""
    rng = np.random.default_rng(6)
    client = InProcessEmbeddingClient(pooling_emb, pooling_glob(400))
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


# --------------------------------------------------------------------------- combiners and shared tables

COMBINED = EmbeddingConfig.from_dict(
    {
        "slots_config": {
            "seq": {"dim": 4, "combiner": "tile", "tile_len": 3},
            "tags": {"dim": 4, "table": "seq", "combiner": "mean"},
            "words": {"dim": 4, "table": "seq", "combiner": "sqrtn"},
            "plain": {"dim": 4, "combiner": "sum"},
        }
    }
)


def stored(c: InProcessEmbeddingClient, table: str, ids) -> np.ndarray:
    """Vectors straight from the stores, by (table, id): independent of the client's pooling."""
    index = np.array([COMBINED.tables[table].index], np.uint16)
    out = []
    for i in ids:
        key = np.array([i], np.uint64)
        (owner,) = [s for s in c.stores if s.owns(key, index)[0]]
        out.append(owner.lookup(key, index)[0])
    return np.array(out, np.float32).reshape(len(ids), -1)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_combiners_tile_mean_sqrtn_and_sum_against_the_stored_rows(num_shards):
    c = InProcessEmbeddingClient(COMBINED, glob(), num_shards=num_shards)
    samples = [[1, 2, 3, 4, 5], [6], [], [7, 7]]
    features = [feat("seq", samples), feat("tags", samples), feat("words", samples), feat("plain", samples)]
    for requires_grad in (False, True):
        out = c.lookup(features, requires_grad=requires_grad).embeddings
        assert out["seq"].shape == (4, 12)
        for i, ids in enumerate(samples):
            kept = ids[:3]
            rows = stored(c, "seq", kept) if kept else np.zeros((0, 4), np.float32)
            tile = np.zeros((3, 4), np.float32)
            tile[: len(kept)] = rows
            np.testing.assert_array_equal(out["seq"][i].detach().numpy(), tile.reshape(-1))
            every = stored(c, "seq", ids) if ids else np.zeros((0, 4), np.float32)
            n = max(len(ids), 1)
            np.testing.assert_allclose(out["tags"][i].detach().numpy(), every.sum(0) / n, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(
                out["words"][i].detach().numpy(), every.sum(0) / np.sqrt(n), rtol=1e-6, atol=1e-7
            )
            plain = stored(c, "plain", ids).sum(0) if ids else np.zeros(4, np.float32)
            np.testing.assert_allclose(out["plain"][i].detach().numpy(), plain, rtol=1e-6, atol=1e-7)


def test_tile_gradients_reach_only_the_kept_ids_and_shared_tables_sum_their_features_gradients():
    c = InProcessEmbeddingClient(COMBINED, glob(optimizer={"type": "sgd", "lr": 1.0}))
    seq = feat("seq", [[1, 2, 3, 4], [2]])
    tags = feat("tags", [[2], [9]])  # the same table: id 2's rows are one row
    before = stored(c, "seq", [1, 2, 3, 4, 9])
    result = c.lookup([seq, tags], requires_grad=True)
    weights = torch.arange(24, dtype=torch.float32).reshape(2, 12)
    tag_weights = torch.full((2, 4), 0.5)
    ((result["seq"] * weights).sum() + (result["tags"] * tag_weights).sum()).backward()
    c.push_gradients(result)
    after = stored(c, "seq", [1, 2, 3, 4, 9])
    w = weights.numpy().reshape(2, 3, 4)
    expected = before.copy()
    expected[0] -= w[0, 0]  # id 1: sample 0, position 0
    expected[1] -= w[0, 1] + w[1, 0] + 0.5  # id 2: sample 0 pos 1, sample 1 pos 0, and tags (mean of one)
    expected[2] -= w[0, 2]  # id 3: position 2
    # id 4 is beyond tile_len: no gradient
    expected[4] -= 0.5  # id 9 through tags only
    np.testing.assert_allclose(after, expected, rtol=1e-6, atol=1e-6)
