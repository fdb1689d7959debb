#!/usr/bin/env python
"""Feature-op throughput: rows per second of a RecIS-like feature pipeline at serving and
training batch sizes.

Workload: the feature ops of RecIS's CTR example (``embedding_config.yml`` slots with ``ops``):
``dense2`` bucketized by 3 boundaries, ``sparse3`` mod 10,000, ``sparse4`` (1 to 2,000 ids a row)
mod 10,000 and truncated to 1,000 ids, ``sparse5`` (1 to 2,000 ids) hashed (farm), mod 10,000 and
truncated, and ``sparse1_x_sparse2`` crossed and mod 1,000; plus ``sparse1`` read as it is. Raw
inputs are random (seeded), drawn once per batch size; each timed call is
``FeaturePipeline.apply`` on one batch (the numba kernels compiled before timing).

Batch sizes 64 (a serving request) and 4,096 (a training batch); per size the median of
``--repeats`` calls, reported as rows/s and ids/s (ids the ops make). The last line printed is
one JSON object: ``b<batch>_rows_per_s``, ``b<batch>_ids_per_s``, ``b<batch>_ms`` and the
sequence lengths used.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import doc_parser  # noqa: E402

RECIS_SLOTS = {
    "dense2": {"dim": 8, "table": "sparse1", "ops": [{"select": "dense2"}, {"bucketize": [0, 0.5, 1]}]},
    "sparse1": {"dim": 8},
    "sparse3": {"dim": 8, "ops": [{"select": "sparse3"}, {"mod": 10000}]},
    "sparse4": {
        "dim": 16,
        "ops": [{"select": "sparse4"}, {"mod": 10000}, {"truncate": {"seq_len": 1000, "side": "right"}}],
    },
    "sparse5": {
        "dim": 16,
        "ops": [{"select": "sparse5"}, "hash", {"mod": 10000}, {"truncate": {"seq_len": 1000, "side": "right"}}],
    },
    "sparse1_x_sparse2": {"dim": 16, "ops": [{"select": ["sparse1", "sparse2"]}, "cross", {"mod": 1000}]},
}


def parse_args():
    p = doc_parser(__doc__)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 4096], help="rows per call (default 64 4096)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per batch size (default 30)")
    p.add_argument(
        "--max-seq", type=int, default=2000, help="longest sparse4 / sparse5 row, as RecIS's example (default 2000)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    return p.parse_args()


def inputs(rows: int, max_seq: int, rng: np.random.Generator) -> dict:
    from embedding_server.core.batch import SparseFeature

    def ids(lengths: np.ndarray, high: int) -> SparseFeature:
        offsets = np.zeros(rows + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return SparseFeature("raw", rng.integers(0, high, int(offsets[-1]), dtype=np.uint64), offsets)

    one = np.ones(rows, np.int64)
    return {
        "dense2": rng.random((rows, 1)),
        "sparse1": ids(one, 1 << 20),
        "sparse2": ids(one, 1 << 20),
        "sparse3": ids(one, 1 << 40),
        "sparse4": ids(rng.integers(1, max_seq, rows), 1_000_000),
        "sparse5": ids(rng.integers(1, max_seq, rows), 1 << 63),  # farm fingerprints of strings
    }


def main() -> int:
    args = parse_args()
    from embedding_server.core.config import EmbeddingConfig
    from embedding_server.core.feature_ops import FeaturePipeline

    pipeline = FeaturePipeline.from_config(EmbeddingConfig.from_dict({"slots_config": RECIS_SLOTS}))
    rng = np.random.default_rng(args.seed)
    print(
        f"bench_features: RecIS-like pipeline ({len(pipeline.slot_names)} slots with ops), sequences up to "
        f"{args.max_seq} ids; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    pipeline.apply(inputs(8, args.max_seq, rng))  # compile the kernels
    results: dict[str, float] = {"max_seq": args.max_seq}
    for bs in args.batch_sizes:
        batch = inputs(bs, args.max_seq, rng)
        made = sum(f.ids.size for f in pipeline.apply(batch))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pipeline.apply(batch)
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        results[f"b{bs}_ms"] = median * 1e3
        results[f"b{bs}_rows_per_s"] = bs / median
        results[f"b{bs}_ids_per_s"] = made / median
        print(
            f"  batch {bs:>5}: {median * 1e3:8.3f} ms, {bs / median:12,.0f} rows/s, {made / median:14,.0f} ids/s",
            flush=True,
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
