"""Do job.yml's sparse optimizer defaults train as well as plain PyTorch on real Criteo rows?

Workload: the real Criteo rows of ``criteo_sample.csv`` (13 dense, 26 categorical features),
split into ``--folds`` folds, ``--repeats`` times with different row orders: each split trains
on the other folds for ``--epochs`` passes (batches of ``--batch-size``, rows shuffled per
epoch with a fixed seed) and scores the held-out fold. Every contender sees the same splits,
batches and dense initialisation: job.yml's model (DLRM, dim 16 embeddings of
criteo_embedding_config.yml, Adam on the dense part) and job.yml's sparse optimizer.

Contenders:
* ``job_defaults``: ``TrainCtx`` with the in-process store and job.yml's default sparse
  optimizer (Adagrad, lr 0.05, PERSIA's initial accumulator of 0.01);
* ``accumulator_0``: the same with torch.optim.Adagrad's default initial accumulator of 0;
* ``torch_same_init``: plain PyTorch, the baseline: one ``nn.EmbeddingBag`` per feature over the
  training ids, ``torch.optim.Adagrad`` (its defaults) on them, the embeddings starting from
  the vectors the store gives the same ids (so only the training code differs);
* ``torch_own_init``: the same with torch's own uniform(-0.01, 0.01) draw (another random start).

Held-out ids never trained read as zeros in every contender (the store's evaluation lookups do
not insert; plain PyTorch leaves them out of the bag). Figures: each contender's mean test AUC
over all splits, and the mean paired difference to ``torch_same_init`` with its standard error.
The last line is JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import doc_parser  # noqa: E402
from torch import nn  # noqa: E402

from embedding_server.core.config import EmbeddingConfig, GlobalConfig  # noqa: E402
from embedding_server.core.optimizers import Adagrad, SparseOptimizer  # noqa: E402
from embedding_server.store.store import EmbeddingStore  # noqa: E402
from trainer.criteo import read_criteo  # noqa: E402
from trainer.ctx import TrainCtx  # noqa: E402
from trainer.data import Chunk, to_batch  # noqa: E402
from trainer.job import JobConfig, build_model, dense_optimizer  # noqa: E402
from trainer.metrics import roc_auc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/criteo_sample.csv")
EMBEDDING_CONFIG = ROOT / "deploy/examples/criteo_embedding_config.yml"


def splits(n: int, folds: int, repeats: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, test rows) of every fold of every repeat."""
    out = []
    for r in range(repeats):
        order = np.random.default_rng(1000 + r).permutation(n)
        for part in np.array_split(order, folds):
            out.append((np.setdiff1d(order, part), np.sort(part)))
    return out


