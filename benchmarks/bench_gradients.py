#!/usr/bin/env python
"""Adagrad gradient-apply throughput of the embedding store, in rows/s, against plain numpy.

Workload: a store of 1M rows in total (``--quick``: 200k) over 26 tables C1..C26 of dim 16 with
Adagrad (default parameters), filled first in train mode. Each timed push carries one gradient
for each of 4,096 x 26 = 106,496 *distinct, existing* keys, drawn at random.

Paths measured, each as the median time per push after warm-up:

* ``numpy``   (baseline) the same Adagrad update written in vectorised numpy on plain float32
  ``[rows, 16]`` weight and accumulator arrays: gather the rows, update, scatter back;
* ``store``   :meth:`EmbeddingStore.apply_gradients` (validation, dedup, hash look-up of the
  rows, compiled update);
* ``kernel``  (extra) the compiled update alone (``kernels.apply_gradients``) on row indices
  resolved beforehand: the same work as the numpy baseline.

The last line printed is one JSON object with every figure; ``ratio`` = store rows/s divided by
numpy rows/s, ``adagrad_rows_per_s`` = store rows/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import OtherLoad, doc_parser, measure, report, rounded  # noqa: E402

if TYPE_CHECKING:
    from embedding_server.core.optimizers import Adagrad

BATCH = 4096
NUM_FEATURES = 26
DIM = 16
FILL_CHUNK = 100_000


def parse_args() -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="small run (200k rows, fewer pushes): under 60 s")
    p.add_argument("--rows", type=int, help="rows in all tables together (default 1,000,000; quick 200,000)")
    p.add_argument("--pushes", type=int, help="timed pushes per path (default 40; quick 20)")
    p.add_argument("--warmup", type=int, help="untimed pushes per path first (default 5; quick 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args()
    args.rows = args.rows or (200_000 if args.quick else 1_000_000)
    args.pushes = args.pushes or (20 if args.quick else 40)
    args.warmup = args.warmup or (3 if args.quick else 5)
    return args


def numpy_adagrad(weights, state, rows, grads, opt: Adagrad) -> None:
    """The store's Adagrad (see kernels.apply_gradients), vectorised: gather, update, scatter."""
    w = np.take(weights, rows, axis=0)  # numpy's fastest row gather
    s = np.take(state, rows, axis=0)
    g = grads + np.float32(opt.weight_decay) * w if opt.weight_decay else grads
    s *= np.float32(opt.g_square_momentum)
    s += g * g
    w -= np.float32(opt.lr) * g / (np.sqrt(s) + np.float32(opt.eps))
    weights[rows] = w
    state[rows] = s


