"""Training throughput with embedding lookups run ahead (PERSIA's embedding_staleness) against 2
embedding-server shards: staleness 4 against the baseline, staleness 1 (synchronous).

Workload: DLRM (13 dense features, 26 categorical features C1..C26, dim 16) trained on the
planted synthetic Criteo-like data (``trainer.synthetic.SyntheticCriteo``), the same batches for
both contenders, Adam on the dense part and Adagrad on the embeddings, through
``TrainCtx.lookahead`` (what ``persia.data.DataLoader`` runs) with ``reproducible=True``. Each
contender gets 2 fresh embedding-server processes (``ServerGroup.start``, gRPC, train mode).

Figures: samples/s of each (median over windows of 10 steps after warm-up, the whole loop
including waiting for a batch's lookup), ``staleness4_ratio`` (goal >= 1.3), the held-out AUC
of each after the same steps (``auc_gap``, goal <= 0.005), and for staleness 1 how a step
splits into the lookup (ms, run on the lookahead thread) and the rest (model, backward,
gradient push), which says how much overlapping can win at most. The last line is JSON;
``ratio`` is ``staleness4_ratio``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from benchmarks._common import OtherLoad, doc_parser, print_summary, rounded  # noqa: E402
from embedding_server.core.config import EmbeddingConfig  # noqa: E402
from embedding_server.core.optimizers import Adagrad  # noqa: E402
from embedding_server.rpc.launcher import ServerGroup  # noqa: E402
from trainer.ctx import TrainCtx  # noqa: E402
from trainer.data import to_batch  # noqa: E402
from trainer.metrics import roc_auc  # noqa: E402
from trainer.models import DLRM  # noqa: E402
from trainer.synthetic import SyntheticCriteo  # noqa: E402

FEATURES = [f"C{i}" for i in range(1, 27)]
DIM = 16
DENSE_LR, SPARSE_LR, INIT_ACC = 1e-3, 0.05, 0.01


def parse_args():
    p = doc_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="fewer steps (about a minute on 2 cores)")
    p.add_argument("--steps", type=int, help="training steps per contender (default 300; quick 80)")
    p.add_argument("--batch-size", type=int, default=1024, help="samples per step")
    p.add_argument("--eval-rows", type=int, default=50_000, help="held-out rows for AUC (quick: 20,000)")
    p.add_argument("--staleness", type=int, default=4, help="the contender's embedding_staleness")
    p.add_argument("--workers", type=int, default=2, help="lookup threads (num_workers)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.steps = args.steps or (80 if args.quick else 300)
    if args.quick:
        args.eval_rows = min(args.eval_rows, 20_000)
    return args


class TimedCtx(TrainCtx):
    """TrainCtx that records how long each lookup (``prepare``) takes."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lookup_s: list[float] = []

    def prepare(self, batch, requires_grad, insert=True):
        t0 = time.perf_counter()
        result = super().prepare(batch, requires_grad, insert)
        if not hasattr(batch, "result"):  # a real lookup, not a prefetched one handed over
            self.lookup_s.append(time.perf_counter() - t0)
        return result


