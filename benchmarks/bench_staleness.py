"""Training throughput with embedding_staleness 4 against staleness 1 (synchronous) against 2
embedding-server shards: PERSIA's lookahead (the lookups of upcoming batches run ahead) with its
asynchronous gradient pushes (backward queues the push; a batch's staleness permit comes back
once its push is applied on the servers).

Workload, embedding-heavy as CTR models are: DLRM with 13 dense features and 26 categorical
features of dim 16, the last 8 of them multi-id (1 to 10 ids per sample, like behaviour-history
lists), about 55,000 ids (20,000 distinct keys) per batch of 1,024 samples, and a modest dense
tower (bottom MLP 64-32, top MLP 64-32), so that looking the embeddings up and pushing their
gradients is about half of a synchronous step. Data: the planted synthetic Criteo-like
generator (``trainer.synthetic.SyntheticCriteo(multi_id_features=8, max_ids=10)``), the same
batches for every run; Adam on the dense part, Adagrad on the embeddings; ``TrainCtx.lookahead``
(what ``persia.data.DataLoader`` runs) with ``reproducible=True`` and the default
``backward_buffer_size`` 10 and ``backward_workers_size`` 8. Every training run gets 2 fresh
embedding-server processes (``ServerGroup.start``, gRPC, train mode). torch runs one intra-op
thread in both contenders (``--torch-threads``): on a machine whose cores the servers and the
lookup and push threads share, a second OpenMP thread spins against them.

Runs: staleness 1 and the contender alternate (1, N, N, 1, ... for ``--repeats``), so that load
drifting during the benchmark hits both alike. A run's samples/s counts the steps after its
warm-up, up to the moment every gradient push has been applied; a contender's figure is the
median of its runs. The AUC is measured on held-out rows after all steps; with
``reproducible=True`` every run of one staleness scores the same AUC (``auc_repeatable``).

Figures: ``staleness1_samples_per_s``, ``staleness4_samples_per_s`` (the contender's, whatever
``--staleness``), ``staleness4_ratio`` (goal >= 1.3), the held-out AUCs and ``auc_gap`` (goal
<= 0.005), ``bayes_auc`` (what the true click probabilities score on those rows), and where a
step's time goes: the training loop's median milliseconds waiting for the next batch (its lookup
and, at staleness 1, the previous push), in forward, and in backward (back-propagation, queuing
the push, the dense optimizer step); the background threads' median lookup and push
milliseconds (client and round trip); the servers' own p50 milliseconds per Lookup and
PushGradients; the CPU milliseconds per step of the loop's thread, a lookup, a push (their
threads' own), the whole training process (gRPC's threads too) and both servers together
(``*_cpu_ms``: training process plus servers is what has to fit on the machine's cores in one
step's time); ``load_before`` (``uptime``'s 1-minute load) and ``other_load`` (the share of the
machine other processes used). The last line is JSON; ``ratio`` is ``staleness4_ratio``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from _common import OtherLoad, doc_parser, print_summary, rounded  # noqa: E402

from embedding_server.core.config import EmbeddingConfig  # noqa: E402
from embedding_server.core.optimizers import Adagrad  # noqa: E402
from embedding_server.rpc.launcher import ServerGroup  # noqa: E402
from trainer.ctx import TrainCtx  # noqa: E402
from trainer.data import to_batch  # noqa: E402
from trainer.metrics import roc_auc  # noqa: E402
from trainer.models import DLRM  # noqa: E402
from trainer.synthetic import SyntheticCriteo  # noqa: E402

NUM_SPARSE, MULTI_ID, MAX_IDS, DIM = 26, 8, 10, 16
FEATURES = [f"C{i}" for i in range(1, NUM_SPARSE + 1)]
DENSE_LR, SPARSE_LR, INIT_ACC = 1e-3, 0.05, 0.01


def parse_args():
    p = doc_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="fewer steps and rows, one run each (under a minute)")
    p.add_argument("--steps", type=int, help="training steps per run (default 1000; quick 120)")
    p.add_argument("--batch-size", type=int, default=1024, help="samples per step")
    p.add_argument("--eval-rows", type=int, default=100_000, help="held-out rows for the AUC (quick: 30,000)")
    p.add_argument("--staleness", type=int, default=4, help="the contender's embedding_staleness")
    p.add_argument("--repeats", type=int, help="runs of each staleness, alternating (default 2; quick 1)")
    p.add_argument("--workers", type=int, default=2, help="lookup threads (num_workers)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.steps = args.steps or (120 if args.quick else 1000)
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.quick:
        args.eval_rows = min(args.eval_rows, 30_000)
    return args


class TimedCtx(TrainCtx):
    """TrainCtx that records how long each background lookup and gradient push takes, in wall
    time and in CPU time of the thread running it."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lookup_s: list[float] = []
        self.push_s: list[float] = []
        self.lookup_cpu_s: list[float] = []
        self.push_cpu_s: list[float] = []
        push = self.client.push_gradients

        def timed_push(result) -> None:
            t0, c0 = time.perf_counter(), time.thread_time()
            push(result)
            self.push_s.append(time.perf_counter() - t0)
            self.push_cpu_s.append(time.thread_time() - c0)

        self.client.push_gradients = timed_push  # type: ignore[method-assign]

    def _lookup(self, batch, requires_grad, insert):
        t0, c0 = time.perf_counter(), time.thread_time()
        result = super()._lookup(batch, requires_grad, insert)
        if requires_grad:
            self.lookup_s.append(time.perf_counter() - t0)
            self.lookup_cpu_s.append(time.thread_time() - c0)
        return result