def main() -> int:
    args = parse_args()
    sys.path.insert(0, str(ROOT))
    from embedding_server.core.config import EmbeddingConfig, GlobalConfig
    from embedding_server.core.optimizers import Adagrad
    from embedding_server.store import kernels
    from embedding_server.store.store import EmbeddingStore

    load = OtherLoad()
    rng = np.random.default_rng(args.seed)
    per_table = args.rows // NUM_FEATURES
    rows = per_table * NUM_FEATURES
    n = BATCH * NUM_FEATURES
    mode = "quick" if args.quick else "full"
    print(
        f"bench_gradients ({mode}): Adagrad, dim {DIM}, {n} distinct existing rows per push, store of {rows} rows, "
        f"{args.pushes} timed pushes after {args.warmup} warm-up; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    opt = Adagrad()
    emb = EmbeddingConfig.from_dict({"slots_config": {f"C{i}": {"dim": DIM} for i in range(1, NUM_FEATURES + 1)}})
    glob = GlobalConfig.from_dict(
        {
            "common_config": {"job_type": "train"},
            "embedding_parameter_server_config": {"capacity": rows},
            "sparse_optimizer": opt.to_dict(),
        }
    )
    store = EmbeddingStore(emb, glob)
    ids = np.concatenate(
        [
            np.unique(rng.integers(1, 2**63, size=per_table + per_table // 64 + 16, dtype=np.uint64))[:per_table]
            for _ in range(NUM_FEATURES)
        ]
    )
    assert ids.shape[0] == rows
    tables = np.repeat(np.arange(NUM_FEATURES, dtype=np.uint16), per_table)
    perm = rng.permutation(rows)  # interleave the tables (np.unique sorted each table's ids)
    ids, tables = ids[perm], tables[perm]
    t0 = time.perf_counter()
    for start in range(0, rows, FILL_CHUNK):
        store.lookup(ids[start : start + FILL_CHUNK], tables[start : start + FILL_CHUNK])
    fill_s = time.perf_counter() - t0
    assert len(store) == rows, (len(store), rows)
    print(f"  (fill of {rows} rows: {fill_s:.2f} s)", flush=True)

    # Pushes: distinct existing keys with random gradients.
    pushes = []
    for _ in range(args.pushes):
        sel = rng.choice(rows, size=n, replace=False)
        grads = rng.standard_normal((n, DIM), dtype=np.float32) * np.float32(0.01)
        pushes.append((sel, grads))
    results: dict[str, float] = {}

    # ---------------------------------------------------------------- baseline: numpy, run beside each path
    weights = rng.random((rows, DIM), dtype=np.float32) * np.float32(0.02) - np.float32(0.01)
    state = np.full((rows, DIM), opt.initial_accumulator_value, np.float32)
    base_samples: list[float] = []

    def baseline(k: int) -> None:
        sel, grads = pushes[k % len(pushes)]
        numpy_adagrad(weights, state, sel, grads, opt)

    # The baseline must compute what the store computes: compare both on a few rows.
    w_np, s_np = weights[:1000].copy(), state[:1000].copy()
    w_st, s_st = w_np.copy(), s_np.copy()
    g_chk = rng.standard_normal((1000, DIM), dtype=np.float32)
    numpy_adagrad(w_np, s_np, np.arange(1000), g_chk, opt)
    kind, params = opt.params()
    kernels.apply_gradients(
        w_st,
        s_st,
        np.arange(1000, dtype=np.int64),
        np.full(NUM_FEATURES, DIM, np.int64),
        np.zeros(1000, np.uint16),
        g_chk,
        np.full(NUM_FEATURES, kind, np.int64),  # per table: every table runs this Adagrad
        np.tile(np.array(params, np.float64), (NUM_FEATURES, 1)),
        0.0,
    )
    diff = float(np.abs(w_np - w_st).max())
    print(f"  (numpy baseline vs the store's Adagrad on 1,000 rows: max |weight difference| {diff:.1e})", flush=True)
    assert diff < 1e-5 and np.allclose(s_np, s_st, rtol=1e-6), "the numpy baseline does not match the store's update"

    # ---------------------------------------------------------------- the store
    print("measuring:", flush=True)
    key_pushes = [(ids[sel], tables[sel], grads) for sel, grads in pushes]
    inserts0 = store.counters()["inserts"]
    report(
        results,
        "store",
        "EmbeddingStore.apply_gradients",
        measure(lambda p: store.apply_gradients(*p), key_pushes, args.warmup, baseline, base_samples),
        n,
        "rows",
        "push",
        "numpy",
    )
    results["inserted_during_pushes"] = store.counters()["inserts"] - inserts0
    if results["inserted_during_pushes"]:
        print(
            f"  WARNING: {results['inserted_during_pushes']} rows inserted during the pushes (expected all existing)",
            flush=True,
        )

    # ---------------------------------------------------------------- kernel only (rows resolved)
    # Uses the store's internal arrays: skipped (with a note) if they are renamed.
    try:
        resolved = []
        for k_ids, k_tabs, grads in key_pushes:
            r = np.empty(n, np.int64)
            kernels.find_rows(store._slots, store._salts, k_ids, k_tabs, r)
            assert (r >= 0).all()
            resolved.append((r, k_tabs, grads))
        kind, params = opt.params()
        kinds = np.full(NUM_FEATURES, kind, np.int64)  # per table: every table runs this Adagrad
        param_array = np.tile(np.array(params, np.float64), (NUM_FEATURES, 1))

        def kernel(p):
            kernels.apply_gradients(
                store._weights, store._state, p[0], store._dims, p[1], p[2], kinds, param_array, 0.0
            )

        report(
            results,
            "kernel",
            "kernels.apply_gradients (rows resolved)",
            measure(kernel, resolved, args.warmup, baseline, base_samples),
            n,
            "rows",
            "push",
            "numpy",
        )
    except (AttributeError, TypeError) as exc:
        print(f"  (kernel-only figure skipped: the store's internals changed: {exc})", flush=True)

    base_rate = n / statistics.median(base_samples)
    print(
        f"  numpy gather/update/scatter (baseline), all {len(base_samples)} pushes: "
        f"{n / base_rate * 1e3:.2f} ms/push, {base_rate / 1e6:.2f} M rows/s",
        flush=True,
    )
    results["numpy_adagrad_rows_per_s"] = base_rate
    results["adagrad_rows_per_s"] = results["store_rows_per_s"]
    results["ratio"] = results["store_ratio"]
    other = load.share()
    print(
        f"  (other processes used {other:.0%} of the machine's CPU during this run; above ~10% the figures are noisy)",
        flush=True,
    )
    summary = {
        "benchmark": "bench_gradients",
        "mode": mode,
        "optimizer": "adagrad",
        "rows": rows,
        "rows_per_push": n,
        "dim": DIM,
        "timed_pushes": args.pushes,
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "other_load": round(other, 3),
        **rounded(results),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
