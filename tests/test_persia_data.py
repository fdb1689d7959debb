"""persia.data: DataLoader over a StreamingDataset fed by real data-loader processes (training
ends cleanly, reproducible runs, staleness counters) and over an IterableDataset; a
StreamingDataset's registration with the service registry and its deregistration on close."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embedding_server.core.config import EmbeddingConfig
from persia import env
from persia.ctx import TrainCtx, eval_ctx
from persia.data import DataLoader, Dataloader, IterableDataset, StreamDataset, StreamingDataset
from persia.embedding.data import IDTypeFeature, IDTypeFeatureWithSingleID, Label, NonIDTypeFeature, PersiaBatch
from persia.embedding.optim import Adagrad

SLOTS = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 4}, "item": {"dim": 4}}})
BATCH = 32

LOADER = """
import os, sys
import numpy as np
from persia.ctx import DataCtx
from persia.embedding.data import IDTypeFeatureWithSingleID, Label, NonIDTypeFeature, PersiaBatch

count = int(sys.argv[1])
index = int(os.environ["REPLICA_INDEX"])
with DataCtx() as ctx:
    for seq in range(count):
        rng = np.random.default_rng([index, seq])
        user = rng.integers(0, 20, 32).astype(np.uint64)
        item = rng.integers(0, 20, 32).astype(np.uint64)
        dense = rng.standard_normal((32, 3)).astype(np.float32)
        dense[:, 0] = index * 1000 + seq  # who sent it, and its place in the stream
        label = ((user % 3 == 0) ^ (item % 4 == 0)).astype(np.float32).reshape(32, 1)
        ctx.send_data(PersiaBatch([IDTypeFeatureWithSingleID("user", user), IDTypeFeatureWithSingleID("item", item)],
                                  non_id_type_features=[NonIDTypeFeature(dense)], labels=[Label(label)]))
