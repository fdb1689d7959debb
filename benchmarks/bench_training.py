"""Training throughput and model quality against a plain PyTorch model of the same shape.

Workload: DLRM (13 dense features, 26 categorical features C1..C26, dim 16) trained on the
planted synthetic Criteo-like data (``trainer.synthetic.SyntheticCriteo``), the same batches for
every contender, Adam on the dense part and Adagrad on the embeddings.

Contenders:
* ``plain``: the baseline, plain PyTorch: one ``nn.EmbeddingBag(sparse=True)`` table per feature
  over the ids the data holds (mapped to rows before timing), ``torch.optim.Adagrad`` on them.
* ``in_process``: ``TrainCtx`` with the embedding store in this process.
* ``grpc_2shard``: ``TrainCtx`` with 2 embedding-server shards over gRPC (real processes).

Figures: samples/s of each (median over timed windows, after warm-up), ratios to ``plain``
(``in_process_ratio`` goal >= 0.7, ``grpc_2shard_ratio`` goal >= 0.4), and the held-out AUC
of each after the same steps (``auc_gap``: |in_process - plain|, goal <= 0.005). The last line
is JSON; ``ratio`` is ``in_process_ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from embedding_server.core.config import EmbeddingConfig  # noqa: E402
from embedding_server.core.optimizers import Adagrad  # noqa: E402
from embedding_server.rpc.launcher import ServerGroup  # noqa: E402
from trainer.batch import PyPersiaBatchData  # noqa: E402
from trainer.ctx import TrainCtx  # noqa: E402
from trainer.data import to_batch  # noqa: E402
from trainer.metrics import roc_auc  # noqa: E402
from trainer.models import DLRM  # noqa: E402
from trainer.synthetic import SyntheticCriteo  # noqa: E402

FEATURES = [f"C{i}" for i in range(1, 27)]
DIM = 16
DENSE_LR, SPARSE_LR, INIT_ACC = 1e-3, 0.05, 0.01


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer, smaller steps (under 60 s on 2 cores)")
    p.add_argument("--steps", type=int, help="training steps per contender (default 300; quick 60)")
    p.add_argument("--batch-size", type=int, help="samples per step (default 1024; quick 512)")
    p.add_argument("--eval-rows", type=int, default=50_000, help="held-out rows for AUC (quick: 20,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-grpc", action="store_true", help="no embedding-server processes")
    args = p.parse_args()
    args.steps = args.steps or (60 if args.quick else 300)
    args.batch_size = args.batch_size or (512 if args.quick else 1024)
    if args.quick:
        args.eval_rows = min(args.eval_rows, 20_000)
    return args


class PlainModel(nn.Module):
    """The baseline: EmbeddingBag tables feeding the same DLRM."""

    def __init__(self, vocab_sizes: list[int], dense: DLRM):
        super().__init__()
        tables = [nn.EmbeddingBag(n, DIM, mode="sum", sparse=True) for n in vocab_sizes]
        for t in tables:
            nn.init.uniform_(t.weight, -0.01, 0.01)  # the store's default bounded_uniform
        self.tables = nn.ModuleList(tables)
        self.dense = dense

    def forward(self, dense: torch.Tensor, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        return self.dense(dense, [t(idx, off) for t, (idx, off) in zip(self.tables, rows)])


def plain_inputs(batch: PyPersiaBatchData, vocab: list[np.ndarray]) -> tuple[torch.Tensor, list, torch.Tensor]:
    """Dense tensor, per-feature (row index, offsets) and targets, ids mapped to table rows."""
    by_name = {f.name: f for f in batch.sparse}
    rows = []
    for name, v in zip(FEATURES, vocab):
        f = by_name[name]
        rows.append((torch.from_numpy(np.searchsorted(v, f.ids).astype(np.int64)), torch.from_numpy(f.offsets[:-1])))
    return torch.from_numpy(batch.dense_matrix()), rows, torch.from_numpy(batch.targets[0])


def run_plain(train: list, evals: list, seed: int, warmup: int) -> tuple[float, float]:
    vocab = [
        np.unique(np.concatenate([next(f.ids for f in b.sparse if f.name == n) for b in train + evals]))
        for n in FEATURES
    ]
    torch.manual_seed(seed)
    model = PlainModel([max(len(v), 1) for v in vocab], DLRM(13, 26, DIM))
    dense_opt = torch.optim.Adam(model.dense.parameters(), lr=DENSE_LR)
    sparse_opt = torch.optim.Adagrad(
        model.tables.parameters(), lr=SPARSE_LR, initial_accumulator_value=INIT_ACC, eps=1e-10
    )
    inputs = [plain_inputs(b, vocab) for b in train]
    times = []
    for dense, rows, target in inputs:
        t0 = time.perf_counter()
        loss = F.binary_cross_entropy(model(dense, rows), target)
        dense_opt.zero_grad(set_to_none=True)
        sparse_opt.zero_grad(set_to_none=True)
        loss.backward()
        dense_opt.step()
        sparse_opt.step()
        times.append(time.perf_counter() - t0)
    with torch.inference_mode():
        scores = [model(d, r).numpy()[:, 0] for d, r, _ in (plain_inputs(b, vocab) for b in evals)]
    return _rate(times, train, warmup), _auc(evals, scores)


def run_ctx(train: list, evals: list, seed: int, warmup: int, **ctx_args) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = DLRM(13, 26, DIM)
    config = EmbeddingConfig.from_dict({"slots_config": {n: {"dim": DIM} for n in FEATURES}})
    times = []
    with TrainCtx(
        model=model,
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=DENSE_LR),
        sparse_optimizer=Adagrad(lr=SPARSE_LR, initial_accumulator_value=INIT_ACC),
        embedding_config=config,
        **ctx_args,
    ) as ctx:
        for batch in train:
            t0 = time.perf_counter()
            output, target = ctx.forward(batch)
            ctx.backward(F.binary_cross_entropy(output, target))
            times.append(time.perf_counter() - t0)
        scores = [ctx.predict(b).numpy()[:, 0] for b in evals]
    return _rate(times, train, warmup), _auc(evals, scores)


def _rate(times: list[float], batches: list, warmup: int) -> float:
    timed = np.array(times[warmup:])
    # Median over windows of 10 steps: robust to a stray slow step, keeps per-step variance.
    windows = [timed[i : i + 10].sum() for i in range(0, len(timed) - 9, 10)] or [timed.sum()]
    return (
        10 * batches[0].batch_size / float(np.median(windows))
        if len(timed) >= 10
        else len(timed) * batches[0].batch_size / timed.sum()
    )


def _auc(evals: list, scores: list) -> float:
    return roc_auc(np.concatenate([b.targets[0][:, 0] for b in evals]), np.concatenate(scores))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = SyntheticCriteo(seed=args.seed)
    n = args.batch_size
    train = [to_batch(data.chunk(n, start=i * n)) for i in range(args.steps)]
    eval_start = (args.steps + 10) * n
    evals = [to_batch(data.chunk(n, start=eval_start + i * n)) for i in range(max(1, args.eval_rows // n))]
    warmup = max(5, args.steps // 10)
    figures: dict[str, float | int | str] = {"steps": args.steps, "batch_size": n, "eval_rows": len(evals) * n}

    plain_rate, plain_auc = run_plain(train, evals, args.seed, warmup)
    print(f"plain PyTorch EmbeddingBag: {plain_rate:,.0f} samples/s, held-out AUC {plain_auc:.4f}")
    rate, auc = run_ctx(train, evals, args.seed, warmup)
    print(f"TrainCtx, in-process store: {rate:,.0f} samples/s ({rate / plain_rate:.2f}x), AUC {auc:.4f}")
    figures.update(
        plain_samples_per_s=plain_rate,
        plain_auc=plain_auc,
        in_process_samples_per_s=rate,
        in_process_auc=auc,
        in_process_ratio=rate / plain_rate,
        auc_gap=abs(auc - plain_auc),
    )
    if not args.skip_grpc:
        with tempfile.TemporaryDirectory() as tmp:
            emb, glob = Path(tmp) / "emb.yml", Path(tmp) / "global.yml"
            emb.write_text(yaml.safe_dump({"slots_config": {n: {"dim": DIM} for n in FEATURES}}, sort_keys=False))
            glob.write_text(yaml.safe_dump({"embedding_parameter_server_config": {"capacity": 4_000_000}}))
            with ServerGroup.start(emb, glob, num_shards=2, workdir=tmp) as group:
                g_rate, g_auc = run_ctx(train, evals, args.seed, warmup, embedding_servers=group.addresses)
        print(f"TrainCtx, 2 shards over gRPC: {g_rate:,.0f} samples/s ({g_rate / plain_rate:.2f}x), AUC {g_auc:.4f}")
        figures.update(grpc_2shard_samples_per_s=g_rate, grpc_2shard_auc=g_auc, grpc_2shard_ratio=g_rate / plain_rate)
    figures["ratio"] = figures["in_process_ratio"]
    print(f"AUC gap to plain PyTorch: {figures['auc_gap']:.4f} (goal <= 0.005)")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
