#!/usr/bin/env python
"""Resident memory per stored row of the embedding store, against the raw bytes of a row.

Each size runs in a fresh subprocess: it loads the compiled kernels (on a throw-away store),
reads its resident set size (``VmRSS`` of ``/proc/self/status``), creates an
:class:`EmbeddingStore` of capacity exactly N rows (26 tables C1..C26, dim 16, Adagrad, train
mode), fills it with N distinct ids through :meth:`EmbeddingStore.lookup` in chunks of 100k ids,
and reads ``VmRSS`` again. Freed heap memory is returned to the kernel (``malloc_trim``) before
each reading, so temporaries of the lookups do not count.

The raw bytes of a row are its vector plus its Adagrad accumulator: 16 x 4 + 16 x 4 = 128 bytes.
Sizes: 1M and 10M rows (``--quick``: 200k and 1M). The last line printed is one JSON object with
``bytes_per_row_<size>`` and ``ratio_<size>`` (resident bytes per row / 128) for each size, and
``ratio`` = the largest size's ratio.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import doc_parser  # noqa: E402

NUM_FEATURES = 26
DIM = 16
RAW_BYTES_PER_ROW = DIM * 4 + DIM * 4  # float32 vector + float32 Adagrad accumulator
CHUNK = 100_000


def parse_args() -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="sizes 200k and 1M rows instead of 1M and 10M: under 60 s")
    p.add_argument("--sizes", type=int, nargs="+", help="row counts to measure (overrides the mode's sizes)")
    p.add_argument("--child", type=int, metavar="N", help=argparse.SUPPRESS)  # internal: measure one size here
    args = p.parse_args()
    args.sizes = args.sizes or ([200_000, 1_000_000] if args.quick else [1_000_000, 10_000_000])
    return args


def label(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def settle() -> int:
    """Resident bytes after returning freed heap memory to the kernel."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return status_kb("VmRSS") * 1024


def child(n: int) -> int:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from embedding_server.core.config import EmbeddingConfig, GlobalConfig
    from embedding_server.store.store import EmbeddingStore

    emb = EmbeddingConfig.from_dict({"slots_config": {f"C{i}": {"dim": DIM} for i in range(1, NUM_FEATURES + 1)}})

    def make(capacity: int) -> EmbeddingStore:
        glob = GlobalConfig.from_dict(
            {
                "common_config": {"job_type": "train"},
                "embedding_parameter_server_config": {"capacity": capacity},
                "sparse_optimizer": {"type": "adagrad"},
            }
        )
        return EmbeddingStore(emb, glob)

    # Load the compiled kernels (and numpy's, torch-free) code paths before the first reading.
    warm = make(1000)
    warm.lookup(np.arange(1, 101, dtype=np.uint64), np.zeros(100, np.uint16))
    del warm
    rss_before = settle()

    store = make(n)
    rss_empty = settle()
    # Distinct ids: multiplying by an odd constant is a bijection of uint64 (spreads them out).
    mult = np.uint64(0x9E3779B97F4A7C15)
    t0 = time.perf_counter()
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        pos = np.arange(start, stop, dtype=np.uint64)
        ids = pos * mult
        tables = (pos % np.uint64(NUM_FEATURES)).astype(np.uint16)
        store.lookup(ids, tables)
        del pos, ids, tables
    fill_s = time.perf_counter() - t0
    rss_after = settle()
    assert len(store) == n, (len(store), n)
    print(
        json.dumps(
            {
                "rows": n,
                "rss_before": rss_before,
                "rss_empty": rss_empty,
                "rss_after": rss_after,
                "peak_rss": status_kb("VmHWM") * 1024,
                "allocated": store.memory_bytes(),
                "fill_s": fill_s,
            }
        )
    )
    return 0


def main() -> int:
    args = parse_args()
    if args.child is not None:
        return child(args.child)
    mode = "quick" if args.quick else "full"
    print(
        f"bench_memory ({mode}): Adagrad, dim {DIM}, {NUM_FEATURES} tables, raw row = {RAW_BYTES_PER_ROW} bytes "
        f"(vector + accumulator); sizes {', '.join(label(n) for n in args.sizes)}, one fresh process each",
        flush=True,
    )
    summary: dict[str, object] = {
        "benchmark": "bench_memory",
        "mode": mode,
        "dim": DIM,
        "optimizer": "adagrad",
        "raw_bytes_per_row": RAW_BYTES_PER_ROW,
    }
    ratio = None
    for n in args.sizes:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(n)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            raise SystemExit(f"measuring {n} rows failed (exit {proc.returncode})")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        grown = r["rss_after"] - r["rss_before"]
        per_row = grown / n
        ratio = per_row / RAW_BYTES_PER_ROW
        tag = label(n)
        print(
            f"  {tag:>5} rows: RSS {r['rss_before'] / 2**20:8.1f} MiB -> {r['rss_after'] / 2**20:8.1f} MiB "
            f"(empty store: +{(r['rss_empty'] - r['rss_before']) / 2**20:.1f} MiB); "
            f"{per_row:7.1f} bytes/row = {ratio:.3f}x raw; allocated {r['allocated'] / n:.1f} bytes/row; "
            f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB; fill {r['fill_s']:.2f} s ({n / r['fill_s'] / 1e6:.2f} M inserts/s)",
            flush=True,
        )
        summary[f"bytes_per_row_{tag}"] = round(per_row, 2)
        summary[f"ratio_{tag}"] = round(ratio, 4)
        summary[f"allocated_bytes_per_row_{tag}"] = round(r["allocated"] / n, 2)
        summary[f"fill_rows_per_s_{tag}"] = round(n / r["fill_s"])
    if ratio is None:
        raise SystemExit("no store size to measure (--sizes is empty)")
    summary["ratio"] = round(ratio, 4)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
