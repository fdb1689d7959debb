"""TrainCtx: gradients against an independent computation, checkpoints, export, remote shards."""

from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.errors import InvalidRequestError, ShardUnavailableError
from embedding_server.core.model_spec import DenseModelSpec
from embedding_server.core.optimizers import SGD, Adagrad, Adam
from embedding_server.rpc.launcher import ServerGroup
from trainer.batch import PyPersiaBatchData
from trainer.ctx import TrainCtx
from trainer.export import export_dense, latest_version
from trainer.metrics import log_loss, roc_auc
from trainer.models import DLRM, DeepCTR

EMB = {
    "slots_config": {
        "user": {"dim": 4},
        "item": {"dim": 4, "sqrt_scaling": True},
        "history": {"dim": 4, "embedding_summation": False, "sample_fixed_size": 3},
    },
    "feature_groups": {"items": ["item", "history"]},
}
CONFIG = EmbeddingConfig.from_dict(EMB)
DENSE_WIDTH = 2


def make_batch(rng: np.random.Generator, size: int = 16, vocab: int = 30) -> PyPersiaBatchData:
    b = PyPersiaBatchData()
    b.add_dense_f32(rng.standard_normal((size, DENSE_WIDTH), dtype=np.float32))
    b.add_sparse(
        [
            (name, [rng.integers(0, vocab, rng.integers(lo, hi)).astype(np.uint64) for _ in range(size)])
            for name, lo, hi in (("user", 1, 2), ("item", 0, 4), ("history", 0, 6))
        ]
    )
    b.add_target(rng.integers(0, 2, (size, 1)).astype(np.float32))
    return b


def make_model(seed: int = 0) -> DeepCTR:
    torch.manual_seed(seed)
    return DeepCTR(DENSE_WIDTH, [4, 4, 4], hidden=(8,))


def train(ctx: TrainCtx, batches) -> list[float]:
    losses = []
    for b in batches:
        out, target = ctx.forward(b)
        loss = F.binary_cross_entropy(out, target)
        ctx.backward(loss)
        losses.append(loss.item())
    return losses


def rows_of(ctx: TrainCtx, batches) -> dict[str, np.ndarray]:
    """Current vectors of every id the batches use, per feature (keys sorted)."""
    out = {}
    for name in CONFIG.slots_config:
        ids = np.unique(np.concatenate([next(f.ids for f in b.sparse if f.name == name) for b in batches]))
        tables = np.full(ids.shape[0], CONFIG.table_of(name).index, np.uint16)
        out[name] = ctx.client.lookup_rows(ids, tables, 4)
    return out


def reference_embeddings(batch: PyPersiaBatchData, rows: dict[tuple[str, int], torch.Tensor]) -> list[torch.Tensor]:
    """The model's sparse inputs built sample by sample from per-id leaf tensors."""
    inputs = []
    for name in CONFIG.slots_config:
        slot = CONFIG.slot(name)
        table = CONFIG.table_of(name).name
        f = next(f for f in batch.sparse if f.name == name)
        per_sample = []
        for i in range(batch.batch_size):
            ids = f.ids[f.offsets[i] : f.offsets[i + 1]].tolist()
            vectors = [rows[(table, x)] for x in ids]
            if slot.embedding_summation:
                total = sum(vectors, torch.zeros(4))
                per_sample.append(total / (len(ids) ** 0.5) if slot.sqrt_scaling and ids else total)
            else:
                kept = vectors[: slot.sample_fixed_size]
                per_sample.append(torch.stack(kept + [torch.zeros(4)] * (slot.sample_fixed_size - len(kept))))
        inputs.append(torch.stack(per_sample))
    return inputs