def run(train: list, evals: list, servers: list[str], staleness: int, args) -> dict[str, float]:
    torch.manual_seed(args.seed)
    model = DLRM(13, 26, DIM)
    config = EmbeddingConfig.from_dict({"slots_config": {n: {"dim": DIM} for n in FEATURES}})
    steps: list[float] = []
    timed = TimedCtx(
        model=model,
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=DENSE_LR),
        sparse_optimizer=Adagrad(lr=SPARSE_LR, initial_accumulator_value=INIT_ACC),
        embedding_config=config,
        embedding_servers=servers,
    )
    with timed as ctx:
        engine = ctx.lookahead(staleness=staleness, buffer_size=10, num_workers=args.workers, reproducible=True)
        t0 = time.perf_counter()
        for batch in engine.iterate(train):
            output, target = ctx.forward(batch)
            ctx.backward(F.binary_cross_entropy(output, target))
            t1 = time.perf_counter()
            steps.append(t1 - t0)
            t0 = t1
        scores = [ctx.predict(b).numpy()[:, 0] for b in evals]
        lookups = timed.lookup_s[: len(train)]
        stats = engine.stats()
    warmup = max(5, len(train) // 10)
    kept = np.array(steps[warmup:])
    windows = [kept[i : i + 10].sum() for i in range(0, len(kept) - 9, 10)] or [kept.sum()]
    per_window = 10 if len(kept) >= 10 else len(kept)
    return {
        "samples_per_s": per_window * args.batch_size / float(np.median(windows)),
        "auc": roc_auc(np.concatenate([b.targets[0][:, 0] for b in evals]), np.concatenate(scores)),
        "step_ms": float(np.median(kept)) * 1e3,
        "lookup_ms": float(np.median(lookups[warmup:])) * 1e3,
        "max_outstanding": stats["max_outstanding"],
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = SyntheticCriteo(seed=args.seed)
    n = args.batch_size
    train = [to_batch(data.chunk(n, start=i * n)) for i in range(args.steps)]
    eval_start = (args.steps + 10) * n
    evals = [to_batch(data.chunk(n, start=eval_start + i * n)) for i in range(max(1, args.eval_rows // n))]
    figures: dict[str, Any] = {
        "steps": args.steps,
        "batch_size": n,
        "eval_rows": len(evals) * n,
        "cpus": os.cpu_count(),
    }
    load = OtherLoad()
    results = {}
    with warnings.catch_warnings(record=True) as caught, tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("always")
        emb, glob = Path(tmp) / "emb.yml", Path(tmp) / "global.yml"
        emb.write_text(yaml.safe_dump({"slots_config": {f: {"dim": DIM} for f in FEATURES}}, sort_keys=False))
        glob.write_text(yaml.safe_dump({"embedding_parameter_server_config": {"capacity": 4_000_000}}))
        for staleness in (1, args.staleness):
            with ServerGroup.start(emb, glob, num_shards=2, workdir=Path(tmp) / f"s{staleness}") as group:
                results[staleness] = run(train, evals, group.addresses, staleness, args)
            r = results[staleness]
            print(
                f"embedding_staleness {staleness}: {r['samples_per_s']:,.0f} samples/s, step {r['step_ms']:.1f} ms, "
                f"lookup {r['lookup_ms']:.1f} ms, held-out AUC {r['auc']:.4f}, "
                f"at most {r['max_outstanding']} lookups outstanding",
                flush=True,
            )
    base, ahead = results[1], results[args.staleness]
    figures.update(
        staleness1_samples_per_s=base["samples_per_s"],
        staleness1_auc=base["auc"],
        staleness1_step_ms=base["step_ms"],
        staleness1_lookup_ms=base["lookup_ms"],
        staleness1_rest_ms=base["step_ms"] - base["lookup_ms"],
        contender_staleness=args.staleness,
        staleness4_samples_per_s=ahead["samples_per_s"],
        staleness4_auc=ahead["auc"],
        staleness4_ratio=ahead["samples_per_s"] / base["samples_per_s"],
        auc_gap=abs(ahead["auc"] - base["auc"]),
        other_load=load.share(),
    )
    figures["ratio"] = figures["staleness4_ratio"]
    print(
        f"staleness {args.staleness} / staleness 1: {figures['ratio']:.2f}x (goal >= 1.3); "
        f"AUC gap {figures['auc_gap']:.4f} (goal <= 0.005); staleness 1 splits a step into "
        f"lookup {base['lookup_ms']:.1f} ms + rest {figures['staleness1_rest_ms']:.1f} ms "
        f"(overlap can win at most {base['step_ms'] / max(base['lookup_ms'], figures['staleness1_rest_ms']):.2f}x); "
        f"other load {figures['other_load']:.0%}"
    )
    print_summary(rounded(figures), caught)


if __name__ == "__main__":
    main()