"""


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(2 + 8, 8)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, dense: torch.Tensor, sparse: list[torch.Tensor]) -> torch.Tensor:
        # column 0 is the sender's tag, not a feature
        return torch.sigmoid(self.out(torch.relu(self.hidden(torch.cat([dense[:, 1:], *sparse], 1)))))


@pytest.fixture()
def one_rank(monkeypatch):
    monkeypatch.setenv("PERSIA_NN_WORKER_ADDRS", "127.0.0.1:0")  # bind any port, no registry
    env.set_env(rank=0, world_size=1, local_rank=0)
    yield
    env.reload_env()


def start_loaders(tmp_path: Path, address: str, count: int, size: int = 2) -> list[subprocess.Popen]:
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    procs = []
    for index in range(size):
        environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        environ.update(REPLICA_INDEX=str(index), REPLICA_SIZE=str(size), PERSIA_NN_WORKER_ADDRS=address)
        procs.append(subprocess.Popen([sys.executable, str(script), str(count)], env=environ, stderr=subprocess.PIPE))
    return procs


def join(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()


def make_ctx(model: Model) -> TrainCtx:
    return TrainCtx(
        model=model,
        embedding_optimizer=Adagrad(lr=0.3),
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        mixed_precision=False,
        embedding_servers=[],
        slots_config=SLOTS,
    )


def train_streaming(tmp_path: Path, count: int, **loader_args) -> tuple[list[float], list[int], dict, Model]:
    dataset = StreamingDataset(buffer_size=4)
    procs = start_loaders(tmp_path, dataset.address, count)
    model = Model()
    losses, senders = [], []
    with make_ctx(model) as ctx:
        loader = DataLoader(dataset, timeout_ms=60_000, **loader_args)
        for batch in loader:
            output, labels = ctx.forward(batch)
            loss = torch.nn.functional.binary_cross_entropy(output, labels[0])
            ctx.backward(loss)
            losses.append(loss.item())
            senders.append(int(batch.non_id_arrays()[0][0, 0]))
    stats = loader.engine.stats()  # after the context's exit, which waits for every push
    join(procs)
    return losses, senders, stats, model


@pytest.mark.process
def test_training_on_two_loaders_streams_ends_when_both_finish(tmp_path, one_rank):
    losses, senders, stats, _ = train_streaming(tmp_path, 10, embedding_staleness=2, num_workers=3)
    assert sorted(senders) == sorted(i * 1000 + k for i in range(2) for k in range(10))
    assert stats["max_outstanding"] <= 2 and stats["released"] == 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # it trains


@pytest.mark.process
def test_reproducible_runs_give_identical_losses_and_weights(tmp_path, one_rank):
    runs = [train_streaming(tmp_path, 8, embedding_staleness=3, num_workers=4, reproducible=True) for _ in range(2)]
    (losses_a, senders_a, stats_a, model_a), (losses_b, senders_b, _, model_b) = runs
    # batches round-robin over the loaders, each loader's in sequence
    assert senders_a == senders_b == [i * 1000 + k for k in range(8) for i in range(2)]
    assert losses_a == losses_b
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    assert stats_a["max_outstanding"] == 3


@pytest.mark.process
@pytest.mark.parametrize("staleness", [1, 4])
def test_staleness_bounds_the_lookups_outstanding(tmp_path, one_rank, staleness, wait_until):
    dataset = StreamingDataset(buffer_size=8)
    procs = start_loaders(tmp_path, dataset.address, 6)
    with make_ctx(Model()) as ctx:
        loader = DataLoader(dataset, timeout_ms=60_000, embedding_staleness=staleness, num_workers=4)
        for k, batch in enumerate(loader):
            output, labels = ctx.forward(batch)
            ahead = min(k + staleness, 12)
            wait_until(lambda n=ahead: loader.engine.stats()["train_completed"] >= n, what=f"{ahead} lookups")
            assert loader.engine.stats()["train_started"] == ahead  # never more than staleness ahead
            ctx.backward(torch.nn.functional.binary_cross_entropy(output, labels[0]))
        assert loader.engine.stats()["max_outstanding"] == staleness
    join(procs)


def eval_batches(count: int, requires_grad: bool = False) -> list[PersiaBatch]:
    rng = np.random.default_rng(9)
    return [
        PersiaBatch(
            [
                IDTypeFeatureWithSingleID("user", rng.integers(0, 20, BATCH).astype(np.uint64)),
                IDTypeFeature("item", [rng.integers(0, 20, 1).astype(np.uint64) for _ in range(BATCH)]),
            ],
            non_id_type_features=[NonIDTypeFeature(rng.standard_normal((BATCH, 3)).astype(np.float32))],
            labels=[Label(rng.integers(0, 2, (BATCH, 1)).astype(np.float32))],
            requires_grad=requires_grad,
        )
        for _ in range(count)
    ]


@pytest.mark.unit
def test_closing_a_streaming_dataset_deregisters_its_address(rank0_registry, nn_worker_entries):
    dataset = StreamingDataset(buffer_size=2)
    assert nn_worker_entries(rank0_registry) == [dataset.address]
    dataset.close()
    assert nn_worker_entries(rank0_registry) == []
    dataset.close()  # closing again asks nothing more
    assert nn_worker_entries(rank0_registry) == []


@pytest.mark.unit
def test_closing_a_replaced_streaming_dataset_keeps_its_replacements_entry(rank0_registry, nn_worker_entries):
    old = StreamingDataset(buffer_size=2)
    new = StreamingDataset(buffer_size=2)  # the same rank again (a restarted worker)
    assert old.address != new.address
    assert nn_worker_entries(rank0_registry) == [new.address]
    old.close()
    assert nn_worker_entries(rank0_registry) == [new.address]
    new.close()
    assert nn_worker_entries(rank0_registry) == []


@pytest.mark.unit
def test_iterable_dataset_under_eval_ctx_scores_as_direct_lookups(one_rank):
    model = Model()
    batches = eval_batches(5)
    with make_ctx(model) as train:
        for batch in eval_batches(3, requires_grad=True):  # trained rows for the evaluation to read
            output, labels = train.forward(batch)
            train.backward(torch.nn.functional.binary_cross_entropy(output, labels[0]))
        with eval_ctx(model=model) as ctx:
            expected = [ctx.forward(ctx.get_embedding_from_data(b))[0] for b in batches]
            got = [ctx.forward(b)[0] for b in DataLoader(IterableDataset(batches), embedding_staleness=1)]
            old_names = [ctx.forward(b)[0] for b in Dataloader(IterableDataset(iter(batches)))]
    assert len(got) == 5
    for e, g, o in zip(expected, got, old_names):
        assert torch.equal(e, g) and torch.equal(e, o)


@pytest.mark.unit
def test_subclassed_iterable_dataset_and_errors(one_rank):
    class TestDataset(IterableDataset):
        def __init__(self):
            super().__init__(buffer_size=2)

        def __iter__(self):
            yield from eval_batches(2)
            yield "not a batch"

    with make_ctx(Model()) as train, eval_ctx(model=train.model) as ctx:
        seen = 0
        with pytest.raises(TypeError, match="TestDataset item 2: expected a PersiaBatch, got str"):
            for batch in DataLoader(TestDataset()):
                ctx.forward(batch)
                seen += 1
        assert seen == 2
    with pytest.raises(NotImplementedError, match="pass an iterable"):
        list(IterableDataset().batches(1.0))
    with pytest.raises(TypeError, match="StreamingDataset or IterableDataset"):
        DataLoader([1, 2])
    with pytest.raises(ValueError, match="embedding_staleness"):
        DataLoader(IterableDataset([]), embedding_staleness=0)
    with pytest.raises(RuntimeError, match="needs a current context"):
        list(DataLoader(IterableDataset([])))
    assert StreamDataset is StreamingDataset


@pytest.mark.unit
def test_a_stream_with_no_data_stops_after_timeout_ms(one_rank, caplog):
    dataset = StreamingDataset(buffer_size=2)
    with make_ctx(Model()):
        assert list(DataLoader(dataset, timeout_ms=300)) == []
    assert "get_batch time out" in caplog.text
    dataset.close()