@pytest.mark.unit
def test_one_step_matches_an_independent_sgd_computation():
    batch = make_batch(np.random.default_rng(3))
    model = make_model()
    reference_model = copy.deepcopy(model)
    with TrainCtx(
        model=model,
        dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        sparse_optimizer=SGD(lr=0.5),
        embedding_config=CONFIG,
    ) as ctx:
        before = rows_of(ctx, [batch])
        leaves = {}
        for name, vectors in before.items():
            ids = np.unique(next(f.ids for f in batch.sparse if f.name == name))
            for x, v in zip(ids.tolist(), vectors):
                leaves[(CONFIG.table_of(name).name, x)] = torch.tensor(v, requires_grad=True)
        expected_out = reference_model(torch.from_numpy(batch.dense_matrix()), reference_embeddings(batch, leaves))
        out, target = ctx.forward(batch)
        torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-6)
        ctx.backward(F.binary_cross_entropy(out, target))
        F.binary_cross_entropy(expected_out, target).backward()

        after = rows_of(ctx, [batch])
        for name, vectors in after.items():
            ids = np.unique(next(f.ids for f in batch.sparse if f.name == name)).tolist()
            for x, got in zip(ids, vectors):
                leaf = leaves[(CONFIG.table_of(name).name, x)]
                grad = leaf.grad if leaf.grad is not None else torch.zeros(4)
                np.testing.assert_allclose(got, (leaf - 0.5 * grad).detach().numpy(), rtol=0, atol=1e-6)
        for p, q in zip(model.parameters(), reference_model.parameters()):
            torch.testing.assert_close(p.detach(), (q - 0.1 * q.grad).detach(), rtol=0, atol=1e-6)
    # Some row must have moved, or the comparison above proves nothing.
    assert any(not np.allclose(before[n], after[n]) for n in before)


def _ctx(model, sparse=None, **kwargs) -> TrainCtx:
    return TrainCtx(
        model=model,
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        sparse_optimizer=sparse or Adam(lr=0.05),
        embedding_config=CONFIG,
        **kwargs,
    )


@pytest.mark.unit
def test_resuming_from_a_checkpoint_gives_identical_parameters(tmp_path):
    rng = np.random.default_rng(7)
    batches = [make_batch(rng) for _ in range(6)]
    with _ctx(make_model()) as ctx:
        train(ctx, batches[:3])
        ctx.dump_checkpoint(tmp_path / "ckpt")
        ctx.dump_checkpoint(tmp_path / "ckpt")  # dumping to the same directory again works
        train(ctx, batches[3:])
        expected_rows, expected_state = rows_of(ctx, batches), copy.deepcopy(ctx.model.state_dict())
    # A different initial model and shard count: everything must come from the checkpoint.
    with _ctx(make_model(seed=99), num_shards=3) as resumed:
        resumed.load_checkpoint(tmp_path / "ckpt")
        assert resumed.step == 3
        train(resumed, batches[3:])
        for key, value in resumed.model.state_dict().items():
            assert torch.equal(value, expected_state[key]), key
        for name, rows in rows_of(resumed, batches).items():
            np.testing.assert_array_equal(rows, expected_rows[name])


def sparse_rows(ctx: TrainCtx) -> dict[tuple[str, int], tuple[bytes, bytes]]:
    """Every row the context's in-process tables hold: (table, id) -> (weight, optimizer state) bytes."""
    return {
        (rows.table.name, int(i)): (rows.weights[k].tobytes(), rows.state[k].tobytes())
        for store in ctx.client.stores
        for rows in store.rows()
        for k, i in enumerate(rows.ids)
    }


def batch_keys(batches) -> set[tuple[str, int]]:
    return {(CONFIG.table_of(f.name).name, int(i)) for b in batches for f in b.sparse for i in f.ids}


