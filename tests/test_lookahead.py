"""trainer.lookahead through TrainCtx.lookahead: staleness permits, ordering, reproducibility."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.optimizers import Adagrad
from trainer.batch import PyPersiaBatchData
from trainer.ctx import TrainCtx
from trainer.lookahead import Lookahead, PrefetchedBatch

pytestmark = pytest.mark.unit

EMB = {"slots_config": {"user": {"dim": 4}, "item": {"dim": 4}}}
DENSE_WIDTH = 3


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(DENSE_WIDTH + 8, 1)

    def forward(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(self.linear(torch.cat([dense, *sparse], 1)))


def batches(count: int, seed: int = 0, size: int = 16) -> list[PyPersiaBatchData]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        b = PyPersiaBatchData()
        b.add_dense_f32(rng.standard_normal((size, DENSE_WIDTH), dtype=np.float32))
        # a small vocabulary: consecutive batches share rows, so staleness changes what they read
        b.add_sparse(
            [(name, [rng.integers(0, 6, 1).astype(np.uint64) for _ in range(size)]) for name in ("user", "item")]
        )
        b.add_target(rng.integers(0, 2, (size, 1)).astype(np.float32))
        out.append(b)
    return out


def make_ctx() -> TrainCtx:
    model = Tiny()
    return TrainCtx(
        model=model,
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        sparse_optimizer=Adagrad(lr=0.5),
        embedding_config=EmbeddingConfig.from_dict(EMB),
    )


def train(ctx: TrainCtx, data, **lookahead) -> list[float]:
    losses = []
    source = ctx.lookahead(**lookahead).iterate(data) if lookahead else data
    for batch in source:
        output, target = ctx.forward(batch)
        loss = F.binary_cross_entropy(output, target)
        ctx.backward(loss)
        losses.append(loss.item())
    return losses


def table_rows(ctx: TrainCtx) -> np.ndarray:
    ids = np.arange(6, dtype=np.uint64)
    return np.stack([ctx.client.lookup_rows(ids, np.full(6, t, np.uint16), 4, insert=False) for t in range(2)])


def test_staleness_one_is_synchronous_training():
    data = batches(10)
    with make_ctx() as plain:
        expected = train(plain, data)
        expected_rows = table_rows(plain)
    with make_ctx() as ctx:
        engine = ctx.lookahead(staleness=1, buffer_size=4, num_workers=3)
        losses = []
        for k, batch in enumerate(engine.iterate(data)):
            output, target = ctx.forward(batch)
            # batch k holds the only permit: batch k + 1 cannot have started its lookup
            assert engine.stats()["train_started"] == k + 1
            loss = F.binary_cross_entropy(output, target)
            ctx.backward(loss)
            losses.append(loss.item())
        assert losses == expected
        np.testing.assert_array_equal(table_rows(ctx), expected_rows)
        stats = engine.stats()
    assert stats["max_outstanding"] == 1
    assert stats["released"] == stats["train_started"] == 10


@pytest.mark.parametrize("staleness", [2, 4])
def test_staleness_bounds_lookups_ahead(staleness, wait_until):
    data = batches(12)
    with make_ctx() as ctx:
        engine = ctx.lookahead(staleness=staleness, buffer_size=10, num_workers=4)
        for k, batch in enumerate(engine.iterate(data)):
            output, target = ctx.forward(batch)
            ahead = min(k + staleness, len(data))
            # once the earlier batches' pushes have landed (in the background), the lookups of
            # the next staleness - 1 batches run ahead of this step, never more
            wait_until(
                lambda n=ahead, k=k: engine.stats()["train_completed"] >= n and engine.stats()["released"] >= k,
                what=f"{ahead} lookups and {k} pushes",
            )
            assert engine.stats()["train_started"] == ahead
            assert engine.stats()["outstanding"] == ahead - k
            ctx.backward(F.binary_cross_entropy(output, target))
        stats = engine.stats()
    assert stats["max_outstanding"] == staleness
    assert stats["released"] == 12 and stats["outstanding"] == 0


def test_reproducible_lookahead_gives_identical_runs_and_staleness_changes_them():
    data = batches(16, seed=3)
    runs = []
    for _ in range(2):
        with make_ctx() as ctx:
            losses = train(ctx, data, staleness=4, buffer_size=6, num_workers=4, reproducible=True)
            runs.append((losses, table_rows(ctx), ctx.model.linear.weight.detach().clone()))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][2], runs[1][2])
    with make_ctx() as sync:
        synchronous = train(sync, data)
    # staleness 4 reads rows without up to 3 batches' gradients: the losses differ from synchronous
    assert synchronous[:1] == runs[0][0][:1] and synchronous != runs[0][0]


def test_reproducible_lookup_sees_exactly_the_gradients_staleness_allows():
    """Independent computation: lookup k of a reproducible run with staleness N reads the rows
    after the pushes of batches 0 .. k - N, replayed here step by step without the engine."""
    data = batches(9, seed=5)
    staleness = 3
    with make_ctx() as ctx:
        engine = ctx.lookahead(staleness=staleness, buffer_size=8, reproducible=True)
        seen = []
        for batch in engine.iterate(data):
            _, _, result = batch.result()
            seen.append({name: value.detach().clone() for name, value in result.embeddings.items()})
            output, target = ctx.forward(batch)
            ctx.backward(F.binary_cross_entropy(output, target))
    with make_ctx() as replay:
        looked: list = []

        def look_up_through(j: int) -> None:
            while len(looked) <= min(j, len(data) - 1):
                looked.append(replay.prepare(data[len(looked)], requires_grad=True))

        look_up_through(staleness - 1)
        for k, batch in enumerate(data):
            dense, sparse, result = looked[k]
            for name, value in result.embeddings.items():
                assert torch.equal(value.detach(), seen[k][name]), (k, name)
            output = replay.model(dense, sparse)
            target = torch.from_numpy(np.concatenate(batch.targets, axis=1))
            replay._pending = result
            replay.backward(F.binary_cross_entropy(output, target))
            look_up_through(k + staleness)  # lookup k + N comes right after push k


def test_forward_without_backward_gives_the_permit_back():
    data = batches(5)
    with make_ctx() as ctx:
        engine = ctx.lookahead(staleness=1)
        for batch in engine.iterate(data):
            ctx.forward(batch)  # evaluation-like use: no backward, the next forward must not block
        assert engine.stats()["train_started"] == 5


def test_failed_lookup_raises_in_forward_and_frees_its_permit():
    good = batches(3)
    bad = PyPersiaBatchData()
    bad.add_dense_f32(np.zeros((2, DENSE_WIDTH), np.float32))
    bad.add_sparse([("nope", [np.array([1], np.uint64)] * 2)])
    bad.add_target(np.zeros((2, 1), np.float32))
    with make_ctx() as ctx:
        engine = ctx.lookahead(staleness=1)
        items = engine.iterate([good[0], bad, good[1]])
        first = next(items)
        output, target = ctx.forward(first)
        ctx.backward(F.binary_cross_entropy(output, target))
        with pytest.raises(Exception, match="nope"):
            ctx.forward(next(items))
        third = next(items)
        assert isinstance(third, PrefetchedBatch) and third.batch is good[1]
        items.close()


def test_source_errors_reach_the_training_loop_after_earlier_batches():
    def source():
        yield from batches(2)
        raise ValueError("row 7 of part-3.parquet is malformed")

    with make_ctx() as ctx:
        seen = []
        with pytest.raises(ValueError, match="part-3.parquet"):
            for batch in ctx.lookahead(staleness=2).iterate(source()):
                seen.append(batch.index)
                output, target = ctx.forward(batch)
                ctx.backward(F.binary_cross_entropy(output, target))
    assert seen == [0, 1]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="embedding_staleness"):
        Lookahead(lambda *a: None, bool, staleness=0)
    with pytest.raises(ValueError, match="buffer_size"):
        Lookahead(lambda *a: None, bool, buffer_size=0)


def test_backward_returns_before_its_push_and_the_permit_comes_back_once_it_is_applied(push_control, wait_until):
    data = batches(3)
    with make_ctx() as ctx:
        pushes = push_control(ctx.client, hold=[0])
        engine = ctx.lookahead(staleness=1, buffer_size=4)
        items = engine.iterate(data)
        output, target = ctx.forward(next(items))
        ctx.backward(F.binary_cross_entropy(output, target))  # returns with its push held
        assert ctx.push_stats()["in_flight"] == 1 and pushes.applied == []
        assert engine.stats()["released"] == 0 and engine.stats()["train_started"] == 1
        # the loop asks for the next batch: with the push still held, batch 1 cannot be looked up
        taken: list = []
        getter = threading.Thread(target=lambda: taken.append(next(items)))
        getter.start()
        getter.join(0.3)  # bounded look for something that must not happen
        assert getter.is_alive() and engine.stats()["train_started"] == 1
        pushes.release(0)
        # staleness 1: the next lookup starts only after the push is applied
        wait_until(lambda: engine.stats()["train_started"] == 2, what="lookup 1 after push 0")
        getter.join()
        assert len(pushes.applied) == 1 and engine.stats()["released"] == 1
        output, target = ctx.forward(taken[0])
        ctx.backward(F.binary_cross_entropy(output, target))
        for batch in items:
            output, target = ctx.forward(batch)
            ctx.backward(F.binary_cross_entropy(output, target))
    assert ctx.push_stats() == {"submitted": 3, "done": 3, "failed": 0, "in_flight": 0, "waiting": 0}


def test_reproducible_pushes_are_applied_in_batch_order_behind_a_slow_one(push_control, wait_until):
    data = batches(8, seed=7)
    with make_ctx() as ctx:
        pushes = push_control(ctx.client, hold=[0])
        engine = ctx.lookahead(staleness=4, buffer_size=8, reproducible=True)
        results = []
        for k, batch in enumerate(engine.iterate(data)):
            results.append(batch.result()[2])
            output, target = ctx.forward(batch)
            ctx.backward(F.binary_cross_entropy(output, target))
            if k == 1:  # push 1 waits behind the held push 0 instead of overtaking it
                wait_until(lambda: ctx.push_stats()["waiting"] == 1, what="push 1 waiting for push 0")
                assert pushes.applied == []
                pushes.release(0)
        ctx.flush()
    assert [id(r) for r in pushes.applied] == [id(r) for r in results]
