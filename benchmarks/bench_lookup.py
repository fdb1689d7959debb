#!/usr/bin/env python
"""Lookup throughput of the embedding store, in keys/s, against a plain ``numpy.take``.

Workload: batches of 4,096 samples x 26 single-id features (C1..C26, one table each, dim 16),
over a table of 1M rows in total (``--quick``: 200k). The tables are filled first (train mode,
every id looked up once), then every timed lookup asks for random *existing* ids, so every key is
a hit (checked against the servers' miss counters).

Paths measured, each as the median time per batch after warm-up:

* ``numpy.take``  (baseline) the same number of rows gathered from a plain float32
  ``[rows, 16]`` array of random values;
* ``store``       :meth:`EmbeddingStore.lookup` on the batch's precomputed (ids, tables) arrays;
* ``in_process``  :meth:`InProcessEmbeddingClient.lookup` on ``SparseFeature`` objects
  (dedup, store lookup, pooling with ``embedding_bag``);
* ``grpc``        :class:`RemoteEmbeddingClient` against 1 embedding server process;
* ``grpc_2shard`` the same against 2 shard processes.

keys/s counts the batch's sample keys (4,096 x 26 = 106,496 per batch), duplicates included.
The last line printed is one JSON object with every figure; ``ratio`` = ``in_process_ratio``
(keys/s of the in-process client divided by keys/s of ``numpy.take``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embedding_server.batch import SparseFeature  # noqa: E402
from embedding_server.client import InProcessEmbeddingClient  # noqa: E402
from embedding_server.config import EmbeddingConfig, GlobalConfig  # noqa: E402

BATCH = 4096
NUM_FEATURES = 26
DIM = 16
FILL_CHUNK = 131_072


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="small run (200k rows, fewer batches): under 60 s")
    p.add_argument("--rows", type=int, help="rows in all tables together (default 1,000,000; quick 200,000)")
    p.add_argument("--batches", type=int, help="timed batches per path (default 40; quick 12)")
    p.add_argument("--warmup", type=int, help="untimed batches per path first (default 5; quick 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--skip-grpc", action="store_true", help="measure only numpy.take, store and in-process")
    args = p.parse_args()
    args.rows = args.rows or (200_000 if args.quick else 1_000_000)
    args.batches = args.batches or (12 if args.quick else 40)
    args.warmup = args.warmup or (3 if args.quick else 5)
    return args


def features() -> list[str]:
    return [f"C{i}" for i in range(1, NUM_FEATURES + 1)]


def embedding_config_dict() -> dict:
    return {"slots_config": {name: {"dim": DIM} for name in features()}}


def global_config_dict(capacity: int) -> dict:
    return {
        "common_config": {"job_type": "train"},
        "embedding_parameter_server_config": {"capacity": int(capacity)},
        "sparse_optimizer": {"type": "adagrad"},
    }


def median_seconds(fn, batches: list, warmup: int) -> float:
    """Median wall time of fn(batch) over ``batches`` after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(batches[i % len(batches)])
    times = []
    for b in batches:
        t0 = time.perf_counter()
        fn(b)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(name: str, seconds: float, keys: int, base: float | None) -> float:
    rate = keys / seconds
    ratio = f"  ({rate / base:.3f}x numpy.take)" if base else ""
    print(f"  {name:<34} {seconds * 1e3:8.2f} ms/batch  {rate / 1e6:8.2f} M keys/s{ratio}", flush=True)
    return rate


def fill(client, vocab: list[np.ndarray]) -> float:
    """Look every id up once (train mode inserts it); returns seconds taken."""
    ids = np.concatenate(vocab)
    tables = np.concatenate([np.full(v.shape[0], t, np.uint16) for t, v in enumerate(vocab)])
    t0 = time.perf_counter()
    for start in range(0, ids.shape[0], FILL_CHUNK):
        client.lookup_rows(ids[start : start + FILL_CHUNK], tables[start : start + FILL_CHUNK], DIM)
    return time.perf_counter() - t0


def total_misses(client) -> int:
    return sum(s["misses"] for s in client.stats())


