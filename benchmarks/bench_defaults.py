"""Which initial accumulator of ctrserve's sparse Adagrad trains as well as plain PyTorch?

Contenders (the same in both parts; every one sees the same batches, the same dense
initialisation and job.yml's model: DLRM, dim 16 embeddings of criteo_embedding_config.yml,
Adam on the dense part, sparse Adagrad with job.yml's lr 0.05):
* ``accumulator_0.01``: ``TrainCtx`` with the in-process store and PERSIA's initial accumulator
  of 0.01 (the default of global_config.yml and of the ``persia`` package);
* ``accumulator_0``: the same with torch.optim.Adagrad's initial accumulator of 0 (job.yml's
  default, ``trainer.job.TORCH_ADAGRAD_INITIAL_ACCUMULATOR``);
* ``torch_same_init``: plain PyTorch, the baseline: one ``nn.EmbeddingBag`` (sum, sparse
  gradients) per feature over the training ids, ``torch.optim.Adagrad`` (its defaults but lr) on
  them, the embeddings starting from the vectors the store gives the same ids (so only the
  training code differs);
* ``torch_own_init`` (real rows only): the same with torch's own uniform(-0.01, 0.01) draw.
Held-out ids never trained read as zeros in every contender (the store's evaluation lookups do
not insert; plain PyTorch leaves them out of the bag). The store runs without weight clipping,
as plain PyTorch does.

Part ``real``: the 200 real Criteo rows of ``criteo_sample.csv`` (13 dense, 26 categorical
features), split into ``--folds`` folds, ``--repeats`` times with different row orders: each
split trains on the other folds for ``--epochs`` passes (batches of ``--batch-size``, rows
shuffled per epoch with a fixed seed) and scores the held-out fold. Real data, but too few rows
to tell the defaults apart: every contender ends near chance.

Part ``generated``: Criteo-like rows of ``trainer.synthetic.SyntheticCriteo`` (the data of
deploy/examples/job.yml), one generator per seed (``--seeds``; seed ``s`` fixes the planted
model, the rows and the dense initialisation): one pass over ``--train-rows`` rows in
job.yml's batches of 512, then the AUC on ``--held-out-rows`` other rows (from
``trainer.job.HELD_OUT_START`` on, never trained). Enough rows for the defaults to differ, and
the generator's Bayes AUC (its true probabilities on the held-out rows) is the ceiling.
``--quick`` runs a short version of it.

Figures, per part: each contender's mean held-out AUC, and the mean paired difference to
``torch_same_init`` with its standard error (across splits, or across seeds). The conclusion
line says which accumulator matches plain PyTorch (a paired difference within two standard
errors of 0), judged on the generated part when it ran. The last line is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
from trainer.job import HELD_OUT_START, JobConfig, build_model, dense_optimizer  # noqa: E402
from trainer.metrics import roc_auc  # noqa: E402
from trainer.synthetic import SyntheticCriteo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/criteo_sample.csv")
JOB = ROOT / "deploy/examples/job.yml"
PERSIA_ACCUMULATOR = 0.01  # PERSIA's Adagrad default (global_config.yml, the persia package)
TORCH_ACCUMULATOR = 0.0  # torch.optim.Adagrad's default
BASELINE = "torch_same_init"
PREDICT_ROWS = 8192  # held-out rows scored at a time
MATCH_FLOOR = 5e-4  # AUC differences below this count as equal (float32 rounding of the same steps)

#: a fresh iterator over the training batches, in the same order on every call
Batches = Callable[[], Iterator[Chunk]]


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


def pieces(chunk: Chunk) -> Iterator[Chunk]:
    """``chunk`` in slices of at most PREDICT_ROWS rows (bounded memory when scoring)."""
    for start in range(0, len(chunk), PREDICT_ROWS):
        yield chunk.slice(start, min(start + PREDICT_ROWS, len(chunk)))


def run_store(
    config: EmbeddingConfig, job: JobConfig, sparse: SparseOptimizer, batches: Batches, test: Chunk, seed: int
) -> float:
    torch.manual_seed(seed)
    model = build_model(job.model, config, test.dense.shape[1])
    with TrainCtx(
        model=model,
        dense_optimizer=dense_optimizer(job.dense_optimizer, model),
        sparse_optimizer=sparse,
        embedding_config=config,
        global_config=GlobalConfig.from_dict({}),
    ) as ctx:
        for part in batches():
            output, target = ctx.forward(to_batch(part))
            ctx.backward(F.binary_cross_entropy(output, target))
        scores = np.concatenate([ctx.predict(to_batch(p)).numpy()[:, 0] for p in pieces(test)])
    return roc_auc(test.labels[:, 0], scores)


class PlainSparse(nn.Module):
    """The baseline's embeddings: one ``nn.EmbeddingBag`` (sum, sparse gradients) per feature
    over the training ids."""

    def __init__(self, vocabularies: list[np.ndarray], dim: int, initial: list[np.ndarray] | None):
        super().__init__()
        self.vocabularies = vocabularies
        # sparse=True: torch.optim.Adagrad then updates only the looked-up rows, which is what its
        # dense update does too (a zero gradient leaves a row and its accumulator unchanged).
        bags = [nn.EmbeddingBag(max(1, v.shape[0]), dim, mode="sum", sparse=True) for v in vocabularies]
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


def training_vocabularies(batches: Batches, features: int) -> list[np.ndarray]:
    """The sorted distinct ids of each sparse feature over all training batches."""
    seen: list[list[np.ndarray]] = [[] for _ in range(features)]
    for part in batches():
        for k, f in enumerate(part.sparse):
            seen[k].append(np.unique(f.ids))
    return [np.unique(np.concatenate(s)) if s else np.zeros(0, np.uint64) for s in seen]


def run_plain(
    config: EmbeddingConfig, job: JobConfig, same_init: bool, batches: Batches, test: Chunk, seed: int
) -> float:
    vocabularies = training_vocabularies(batches, len(test.sparse))
    initial = None
    if same_init:  # the store's deterministic initial vectors of the same ids
        store = EmbeddingStore(config, GlobalConfig.from_dict({}))
        initial = []
        for name, vocab in zip(test.feature_names, vocabularies):
            table = config.table_of(name)
            ids = vocab if vocab.shape[0] else np.zeros(1, np.uint64)
            initial.append(store.lookup(ids, np.full(ids.shape[0], table.index, np.uint16)))
        del store
    dim = next(iter(config.tables.values())).dim
    torch.manual_seed(seed)
    model = build_model(job.model, config, test.dense.shape[1])
    sparse = PlainSparse(vocabularies, dim, initial)
    opt_dense = dense_optimizer(job.dense_optimizer, model)
    settings = job.sparse()
    opt_sparse = torch.optim.Adagrad(sparse.parameters(), lr=settings.lr)  # torch's defaults otherwise
    for part in batches():
        output = model(torch.from_numpy(part.dense), sparse(part))
        loss = F.binary_cross_entropy(output, torch.from_numpy(part.labels))
        opt_dense.zero_grad()
        opt_sparse.zero_grad()
        loss.backward()
        opt_dense.step()
        opt_sparse.step()
    with torch.no_grad():
        scores = np.concatenate([model(torch.from_numpy(p.dense), sparse(p)).numpy()[:, 0] for p in pieces(test)])
    return roc_auc(test.labels[:, 0], scores)


def contenders(job: JobConfig) -> dict[str, SparseOptimizer]:
    """The two store contenders: job.yml's sparse Adagrad with each initial accumulator."""
    sparse = job.sparse()
    if not isinstance(sparse, Adagrad):
        raise SystemExit(f"{JOB}: sparse_optimizer must be adagrad for this comparison, got {sparse}")
    return {
        "accumulator_0.01": dataclasses.replace(sparse, initial_accumulator_value=PERSIA_ACCUMULATOR),
        "accumulator_0": dataclasses.replace(sparse, initial_accumulator_value=TORCH_ACCUMULATOR),
    }


