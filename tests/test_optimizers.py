"""Sparse optimizer updates of EmbeddingStore in train mode, against torch.optim and numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.core.optimizers import SGD, Adagrad, Adam
from embedding_server.store.store import EmbeddingStore

pytestmark = pytest.mark.unit

DIM = 6
POOL = np.array([3, 17, 2**40 + 5, 99, 2**63 + 11, 1234567], np.uint64)


def make_store(
    optimizer: dict, dim: int = DIM, capacity: int = 64, weight_bound: float = 0.0, init: dict | None = None
) -> EmbeddingStore:
    emb = EmbeddingConfig.from_dict({"slots_config": {"f": {"dim": dim}}})
    glob = GlobalConfig.from_dict(
        {
            "embedding_parameter_server_config": {"capacity": capacity, "weight_bound": weight_bound},
            "sparse_optimizer": optimizer,
            "initialization": init or {"lower": -0.5, "upper": 0.5},
        }
    )
    return EmbeddingStore(emb, glob)


def tabs(n: int) -> np.ndarray:
    return np.zeros(n, np.uint16)


def random_pushes(seed: int, steps: int = 6, n: int = 10, dim: int = DIM, scale: float = 1.0):
    """Pushes of ``n`` ids drawn with replacement from POOL (so duplicates occur) and random grads."""
    rng = np.random.default_rng(seed)
    pushes = []
    for step in range(steps):
        pos = rng.integers(0, POOL.shape[0], n)
        if step == 0:
            pos[:2] = pos[0]  # at least one duplicate id in the first push
        grads = (rng.standard_normal((n, dim)) * scale).astype(np.float32)
        pushes.append((pos, grads))
    return pushes


def run_store(store: EmbeddingStore, pushes) -> np.ndarray:
    for pos, grads in pushes:
        store.apply_gradients(POOL[pos], tabs(pos.shape[0]), grads)
    return store.lookup(POOL, tabs(POOL.shape[0]))


def run_torch(initial: np.ndarray, pushes, make_opt) -> np.ndarray:
    """One torch parameter per row; rows not in a push keep grad None, which torch.optim skips,
    so each row sees exactly the steps in which it was pushed (sparse semantics)."""
    params = [torch.nn.Parameter(torch.from_numpy(initial[i].copy())) for i in range(initial.shape[0])]
    opt = make_opt(params)
    for pos, grads in pushes:
        for p in params:
            p.grad = None
        for k, i in enumerate(pos):
            g = torch.from_numpy(grads[k].copy())
            params[i].grad = g if params[i].grad is None else params[i].grad + g  # duplicates sum
        opt.step()
    return torch.stack([p.detach() for p in params]).numpy()


def assert_close(actual, expected):
    torch.testing.assert_close(
        torch.as_tensor(actual), torch.as_tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0
    )


def initial_rows(store: EmbeddingStore) -> np.ndarray:
    return store.lookup(POOL, tabs(POOL.shape[0])).copy()


# --------------------------------------------------------------------------- torch-equivalent cases


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sgd_matches_torch_sgd(weight_decay):
    store = make_store({"type": "sgd", "lr": 0.1, "weight_decay": weight_decay})
    init = initial_rows(store)
    pushes = random_pushes(0)
    got = run_store(store, pushes)
    want = run_torch(init, pushes, lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=weight_decay))
    assert not np.allclose(got, init)
    assert_close(got, want)


def test_adagrad_with_unit_momentum_matches_torch_adagrad():
    store = make_store(
        {"type": "adagrad", "lr": 0.05, "initial_accumulator_value": 0.1, "g_square_momentum": 1.0, "eps": 1e-10}
    )
    init = initial_rows(store)
    pushes = random_pushes(1)
    got = run_store(store, pushes)
    want = run_torch(init, pushes, lambda p: torch.optim.Adagrad(p, lr=0.05, initial_accumulator_value=0.1, eps=1e-10))
    assert not np.allclose(got, init)
    assert_close(got, want)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_matches_torch_adam(weight_decay):
    store = make_store({"type": "adam", "lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": weight_decay})
    init = initial_rows(store)
    pushes = random_pushes(2, steps=8)
    got = run_store(store, pushes)
    want = run_torch(
        init, pushes, lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    )
    assert not np.allclose(got, init)
    assert_close(got, want)


def test_adam_step_count_is_per_row():
    # A row pushed for the first time late in training gets Adam's first-step update
    # (bias correction with t=1): its move is exactly lr * sign(g) when eps is negligible.
    store = make_store({"type": "adam", "lr": 0.01, "eps": 1e-12})
    for _ in range(5):
        store.apply_gradients(POOL[:1], tabs(1), np.ones((1, DIM), np.float32))
    before = store.lookup(POOL[1:2], tabs(1)).copy()
    g = np.array([[1.0, -2.0, 0.5, -0.25, 3.0, -1.0]], np.float32)
    store.apply_gradients(POOL[1:2], tabs(1), g)
    after = store.lookup(POOL[1:2], tabs(1))
    assert_close(after - before, -0.01 * np.sign(g))


# --------------------------------------------------------------------------- numpy references


def adagrad_reference(initial: np.ndarray, pushes, lr, init_acc, wd, gsm, eps, vectorwise: bool) -> np.ndarray:
    w = initial.astype(np.float64).copy()
    acc = np.full((w.shape[0], 1 if vectorwise else w.shape[1]), init_acc, np.float64)
    for pos, grads in pushes:
        summed: dict[int, np.ndarray] = {}
        for k, i in enumerate(pos):
            summed[int(i)] = summed.get(int(i), 0.0) + grads[k].astype(np.float64)
        for i, g in summed.items():
            g = g + wd * w[i]
            if vectorwise:
                acc[i] = gsm * acc[i] + np.mean(g * g)
            else:
                acc[i] = gsm * acc[i] + g * g
            w[i] = w[i] - lr * g / (np.sqrt(acc[i]) + eps)
    return w


@pytest.mark.parametrize(
    "gsm, wd, vectorwise",
    [
        (0.9, 0.0, False),
        (0.5, 0.0, False),
        (1.0, 0.05, False),
        (0.8, 0.05, False),
        (1.0, 0.0, True),
        (0.7, 0.0, True),
        (0.9, 0.1, True),
    ],
)
def test_adagrad_variants_match_numpy_reference(gsm, wd, vectorwise):
    params = dict(lr=0.05, initial_accumulator_value=0.1, weight_decay=wd, g_square_momentum=gsm, eps=1e-6)
    store = make_store({"type": "adagrad", "vectorwise_shared": vectorwise, **params})
    init = initial_rows(store)
    pushes = random_pushes(3)
    got = run_store(store, pushes)
    want = adagrad_reference(init, pushes, 0.05, 0.1, wd, gsm, 1e-6, vectorwise)
    assert not np.allclose(got, init)
    assert_close(got, want)


def test_adagrad_variants_differ_from_plain_adagrad():
    # Guard that the reference cases above exercise different code: momentum, decay and the
    # shared accumulator each change the result.
    pushes = random_pushes(4)
    results = []
    for extra in ({}, {"g_square_momentum": 0.5}, {"weight_decay": 0.5}, {"vectorwise_shared": True}):
        results.append(run_store(make_store({"type": "adagrad", "lr": 0.05, **extra}), pushes))
    for other in results[1:]:
        assert np.abs(other - results[0]).max() > 1e-4


def test_adagrad_vectorwise_shared_keeps_one_accumulator_per_row():
    store = make_store({"type": "adagrad", "vectorwise_shared": True, "initial_accumulator_value": 0.25})
    store.apply_gradients(POOL[:2], tabs(2), np.full((2, DIM), 2.0, np.float32))
    (rows,) = list(store.rows())
    assert rows.state.shape == (2, 1)
    np.testing.assert_allclose(rows.state[:, 0], 0.25 + 4.0, rtol=1e-6)


# --------------------------------------------------------------------------- general update semantics


def test_gradients_of_duplicate_ids_are_summed():
    a = make_store({"type": "adagrad", "lr": 0.1})
    b = make_store({"type": "adagrad", "lr": 0.1})
    g1 = np.linspace(-1, 1, DIM, dtype=np.float32)
    g2 = np.linspace(2, 0, DIM, dtype=np.float32)
    a.apply_gradients(np.array([5, 7, 5], np.uint64), tabs(3), np.stack([g1, np.ones(DIM, np.float32), g2]))
    b.apply_gradients(np.array([5, 7], np.uint64), tabs(2), np.stack([g1 + g2, np.ones(DIM, np.float32)]))
    ids = np.array([5, 7], np.uint64)
    np.testing.assert_array_equal(a.lookup(ids, tabs(2)), b.lookup(ids, tabs(2)))


def test_gradient_for_unseen_id_inserts_initial_row_first():
    store = make_store({"type": "sgd", "lr": 0.5})
    fresh = make_store({"type": "sgd", "lr": 0.5})
    ids = np.array([11, 12], np.uint64)
    grads = np.arange(2 * DIM, dtype=np.float32).reshape(2, DIM) / 10
    store.apply_gradients(ids, tabs(2), grads)
    c = store.counters()
    assert (c["rows"], c["inserts"]) == (2, 2)
    expected = fresh.lookup(ids, tabs(2)) - 0.5 * grads
    assert_close(store.lookup(ids, tabs(2)), expected)


def test_gradient_leaves_other_rows_untouched():
    store = make_store({"type": "adam", "lr": 0.1})
    before = initial_rows(store)
    store.apply_gradients(POOL[2:3], tabs(1), np.ones((1, DIM), np.float32))
    after = store.lookup(POOL, tabs(POOL.shape[0]))
    changed = np.flatnonzero(np.any(after != before, axis=1))
    assert changed.tolist() == [2]


def test_weight_bound_clips_updated_weights():
    bound = 0.05
    store = make_store({"type": "sgd", "lr": 1.0}, weight_bound=bound, init={"lower": -0.01, "upper": 0.01})
    free = make_store({"type": "sgd", "lr": 1.0}, init={"lower": -0.01, "upper": 0.01})
    rng = np.random.default_rng(5)
    grads = rng.standard_normal((POOL.shape[0], DIM)).astype(np.float32)
    init = initial_rows(store)
    store.apply_gradients(POOL, tabs(POOL.shape[0]), grads)
    free.apply_gradients(POOL, tabs(POOL.shape[0]), grads)
    got = store.lookup(POOL, tabs(POOL.shape[0]))
    unclipped = free.lookup(POOL, tabs(POOL.shape[0]))
    assert np.abs(unclipped).max() > bound  # the update does leave the bound without clipping
    assert np.abs(got).max() <= np.float32(bound)
    assert (got == np.float32(bound)).any() and (got == np.float32(-bound)).any()
    assert_close(got, np.clip(init - grads, -bound, bound))


def test_weight_bound_applies_to_adam_and_adagrad():
    for opt in ({"type": "adam", "lr": 1.0}, {"type": "adagrad", "lr": 1.0}):
        store = make_store(opt, weight_bound=0.2)
        grads = np.full((POOL.shape[0], DIM), -3.0, np.float32)
        store.apply_gradients(POOL, tabs(POOL.shape[0]), grads)
        np.testing.assert_array_equal(store.lookup(POOL, tabs(POOL.shape[0])), np.float32(0.2))


def test_set_optimizer_changes_learning_rate_of_populated_store():
    store = make_store({"type": "sgd", "lr": 0.1})
    init = initial_rows(store)
    store.set_optimizer(SGD(lr=1.0))
    store.apply_gradients(POOL[:1], tabs(1), np.ones((1, DIM), np.float32))
    assert_close(store.lookup(POOL[:1], tabs(1)), init[:1] - 1.0)


def test_set_optimizer_refuses_other_state_layout_on_populated_store():
    from embedding_server.core.errors import InvalidRequestError

    store = make_store({"type": "adagrad"})
    initial_rows(store)
    with pytest.raises(InvalidRequestError, match="cannot switch the sparse optimizer from Adagrad to Adam"):
        store.set_optimizer(Adam())
    assert store.optimizer == Adagrad()
