#!/usr/bin/env python
"""Freshness of served embeddings: trainer flush to visible in a serving lookup, local disk and S3;
packet apply rate; lookup latency while big packets are applied.

Workload: 26 tables (C1..C26), dim 16. A trainer (``InProcessEmbeddingClient``, train mode,
``enable_incremental_update`` on, 1 training shard, its publisher's own interval and buffer
triggers set out of reach) and one inference embedding server (a real ``ctrserve
embedding-server`` process, infer mode, ``--model-root``) that loaded the trainer's first
checkpoint and follows the model root.

Parts (the S3 one runs first, see 2):

1. **Freshness, local disk** (``p50_s``, ``p99_s``): each update looks up and pushes gradients
   for ``--update-rows`` distinct rows (spread over the 26 tables, from a vocabulary of
   ``--vocab`` rows), reads back their new values from the trainer, then times from the start of
   ``publisher.flush()`` (encode + atomic write of the packet) until a
   ``RemoteEmbeddingClient.lookup_rows`` of those rows answers exactly those bytes (lookups every
   ``--poll-ms`` ms). The server watches a local root with inotify. Also reported: the time of
   ``flush()`` alone (``flush_p50_s``) and the server's own created-to-applied freshness from its
   Stats RPC (``server_freshness_p50_s``/``_p99_s``: packet creation time, stamped during
   ``flush()``, to the end of its apply; warm-up packets included).
2. **Freshness, S3** (``s3_p50_s``, ``s3_p99_s``): the same against ``s3://`` on a real
   single-node Ceph started by this script (:mod:`ctrserve.ceph_cluster`, memstore OSD, RADOS
   Gateway on loopback) and stopped at the end. The server lists the root every
   ``--s3-poll-interval`` s (the server's default, 1 s). Each flush first waits a random 0 to
   poll-interval seconds, so flushes land at random points of the server's listing cycle (a
   trainer does not flush in step with it; without the wait this loop locks onto the cycle and
   every flush is seen a whole interval later). Runs first, before anything in this process
   uses gRPC (Ceph's tools are forked with a pre-exec hook, which can abort in a process whose
   gRPC threads run). Skipped, with ``s3_skipped`` saying why
   in the JSON, only when Ceph's programs are not installed (``--skip-s3`` skips it on purpose).
3. **Apply rate** (``apply_rows_per_s``, ``apply_overwrite_rows_per_s``; goal >= 5M rows/s):
   ``--apply-packets`` packets of ``--packet-rows`` rows each (distinct random rows of a
   ``--heavy-vocab``-row vocabulary, dim 16) are written to a fresh local model root without
   checkpoint; an in-process ``ModelRootFollower`` on an infer-mode store is started and timed
   until ``wait_synced()``: its initial replay reads, decodes, verifies (checksum, full Arrow
   validation) and applies (``put_many``) every packet, the exact code path of a serving
   follower. Stores here and in 4 are sized as the README says an infer server should be: the
   rows it serves plus its largest packet, the room a packet is staged in while lookups go on. Done twice on the same store: into the empty store (new rows and overwrites, as at
   start-up: ``apply_rows_per_s``), then by a second follower into the store that now holds
   every row (overwrites only, as in steady following: ``apply_overwrite_rows_per_s``). Also
   ``decode_packet`` alone on the same packets (``decode_rows_per_s``), and the rate at which the
   machine commits fresh memory (``fresh_memory_commit_gb_per_s``, 256 MB with huge pages asked
   for, taken after the replays: mostly memory they gave back), reported. Last,
   the replay into another new store, made after the first is freed, so its memory is what the
   first gave back (``apply_reused_memory_rows_per_s``, reported): the same work without the cost
   of committing memory the machine has not touched lately. As in a server, the replay commits
   on 4 KiB pages and, once synced, the follower moves the rows onto huge pages in the
   background; each replay waits for that before the next (``apply_huge_pages_s``: how long the
   first took, reported).
4. **Lookup p99 under heavy applies** (``lookup_p99_ratio``, goal <= 1.5): back on the local
   server of part 1, a client looks up ``--lookup-keys`` existing rows in a loop. Rounds of an
   idle window (``--idle-s`` seconds, no packets) and a busy window (``--busy-packets`` pre-encoded
   packets of ``--packet-rows`` rows written to the model root, lookups running until the
   server's watermark reaches the last one) alternate, swapping which goes first each round.
   A busy window's packets are written and fsynced beforehand to a folder next to the model
   root and renamed into it when the window starts (a rename is how an atomic publish ends), so
   the window measures the server applying them, not this process writing 150 MB of files
   (writing alone, with no apply, disturbs the lookups too).
   ``lookup_p99_ratio`` = p99 latency in busy windows / p99 in idle windows (the same-run
   baseline). ``lookup_live_apply_rows_per_s``: rows written in a busy window / (first write to
   the server's watermark reaching the last packet), a lower bound of the server's apply rate
   while it serves lookups. After the last window the served rows of the last packet are checked
   bit for bit. Run twice: over gRPC (``lookup_*``, the client told ``local_lookups=False``, as a
   handler on another machine looks up) and through the server's local Unix socket
   (``local_lookup_*``, what a client on the server's machine uses by default).
   The server runs with CPU placement (``--apply-cpus``, see ``--apply-cpus`` here; ``placement``
   in the JSON): it applies packets on the last CPU and serves on the others. The gRPC client
   stands in for a handler on another machine, so it runs on the serving CPUs only (on the
   apply CPU it, not the server, would be slowed by the applies); the local-socket client, a
   handler on the same machine, runs wherever the OS puts it.
5. **Lookup p99 under heavy applies, in-process** (``store_lookup_p99_ratio``, reported): part 4
   in one process, without gRPC: lookups straight on an infer-mode store (``store.lookup``) on
   the serving CPUs while its ``ModelRootFollower`` applies the same kind of packets on the apply
   CPU, set up as a server is (kernels warmed up, start-up objects frozen out of the garbage
   collector). It separates the store's own behaviour under applies from the transports sharing
   2 cores with the client.
6. **Part 4 without CPU placement** (``unplaced_lookup_p99_ratio``,
   ``unplaced_local_lookup_p99_ratio``, reported): the server is restarted on the same model root
   without ``--apply-cpus`` and part 4 runs again, clients unpinned: what placement buys. Skipped
   when there is no placement (``--apply-cpus none``, or a single CPU).

``ratio`` = ``p99_s`` / 1.0 s: the local freshness p99 against its goal (not a same-run
baseline: the goal is absolute; <= 1 meets it). Likewise ``s3_ratio`` = ``s3_p99_s`` / 3.0 s
and ``apply_ratio`` = the lower of the two apply rates / 5M (>= 1 meets the goal). ``lookup_p99_ratio`` is
against the idle windows measured in the same run. p99 over N samples is numpy's linear
percentile (with N = 20 it is close to the maximum).

The last line printed is one JSON object with every figure. Everything started (servers, Ceph)
is stopped at the end, also on errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import OtherLoad, doc_parser, rounded  # noqa: E402

NUM_TABLES = 26
DIM = 16
LOCAL_GOAL_S = 1.0
S3_GOAL_S = 3.0
APPLY_GOAL_ROWS_PER_S = 5e6
LOOKUP_GOAL_RATIO = 1.5
HEAVY_ID_BASE = 1 << 40  # heavy-apply rows never collide with the freshness rows


def parse_args() -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="small run: under 60 s on 2 cores")
    p.add_argument("--updates", type=int, help="timed flushes per storage (default 100; quick 20)")
    p.add_argument("--s3-updates", type=int, help="timed flushes on S3 (default 100; quick 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed flushes first (default 2; on S3 at most 1)")
    p.add_argument("--update-rows", type=int, default=4096, help="distinct rows changed per flush (default 4096)")
    p.add_argument(
        "--vocab",
        type=int,
        default=NUM_TABLES * 8192,
        help="rows the updates are drawn from, over all tables (default 212,992)",
    )
    p.add_argument("--poll-ms", type=float, default=2.0, help="pause between freshness lookups (default 2 ms)")
    p.add_argument(
        "--s3-poll-interval",
        type=float,
        default=1.0,
        help="the S3 server's --poll-interval: seconds between listings (default 1, the server's default)",
    )
    p.add_argument("--packet-rows", type=int, help="rows per heavy packet (default 500,000; quick 250,000)")
    p.add_argument("--apply-packets", type=int, help="packets replayed for the apply rate (default 10; quick 4)")
    p.add_argument("--heavy-vocab", type=int, help="rows the heavy packets are drawn from (default 2M; quick 1M)")
    p.add_argument(
        "--rounds",
        type=int,
        help="idle/busy window pairs for the lookup latency (default 8; quick 2). A busy window lasts well "
        "under a second: the p99 of fewer busy lookups swings with any hiccup of the machine",
    )
    p.add_argument("--busy-packets", type=int, help="packets written per busy window (default 4; quick 2)")
    p.add_argument("--idle-s", type=float, help="seconds per idle window (default 2; quick 1)")
    p.add_argument(
        "--lookup-keys",
        type=int,
        default=NUM_TABLES * 256,
        help="keys per lookup in the latency loop (default 6,656 = 256 samples x 26 features)",
    )
    p.add_argument(
        "--apply-cpus",
        default="auto",
        metavar="LIST|auto|none",
        help="the local server's --apply-cpus in parts 1 and 4 (auto, the default: the last CPU this process "
        "may use, when it may use two or more; none: no placement, and no part 6)",
    )
    p.add_argument("--skip-s3", action="store_true", help="do not start Ceph; no S3 figures")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args()
    q = args.quick
    args.updates = args.updates or (20 if q else 100)
    args.s3_updates = args.s3_updates or (8 if q else args.updates)
    args.packet_rows = args.packet_rows or (250_000 if q else 500_000)
    args.apply_packets = args.apply_packets or (4 if q else 10)
    args.heavy_vocab = args.heavy_vocab or (1_000_000 if q else 2_000_000)
    args.rounds = args.rounds or (2 if q else 8)
    args.busy_packets = args.busy_packets or (2 if q else 4)
    args.idle_s = args.idle_s or (1.0 if q else 2.0)
    if args.packet_rows > args.heavy_vocab:
        p.error("--packet-rows must not exceed --heavy-vocab")
    if args.update_rows > args.vocab:
        p.error("--update-rows must not exceed --vocab")
    return args


# --------------------------------------------------------------------------- set-up


def tables() -> list[str]:
    return [f"C{i}" for i in range(1, NUM_TABLES + 1)]


def embedding_config_dict() -> dict:
    return {"slots_config": {name: {"dim": DIM} for name in tables()}}


def train_config_dict(root: str, capacity: int, storage: dict | None = None) -> dict:
    server = {
        "capacity": capacity,
        "enable_incremental_update": True,
        "incremental_dir": f"{root}/incremental",
        # Only the benchmark's explicit flush() publishes: the interval and buffer triggers are out of reach.
        "incremental_flush_interval": 86_400.0,
        "incremental_buffer_size": 1 << 30,
    }
    if storage:
        server["storage"] = storage
    return {
        "common_config": {"job_type": "train"},
        "embedding_parameter_server_config": server,
        "sparse_optimizer": {"type": "adagrad", "lr": 0.05},
    }


def infer_config_dict(capacity: int) -> dict:
    return {"common_config": {"job_type": "infer"}, "embedding_parameter_server_config": {"capacity": capacity}}


def percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples, np.float64)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


class Trainer:
    """The in-process training side: update rows, read their new values, flush a packet."""

    def __init__(self, emb, glob, vocab: int, rng: np.random.Generator):
        from embedding_server.rpc.client import InProcessEmbeddingClient

        self.client = InProcessEmbeddingClient(emb, glob, num_shards=1)
        self.publisher = self.client.publishers[0]
        self.vocab = vocab
        self.rng = rng

    def update(self, rows: int) -> tuple[np.ndarray, np.ndarray, bytes]:
        """Push gradients for ``rows`` distinct random rows; returns (ids, tables, their new values' bytes)."""
        keys = self.rng.choice(self.vocab, rows, replace=False)
        tabs = (keys % NUM_TABLES).astype(np.uint16)
        ids = (keys // NUM_TABLES).astype(np.uint64)
        self.client.lookup_rows(ids, tabs, DIM)  # inserts new rows (initial values: not a change)
        self.client.push_rows(ids, tabs, self.rng.standard_normal((rows, DIM)).astype(np.float32))
        return ids, tabs, self.client.lookup_rows(ids, tabs, DIM).tobytes()

    def close(self) -> None:
        self.client.close()


def freshness_run(
    trainer: Trainer,
    serving,
    count: int,
    warmup: int,
    rows: int,
    poll_s: float,
    timeout_s: float,
    label: str,
    jitter_s: float = 0.0,
) -> tuple[list[float], list[float]]:
    """Time flush start -> served lookup equal to the trainer's values, ``count`` times after
    ``warmup``; each flush first waits a random 0..``jitter_s`` seconds."""
    fresh, flush = [], []
    for i in range(warmup + count):
        ids, tabs, want = trainer.update(rows)
        if jitter_s:
            time.sleep(trainer.rng.uniform(0.0, jitter_s))
        t0 = time.perf_counter()
        trainer.publisher.flush()
        t_flushed = time.perf_counter()
        while True:
            if serving.lookup_rows(ids, tabs, DIM).tobytes() == want:
                break
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(
                    f"{label}: update {i} not served after {timeout_s:.0f} s (watermark "
                    f"{serving.stats()[0].get('watermark')}, published seq {trainer.publisher.last_seq})"
                )
            time.sleep(poll_s)
        t1 = time.perf_counter()
        if i >= warmup:
            fresh.append(t1 - t0)
            flush.append(t_flushed - t0)
    return fresh, flush


def report_freshness(
    results: dict, prefix: str, fresh: list[float], flush: list[float], serving, goal: float, name: str
) -> None:
    p50, p99 = percentiles(fresh)
    f50, f99 = percentiles(flush)
    hot = serving.stats()[0]["hotload"]
    results.update(
        {
            f"{prefix}p50_s": p50,
            f"{prefix}p99_s": p99,
            f"{prefix}max_s": max(fresh),
            f"{prefix}flush_p50_s": f50,
            f"{prefix}flush_p99_s": f99,
            f"{prefix}server_freshness_p50_s": hot["freshness_p50_s"],
            f"{prefix}server_freshness_p99_s": hot["freshness_p99_s"],
            f"{prefix}packets_applied": hot["packets_applied"],
        }
    )
    print(
        f"  {name}: flush -> served p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max {max(fresh) * 1e3:.1f} ms "
        f"over {len(fresh)} flushes (goal p99 < {goal:.0f} s: {'met' if p99 < goal else 'NOT met'}); flush() alone "
        f"p50 {f50 * 1e3:.1f} ms; server created->applied p50 {hot['freshness_p50_s'] * 1e3:.1f} ms, "
        f"p99 {hot['freshness_p99_s'] * 1e3:.1f} ms",
        flush=True,
    )


# --------------------------------------------------------------------------- heavy packets


def heavy_packet(
    emb, rng: np.random.Generator, rows: int, vocab: int, seq: int
) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """An encoded packet of ``rows`` distinct random rows (shard 0 of 1); also its keys and values."""
    from embedding_server.modelroot.packets import encode_packet
    from embedding_server.store.store import TableRows

    keys = np.sort(rng.permutation(vocab)[:rows])
    tabs = (keys % NUM_TABLES).astype(np.uint16)
    order = np.argsort(tabs, kind="stable")
    keys, tabs = keys[order], tabs[order]
    ids = (keys // NUM_TABLES).astype(np.uint64) + np.uint64(HEAVY_ID_BASE)
    weights = rng.standard_normal((rows, DIM)).astype(np.float32)
    bounds = np.searchsorted(tabs, np.arange(NUM_TABLES + 1))
    parts = []
    for t in range(NUM_TABLES):
        lo, hi = bounds[t], bounds[t + 1]
        if hi > lo:
            spec = emb.tables[f"C{t + 1}"]
            parts.append(TableRows(spec, ids[lo:hi], weights[lo:hi], np.zeros((hi - lo, 0), np.float32)))
    # Table indexes follow the config's order; map C<t+1> to its index for lookups.
    index = np.array([emb.tables[f"C{t + 1}"].index for t in range(NUM_TABLES)], np.uint16)[tabs]
    data = encode_packet(parts, shard=0, num_shards=1, seq=seq, fingerprint=emb.fingerprint())
    return data, ids, index, weights


def measure_apply_rate(args, emb, tmp: Path, results: dict) -> None:
    from embedding_server.core.config import GlobalConfig
    from embedding_server.modelroot.hotload import FollowOptions, ModelRootFollower
    from embedding_server.modelroot.packets import decode_packet, packet_dir, packet_name
    from embedding_server.storage.urls import open_storage
    from embedding_server.store.store import EmbeddingStore

    rng = np.random.default_rng(args.seed + 7)
    root = tmp / "apply-root"
    storage = open_storage(str(root))
    blobs = []
    for seq in range(args.apply_packets):
        data = heavy_packet(emb, rng, args.packet_rows, args.heavy_vocab, seq)[0]
        storage.write_atomic(f"{packet_dir(0, 1)}/{packet_name(seq)}", data)
        blobs.append(data)
    total = args.apply_packets * args.packet_rows
    warm = EmbeddingStore(emb, GlobalConfig.from_dict(infer_config_dict(4096)))  # load the compiled kernels first
    warm.put_many(decode_packet(heavy_packet(emb, rng, 1000, 1000, 0)[0], emb).tables)
    del warm

    def new_store() -> EmbeddingStore:
        # Sized as an infer server should be: every row it serves plus its largest packet (room to stage one).
        return EmbeddingStore(
            emb, GlobalConfig.from_dict(infer_config_dict(args.heavy_vocab + args.packet_rows + 1024))
        )

    def replay(store) -> tuple[float, float]:
        """Seconds for a new follower's initial replay of every packet into ``store``, then the
        seconds it took after that to move the rows onto huge pages (as a serving follower does
        in the background; waited for, so the next replay runs on huge pages as a server's
        applies would)."""
        follower = ModelRootFollower(store, str(root), FollowOptions(use_inotify=False, poll_interval_s=3600))
        t0 = time.perf_counter()
        follower.start()
        try:
            follower.wait_synced(600)
            elapsed = time.perf_counter() - t0
            stats = follower.stats()
            if not follower.wait_huge_pages(600):
                raise RuntimeError("apply rate: the follower did not move its rows onto huge pages in 600 s")
            moved = time.perf_counter() - t0 - elapsed
        finally:
            follower.stop()
        if stats["rows_applied"] != total or stats["packets_quarantined"]:
            raise RuntimeError(
                f"apply rate: follower applied {stats['rows_applied']} of {total} rows "
                f"({stats['packets_quarantined']} packets quarantined)"
            )
        return elapsed, moved

    store = new_store()
    empty_s, move_s = replay(store)  # into an empty store: new rows and overwrites, as a server starting up
    held = len(store)
    full_s, _ = replay(store)  # again into the store that now holds every row: overwrites only, as in steady following
    # Once more into a new store, on the memory the first one gave back: the same work without
    # this machine's cost of committing memory it has not touched lately.
    del store
    warm_s, _ = replay(new_store())
    decode_s = 0.0  # the decode + verification share
    for data in blobs:
        a = time.perf_counter()
        decode_packet(data, emb)
        decode_s += time.perf_counter() - a
    mb = sum(len(b) for b in blobs) / 1e6
    commit_gbps = fresh_memory_commit_gbps()
    rate, over = total / empty_s, total / full_s
    results.update(
        {
            "apply_rows_per_s": rate,
            "apply_overwrite_rows_per_s": over,
            "apply_ratio": min(rate, over) / APPLY_GOAL_ROWS_PER_S,
            "apply_rows": total,
            "apply_distinct_rows": held,
            "apply_packet_rows": args.packet_rows,
            "apply_mb": mb,
            "decode_rows_per_s": total / decode_s,
            "fresh_memory_commit_gb_per_s": commit_gbps,
            "apply_reused_memory_rows_per_s": total / warm_s,
            "apply_huge_pages_s": move_s,
        }
    )
    met = min(rate, over) >= APPLY_GOAL_ROWS_PER_S
    print(
        f"  apply rate (follower replay of {args.apply_packets} x {args.packet_rows:,}-row packets, {mb:.0f} MB, "
        f"{held:,} distinct rows, from local disk): {rate / 1e6:.2f} M rows/s into an empty store, {over / 1e6:.2f} M "
        f"rows/s overwriting (goal >= 5 M: {'met' if met else 'NOT met'}); decode_packet alone "
        f"{total / decode_s / 1e6:.2f} M rows/s; this machine commits fresh memory (huge pages) at "
        f"{commit_gbps:.2f} GB/s; into a new store on memory given back by the first: {total / warm_s / 1e6:.2f} M "
        f"rows/s; after the replay, moving the rows onto huge pages took {move_s:.2f} s",
        flush=True,
    )


def fresh_memory_commit_gbps(nbytes: int = 256 << 20) -> float:
    """GB/s at which this machine commits fresh anonymous memory with huge pages asked for
    (``memory.populate``; a start-up replay commits on 4 KiB pages instead, see
    :mod:`embedding_server.store.memory`). Taken after part 3's replays freed their stores, so
    it is mostly memory given back moments before, whose rate varies widely between runs
    (benchmarks/README.md has the figures)."""
    from embedding_server.store.memory import fresh_buffer, populate

    buffer = fresh_buffer(nbytes)
    array = np.frombuffer(buffer, np.uint8)
    t0 = time.perf_counter()
    populate(array, 0, nbytes)
    elapsed = time.perf_counter() - t0
    del array
    buffer.close()
    return nbytes / elapsed / 1e9


def lookup_windows(
    args,
    emb,
    rng: np.random.Generator,
    lookup,
    watermark,
    folder: Path,
    staging: Path,
    first_seq: int,
    pool: tuple[np.ndarray, np.ndarray],
) -> dict:
    """Rounds of an idle and a busy window (see part 4): ``lookup(ids, tables)`` of
    ``--lookup-keys`` keys from ``pool`` in a loop, ``watermark()`` polled every 20 ms in both
    kinds of window; a busy window's packets (seqs from ``first_seq``) are written to
    ``staging`` first and renamed into ``folder`` when it starts. Checks the last packet's rows
    bit for bit. Returns latencies (s), the apply rates seen and the next free seq."""
    from embedding_server.modelroot.packets import packet_name
    from embedding_server.storage.urls import open_storage

    stage = open_storage(str(staging))
    n = min(args.lookup_keys, pool[0].shape[0])
    batches = [
        tuple(a[pick] for a in pool) for pick in (rng.choice(pool[0].shape[0], n, replace=False) for _ in range(64))
    ]
    idle: list[float] = []
    busy: list[float] = []
    rates: list[float] = []

    def lookups_until(done: threading.Event, out: list[float]) -> None:
        k = 0
        while not done.is_set():
            ids, tabs = batches[k % len(batches)]
            k += 1
            t = time.perf_counter()
            lookup(ids, tabs)
            out.append(time.perf_counter() - t)

    def window(out: list[float], blobs: list[tuple[int, bytes]]) -> None:
        """Lookups while the watermark is polled: for ``--idle-s`` (no blobs), or until it
        reaches the last blob after they are renamed in."""
        done, info = threading.Event(), {}
        for seq, data in blobs:
            stage.write_atomic(packet_name(seq), data)

        def publish_and_poll() -> None:
            try:
                t0 = time.perf_counter()
                for seq, _ in blobs:
                    os.rename(staging / packet_name(seq), folder / packet_name(seq))
                last = blobs[-1][0] if blobs else None
                deadline = time.monotonic() + (120 if blobs else args.idle_s)
                while True:
                    mark = watermark()  # polled in both kinds of window alike
                    if last is not None and mark >= last:
                        rates.append(len(blobs) * args.packet_rows / (time.perf_counter() - t0))
                        break
                    if time.monotonic() > deadline:
                        if last is not None:
                            raise RuntimeError(f"seq {last} was not applied within 120 s")
                        break
                    time.sleep(0.02)
            except BaseException as exc:  # reported by the main thread
                info["error"] = exc
            finally:
                done.set()

        poller = threading.Thread(target=publish_and_poll, name="window-poller")
        poller.start()
        lookups_until(done, out)
        poller.join()
        if "error" in info:
            raise RuntimeError(f"heavy apply: {info['error']}")

    for _ in range(3):  # warm the lookup path
        lookup(*batches[0])
    seq = first_seq
    for r in range(args.rounds):
        packets = [
            heavy_packet(emb, rng, args.packet_rows, args.heavy_vocab, seq + k) for k in range(args.busy_packets)
        ]
        blobs = [(seq + k, p[0]) for k, p in enumerate(packets)]
        seq += args.busy_packets
        for kind in [(idle, []), (busy, blobs)] if r % 2 == 0 else [(busy, blobs), (idle, [])]:
            window(*kind)
    _, ids, index, weights = packets[-1]
    sample = rng.choice(ids.shape[0], min(100_000, ids.shape[0]), replace=False)
    if lookup(ids[sample], index[sample]).tobytes() != weights[sample].tobytes():
        raise RuntimeError("heavy apply: the served rows of the last packet differ from the packet")
    return {"idle": idle, "busy": busy, "rates": rates, "keys": n, "next_seq": seq}


def report_windows(results: dict, prefix: str, got: dict, where: str, rate_label: str) -> float:
    """Record and print the windows' figures under ``prefix``; returns the median apply rate."""
    (i50, i99), (b50, b99) = percentiles(got["idle"]), percentiles(got["busy"])
    live = float(np.median(got["rates"]))
    results.update(
        {
            f"{prefix}idle_p50_ms": i50 * 1e3,
            f"{prefix}idle_p99_ms": i99 * 1e3,
            f"{prefix}busy_p50_ms": b50 * 1e3,
            f"{prefix}busy_p99_ms": b99 * 1e3,
            f"{prefix}p99_ratio": b99 / i99,
            f"{prefix}keys": got["keys"],
            f"{prefix}count_idle": len(got["idle"]),
            f"{prefix}count_busy": len(got["busy"]),
        }
    )
    print(
        f"  {where}: lookups of {got['keys']:,} keys: idle p50 {i50 * 1e3:.2f} ms p99 {i99 * 1e3:.2f} ms "
        f"({len(got['idle'])} lookups); while packets apply: p50 {b50 * 1e3:.2f} ms p99 {b99 * 1e3:.2f} ms "
        f"({len(got['busy'])} lookups) = {b99 / i99:.2f}x idle p99 (goal <= {LOOKUP_GOAL_RATIO}: "
        f"{'met' if b99 / i99 <= LOOKUP_GOAL_RATIO else 'NOT met'}); {rate_label} {live / 1e6:.2f} M rows/s; last "
        f"packet served bit for bit",
        flush=True,
    )
    return live


def measure_lookup_under_apply(
    args,
    emb,
    trainer: Trainer,
    serving,
    results: dict,
    lookup_pool: tuple[np.ndarray, np.ndarray],
    prefix: str,
    where: str,
) -> None:
    """Part 4: lookups through ``serving`` from the local server in idle windows vs windows in
    which big packets are applied; figures under ``prefix``."""
    from embedding_server.storage.base import LocalStorage

    storage = trainer.publisher.storage
    if not isinstance(storage, LocalStorage):
        raise RuntimeError(f"part 4 renames packets into place and needs a local model root, not {storage.url}")
    folder = storage.root  # the training shard's packet folder under the model root

    def watermark() -> int:
        streams = serving.stats()[0]["hotload"]["streams"]
        return streams[0]["watermark"] if streams else -1

    got = lookup_windows(
        args,
        emb,
        np.random.default_rng(args.seed + 11),
        lambda ids, tabs: serving.lookup_rows(ids, tabs, DIM),
        watermark,
        folder,
        folder.parent.parent.parent / "heavy-staging",
        trainer.publisher.last_seq + 1,
        lookup_pool,
    )
    trainer.publisher.last_seq = got["next_seq"] - 1  # these seqs are taken (the trainer publishes no more)
    live = report_windows(results, prefix, got, where, "server applied (first rename to watermark)")
    results.update(
        {
            f"{prefix}live_apply_rows_per_s": live,
            f"{prefix}heavy_rows_applied": args.rounds * args.busy_packets * args.packet_rows,
        }
    )


def cpu_placement(args) -> tuple[frozenset[int], frozenset[int]] | None:
    """(serving CPUs, apply CPUs) of the local server, or None for no placement (``--apply-cpus
    none``, or ``auto`` on a single CPU)."""
    from embedding_server.store.cpus import parse_cpu_list, usable_cpus

    usable = usable_cpus()
    if args.apply_cpus == "none" or (args.apply_cpus == "auto" and len(usable) < 2):
        return None
    try:
        apply = frozenset({max(usable)}) if args.apply_cpus == "auto" else parse_cpu_list(args.apply_cpus)
    except ValueError as exc:
        raise SystemExit(f"--apply-cpus: {exc}") from None
    if not apply < usable:
        raise SystemExit(
            f"--apply-cpus {args.apply_cpus}: must leave this process at least one of its CPUs {sorted(usable)}"
        )
    return usable - apply, apply


@contextlib.contextmanager
def client_on(cpus: frozenset[int] | None):
    """Run this process's threads (the client's) only on ``cpus`` meanwhile (None: where they are)."""
    from embedding_server.store.cpus import pin_process, usable_cpus

    before = usable_cpus()
    if cpus is not None:
        pin_process(cpus)
    try:
        yield
    finally:
        if cpus is not None:
            pin_process(before)


def measure_both_ways(
    args,
    emb,
    trainer: Trainer,
    group,
    near,
    results: dict,
    pool: tuple[np.ndarray, np.ndarray],
    placement: tuple[frozenset[int], frozenset[int]] | None,
    prefix: str,
) -> None:
    """Part 4 over gRPC, then through the local socket (``near``: a client that uses it). The
    gRPC client stands in for a handler on another machine, so with a placement it runs on the
    serving CPUs only: on the apply CPUs it would be the one slowed by the applies, not the server."""
    from embedding_server.rpc.remote import RemoteEmbeddingClient

    wait_huge_pages(near)
    with (
        client_on(None if placement is None else placement[0]),
        RemoteEmbeddingClient(emb, group.addresses, local_lookups=False) as over_grpc,
    ):
        measure_lookup_under_apply(args, emb, trainer, over_grpc, results, pool, f"{prefix}lookup_", "server over gRPC")
    print("  the same server through its local socket", flush=True)
    measure_lookup_under_apply(
        args, emb, trainer, near, results, pool, f"{prefix}local_lookup_", "server over its local socket"
    )


def wait_huge_pages(client, timeout_s: float = 120.0) -> None:
    """Wait until the servers have moved the rows they loaded at start-up onto huge pages (in
    the background, once synced): lookups measured meanwhile would measure that move."""
    deadline = time.monotonic() + timeout_s
    while any(s["hotload"] is not None and s["hotload"]["huge_pages_pending"] for s in client.stats()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the servers did not move their rows onto huge pages in {timeout_s:g} s")
        time.sleep(0.05)


def measure_store_lookup_under_apply(args, emb, tmp: Path, results: dict, apply_cpus: frozenset[int] | None) -> None:
    """Part 5: part 4 in one process, without gRPC: lookups straight on an infer-mode store while
    its ModelRootFollower applies the same kind of packets (as a server does: kernels warmed up,
    start-up objects frozen out of the garbage collector, the follower on ``apply_cpus``; the
    caller places the lookups)."""
    import gc

    from embedding_server.core.config import GlobalConfig
    from embedding_server.modelroot.hotload import FollowOptions, ModelRootFollower
    from embedding_server.modelroot.packets import packet_dir, packet_name
    from embedding_server.storage.urls import open_storage
    from embedding_server.store.store import EmbeddingStore

    rng = np.random.default_rng(args.seed + 13)
    root = tmp / "store-root"
    data, ids, index, _ = heavy_packet(emb, rng, args.packet_rows, args.heavy_vocab, 0)
    open_storage(str(root)).write_atomic(f"{packet_dir(0, 1)}/{packet_name(0)}", data)
    store = EmbeddingStore(emb, GlobalConfig.from_dict(infer_config_dict(args.heavy_vocab + args.packet_rows + 1024)))
    store.warm_up()
    follower = ModelRootFollower(store, str(root), FollowOptions(apply_cpus=apply_cpus)).start()
    try:
        follower.wait_synced(120)
        if not follower.wait_huge_pages(120):  # a move measured as part of the windows would distort them
            raise RuntimeError("in-process store: the follower did not move its rows onto huge pages in 120 s")
        gc.freeze()

        def watermark() -> int:
            return follower.stats()["streams"][0]["watermark"]

        got = lookup_windows(
            args, emb, rng, store.lookup, watermark, root / packet_dir(0, 1), tmp / "store-staging", 1, (ids, index)
        )
    finally:
        follower.stop()
        gc.unfreeze()
    report_windows(results, "store_lookup_", got, "in-process store", "follower applied")


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict:
    from embedding_server.core.config import EmbeddingConfig, GlobalConfig
    from embedding_server.modelroot.incremental import publish_checkpoint
    from embedding_server.rpc.remote import RemoteEmbeddingClient
    from embedding_server.store.cpus import format_cpu_list

    load = OtherLoad()
    began = time.monotonic()
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_freshness_")))
    emb = EmbeddingConfig.from_dict(embedding_config_dict())
    emb_path = tmp / "emb.yml"
    emb_path.write_text(yaml.safe_dump(embedding_config_dict(), sort_keys=False))
    # Every row served plus the largest packet: the room a packet is staged in (EmbeddingStore.put_many).
    serve_capacity = args.vocab + args.heavy_vocab + args.packet_rows + 1024
    infer_path = tmp / "infer.yml"
    infer_path.write_text(yaml.safe_dump(infer_config_dict(serve_capacity)))
    rng = np.random.default_rng(args.seed)
    results: dict = {
        "quick": args.quick,
        "updates": args.updates,
        "s3_updates": args.s3_updates,
        "update_rows": args.update_rows,
        "tables": NUM_TABLES,
        "dim": DIM,
    }
    timeout_s = 30.0

    # The local trainer and the checkpoint its server starts from.
    root = tmp / "model"
    trainer = Trainer(emb, GlobalConfig.from_dict(train_config_dict(str(root), args.vocab + 1024)), args.vocab, rng)
    stack.callback(trainer.close)
    trainer.update(args.update_rows)
    publish_checkpoint(trainer.client, str(root))
    placement = cpu_placement(args)
    results["placement"] = (
        None
        if placement is None
        else {"serve_cpus": format_cpu_list(placement[0]), "apply_cpus": format_cpu_list(placement[1])}
    )
    placed = [] if placement is None else ["--apply-cpus", format_cpu_list(placement[1])]
    local_server = (tmp / "servers-local", ["--model-root", str(root)] + placed)

    # 2. S3 on Ceph, first: Ceph's one-shot tools are forked with a pre-exec hook, which can abort
    # in a process whose gRPC threads are already running; nothing here has used gRPC yet. Its
    # server and the local one start together (a server start is mostly imports: seconds).
    results["s3_poll_interval_s"] = args.s3_poll_interval
    from ctrserve import ceph_cluster as ceph

    missing = ceph.missing_binaries()
    if args.skip_s3 or missing:
        why = (
            "--skip-s3 given"
            if args.skip_s3
            else f"Ceph programs not installed: {', '.join(missing)}; {ceph.INSTALL_HINT}"
        )
        print(f"freshness, S3: SKIPPED ({why})", flush=True)
        results.update({"s3_skipped": why, "s3_p50_s": None, "s3_p99_s": None, "s3_ratio": None})
        group = start_servers(stack, emb_path, infer_path, [local_server], results)[0]
    else:
        with contextlib.ExitStack() as s3_stack:  # Ceph, its trainer and server are stopped before the local parts
            s3_trainer, s3_root = setup_s3(args, emb, tmp, ceph, s3_stack, results)
            s3_server = (tmp / "servers-s3", ["--model-root", s3_root, "--poll-interval", str(args.s3_poll_interval)])
            group, s3_group = start_servers(stack, emb_path, infer_path, [local_server, s3_server], results)
            s3_stack.push(s3_group)  # stopped first, before Ceph
            measure_s3(args, emb, s3_trainer, s3_group, results)
            print("  stopping the S3 server and Ceph ...", flush=True)
            t0 = time.monotonic()
        results["ceph_stop_s"] = time.monotonic() - t0
    s3_done = time.monotonic()

    # 1. local disk ---------------------------------------------------------------------------
    print(
        f"freshness, local disk: {args.updates} flushes of {args.update_rows:,} rows (26 tables, dim 16), "
        f"lookups every {args.poll_ms:g} ms",
        flush=True,
    )
    serving = stack.enter_context(RemoteEmbeddingClient(emb, group.addresses))
    fresh, flush = freshness_run(
        trainer, serving, args.updates, args.warmup, args.update_rows, args.poll_ms / 1e3, timeout_s, "local"
    )
    report_freshness(results, "", fresh, flush, serving, LOCAL_GOAL_S, "local disk (inotify)")
    served_ids, served_tabs = served_rows(trainer)  # every row the trainer changed: all served, all hits
    local_done = time.monotonic()

    # 3. apply rate (in-process, no server) -----------------------------------------------------
    print(f"apply rate: follower replay of {args.apply_packets} packets x {args.packet_rows:,} rows", flush=True)
    measure_apply_rate(args, emb, tmp, results)

    # 4. lookups under heavy applies, on the local server ----------------------------------------
    where = "" if placement is None else f" (server: --apply-cpus {results['placement']['apply_cpus']})"
    print(
        f"lookup latency: {args.rounds} rounds of an idle window ({args.idle_s:g} s) and a busy window "
        f"({args.busy_packets} x {args.packet_rows:,}-row packets){where}",
        flush=True,
    )
    measure_both_ways(args, emb, trainer, group, serving, results, (served_ids, served_tabs), placement, "")
    print("lookup latency, in-process store (no gRPC, no second process)", flush=True)
    with client_on(None if placement is None else placement[0]):
        measure_store_lookup_under_apply(args, emb, tmp, results, None if placement is None else placement[1])
    group.stop()

    # 6. part 4 on a server without CPU placement -------------------------------------------------
    if placement is not None:
        print(
            "lookup latency, part 4 again on a server without CPU placement (restarted on the same model root)",
            flush=True,
        )
        unplaced = start_servers(
            stack, emb_path, infer_path, [(tmp / "servers-unplaced", ["--model-root", str(root)])], {}
        )[0]
        with RemoteEmbeddingClient(emb, unplaced.addresses) as near:
            measure_both_ways(args, emb, trainer, unplaced, near, results, (served_ids, served_tabs), None, "unplaced_")
        unplaced.stop()
    heavy_done = time.monotonic()

    results["ratio"] = results["p99_s"] / LOCAL_GOAL_S
    results["goals_met"] = {
        "local_p99_under_1s": results["p99_s"] < LOCAL_GOAL_S,
        "s3_p99_under_3s": None if results.get("s3_p99_s") is None else results["s3_p99_s"] < S3_GOAL_S,
        "apply_at_least_5M_rows_per_s": results["apply_ratio"] >= 1.0,
        "lookup_p99_at_most_1_5x_idle": results["lookup_p99_ratio"] <= LOOKUP_GOAL_RATIO,
    }
    results["phase_seconds"] = {
        "setup_and_s3": round(s3_done - began, 1),
        "local": round(local_done - s3_done, 1),
        "apply_and_lookups": round(heavy_done - local_done, 1),
    }
    results["other_load"] = load.share()
    results["cpus"] = os.cpu_count()
    return results


def start_servers(
    stack: contextlib.ExitStack, emb_path: Path, infer_path: Path, servers: list[tuple[Path, list[str]]], results: dict
) -> list:
    """Start one infer-mode server per (workdir, extra args), all at once; each is stopped by ``stack``."""
    from concurrent.futures import ThreadPoolExecutor

    from embedding_server.core.config import JobType
    from embedding_server.rpc.launcher import ServerGroup

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(servers)) as pool:
        futures = [
            pool.submit(
                ServerGroup.start,
                emb_path,
                infer_path,
                num_shards=1,
                workdir=workdir,
                mode=JobType.INFER,
                metrics=True,
                extra_args=extra,
            )
            for workdir, extra in servers
        ]
    groups, error = [], None
    for future in futures:
        try:
            groups.append(stack.enter_context(future.result()))
        except BaseException as exc:  # the others are registered (and so stopped) first
            error = error or exc
    if error is not None:
        raise error
    results["server_start_s"] = time.monotonic() - t0
    return groups


def served_rows(trainer: Trainer) -> tuple[np.ndarray, np.ndarray]:
    """Every row the trainer holds (ids, table indexes): all were updated and published."""
    ids, tabs = [], []
    for store in trainer.client.stores:
        for rows in store.rows():
            ids.append(rows.ids)
            tabs.append(np.full(rows.ids.shape[0], rows.table.index, np.uint16))
    return np.concatenate(ids), np.concatenate(tabs)


def setup_s3(args, emb, tmp: Path, ceph, stack: contextlib.ExitStack, results: dict) -> tuple[Trainer, str]:
    """Start Ceph (stopped by ``stack``), point the environment at it, and make the S3 trainer
    with the checkpoint its server starts from; returns the trainer and the model root."""
    from embedding_server.core.config import GlobalConfig
    from embedding_server.modelroot.incremental import publish_checkpoint

    print(
        f"freshness, S3 (real Ceph, RADOS Gateway on loopback): {args.s3_updates} flushes, server lists every "
        f"{args.s3_poll_interval:g} s",
        flush=True,
    )
    t0 = time.monotonic()
    cluster = ceph.CephCluster.start(tmp / "ceph", die_with_parent=True)
    stack.callback(cluster.stop)
    bucket = "bench"
    cluster.create_bucket(bucket)
    results["ceph_start_s"] = time.monotonic() - t0
    for name, value in cluster.env().items():  # the server processes inherit them
        os.environ[name] = value
    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")
    os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "WHEN_REQUIRED")
    root = f"s3://{bucket}/freshness-{uuid.uuid4().hex[:8]}"
    storage = {"endpoint": cluster.endpoint, "access_key": cluster.access_key, "secret_key": cluster.secret_key}
    trainer = Trainer(
        emb,
        GlobalConfig.from_dict(train_config_dict(root, args.vocab + 1024, storage)),
        args.vocab,
        np.random.default_rng(args.seed + 3),
    )
    stack.callback(trainer.close)
    trainer.update(args.update_rows)
    publish_checkpoint(trainer.client, root, storage_options=storage)
    return trainer, root


def measure_s3(args, emb, trainer: Trainer, group, results: dict) -> None:
    from embedding_server.rpc.remote import RemoteEmbeddingClient

    with RemoteEmbeddingClient(emb, group.addresses) as serving:
        fresh, flush = freshness_run(
            trainer,
            serving,
            args.s3_updates,
            min(args.warmup, 1),
            args.update_rows,
            args.poll_ms / 1e3,
            max(30.0, 10 * args.s3_poll_interval),
            "s3",
            jitter_s=args.s3_poll_interval,
        )
        report_freshness(
            results, "s3_", fresh, flush, serving, S3_GOAL_S, f"S3 on Ceph (listing every {args.s3_poll_interval:g} s)"
        )
    results["s3_ratio"] = results["s3_p99_s"] / S3_GOAL_S
    results["s3_p99_over_poll_interval"] = results["s3_p99_s"] / args.s3_poll_interval


def main() -> int:
    args = parse_args()

    def on_sigterm(signum, frame):  # the finally blocks stop the servers and Ceph
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    with contextlib.ExitStack() as stack:
        results = run(args, stack)
        print("stopping servers and Ceph ...", flush=True)
    print(f"ratio (local freshness p99 / 1 s goal) = {results['ratio']:.3f}", flush=True)
    print(json.dumps(rounded(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
