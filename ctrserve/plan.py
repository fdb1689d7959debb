"""``ctrserve plan``: embedding shards and memory per pod for a table size.

Sized from the store's own allocation per row (:mod:`embedding_server.store.plan`), for the
given row count and, for comparison, for 10^8 to 10^10 rows with the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from embedding_server.core.errors import ConfigError
from embedding_server.core.optimizers import OPTIMIZERS
from embedding_server.store.plan import Plan, format_bytes, parse_bytes, plan

SCALE = (10**8, 10**9, 10**10)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="embedding shards and memory per pod for N rows",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", required=True, type=float, help="rows in all tables together (e.g. 1e9)")
    p.add_argument("--dim", required=True, type=int, help="the widest embedding dim")
    p.add_argument(
        "--optimizer",
        default="adagrad",
        choices=sorted(OPTIMIZERS),
        help="training's sparse optimizer (default adagrad)",
    )
    p.add_argument("--replicas", type=int, default=1, help="serving replicas per shard (default 1)")
    p.add_argument("--memory-per-pod", default="64GiB", help="memory of one embedding-server pod (default 64GiB)")
    p.add_argument(
        "--headroom",
        type=float,
        default=0.25,
        help="fraction of a pod kept for requests, packet applies and slack (default 0.25)",
    )
    p.add_argument(
        "--base-memory", default="1GiB", help="a ready server without rows: Python, kernels, gRPC (default 1GiB)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        memory, base = parse_bytes(args.memory_per_pod), parse_bytes(args.base_memory)
        settings = dict(
            dim=args.dim,
            optimizer=args.optimizer,
            memory_per_pod=memory,
            replicas=args.replicas,
            headroom=args.headroom,
            base_memory=base,
        )
        main = plan(int(args.rows), **settings)
        scale = [plan(rows, **settings) for rows in SCALE]
    except ValueError as exc:
        raise ConfigError(f"plan: {exc}") from None
    if args.json:
        print(json.dumps({"plan": _as_dict(main), "scale": [_as_dict(p) for p in scale]}))
        return 0
    print(
        f"{main.rows:.3g} rows of dim {main.dim}, {main.optimizer} training, pods of "
        f"{format_bytes(main.memory_per_pod)} ({main.headroom:.0%} headroom, {format_bytes(main.base_memory)} base)"
    )
    for tier in (main.train, main.serve):
        print(
            f"  {tier.mode.value:5s}: {tier.bytes_per_row:6.1f} B/row -> {tier.shards} shards x {tier.replicas} "
            f"replicas = {tier.pods} pods, capacity {tier.capacity:,} rows/shard, "
            f"{format_bytes(tier.memory_per_pod)} per pod"
        )
    print("at other sizes (same settings):")
    print(
        f"  {'rows':>8s}  {'train shards':>12s}  {'train mem/pod':>13s}  {'serve shards':>12s}  {'serve pods':>10s}  {'serve mem/pod':>13s}"
    )
    for p in scale:
        print(
            f"  {p.rows:8.0e}  {p.train.shards:12d}  {format_bytes(p.train.memory_per_pod):>13s}  "
            f"{p.serve.shards:12d}  {p.serve.pods:10d}  {format_bytes(p.serve.memory_per_pod):>13s}"
        )
    return 0


def _as_dict(p: Plan) -> dict:
    out = dataclasses.asdict(p)
    for key in ("train", "serve"):
        out[key]["mode"] = out[key]["mode"].value
    return out