@pytest.mark.unit
def test_evaluation_inserts_no_rows_and_scores_like_the_served_model(tmp_path):
    """Evaluating on held-out ids changes no table: the checkpoint holds exactly the trained ids,
    and the scores are those of an infer-mode store loaded from it (zeros for unseen ids)."""
    from embedding_server.core.config import GlobalConfig
    from embedding_server.rpc.client import InProcessEmbeddingClient, RawEmbedding
    from trainer.job import evaluate

    rng = np.random.default_rng(17)
    train_batches = [make_batch(rng) for _ in range(3)]
    held_out = [make_batch(rng, vocab=30) for _ in range(2)] + [make_batch(rng, vocab=1000)]
    for b in held_out[2:]:  # ids far outside the trained vocabulary, next to trained ones
        for f in b.sparse:
            f.ids[::2] += np.uint64(5000)
    with _ctx(make_model(), num_shards=2) as ctx:
        train(ctx, train_batches)
        trained = sparse_rows(ctx)
        assert set(trained) == batch_keys(train_batches)
        assert batch_keys(held_out) - set(trained), "the held-out batches must hold ids never trained"
        figures = evaluate(ctx, held_out)
        scores = [ctx.predict(b) for b in held_out]
        assert sparse_rows(ctx) == trained  # not one row inserted, evicted or changed
        assert sum(s["rows"] for s in ctx.client.stats()) == len(trained)
        ctx.dump_checkpoint(tmp_path / "ckpt")
        model = ctx.model
    served = InProcessEmbeddingClient(CONFIG, GlobalConfig.from_dict({"common_config": {"job_type": "infer"}}))
    served.load(str(tmp_path / "ckpt/sparse"))
    assert {(r.table.name, int(i)) for s in served.stores for r in s.rows() for i in r.ids} == set(trained)
    model.eval()
    with torch.inference_mode():
        for batch, got in zip(held_out, scores):
            lookup = served.lookup([next(f for f in batch.sparse if f.name == n) for n in CONFIG.slots_config])
            sparse = [
                lookup[n].values if isinstance(lookup[n], RawEmbedding) else lookup[n] for n in CONFIG.slots_config
            ]
            want = model(torch.from_numpy(batch.dense_matrix()), sparse)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    labels = np.concatenate([b.targets[0][:, 0] for b in held_out])
    all_scores = torch.cat(scores).numpy()[:, 0]
    assert {k: figures[k] for k in ("auc", "loss", "rows", "gauc")} == {
        "auc": roc_auc(labels, all_scores),
        "loss": log_loss(labels, all_scores),
        "rows": labels.shape[0],
        "gauc": None,
    }


def dense_state(ctx: TrainCtx) -> dict:
    return {"model": ctx.model.state_dict(), "optimizer": ctx.dense_optimizer.state_dict(), "step": ctx.step}


def assert_same_dense_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)


@pytest.mark.process  # the real Ceph cluster (ceph_s3) runs as child processes
@pytest.mark.ceph
def test_checkpoint_round_trips_through_s3_exactly(ceph_s3, tmp_path, monkeypatch):
    """dump_checkpoint("s3://bucket/prefix") writes every part through the storage layer (nothing
    local), and a fresh context (other initial model, other shard count) loads it back exactly."""
    from embedding_server.storage.urls import open_storage

    for name, value in ceph_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    url = f"s3://{ceph_s3.bucket}/test_ctx/{tmp_path.name}/ckpt"
    rng = np.random.default_rng(23)
    batches = [make_batch(rng) for _ in range(4)]
    with _ctx(make_model(), num_shards=2) as ctx:
        train(ctx, batches)
        ctx.dump_checkpoint(url)
        expected_rows, expected_dense = sparse_rows(ctx), copy.deepcopy(dense_state(ctx))
    assert list(tmp_path.iterdir()) == []  # no local folder named after the URL
    storage = open_storage(url)
    assert storage.list_dir() == ["dense.pt", "sparse"]
    assert "manifest.json" in storage.list_dir("sparse")
    with _ctx(make_model(seed=5), num_shards=3) as resumed:
        resumed.load_checkpoint(url)
        assert_same_dense_state(dense_state(resumed), expected_dense)
        assert sparse_rows(resumed) == expected_rows
        assert len(expected_rows) == len(batch_keys(batches))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
