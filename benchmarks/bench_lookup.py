#!/usr/bin/env python
"""Lookup throughput of the embedding store, in keys/s, against a plain ``numpy.take``.

Workload: batches of 4,096 samples x 26 single-id features (C1..C26, one table each, dim 16),
over tables of 1M rows in total (``--quick``: 200k). The tables are filled first (train mode,
every id looked up once), then every timed lookup asks for random *existing* ids, so every key is
a hit (checked against the stores' miss counters).

Paths measured, each as the median time per batch after warm-up:

* ``numpy.take``  (baseline) the same number of rows (106,496) gathered from a plain float32
  ``[rows, 16]`` array of random values, at random positions;
* ``store``       :meth:`EmbeddingStore.lookup` on the batch's precomputed (ids, tables) arrays;
* ``in_process``  :meth:`InProcessEmbeddingClient.lookup` on ``SparseFeature`` objects (every bag
  holds one id, so the client asks the store for the keys as they are and slices the answer);
* ``grpc``        :class:`RemoteEmbeddingClient` against 1 embedding server process, over gRPC
  (``local_lookups=False``);
* ``local``       the same client and server with lookups over the server's local Unix socket
  (the default on one machine, :mod:`embedding_server.rpc.local_lookup`);
* ``grpc_2shard`` and ``local_2shard``: the same two against 2 shard processes.

The baseline runs interleaved with every path (one baseline batch, one path batch, ...), and each
path's ratio is its keys/s over the keys/s of the baseline batches timed beside it: on a shared
machine (caches, other processes) both then see the same conditions. keys/s counts the batch's
sample keys (4,096 x 26 = 106,496), duplicates included.

The last line printed is one JSON object with every figure: ``store_ratio``, ``in_process_ratio``,
``grpc_ratio``, ``local_ratio``, ``grpc_2shard_ratio``, ``local_2shard_ratio`` and ``ratio`` =
``in_process_ratio``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import OtherLoad, doc_parser, measure, print_summary, report, rounded  # noqa: E402

BATCH = 4096
NUM_FEATURES = 26
DIM = 16
FILL_CHUNK = 131_072


def parse_args() -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="small run (200k rows, fewer batches): under 60 s")
    p.add_argument("--rows", type=int, help="rows in all tables together (default 1,000,000; quick 200,000)")
    p.add_argument("--batches", type=int, help="timed batches per path (default 40; quick 20)")
    p.add_argument("--warmup", type=int, help="untimed batches per path first (default 5; quick 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--torch-threads",
        type=int,
        help="torch intra-op threads in this process (default: torch's own default, one per core)",
    )
    p.add_argument("--skip-grpc", action="store_true", help="measure only numpy.take, store and in-process")
    args = p.parse_args()
    args.rows = args.rows or (200_000 if args.quick else 1_000_000)
    args.batches = args.batches or (20 if args.quick else 40)
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


class Baseline:
    """numpy.take of ``keys`` random rows from a float32 [rows, DIM] array of random values."""

    def __init__(self, rng: np.random.Generator, rows: int, keys: int, count: int):
        self.table = rng.random((rows, DIM), dtype=np.float32)  # random values: every page really allocated
        self.indexes = [rng.integers(0, rows, size=keys) for _ in range(count)]
        self.samples: list[float] = []  # every timed baseline batch of the run

    def __call__(self, k: int) -> None:
        np.take(self.table, self.indexes[k % len(self.indexes)], axis=0)


def fill(client, vocab: list[np.ndarray]) -> float:
    """Look every id up once (train mode inserts it); returns seconds taken."""
    ids = np.concatenate(vocab)
    tables = np.concatenate([np.full(v.shape[0], t, np.uint16) for t, v in enumerate(vocab)])
    t0 = time.perf_counter()
    for start in range(0, ids.shape[0], FILL_CHUNK):
        client.lookup_rows(ids[start : start + FILL_CHUNK], tables[start : start + FILL_CHUNK], DIM)
    return time.perf_counter() - t0


def _store_lookup(store, keys: tuple[np.ndarray, np.ndarray]) -> object:
    """One timed store lookup (``store`` is bound with functools.partial: run() deletes its name)."""
    return store.lookup(*keys)


def total_misses(client) -> int:
    return sum(s["misses"] for s in client.stats())


def main() -> int:
    args = parse_args()
    # Warnings the library raises while measuring are collected and printed before the JSON line
    # (so the JSON object stays the last line even when stderr and stdout are merged).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(args)
    print_summary(summary, caught)
    return 0


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    import yaml

    from embedding_server.core.batch import SparseFeature
    from embedding_server.core.config import EmbeddingConfig, GlobalConfig
    from embedding_server.rpc.client import InProcessEmbeddingClient

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load = OtherLoad()
    rng = np.random.default_rng(args.seed)
    per_table = args.rows // NUM_FEATURES
    rows = per_table * NUM_FEATURES
    keys_per_batch = BATCH * NUM_FEATURES
    mode = "quick" if args.quick else "full"
    print(
        f"bench_lookup ({mode}): {NUM_FEATURES} features x {BATCH} samples = {keys_per_batch} keys/batch, dim {DIM}, "
        f"{rows} rows ({per_table} per table), {args.batches} timed batches after {args.warmup} warm-up; "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    # Distinct random 64-bit ids per table (hashed ids, as CTR data has).
    vocab = []
    for _ in range(NUM_FEATURES):
        v = np.unique(rng.integers(1, 2**63, size=per_table + per_table // 64 + 16, dtype=np.uint64))
        vocab.append(rng.permutation(v)[:per_table])
    assert all(v.shape[0] == per_table for v in vocab)

    # Batches of existing ids: random positions into each table's vocabulary.
    batches = []
    for _ in range(args.batches):
        pos = rng.integers(0, per_table, size=(NUM_FEATURES, BATCH))
        batches.append([vocab[t][pos[t]] for t in range(NUM_FEATURES)])
    distinct = statistics.mean(sum(np.unique(col).shape[0] for col in b) for b in batches)
    print(
        f"  (distinct keys per batch: {distinct:.0f} of {keys_per_batch}; the clients deduplicate before asking)",
        flush=True,
    )
    offsets = np.arange(BATCH + 1, dtype=np.int64)
    feature_batches = [[SparseFeature(name, b[t], offsets) for t, name in enumerate(features())] for b in batches]
    tab_col = np.repeat(np.arange(NUM_FEATURES, dtype=np.uint16), BATCH)
    key_batches = [(np.concatenate(b), tab_col) for b in batches]

    baseline = Baseline(rng, rows, keys_per_batch, args.batches)
    per_batch = (keys_per_batch, "keys", "batch", "numpy.take")  # report()'s unit arguments
    results: dict[str, float] = {}

    # ---------------------------------------------------------------- in-process
    emb = EmbeddingConfig.from_dict(embedding_config_dict())
    glob = GlobalConfig.from_dict(global_config_dict(rows))
    client = InProcessEmbeddingClient(emb, glob, num_shards=1)
    fill_s = fill(client, vocab)
    print(f"  (in-process fill of {rows} rows: {fill_s:.2f} s, {rows / fill_s / 1e6:.2f} M inserts/s)", flush=True)
    results["in_process_fill_rows_per_s"] = rows / fill_s
    store = client.stores[0]
    misses0 = total_misses(client)
    print("measuring:", flush=True)
    report(
        results,
        "store",
        "EmbeddingStore.lookup (kernel path)",
        measure(functools.partial(_store_lookup, store), key_batches, args.warmup, baseline, baseline.samples),
        *per_batch,
    )
    report(
        results,
        "in_process",
        "InProcessEmbeddingClient.lookup",
        measure(client.lookup, feature_batches, args.warmup, baseline, baseline.samples),
        *per_batch,
    )
    results["in_process_misses"] = total_misses(client) - misses0
    if results["in_process_misses"]:
        print(f"  WARNING: {results['in_process_misses']} misses in-process (expected all hits)", flush=True)
    del client, store

    # ---------------------------------------------------------------- over gRPC
    if not args.skip_grpc:
        from embedding_server.core.config import JobType
        from embedding_server.rpc.launcher import ServerGroup
        from embedding_server.rpc.remote import RemoteEmbeddingClient
        from embedding_server.rpc.replicas import Transport

        with tempfile.TemporaryDirectory(prefix="bench_lookup_") as tmp:
            emb_path = Path(tmp) / "embedding_config.yml"
            # sort_keys=False: the feature order defines the table indexes (and the config fingerprint).
            emb_path.write_text(yaml.safe_dump(embedding_config_dict(), sort_keys=False))
            for shards, _key in ((1, "grpc"), (2, "grpc_2shard")):
                # Headroom over rows / shards so that no shard evicts (hashing splits keys unevenly).
                capacity = rows if shards == 1 else int(rows / shards * 1.05) + 1024
                glob_path = Path(tmp) / f"global_config_{shards}.yml"
                glob_path.write_text(yaml.safe_dump(global_config_dict(capacity), sort_keys=False))
                t0 = time.perf_counter()
                group = ServerGroup.start(
                    emb_path, glob_path, num_shards=shards, workdir=Path(tmp) / f"run{shards}", mode=JobType.TRAIN
                )
                try:
                    start_s = time.perf_counter() - t0
                    with RemoteEmbeddingClient(emb, group.addresses, timeout=120.0, local_lookups=False) as remote:
                        fill_s = fill(remote, vocab)
                        print(
                            f"  ({shards} server process(es) serving after {start_s:.1f} s; fill of {rows} rows over gRPC: "
                            f"{fill_s:.2f} s)",
                            flush=True,
                        )
                    servers = "1 server" if shards == 1 else f"{shards} shards"
                    for transport in (Transport.GRPC, Transport.LOCAL):
                        path = transport.value if shards == 1 else f"{transport}_{shards}shard"
                        local = transport is Transport.LOCAL
                        with RemoteEmbeddingClient(emb, group.addresses, timeout=120.0, local_lookups=local) as remote:
                            used = {r["transport"] for rs in remote.replica_states() for r in rs}
                            if used != {transport}:
                                raise RuntimeError(f"{path}: the client's replicas use {used}, not {transport}")
                            misses0 = total_misses(remote)
                            report(
                                results,
                                path,
                                f"RemoteEmbeddingClient, {servers}, {'local socket' if local else 'gRPC'}",
                                measure(remote.lookup, feature_batches, args.warmup, baseline, baseline.samples),
                                *per_batch,
                            )
                            results[f"{path}_misses"] = total_misses(remote) - misses0
                            if results[f"{path}_misses"]:
                                print(
                                    f"  WARNING: {results[f'{path}_misses']} misses ({path}; expected all hits)",
                                    flush=True,
                                )
                finally:
                    group.stop()

    base_rate = keys_per_batch / statistics.median(baseline.samples)
    print(
        f"  numpy.take (baseline), all {len(baseline.samples)} batches: {keys_per_batch / base_rate * 1e3:.2f} ms/batch, "
        f"{base_rate / 1e6:.2f} M keys/s",
        flush=True,
    )
    results["numpy_take_keys_per_s"] = base_rate
    results["ratio"] = results["in_process_ratio"]
    other = load.share()
    print(
        f"  (other processes used {other:.0%} of the machine's CPU during this run; above ~10% the figures are noisy)",
        flush=True,
    )
    return {
        "benchmark": "bench_lookup",
        "mode": mode,
        "rows": rows,
        "batch_samples": BATCH,
        "features": NUM_FEATURES,
        "dim": DIM,
        "keys_per_batch": keys_per_batch,
        "timed_batches": args.batches,
        "distinct_keys_per_batch": round(distinct),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "other_load": round(other, 3),
        **rounded(results),
    }


if __name__ == "__main__":
    sys.exit(main())
