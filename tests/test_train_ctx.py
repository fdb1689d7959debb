"""persia.train_ctx: PERSIA's TrainCtx / eval_ctx on ctrserve's trainer (in-process tables)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from embedding_server.core.config import EmbeddingConfig as SlotsConfig
from embedding_server.core.errors import InvalidRequestError, ShardUnavailableError
from persia.ctx import PreprocessMode, TrainCtx, cnt_ctx, eval_ctx
from persia.embedding import EmbeddingConfig
from persia.embedding.data import IDTypeFeature, IDTypeFeatureWithSingleID, Label, NonIDTypeFeature, PersiaBatch
from persia.embedding.optim import SGD, Adagrad

pytestmark = pytest.mark.unit

SLOTS = SlotsConfig.from_dict({"slots_config": {"user": {"dim": 4}, "tags": {"dim": 4}}})


class PersiaModel(nn.Module):
    """PERSIA's signature: an int8 non-ID feature (1-D) and a float one (2-D)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(1 + 3 + 8, 1)

    def forward(self, non_id_type_tensors: list[Tensor], id_type_tensors: list[Tensor]) -> Tensor:
        parts = [non_id_type_tensors[0].float().unsqueeze(1), non_id_type_tensors[1]]
        parts.extend(id_type_tensors)
        x = torch.cat(parts, dim=1)
        return torch.sigmoid(self.linear(x))


def make_batch(rng: np.random.Generator, n: int = 16, requires_grad: bool = True) -> PersiaBatch:
    return PersiaBatch(
        [
            IDTypeFeatureWithSingleID("user", rng.integers(0, 50, n).astype(np.uint64)),
            IDTypeFeature("tags", [rng.integers(0, 20, rng.integers(0, 3)).astype(np.uint64) for _ in range(n)]),
        ],
        non_id_type_features=[
            NonIDTypeFeature(rng.integers(-3, 3, n).astype(np.int8), "age"),
            NonIDTypeFeature(rng.normal(size=(n, 3)).astype(np.float32), "x"),
        ],
        labels=[Label(rng.integers(0, 2, n).astype(np.float32), "click")],
        requires_grad=requires_grad,
    )


def make_ctx(model: nn.Module, **kwargs) -> TrainCtx:
    torch.manual_seed(0)
    kwargs.setdefault("embedding_optimizer", Adagrad(lr=0.1))
    return TrainCtx(
        model=model,
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        embedding_servers=[],
        slots_config=SLOTS,
        mixed_precision=False,
        **kwargs,
    )


def direct_scores(ctx: TrainCtx, model: nn.Module, batch: PersiaBatch) -> Tensor:
    """The independent computation: embeddings looked up from the client, the model called by hand."""
    by_name = {f.name: f for f in batch.sparse}
    looked = ctx.engine.client.lookup([by_name["user"], by_name["tags"]], requires_grad=False, insert=False)
    non_id = [torch.from_numpy(a.copy()) for a in batch.non_id_arrays()]
    with torch.no_grad():
        return model(non_id, [looked.embeddings["user"], looked.embeddings["tags"]])


def test_persia_signature_model_trains_and_labels_come_back_as_given():
    rng = np.random.default_rng(0)
    model = PersiaModel()
    with make_ctx(model) as ctx:
        assert cnt_ctx() is ctx
        batch = make_batch(rng)
        output, labels = ctx.forward(batch)
        assert isinstance(labels, list) and labels[0].shape == (16,)
        np.testing.assert_array_equal(labels[0].numpy(), batch.label_arrays()[0])
        torch.testing.assert_close(output.detach(), direct_scores(ctx, model, batch))
        before = ctx.get_embedding_size()
        losses = []
        for _ in range(60):
            output, labels = ctx.forward(batch)
            loss = nn.functional.binary_cross_entropy(output[:, 0], labels[0])
            scaled = ctx.backward(loss)
            torch.testing.assert_close(scaled, loss.detach())  # no mixed precision: scale 1
            losses.append(loss.item())
        assert losses[-1] < losses[0] * 0.8
        assert sum(before) > 0
    assert cnt_ctx() is None


def test_eval_ctx_shares_tables_inserts_nothing_and_matches_direct_scores():
    rng = np.random.default_rng(1)
    model = PersiaModel()
    with make_ctx(model) as ctx:
        for _ in range(3):
            output, labels = ctx.forward(make_batch(rng))
            ctx.backward(nn.functional.binary_cross_entropy(output[:, 0], labels[0]))
        rows = ctx.get_embedding_size()
        test = make_batch(np.random.default_rng(99), requires_grad=False)
        with eval_ctx(model=model) as ev:
            assert ev.preprocess_mode is PreprocessMode.EVAL and ev.engine.client is ctx.engine.client
            output, labels = ev.forward(ev.get_embedding_from_data(test))
            assert not output.requires_grad
            torch.testing.assert_close(output, direct_scores(ctx, model, test))
            output_b, _ = ev.forward(test.to_bytes())
            torch.testing.assert_close(output_b, output)
        assert ctx.get_embedding_size() == rows