def shown(se: float | None) -> str:
    """A standard error as printed (``n/a`` from a single split or seed)."""
    return "n/a" if se is None else f"{se:.4f}"


def summarise(aucs: dict[str, list[float]], over: str) -> dict[str, Any]:
    """Each contender's mean AUC and its mean paired difference to the baseline with its standard
    error (across ``over``: splits or seeds); printed and returned."""
    base = np.array(aucs[BASELINE])
    out: dict[str, Any] = {over: len(base)}
    for name, values in aucs.items():
        v = np.array(values)
        diff = v - base
        se = round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 4) if len(diff) > 1 else None  # None: one sample
        out[f"{name}_auc"] = round(float(v.mean()), 4)
        out[f"{name}_minus_torch"] = round(float(diff.mean()), 4)
        out[f"{name}_minus_torch_se"] = se
        print(f"  {name:16s} mean held-out AUC {v.mean():.4f}  minus {BASELINE} {diff.mean():+.4f} (s.e. {shown(se)})")
    return out


def real_part(
    args: argparse.Namespace, config: EmbeddingConfig, job: JobConfig, sparse: dict[str, SparseOptimizer]
) -> dict[str, Any]:
    chunk = next(read_criteo(args.data, chunk_rows=1 << 20))
    print(f"real rows: {len(chunk)} of {args.data}", flush=True)
    aucs: dict[str, list[float]] = {k: [] for k in (*sparse, BASELINE, "torch_own_init")}
    all_splits = splits(len(chunk), args.folds, args.repeats)
    for i, (train, test_rows) in enumerate(all_splits):
        rows = epoch_batches(train, args.epochs, args.batch_size, seed=i)
        test = chunk.take(test_rows)
        if test.labels[:, 0].min() == test.labels[:, 0].max():
            continue  # a fold of one class has no AUC

        def batches(rows: list[np.ndarray] = rows) -> Iterator[Chunk]:
            return (chunk.take(r) for r in rows)

        for name, optimizer in sparse.items():
            aucs[name].append(run_store(config, job, optimizer, batches, test, seed=i))
        aucs[BASELINE].append(run_plain(config, job, True, batches, test, seed=i))
        aucs["torch_own_init"].append(run_plain(config, job, False, batches, test, seed=i))
        print(f"split {i + 1}/{len(all_splits)}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in aucs.items()), flush=True)
    print("real rows:")
    summary = summarise(aucs, "splits")
    return {"rows": len(chunk), "epochs": args.epochs, "batch_size": args.batch_size, **summary}


def generated_part(
    args: argparse.Namespace, config: EmbeddingConfig, job: JobConfig, sparse: dict[str, SparseOptimizer]
) -> dict[str, Any]:
    batch_size = job.data.batch_size
    steps = -(-args.train_rows // batch_size)
    print(
        f"generated rows: {args.seeds} seeds x {args.train_rows} training rows ({steps} steps of {batch_size}), "
        f"{args.held_out_rows} held-out rows",
        flush=True,
    )
    aucs: dict[str, list[float]] = {k: [] for k in (*sparse, BASELINE)}
    bayes: list[float] = []
    for seed in range(args.seeds):
        generator = SyntheticCriteo(seed=seed)
        test = generator.chunk(args.held_out_rows, start=HELD_OUT_START)
        bayes.append(generator.bayes_auc(test))

        def batches(generator: SyntheticCriteo = generator) -> Iterator[Chunk]:
            for start in range(0, args.train_rows, batch_size):
                yield generator.chunk(min(batch_size, args.train_rows - start), start=start)

        for name, optimizer in sparse.items():
            aucs[name].append(run_store(config, job, optimizer, batches, test, seed=seed))
        aucs[BASELINE].append(run_plain(config, job, True, batches, test, seed=seed))
        print(
            f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in aucs.items()) + f", Bayes {bayes[-1]:.4f}",
            flush=True,
        )
    print("generated rows:")
    summary = summarise(aucs, "seeds")
    print(f"  {'Bayes AUC':16s} {np.mean(bayes):.4f} (the generator's true probabilities: the ceiling)")
    return {
        "train_rows": args.train_rows,
        "held_out_rows": args.held_out_rows,
        "batch_size": batch_size,
        **summary,
        "bayes_auc": round(float(np.mean(bayes)), 4),
    }


def matches(summary: dict[str, Any], name: str) -> bool:
    """Whether contender ``name``'s paired difference to the baseline is within two standard
    errors of 0 (or below MATCH_FLOOR: the same update summed in another order rounds apart)."""
    diff, se = summary[f"{name}_minus_torch"], summary[f"{name}_minus_torch_se"]
    return bool(abs(diff) <= max(2 * (se or 0.0), MATCH_FLOOR))


def label(name: str, job_accumulator: float) -> str:
    """``accumulator_0.01`` -> ``0.01 (PERSIA's)``, marking job.yml's default."""
    value = float(name.removeprefix("accumulator_"))
    origin = "PERSIA's" if value == PERSIA_ACCUMULATOR else "torch's"
    return f"{value:g} ({origin}{'; job.yml default' if value == job_accumulator else ''})"


def verdict(summary: dict[str, Any], job_accumulator: float) -> str:
    """Which initial accumulator matches plain PyTorch on one part's figures, with the figures."""
    names = ("accumulator_0.01", "accumulator_0")
    figures = ", ".join(
        f"{label(n, job_accumulator)} {summary[f'{n}_minus_torch']:+.4f} (s.e. {shown(summary[f'{n}_minus_torch_se'])})"
        for n in names
    )
    same = [n for n in names if matches(summary, n)]
    if summary[f"{names[0]}_minus_torch_se"] is None:
        text = "a single split or seed gives no standard error, so nothing can be decided (run more)"
    elif len(same) == 1:
        text = f"initial accumulator {label(same[0], job_accumulator)} matches plain PyTorch, the other does not"
    elif same:
        text = "both initial accumulators match plain PyTorch within two standard errors (these figures cannot decide)"
    else:
        closest = min(names, key=lambda n: abs(summary[f"{n}_minus_torch"]))
        text = f"neither initial accumulator matches plain PyTorch; the closer is {label(closest, job_accumulator)}"
    return f"{text}; AUC minus plain PyTorch: {figures}"


def conclusion(result: dict[str, Any], job_accumulator: float) -> str:
    """The last line before the JSON: judged on the generated rows when they ran (the real rows
    are too few to decide), the real rows' verdict after it."""
    parts = [(k, what) for k, what in (("generated", "generated rows"), ("real", "real rows")) if k in result]
    return "conclusion: " + "; ".join(
        f"{'on the' if i == 0 else 'and on the'} {what}, {verdict(result[k], job_accumulator)}"
        for i, (k, what) in enumerate(parts)
    )


def main() -> None:
    parser = doc_parser(__doc__)
    parser.add_argument("--part", choices=("both", "real", "generated"), default="both", help="(default: %(default)s)")
    real = parser.add_argument_group("real rows")
    real.add_argument("--data", default=str(DATA), help="a Criteo CSV/TSV file (default: %(default)s)")
    real.add_argument("--folds", type=int, default=5, help="(default: %(default)s)")
    real.add_argument("--repeats", type=int, default=4, help="(default: %(default)s)")
    real.add_argument("--epochs", type=int, default=5, help="(default: %(default)s)")
    real.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    gen = parser.add_argument_group("generated rows")
    gen.add_argument("--seeds", type=int, default=3, help="generators (seeds 0..N-1) (default: %(default)s)")
    gen.add_argument("--train-rows", type=int, default=500_000, help="training rows per seed (default: %(default)s)")
    gen.add_argument("--held-out-rows", type=int, default=50_000, help="held-out rows per seed (default: %(default)s)")
    gen.add_argument(
        "--quick", action="store_true", help="a short run: 2 seeds of 100,000 training and 20,000 held-out rows"
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.train_rows, args.held_out_rows = 2, 100_000, 20_000
    if args.seeds < 1 or args.train_rows < 1 or args.held_out_rows < 1:
        parser.error("--seeds, --train-rows and --held-out-rows must be >= 1")
    torch.set_num_threads(1)
    # Opting out explicitly (torch's default) silences the warning torch.optim.Adagrad's sparse
    # update would print; its sparse gradients come from nn.EmbeddingBag, valid by construction.
    torch.sparse.check_sparse_tensor_invariants.disable()
    job = JobConfig.load(JOB)
    config = EmbeddingConfig.load(job.embedding_config)
    sparse = contenders(job)
    default = job.sparse()
    assert isinstance(default, Adagrad)  # contenders() checked it
    job_accumulator = default.initial_accumulator_value
    print(f"job.yml's sparse optimizer: {default}", flush=True)
    result: dict[str, Any] = {"job_initial_accumulator": job_accumulator}
    if args.part in ("both", "real"):
        result["real"] = real_part(args, config, job, sparse)
    if args.part in ("both", "generated"):
        result["generated"] = generated_part(args, config, job, sparse)
    print(conclusion(result, job_accumulator))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