@pytest.mark.parametrize(
    "url, message",
    [
        ("hdfs://namenode:9000/models/ckpt", "cannot connect to HDFS: .*Hadoop client"),
        ("gs://bucket/ckpt", "scheme 'gs://' is not supported"),
    ],
)
def test_checkpoint_urls_without_a_usable_storage_fail_clearly_and_create_nothing_locally(
    tmp_path, monkeypatch, url, message
):
    """No HDFS client here: dump and load fail with the storage layer's clear error, and
    nothing (least of all a folder named 'hdfs:') appears in the working directory."""
    from embedding_server.storage.base import StorageError

    monkeypatch.chdir(tmp_path)
    with _ctx(make_model()) as ctx:
        train(ctx, [make_batch(np.random.default_rng(2))])
        with pytest.raises(StorageError, match=message):
            ctx.dump_checkpoint(url)
        assert list(tmp_path.iterdir()) == []  # the old code made ./hdfs:/namenode:9000/models/ckpt
        with pytest.raises(StorageError, match=message):
            ctx.load_checkpoint(url)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_training_on_a_learnable_signal_raises_auc():
    rng = np.random.default_rng(11)
    batches = []
    for _ in range(60):
        b = make_batch(rng, size=64)
        user = b.sparse[0].ids
        b.data.targets = [((user % 3) == 0).astype(np.float32).reshape(-1, 1)]
        batches.append(b)
    model = make_model()
    with _ctx(model, sparse=Adagrad(lr=0.1)) as ctx:
        losses = train(ctx, batches)
        scores = np.concatenate([ctx.predict(b).numpy() for b in batches[-8:]])
    labels = np.concatenate([b.targets[0] for b in batches[-8:]])
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1
    assert roc_auc(labels, scores) > 0.9
    assert log_loss(labels, scores) < 0.5


@pytest.mark.unit
def test_forward_refuses_batches_the_model_cannot_take():
    with _ctx(make_model()) as ctx:
        no_target = make_batch(np.random.default_rng(0))
        no_target.data.targets = []
        with pytest.raises(InvalidRequestError, match="needs a target"):
            ctx.forward(no_target)
        partial = PyPersiaBatchData()
        partial.add_sparse([("user", [[1]])])
        partial.add_target(np.zeros((1, 1), np.float32))
        with pytest.raises(InvalidRequestError, match=r"lacks sparse features .*'item'"):
            ctx.forward(partial)
        unknown = make_batch(np.random.default_rng(0))
        unknown.add_sparse([("ghost", [[1]] * unknown.batch_size)])
        with pytest.raises(InvalidRequestError, match="unknown feature 'ghost'"):
            ctx.forward(unknown)
        with pytest.raises(RuntimeError, match="needs a forward"):
            ctx.backward(torch.zeros(()))


@pytest.mark.unit
def test_mixed_precision_is_off_on_the_cpu():
    with _ctx(make_model(), mixed_precision=True) as ctx:
        assert ctx.device.type == "cpu" and not ctx.mixed_precision
        train(ctx, [make_batch(np.random.default_rng(0))])


@pytest.mark.unit
def test_data_parallel_without_shared_servers_is_refused():
    with pytest.raises(ValueError, match="needs embedding servers"):
        _ctx(make_model(), distributed=True)


@pytest.mark.unit
def test_export_writes_torchscript_and_spec_that_reproduce_the_model(tmp_path):
    batch = make_batch(np.random.default_rng(5))
    root = str(tmp_path / "root")
    assert latest_version(root) == 0
    with _ctx(make_model()) as ctx:
        train(ctx, [batch])
        v1 = export_dense(ctx.model, CONFIG, root, step=ctx.step, dense_width=DENSE_WIDTH)
        v2 = export_dense(ctx.model, CONFIG, root, step=ctx.step, dense_width=DENSE_WIDTH, sparse_watermark={"0": 12})
        with pytest.raises(ValueError, match="not above the newest"):
            export_dense(ctx.model, CONFIG, root, step=ctx.step, dense_width=DENSE_WIDTH, version=2)
        dense, sparse, _ = ctx.prepare(batch, requires_grad=False)
        expected = ctx.model(dense, sparse)
    assert (v1, v2) == (1, 2) and latest_version(root) == 2
    spec = DenseModelSpec.from_json((tmp_path / "root/dense/v00000002/model.json").read_text())
    assert (spec.version, spec.step, spec.dense_width, spec.sparse_watermark) == (2, 1, DENSE_WIDTH, {"0": 12})
    assert [(f.name, f.dim, f.pooled, f.sample_fixed_size) for f in spec.features] == [
        ("user", 4, True, 0),
        ("item", 4, True, 0),
        ("history", 4, False, 3),
    ]
    assert EmbeddingConfig.from_dict(spec.embedding_config).fingerprint() == CONFIG.fingerprint()
    scripted = torch.jit.load(str(tmp_path / "root/dense/v00000002/model.pt"))
    torch.testing.assert_close(scripted(dense, sparse), expected, rtol=0, atol=0)