def test_checkpoint_round_trip_and_servable_jit_model(tmp_path):
    rng = np.random.default_rng(2)
    model = PersiaModel()
    batch = make_batch(rng)
    with make_ctx(model) as ctx:
        for _ in range(3):
            output, labels = ctx.forward(batch)
            ctx.backward(nn.functional.binary_cross_entropy(output[:, 0], labels[0]))
        ctx.dump_checkpoint(str(tmp_path / "ckpt"), with_jit_model=True, blocking=False)
        ctx.wait_for_dump_embedding()
        expected = direct_scores(ctx, model, batch)
        jit = torch.jit.load(str(tmp_path / "ckpt" / "jit_dense.pt"))
        by_name = {f.name: f for f in batch.sparse}
        looked = ctx.engine.client.lookup([by_name["user"], by_name["tags"]], requires_grad=False, insert=False)
        non_id = [torch.from_numpy(a.copy()) for a in batch.non_id_arrays()]
        torch.testing.assert_close(jit(non_id, [looked.embeddings["user"], looked.embeddings["tags"]]), expected)
    assert {"dense.pt", "opt.pt", "jit_dense.pt"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    fresh_model = PersiaModel()
    with make_ctx(fresh_model) as ctx2:
        ctx2.load_checkpoint(str(tmp_path / "ckpt"))
        torch.testing.assert_close(direct_scores(ctx2, fresh_model, batch), expected)


def test_old_sparse_optimizer_keyword_gives_one_target_tensor():
    rng = np.random.default_rng(3)
    model = PersiaModel()
    with make_ctx(model, embedding_optimizer=None, sparse_optimizer=SGD(0.1)) as ctx:
        output, target = ctx.forward(make_batch(rng))
        assert isinstance(target, Tensor) and target.shape == (16, 1)


def test_training_refuses_a_batch_without_labels_and_needs_an_optimizer():
    model = PersiaModel()
    with pytest.raises(TypeError, match="embedding_optimizer"):
        make_ctx(model, embedding_optimizer=None)
    with make_ctx(model) as ctx:
        with pytest.raises(InvalidRequestError, match="target"):
            unlabeled = PersiaBatch(
                [
                    IDTypeFeatureWithSingleID("user", np.array([1], np.uint64)),
                    IDTypeFeature("tags", [np.array([2], np.uint64)]),
                ],
                requires_grad=False,
            )
            ctx.forward(unlabeled)


def test_embedding_config_sets_in_process_initialisation():
    model = PersiaModel()
    ctx = make_ctx(model, embedding_config=EmbeddingConfig(emb_initialization=(0.5, 0.6)))
    looked = ctx.engine.client.lookup(make_batch(np.random.default_rng(5)).sparse[:1], requires_grad=False)
    values = looked.embeddings["user"]
    assert float(values.min()) >= 0.5 and float(values.max()) <= 0.6


def table_rows(ctx: TrainCtx) -> list[np.ndarray]:
    """Every row the batches of :func:`make_batch` can touch (unseen ones read as zeros)."""
    client = ctx.engine.client
    return [
        client.lookup_rows(np.arange(n, dtype=np.uint64), np.full(n, SLOTS.table_of(name).index, np.uint16), 4, False)
        for name, n in (("user", 50), ("tags", 20))
    ]


def train_and_evaluate(push_control, evaluate: bool, **kwargs) -> tuple[list[np.ndarray], Tensor | None, dict]:
    """Train 5 batches, a background push of the last one held 0.1 s longer; then (``evaluate``)
    score a batch in an eval_ctx made before training, and leave. Returns the rows, the scores
    and the push counters as they were on leaving."""
    rng = np.random.default_rng(5)
    model = PersiaModel()
    scores = None
    with make_ctx(model, **kwargs) as ctx:
        background = ctx.engine.backward_buffer_size > 0
        pushes = push_control(ctx.engine.client, delay=0.005, hold=[4] if background else [])
        ev = eval_ctx(model=model)  # shares the tables; made before any push
        for _ in range(5):
            output, labels = ctx.forward(make_batch(rng))
            ctx.backward(nn.functional.binary_cross_entropy(output[:, 0], labels[0]))
        if background:
            threading.Timer(0.1, pushes.release, [4]).start()
        if evaluate:
            with ev:  # its lookups wait for the training context's pushes
                scores, _ = ev.forward(make_batch(np.random.default_rng(99), requires_grad=False))
    stats = ctx.engine.push_stats()
    return table_rows(ctx), scores, stats


@pytest.mark.parametrize("evaluate", [True, False])
def test_backward_sizes_are_honoured_and_eval_and_exit_wait_for_every_push(push_control, evaluate):
    inline_rows, inline_scores, inline_stats = train_and_evaluate(push_control, evaluate, backward_buffer_size=0)
    assert inline_stats["submitted"] == 0  # pushed in backward itself
    rows, scores, stats = train_and_evaluate(push_control, evaluate, backward_buffer_size=2, backward_workers_size=3)
    assert stats == {"submitted": 5, "done": 5, "failed": 0, "in_flight": 0, "waiting": 0}
    if evaluate:
        torch.testing.assert_close(scores, inline_scores, rtol=0, atol=0)
    for got, want in zip(rows, inline_rows):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="backward_workers_size"):
        make_ctx(PersiaModel(), backward_workers_size=0)


def test_a_failed_push_is_raised_on_leaving_the_context(push_control):
    rng = np.random.default_rng(6)
    with pytest.raises(ShardUnavailableError, match="gradient push 1"):
        with make_ctx(PersiaModel()) as ctx:
            push_control(ctx.engine.client, fail=[1])
            for _ in range(2):
                output, labels = ctx.forward(make_batch(rng))
                ctx.backward(nn.functional.binary_cross_entropy(output[:, 0], labels[0]))
    assert cnt_ctx() is None