def main() -> int:
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    per_table = args.rows // NUM_FEATURES
    rows = per_table * NUM_FEATURES
    keys_per_batch = BATCH * NUM_FEATURES
    mode = "quick" if args.quick else "full"
    print(f"bench_lookup ({mode}): {NUM_FEATURES} features x {BATCH} samples = {keys_per_batch} keys/batch, dim {DIM}, "
          f"{rows} rows ({per_table} per table), {args.batches} timed batches after {args.warmup} warm-up; "
          f"{os.cpu_count()} CPUs", flush=True)

    # Distinct random 64-bit ids per table (hashed ids, as CTR data has).
    vocab = []
    for _ in range(NUM_FEATURES):
        v = np.unique(rng.integers(1, 2**63, size=per_table + per_table // 64 + 16, dtype=np.uint64))
        vocab.append(rng.permutation(v)[:per_table])
    assert all(v.shape[0] == per_table for v in vocab)

    # Batches of existing ids: positions into each table's vocabulary.
    n_batches = args.batches
    batches = []
    for _ in range(n_batches):
        pos = rng.integers(0, per_table, size=(NUM_FEATURES, BATCH))
        batches.append([vocab[t][pos[t]] for t in range(NUM_FEATURES)])
    offsets = np.arange(BATCH + 1, dtype=np.int64)
    feature_batches = [[SparseFeature(name, b[t], offsets) for t, name in enumerate(features())] for b in batches]
    tab_col = np.repeat(np.arange(NUM_FEATURES, dtype=np.uint16), BATCH)
    key_batches = [(np.concatenate(b), tab_col) for b in batches]

    results: dict[str, float] = {}

    # ---------------------------------------------------------------- baseline: numpy.take
    table = rng.random((rows, DIM), dtype=np.float32)  # random values: every page really allocated
    take_idx = [rng.integers(0, rows, size=keys_per_batch) for _ in range(n_batches)]
    print("measuring:", flush=True)
    t = median_seconds(lambda idx: np.take(table, idx, axis=0), take_idx, args.warmup)
    base = report("numpy.take (baseline)", t, keys_per_batch, None)
    results["numpy_take_keys_per_s"] = base
    del table

    # ---------------------------------------------------------------- in-process
    emb = EmbeddingConfig.from_dict(embedding_config_dict())
    glob = GlobalConfig.from_dict(global_config_dict(rows))
    client = InProcessEmbeddingClient(emb, glob, num_shards=1)
    fill_s = fill(client, vocab)
    print(f"  (in-process fill of {rows} rows: {fill_s:.2f} s, {rows / fill_s / 1e6:.2f} M inserts/s)", flush=True)
    results["in_process_fill_rows_per_s"] = rows / fill_s
    store = client.stores[0]
    misses0 = total_misses(client)

    t = median_seconds(lambda kb: store.lookup(*kb), key_batches, args.warmup)
    rate = report("EmbeddingStore.lookup (kernel path)", t, keys_per_batch, base)
    results["store_keys_per_s"] = rate
    results["store_ratio"] = rate / base

    t = median_seconds(client.lookup, feature_batches, args.warmup)
    rate = report("InProcessEmbeddingClient.lookup", t, keys_per_batch, base)
    results["in_process_keys_per_s"] = rate
    results["in_process_ratio"] = rate / base
    misses = total_misses(client) - misses0
    if misses:
        print(f"  WARNING: {misses} misses during in-process measurement (expected all hits)", flush=True)
    results["in_process_misses"] = misses
    del client, store

    # ---------------------------------------------------------------- over gRPC
    if not args.skip_grpc:
        from embedding_server.launcher import ServerGroup
        from embedding_server.remote import RemoteEmbeddingClient

        with tempfile.TemporaryDirectory(prefix="bench_lookup_") as tmp:
            emb_path = Path(tmp) / "embedding_config.yml"
            emb_path.write_text(yaml.safe_dump(embedding_config_dict(), sort_keys=False))
            for shards, key in ((1, "grpc"), (2, "grpc_2shard")):
                # Headroom over rows / shards so that no shard evicts (hashing splits keys unevenly).
                capacity = rows if shards == 1 else int(rows / shards * 1.05) + 1024
                glob_path = Path(tmp) / f"global_config_{shards}.yml"
                glob_path.write_text(yaml.safe_dump(global_config_dict(capacity), sort_keys=False))
                t0 = time.perf_counter()
                group = ServerGroup.start(emb_path, glob_path, num_shards=shards, workdir=Path(tmp) / f"run{shards}", mode="train")
                try:
                    start_s = time.perf_counter() - t0
                    with RemoteEmbeddingClient(emb, group.addresses, timeout=120.0) as remote:
                        fill_s = fill(remote, vocab)
                        print(f"  ({shards} server(s) ready in {start_s:.1f} s; fill of {rows} rows over gRPC: {fill_s:.2f} s)",
                              flush=True)
                        misses0 = total_misses(remote)
                        t = median_seconds(remote.lookup, feature_batches, args.warmup)
                        label = "RemoteEmbeddingClient, 1 server" if shards == 1 else f"RemoteEmbeddingClient, {shards} shards"
                        rate = report(label, t, keys_per_batch, base)
                        misses = total_misses(remote) - misses0
                        if misses:
                            print(f"  WARNING: {misses} misses during {key} measurement (expected all hits)", flush=True)
                        results[f"{key}_keys_per_s"] = rate
                        results[f"{key}_ratio"] = rate / base
                        results[f"{key}_misses"] = misses
                finally:
                    group.stop()

    results["ratio"] = results["in_process_ratio"]
    summary = {
        "benchmark": "bench_lookup",
        "mode": mode,
        "rows": rows,
        "batch_samples": BATCH,
        "features": NUM_FEATURES,
        "dim": DIM,
        "keys_per_batch": keys_per_batch,
        "timed_batches": n_batches,
        "cpus": os.cpu_count(),
        **{k: (round(v, 4) if isinstance(v, float) and v < 1e3 else (round(v) if isinstance(v, float) else v)) for k, v in results.items()},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