@pytest.mark.unit
def test_an_incomplete_version_without_its_json_is_not_counted(tmp_path):
    (tmp_path / "dense/v00000007").mkdir(parents=True)
    (tmp_path / "dense/v00000007/model.pt").write_bytes(b"partial")
    assert latest_version(str(tmp_path)) == 0


@pytest.mark.unit
def test_model_spec_rejects_malformed_json():
    from embedding_server.core.errors import ConfigError

    good = json.loads(DenseModelSpec.for_config(CONFIG, version=1, step=0, dense_width=2).to_json())
    for bad, message in [
        ({**good, "format_version": 9}, "format_version"),
        ({**good, "extra": 1}, "unknown keys"),
        ({**good, "version": -1}, "non-negative"),
        ({**good, "features": [{"name": "x"}]}, "dim"),
    ]:
        with pytest.raises(ConfigError, match=message):
            DenseModelSpec.from_json(json.dumps(bad))
    with pytest.raises(ConfigError, match="not valid JSON"):
        DenseModelSpec.from_json("{")


@pytest.mark.unit
@pytest.mark.parametrize(
    "model", [DLRM(DENSE_WIDTH, 3, 4, bottom_mlp=(8,), top_mlp=(8,)), DeepCTR(DENSE_WIDTH, [4, 4, 4])]
)
def test_ready_models_script_and_match_eager(model):
    dense = torch.randn(5, DENSE_WIDTH)
    sparse = [torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 3, 4)]
    scripted = torch.jit.script(model)
    out = model(dense, sparse)
    assert out.shape == (5, 1) and bool(((out > 0) & (out < 1)).all())
    torch.testing.assert_close(scripted(dense, sparse), out)


@pytest.mark.unit
def test_auc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 20, 200).astype(float)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(labels, scores) == pytest.approx(pairwise, abs=1e-12)
    assert np.isnan(roc_auc(np.ones(3), np.arange(3)))


@pytest.mark.process
def test_remote_shards_train_exactly_like_the_in_process_store(tmp_path):
    (tmp_path / "emb.yml").write_text(yaml.safe_dump(EMB, sort_keys=False))
    (tmp_path / "global.yml").write_text(yaml.safe_dump({"embedding_parameter_server_config": {"capacity": 10_000}}))
    rng = np.random.default_rng(21)
    batches = [make_batch(rng) for _ in range(4)]
    with _ctx(make_model(), num_shards=2) as local:
        local_losses = train(local, batches)
        local_rows = rows_of(local, batches)
    with ServerGroup.start(
        tmp_path / "emb.yml", tmp_path / "global.yml", num_shards=2, workdir=tmp_path / "srv"
    ) as group:
        with _ctx(make_model(), embedding_servers=group.addresses) as remote:
            remote_losses = train(remote, batches)
            remote_rows = rows_of(remote, batches)
            stats = remote.client.stats()
    assert remote_losses == local_losses
    for name in local_rows:
        np.testing.assert_array_equal(remote_rows[name], local_rows[name])
    assert sum(s["rows"] for s in stats) > 0


def train_ahead(ctx: TrainCtx, batches, **lookahead) -> list[float]:
    """:func:`train` through ``ctx.lookahead(**lookahead)`` (plain :func:`train` without keywords)."""
    return train(ctx, ctx.lookahead(**lookahead).iterate(batches) if lookahead else batches)