def epoch_batches(train: np.ndarray, epochs: int, batch_size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(epochs):
        order = rng.permutation(train)
        batches += [order[i : i + batch_size] for i in range(0, order.shape[0], batch_size)]
    return batches


def run_store(
    chunk: Chunk, config: EmbeddingConfig, job: JobConfig, sparse: SparseOptimizer, batches, test, seed: int
) -> float:
    torch.manual_seed(seed)
    model = build_model(job.model, config, chunk.dense.shape[1])
    with TrainCtx(
        model=model,
        dense_optimizer=dense_optimizer(job.dense_optimizer, model),
        sparse_optimizer=sparse,
        embedding_config=config,
        global_config=GlobalConfig.from_dict({}),
    ) as ctx:
        for rows in batches:
            output, target = ctx.forward(to_batch(chunk.take(rows)))
            ctx.backward(F.binary_cross_entropy(output, target))
        scores = ctx.predict(to_batch(chunk.take(test))).numpy()[:, 0]
    return roc_auc(chunk.labels[test, 0], scores)


class PlainSparse(nn.Module):
    """The baseline's embeddings: one ``nn.EmbeddingBag`` (sum) per feature over the training ids."""

    def __init__(self, vocabularies: list[np.ndarray], dim: int, initial: list[np.ndarray] | None):
        super().__init__()
        self.vocabularies = vocabularies
        bags = [nn.EmbeddingBag(max(1, v.shape[0]), dim, mode="sum") for v in vocabularies]
        self.bags = nn.ModuleList(bags)
        for k, bag in enumerate(bags):
            with torch.no_grad():
                if initial is not None:
                    bag.weight.copy_(torch.from_numpy(initial[k]))
                else:
                    bag.weight.uniform_(-0.01, 0.01)

    def forward(self, chunk: Chunk) -> list[torch.Tensor]:
        out = []
        for vocab, bag, f in zip(self.vocabularies, self.bags, chunk.sparse):
            pos = np.minimum(np.searchsorted(vocab, f.ids), max(0, vocab.shape[0] - 1))
            known = vocab[pos] == f.ids if vocab.shape[0] else np.zeros(f.ids.shape[0], np.bool_)
            sample = np.repeat(np.arange(len(chunk)), np.diff(f.offsets))[known]
            offsets = np.searchsorted(sample, np.arange(len(chunk)))
            out.append(bag(torch.from_numpy(pos[known]), torch.from_numpy(offsets)))
        return out


def run_plain(chunk: Chunk, config: EmbeddingConfig, job: JobConfig, same_init: bool, batches, test, seed) -> float:
    train_rows = np.unique(np.concatenate(batches))
    train_chunk = chunk.take(train_rows)
    vocabularies = [np.unique(f.ids) for f in train_chunk.sparse]
    initial = None
    if same_init:  # the store's deterministic initial vectors of the same ids
        store = EmbeddingStore(config, GlobalConfig.from_dict({}))
        initial = []
        for name, vocab in zip(chunk.feature_names, vocabularies):
            table = config.table_of(name)
            ids = vocab if vocab.shape[0] else np.zeros(1, np.uint64)
            initial.append(store.lookup(ids, np.full(ids.shape[0], table.index, np.uint16)))
    dim = next(iter(config.tables.values())).dim
    torch.manual_seed(seed)
    model = build_model(job.model, config, chunk.dense.shape[1])
    sparse = PlainSparse(vocabularies, dim, initial)
    opt_dense = dense_optimizer(job.dense_optimizer, model)
    settings = job.sparse()
    opt_sparse = torch.optim.Adagrad(sparse.parameters(), lr=settings.lr)  # torch's defaults otherwise
    for rows in batches:
        part = chunk.take(rows)
        output = model(torch.from_numpy(part.dense), sparse(part))
        loss = F.binary_cross_entropy(output, torch.from_numpy(part.labels))
        opt_dense.zero_grad()
        opt_sparse.zero_grad()
        loss.backward()
        opt_dense.step()
        opt_sparse.step()
    part = chunk.take(test)
    with torch.no_grad():
        scores = model(torch.from_numpy(part.dense), sparse(part)).numpy()[:, 0]
    return roc_auc(part.labels[:, 0], scores)


def main() -> None:
    parser = doc_parser(__doc__)
    parser.add_argument("--data", default=str(DATA), help="a Criteo CSV/TSV file (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    chunk = next(read_criteo(args.data, chunk_rows=1 << 20))
    config = EmbeddingConfig.load(EMBEDDING_CONFIG)
    job = JobConfig(embedding_config=str(EMBEDDING_CONFIG))
    default = job.sparse()
    assert isinstance(default, Adagrad)
    torch_like = dataclasses.replace(default, initial_accumulator_value=0.0)  # torch.optim.Adagrad's default
    print(f"job.yml's sparse optimizer: {default}", flush=True)
    names = ("job_defaults", "accumulator_0", "torch_same_init", "torch_own_init")
    aucs: dict[str, list[float]] = {k: [] for k in names}
    all_splits = splits(len(chunk), args.folds, args.repeats)
    for i, (train, test) in enumerate(all_splits):
        batches = epoch_batches(train, args.epochs, args.batch_size, seed=i)
        if chunk.labels[test, 0].min() == chunk.labels[test, 0].max():
            continue  # a fold of one class has no AUC
        aucs["job_defaults"].append(run_store(chunk, config, job, default, batches, test, seed=i))
        aucs["accumulator_0"].append(run_store(chunk, config, job, torch_like, batches, test, seed=i))
        aucs["torch_same_init"].append(run_plain(chunk, config, job, True, batches, test, seed=i))
        aucs["torch_own_init"].append(run_plain(chunk, config, job, False, batches, test, seed=i))
        print(f"split {i + 1}/{len(all_splits)}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in aucs.items()), flush=True)
    base = np.array(aucs["torch_same_init"])
    summary: dict[str, object] = {
        "rows": len(chunk),
        "splits": len(base),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
    }
    for name, values in aucs.items():
        v = np.array(values)
        diff = v - base
        summary[f"{name}_auc"] = round(float(v.mean()), 4)
        summary[f"{name}_minus_torch"] = round(float(diff.mean()), 4)
        summary[f"{name}_minus_torch_se"] = round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 4)
        se = summary[f"{name}_minus_torch_se"]
        print(f"{name:16s} mean test AUC {v.mean():.4f}  minus torch_same_init {diff.mean():+.4f} (s.e. {se})")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
