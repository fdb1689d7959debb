"""Capacity planning: how many shards a table of N rows needs, and the memory of each pod.

The bytes of one row come from the store's own allocation (:func:`~embedding_server.store.store.store_layout`):
per row of capacity, the vector (``4 x dim``), the optimizer state (``4 x max(1, width)``;
Adagrad's width is ``dim``, Adam's ``2 x dim + 1``; serving keeps none but one float), the
index slots (``16 / LOAD_FACTOR``), the row's slot and LRU tick (4 + 4), the free-row stack
(8), and in serving the staged-apply link (4) or in training with incremental updates the
changed flag (1). That is what the store allocates; it commits it as rows are used
(``benchmarks/bench_memory.py`` measures the resident bytes of a full store: 158.9 B per row for
Adagrad at dim 16, where this gives 166.9 B: the free stack is only touched once rows are evicted).

A pod holds ``base + capacity x bytes_per_row`` and keeps ``headroom`` of its memory for the
rest (requests in flight, a packet being applied, allocator slack; docs/operations.md#memory-bounds
has the exact bounds). Shards must also stay under the store's per-shard limit of ``2^31 - 2`` rows.

Example:
    >>> p = plan(10**9, dim=16, optimizer="adagrad", memory_per_pod=64 << 30, replicas=2)
    >>> p.train.shards, p.serve.shards, p.serve.pods
    (4, 3, 6)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from embedding_server.core.config import JobType
from embedding_server.core.optimizers import OPTIMIZERS, SparseOptimizer
from embedding_server.store.store import store_layout

MAX_SHARD_ROWS = 2**31 - 2  # EmbeddingStore refuses a capacity of 2^31 - 1 or more
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """``"64GiB"``, ``"64Gi"``, ``"500MB"``, ``"1e9"`` -> bytes.

    Raises:
        ValueError: not a size.
    """
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 64GiB, 500MB)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    return int(number * _UNITS[unit])


def bytes_per_row(dim: int, state_width: int, mode: JobType, tracks_changes: bool = False) -> float:
    """Bytes the store allocates per row of capacity (see the module docstring), from
    :func:`store_layout` at a large capacity (the per-store constants vanish)."""
    rows = 1 << 24
    layout = store_layout(rows, dim, state_width, mode, tracks_changes)
    total = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in layout.values())
    return total / rows


@dataclass(frozen=True)
class Tier:
    """Shards of one mode.

    Attributes:
        mode: train (with optimizer state; one server per shard) or infer (serving replicas).
        bytes_per_row: allocated bytes per row of capacity.
        shards: shard count.
        capacity: rows per shard.
        replicas: servers per shard.
        pods: shards x replicas.
        memory_per_pod: bytes a pod needs (base + rows), without the headroom.
    """

    mode: JobType
    bytes_per_row: float
    shards: int
    capacity: int
    replicas: int
    pods: int
    memory_per_pod: int


@dataclass(frozen=True)
class Plan:
    rows: int
    dim: int
    optimizer: str
    memory_per_pod: int
    headroom: float
    base_memory: int
    train: Tier
    serve: Tier


def plan(
    rows: int,
    dim: int,
    optimizer: str | SparseOptimizer = "adagrad",
    memory_per_pod: int = 64 << 30,
    replicas: int = 1,
    headroom: float = 0.25,
    base_memory: int = 1 << 30,
    incremental: bool = True,
) -> Plan:
    """Shards and per-pod memory for ``rows`` rows of width ``dim``.

    Args:
        rows: rows to hold (all tables together).
        dim: the widest embedding dim.
        optimizer: ``sgd``, ``adagrad``, ``adam`` or an optimizer object (training's state).
        memory_per_pod: bytes of one embedding-server pod.
        replicas: serving replicas per shard (training has one server per shard).
        headroom: fraction of a pod's memory kept for everything but the rows.
        base_memory: bytes of a ready server without rows (interpreter, kernels, gRPC).
        incremental: training writes packets (a changed flag per row).

    Raises:
        ValueError: a bad argument, or a pod too small to hold any rows.
    """
    if rows < 1 or dim < 1 or replicas < 1 or not 0 <= headroom < 1:
        raise ValueError("rows, dim and replicas must be >= 1 and headroom in [0, 1)")
    if isinstance(optimizer, str):
        if optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; one of {', '.join(OPTIMIZERS)}")
        name, opt = optimizer.lower(), OPTIMIZERS[optimizer.lower()]()
    else:
        name, opt = type(optimizer).__name__.lower(), optimizer
    usable = memory_per_pod * (1 - headroom) - base_memory
    if usable <= 0:
        raise ValueError(f"a pod of {memory_per_pod} bytes has no room for rows after headroom and base memory")

    def tier(mode: JobType, state_width: int, tracks: bool, copies: int) -> Tier:
        per_row = bytes_per_row(dim, state_width, mode, tracks)
        fits = min(MAX_SHARD_ROWS, int(usable // per_row))
        if fits < 1:
            raise ValueError(f"a pod of {memory_per_pod} bytes cannot hold one row of {per_row:.0f} bytes")
        shards = math.ceil(rows / fits)
        capacity = math.ceil(rows / shards)
        return Tier(mode, per_row, shards, capacity, copies, shards * copies, int(base_memory + capacity * per_row))

    return Plan(
        rows,
        dim,
        name,
        memory_per_pod,
        headroom,
        base_memory,
        train=tier(JobType.TRAIN, opt.state_width(dim), incremental, 1),
        serve=tier(JobType.INFER, 0, False, replicas),
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    raise AssertionError("unreachable")