@pytest.mark.unit
@pytest.mark.parametrize("lookahead", [{}, {"staleness": 3, "reproducible": True, "buffer_size": 4}])
def test_background_pushes_train_exactly_like_pushes_made_in_backward(push_control, lookahead):
    """Slow background pushes change nothing: plain batches wait for them before their lookup,
    a reproducible lookahead applies them in order at the same points."""
    rng = np.random.default_rng(11)
    batches = [make_batch(rng, vocab=12) for _ in range(8)]
    with _ctx(make_model(), backward_buffer_size=0) as inline:
        expected = train_ahead(inline, batches, **lookahead), sparse_rows(inline), inline.model.state_dict()
    with _ctx(make_model(), backward_buffer_size=3, backward_workers_size=4) as ctx:
        push_control(ctx.client, delay=0.01)
        losses = train_ahead(ctx, batches, **lookahead)
        got = losses, sparse_rows(ctx), ctx.model.state_dict()
        assert ctx.push_stats()["submitted"] == len(batches)
    assert got[0] == expected[0]
    assert got[1] == expected[1]
    for key, value in expected[2].items():
        assert torch.equal(got[2][key], value), key


@pytest.mark.unit
def test_checkpoint_and_exit_hold_every_queued_push(tmp_path, push_control):
    rng = np.random.default_rng(12)
    batches = [make_batch(rng, vocab=12) for _ in range(6)]
    ahead = {"staleness": 4, "reproducible": True, "buffer_size": 4}
    with _ctx(make_model(), backward_buffer_size=0) as inline:
        train_ahead(inline, batches, **ahead)
        expected = sparse_rows(inline)
    with _ctx(make_model()) as ctx:
        pushes = push_control(ctx.client, hold=[len(batches) - 1])
        train_ahead(ctx, batches, **ahead)
        assert ctx.push_stats()["in_flight"] >= 1  # the last push is still held
        threading.Timer(0.1, pushes.release, [len(batches) - 1]).start()  # a slow shard answers
        ctx.dump_checkpoint(tmp_path / "ckpt")
    with _ctx(make_model()) as loaded:
        loaded.load_checkpoint(tmp_path / "ckpt")
        assert sparse_rows(loaded) == expected
    with _ctx(make_model()) as ctx:
        pushes = push_control(ctx.client, hold=[len(batches) - 1])
        train_ahead(ctx, batches, **ahead)
        threading.Timer(0.1, pushes.release, [len(batches) - 1]).start()
    assert ctx.push_stats()["in_flight"] == 0 and len(pushes.applied) == len(batches)
    assert sparse_rows(ctx) == expected  # leaving the context waited for the held push


@pytest.mark.unit
def test_a_failed_push_is_raised_by_the_next_forward_backward_or_exit(push_control, wait_until):
    rng = np.random.default_rng(13)
    batches = [make_batch(rng) for _ in range(6)]

    def step(k: int) -> None:
        output, target = ctx.forward(batches[k])
        ctx.backward(F.binary_cross_entropy(output, target))

    with pytest.raises(ShardUnavailableError, match="gradient push 5") as at_exit:
        with _ctx(make_model()) as ctx:
            pushes = push_control(ctx.client, hold=[3], fail=[1, 3, 5])
            step(0)
            step(1)
            wait_until(lambda: ctx.push_stats()["failed"] == 1, what="push 1 failing")
            with pytest.raises(ShardUnavailableError, match="gradient push 1") as in_forward:
                ctx.forward(batches[2])
            assert any("training step 1" in note for note in in_forward.value.__notes__)
            step(2)  # raised once: training goes on
            step(3)  # its push is held, then fails while the next lookup waits for it
            threading.Timer(0.1, pushes.release, [3]).start()
            output, target = ctx.forward(batches[4])
            loss = F.binary_cross_entropy(output, target)
            with pytest.raises(ShardUnavailableError, match="gradient push 3"):
                ctx.backward(loss)
            ctx.backward(loss)  # raised before doing anything: the step can be taken again
            step(5)
    assert any("training step 5" in note for note in at_exit.value.__notes__)
    assert len(pushes.applied) == 3  # pushes 0, 2, 4