def process_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def run(train: list, evals: list, group: ServerGroup, staleness: int, args) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = DLRM(13, NUM_SPARSE, DIM)
    config = EmbeddingConfig.from_dict({"slots_config": {n: {"dim": DIM} for n in FEATURES}})
    warmup = max(5, len(train) // 10)
    phases: dict[str, list[float]] = {"wait": [], "forward": [], "backward": []}
    timed = TimedCtx(
        model=model,
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=DENSE_LR),
        sparse_optimizer=Adagrad(lr=SPARSE_LR, initial_accumulator_value=INIT_ACC),
        embedding_config=config,
        embedding_servers=group.addresses,
    )
    with timed as ctx:
        engine = ctx.lookahead(staleness=staleness, buffer_size=10, num_workers=args.workers, reproducible=True)
        batches = engine.iterate(train)
        pids = [s.process.pid for s in group.servers]
        start = loop_cpu = client_cpu = server_cpu = 0.0
        for k in range(len(train)):
            if k == warmup:
                start, loop_cpu, client_cpu = time.perf_counter(), time.thread_time(), time.process_time()
                server_cpu = process_cpu_s(pids)
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            output, target = ctx.forward(batch)
            t2 = time.perf_counter()
            ctx.backward(F.binary_cross_entropy(output, target))
            t3 = time.perf_counter()
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[name].append(seconds)
        ctx.flush()
        elapsed = time.perf_counter() - start
        loop_cpu, client_cpu = time.thread_time() - loop_cpu, time.process_time() - client_cpu
        server_cpu = process_cpu_s(pids) - server_cpu
        next(batches, None)  # the stream's end: the lookahead stops
        scores = [ctx.predict(b).numpy()[:, 0] for b in evals]
        server = {m["method"]: m["latency_p50_ms"] for s in ctx.client.stats()[:1] for m in s["methods"]}
        stats = engine.stats()
        lookups, pushes = timed.lookup_s[warmup:], timed.push_s[warmup:]

    def ms(values: list[float]) -> float:
        return float(np.median(values)) * 1e3

    timed_steps = len(train) - warmup
    return {
        "samples_per_s": timed_steps * args.batch_size / elapsed,
        "auc": roc_auc(np.concatenate([b.targets[0][:, 0] for b in evals]), np.concatenate(scores)),
        "step_ms": elapsed / timed_steps * 1e3,
        # CPU per step: the training loop's thread, the lookup and push threads, the whole
        # training process (gRPC's own threads too), both servers
        "loop_cpu_ms": loop_cpu / timed_steps * 1e3,
        "client_cpu_ms": client_cpu / timed_steps * 1e3,
        "lookup_cpu_ms": ms(timed.lookup_cpu_s[warmup:]),
        "push_cpu_ms": ms(timed.push_cpu_s[warmup:]),
        "server_cpu_ms": server_cpu / timed_steps * 1e3,
        "wait_ms": ms(phases["wait"][warmup:]),
        "forward_ms": ms(phases["forward"][warmup:]),
        "backward_ms": ms(phases["backward"][warmup:]),
        "lookup_ms": ms(lookups),
        "push_ms": ms(pushes),
        "server_lookup_ms": server.get("Lookup", float("nan")),
        "server_push_ms": server.get("PushGradients", float("nan")),
        "max_outstanding": stats["max_outstanding"],
    }


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.torch_threads)
    data = SyntheticCriteo(seed=args.seed, multi_id_features=MULTI_ID, max_ids=MAX_IDS)
    n = args.batch_size
    train = [to_batch(data.chunk(n, start=i * n)) for i in range(args.steps)]
    eval_start = (args.steps + 10) * n
    eval_chunks = [data.chunk(n, start=eval_start + i * n) for i in range(max(1, args.eval_rows // n))]
    evals = [to_batch(c) for c in eval_chunks]
    ids = sum(f.ids.shape[0] for f in train[0].sparse)
    figures: dict[str, Any] = {
        "steps": args.steps,
        "batch_size": n,
        "ids_per_batch": ids,
        "eval_rows": len(evals) * n,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "torch_threads": args.torch_threads,
        "load_before": load_average(),
        "bayes_auc": float(np.mean([data.bayes_auc(c) for c in eval_chunks])),
    }
    print(f"load average before: {figures['load_before']:.2f} on {os.cpu_count()} cores; {ids:,} ids per batch")
    load = OtherLoad()
    contender = args.staleness
    order = [s for r in range(args.repeats) for s in ((1, contender) if r % 2 == 0 else (contender, 1))]
    results: dict[int, list[dict[str, Any]]] = {1: [], contender: []}
    with warnings.catch_warnings(record=True) as caught, tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("always")
        emb, glob = Path(tmp) / "emb.yml", Path(tmp) / "global.yml"
        emb.write_text(yaml.safe_dump({"slots_config": {f: {"dim": DIM} for f in FEATURES}}, sort_keys=False))
        glob.write_text(yaml.safe_dump({"embedding_parameter_server_config": {"capacity": 4_000_000}}))
        for i, staleness in enumerate(order):
            with ServerGroup.start(emb, glob, num_shards=2, workdir=Path(tmp) / f"run{i}") as group:
                r = run(train, evals, group, staleness, args)
            results[staleness].append(r)
            print(
                f"embedding_staleness {staleness}: {r['samples_per_s']:,.0f} samples/s, step {r['step_ms']:.1f} ms "
                f"(loop: wait {r['wait_ms']:.1f} + forward {r['forward_ms']:.1f} + backward {r['backward_ms']:.1f} ms; "
                f"background: lookup {r['lookup_ms']:.1f}, push {r['push_ms']:.1f} ms; servers: lookup "
                f"{r['server_lookup_ms']:.2f}, push {r['server_push_ms']:.2f} ms; CPU per step: loop "
                f"{r['loop_cpu_ms']:.1f}, lookup {r['lookup_cpu_ms']:.1f}, push {r['push_cpu_ms']:.1f}, "
                f"training process {r['client_cpu_ms']:.1f}, servers "
                f"{r['server_cpu_ms']:.1f} ms), held-out AUC {r['auc']:.4f}, "
                f"at most {r['max_outstanding']} batches outstanding",
                flush=True,
            )
    base, ahead = results[1], results[contender]

    def median(runs: list[dict[str, Any]], key: str) -> float:
        return float(np.median([r[key] for r in runs]))

    figures.update(
        staleness1_samples_per_s=median(base, "samples_per_s"),
        staleness1_auc=base[0]["auc"],
        contender_staleness=contender,
        staleness4_samples_per_s=median(ahead, "samples_per_s"),
        staleness4_auc=ahead[0]["auc"],
        auc_repeatable=all(r["auc"] == runs[0]["auc"] for runs in (base, ahead) for r in runs),
    )
    figures["staleness4_ratio"] = figures["staleness4_samples_per_s"] / figures["staleness1_samples_per_s"]
    figures["auc_gap"] = abs(figures["staleness4_auc"] - figures["staleness1_auc"])
    for key in (
        "step_ms",
        "wait_ms",
        "forward_ms",
        "backward_ms",
        "lookup_ms",
        "push_ms",
        "loop_cpu_ms",
        "lookup_cpu_ms",
        "push_cpu_ms",
        "client_cpu_ms",
        "server_cpu_ms",
    ):
        figures[f"staleness1_{key}"] = median(base, key)
        figures[f"staleness4_{key}"] = median(ahead, key)
    figures["server_lookup_ms"] = median(base, "server_lookup_ms")
    figures["server_push_ms"] = median(base, "server_push_ms")
    figures["other_load"] = load.share()
    figures["ratio"] = figures["staleness4_ratio"]
    print(
        f"staleness {contender} / staleness 1: {figures['ratio']:.2f}x (goal >= 1.3); AUC {figures['staleness1_auc']:.4f} "
        f"vs {figures['staleness4_auc']:.4f}, gap {figures['auc_gap']:.4f} (goal <= 0.005; Bayes AUC "
        f"{figures['bayes_auc']:.4f}); other load {figures['other_load']:.0%}"
    )
    print_summary(rounded(figures), caught)


if __name__ == "__main__":
    main()
