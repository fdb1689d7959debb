"""Structure-aware fuzzing of the three decoders that read untrusted bytes.

Targets:

* ``batch``: :func:`embedding_server.core.batch_codec.decode_batch` (the batch bytes clients send).
* ``packet``: :func:`embedding_server.modelroot.packets.decode_packet` (incremental packets from the model root).
* ``request``: :meth:`handler.request.RequestDecoder.decode` (TorchServe request items: batch
  bytes, JSON bytes, JSON text, already-parsed JSON objects).

Each input is made from a seed and its index alone (``random.Random(f"{seed}:{index}")``), so
any failure is reproduced by ``--seed S --index I``. Inputs start from valid encodings and are
mutated the way real corruption and real attackers do: header and JSON fields set to huge,
negative or mistyped values with the checksum recomputed (so the check behind it is reached),
truncations, byte flips, 8-byte fields overwritten with huge sizes, Arrow columns of other
types, metadata that lies. Fixed inputs claiming 10^12 elements come first.

Per input the decoder must either return a self-consistent result or raise the documented
exception (``InvalidRequestError``/``PacketError``/``RequestError``); within
``--time-bound`` seconds; and with a traced peak allocation (tracemalloc: Python objects and
numpy arrays) within ``ALLOC_BOUND``. The process also runs under ``RLIMIT_AS`` (its address
space at start plus ``--address-space-mb``), so an untraced huge allocation fails too. A crash
(segfault in pyarrow, say) kills only this process: run it as a subprocess
(:func:`run_in_subprocess`) and a non-zero exit is the failure.

Run: ``python -m ctrserve.fuzz --target batch --inputs 1000 --seed 1``; the last line is
JSON ``{"target", "inputs", "seconds", "failures": [...], "max_input_seconds", "max_peak_bytes"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedding_server.core.batch import SparseFeature
from embedding_server.core.batch_codec import MAGIC, BatchData, decode_batch, encode_batch
from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.errors import InvalidRequestError

HUGE = [2**31, 2**32 - 1, 2**40 - 1, 10**12, 2**53, 2**63, 2**64 - 1, 2**64, 10**30, -1, -(2**63)]
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    1.5,
    float("nan"),
    "",
    "x",
    [],
    {},
    [1],
    {"a": 1},
    "\u0000",
    "é" * 3,
]
#: Peak traced bytes one input may allocate: a fixed allowance plus a multiple of its size
#: (parsed JSON takes many times its bytes in Python objects).
ALLOC_FIXED = 32 << 20
ALLOC_PER_INPUT_BYTE = 40
EMB = EmbeddingConfig.from_dict(
    {
        "slots_config": {
            "C1": {"dim": 4},
            "C2": {"dim": 8},
            "H1": {"dim": 4, "embedding_summation": False, "sample_fixed_size": 3},
        },
        "feature_groups": {"g": ["C1", "H1"]},
    }
)
DENSE_WIDTH = 3


# --------------------------------------------------------------------------- shared mutations


def flip_bytes(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def huge_word(rng: random.Random, data: bytes) -> bytes:
    """Overwrite an aligned 4- or 8-byte field with a huge or negative size."""
    buf = bytearray(data)
    width = rng.choice((4, 8))
    if len(buf) < width:
        return bytes(buf)
    pos = rng.randrange(0, len(buf) - width + 1) & ~(width - 1)
    value = rng.choice(HUGE) % (1 << (8 * width))
    buf[pos : pos + width] = value.to_bytes(width, "little")
    return bytes(buf)


def splice(rng: random.Random, data: bytes) -> bytes:
    """Insert, delete or duplicate a chunk."""
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.randint(1, 64))
    return rng.choice(
        (
            data[:a] + data[b:],
            data[:b] + data[a:b] + data[b:],
            data[:a] + os.urandom(0) + bytes(rng.randrange(256) for _ in range(b - a)) + data[b:],
        )
    )


BYTE_MUTATORS = (flip_bytes, truncate, huge_word, splice)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 3)):
        data = rng.choice(BYTE_MUTATORS)(rng, data)
    return data


def mutate_json_value(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """A copy of a JSON value with one node replaced, removed or added somewhere inside."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        out = dict(value)
        choice = rng.random()
        if choice < 0.15:
            del out[key]
        elif choice < 0.25:
            out[rng.choice(["extra", "", "batch_size", "dense", "sparse", "meta", "ids", "\u0000"])] = rng.choice(
                ODD_VALUES + HUGE
            )
        else:
            out[key] = mutate_json_value(rng, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        items = list(value)
        i = rng.randrange(len(items))
        choice = rng.random()
        if choice < 0.15:
            del items[i]
        elif choice < 0.25:
            items.insert(i, rng.choice(ODD_VALUES + HUGE))
        elif choice < 0.3:
            items = items * rng.randint(2, 4)
        else:
            items[i] = mutate_json_value(rng, items[i], depth + 1)
        return items
    return rng.choice(ODD_VALUES + HUGE + [[[]] * rng.randint(0, 5), [[2**64 - 1, 0]], "[" * 50])


# --------------------------------------------------------------------------- batch bytes


def random_batch(rng: random.Random) -> BatchData:
    batch = rng.choice((0, 1, 2, 5, 17))
    nprng = np.random.default_rng(rng.randrange(2**32))
    metas: tuple[dict[str, str | int | float], ...] = ({}, {"request": "r1", "n": 3, "x": 0.5})
    data = BatchData(meta=rng.choice(metas))
    for dtype in rng.sample([np.float32, np.float64, np.int32, np.int64], rng.randint(0, 2)):
        data.dense.append(nprng.normal(size=(batch, rng.randint(0, 4))).astype(dtype))
    data.sparse = [
        SparseFeature.from_lists(
            name, [nprng.integers(0, 2**63, rng.randint(0, 4)).astype(np.uint64) for _ in range(batch)]
        )
        for name in rng.sample(["C1", "C2", "H1", "other", "é"], rng.randint(0 if data.dense else 1, 3))
    ]
    if rng.random() < 0.3:
        data.targets.append(nprng.random((batch, 1)).astype(np.float32))
    return data


def _frame(header: bytes, payload: bytes, fix_len: bool = True, fix_crc: bool = True, version: int = 1) -> bytes:
    body = header + payload
    prefix = struct.pack("<4sHHI", MAGIC, version, 0, len(header) if fix_len else 0)
    return prefix + body + struct.pack("<I", zlib.crc32(body) if fix_crc else 0)


def _split(encoded: bytes) -> tuple[dict, bytes]:
    hlen = struct.unpack_from("<I", encoded, 8)[0]
    header = json.loads(encoded[12 : 12 + hlen])
    return header, encoded[12 + hlen : -4]


def mutate_batch_header(rng: random.Random, encoded: bytes) -> bytes:
    """Change a header field, keep the length and checksum right: the payload checks are reached."""
    header, payload = _split(encoded)
    field = rng.choice(["batch_size", "dense", "sparse", "targets", "meta", "any"])
    if field == "batch_size":
        header["batch_size"] = rng.choice(
            HUGE + ODD_VALUES + [header["batch_size"] + 1, max(0, header["batch_size"] - 1)]
        )
    elif field in ("dense", "sparse", "targets") and header[field]:
        entry = dict(rng.choice(header[field]))
        key = rng.choice(list(entry))
        entry[key] = rng.choice(HUGE + ODD_VALUES + ["f16", "f32", "u8"])
        header[field] = header[field] + [entry] if rng.random() < 0.3 else [entry] + header[field][1:]
    else:
        header = mutate_json_value(rng, header)
    raw = json.dumps(header, allow_nan=True).encode() if rng.random() < 0.95 else b"\xff\xfe{"
    return _frame(raw, payload)


def mutate_batch_payload(rng: random.Random, encoded: bytes) -> bytes:
    """Corrupt the payload (offsets, ids, lengths) and recompute the checksum."""
    header, payload = _split(encoded)
    raw = json.dumps(header).encode()
    return _frame(raw, rng.choice((flip_bytes, truncate, huge_word, splice))(rng, payload))


def claimed_huge_batches() -> list[bytes]:
    """Valid frames whose headers claim ~10^12 elements with a tiny payload."""
    base: dict[str, Any] = {"dense": [], "sparse": [], "targets": [], "meta": {}}
    return [
        _frame(json.dumps({**base, "batch_size": 10**12, "sparse": [{"name": "C1", "ids": 10**12}]}).encode(), b""),
        _frame(
            json.dumps({**base, "batch_size": 1, "sparse": [{"name": "C1", "ids": 10**12}]}).encode(),
            struct.pack("<qq", 0, 10**12),
        ),
        _frame(
            json.dumps({**base, "batch_size": 10**6, "dense": [{"dtype": "f64", "width": 10**6}]}).encode(), b"\0" * 64
        ),
        _frame(json.dumps({**base, "batch_size": 2**40 - 1, "targets": [{"width": 2**40 - 1}]}).encode(), b""),
        struct.pack("<4sHHI", MAGIC, 1, 0, 2**32 - 1) + b"{}" + b"\0\0\0\0",
    ]


def batch_input(rng: random.Random) -> bytes:
    encoded = encode_batch(random_batch(rng))
    kind = rng.random()
    if kind < 0.05:
        return encoded
    if kind < 0.45:
        return mutate_batch_header(rng, encoded)
    if kind < 0.7:
        return mutate_batch_payload(rng, encoded)
    return mutate_bytes(rng, encoded)


def check_batch(data: bytes) -> None:
    try:
        decoded = decode_batch(data)
    except InvalidRequestError:
        return
    for f in decoded.sparse:  # a decoded batch is consistent and encodes back to the same bytes
        assert f.offsets[0] == 0 and f.offsets[-1] == f.ids.shape[0] and (np.diff(f.offsets) >= 0).all()
    again = decode_batch(encode_batch(decoded))
    assert [f.ids.tolist() for f in again.sparse] == [f.ids.tolist() for f in decoded.sparse]


# --------------------------------------------------------------------------- packets


def _packets_module():
    from embedding_server.modelroot import packets

    return packets


def random_packet(rng: random.Random) -> bytes:
    from embedding_server.store.store import TableRows

    nprng = np.random.default_rng(rng.randrange(2**32))
    tables = []
    for spec in rng.sample(list(EMB.tables.values()), rng.randint(0, len(EMB.tables))):
        n = rng.choice((0, 1, 3, 10))
        tables.append(
            TableRows(
                spec,
                nprng.integers(0, 2**64 - 1, n, dtype=np.uint64),
                nprng.normal(size=(n, spec.dim)).astype(np.float32),
                np.zeros((n, 0), np.float32),
            )
        )
    return _packets_module().encode_packet(
        tables, shard=rng.randrange(4), num_shards=4, seq=rng.randrange(2**40), fingerprint=EMB.fingerprint()
    )


def _rewrite(table, metadata: dict | None = None, columns: list | None = None, names: list | None = None) -> bytes:
    import pyarrow as pa

    columns = columns if columns is not None else table.columns
    names = names if names is not None else table.schema.names
    out = pa.Table.from_arrays(columns, names=names).replace_schema_metadata(
        metadata if metadata is not None else table.schema.metadata
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, out.schema) as writer:
        writer.write_table(out)
    return sink.getvalue().to_pybytes()


def mutate_packet_metadata(rng: random.Random, data: bytes) -> bytes:
    import pyarrow as pa

    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    key = rng.choice(list(meta) + ["extra"])
    meta[key] = str(rng.choice(HUGE + ODD_VALUES + ["1e999", "nan", "-0", "0x10", " 1", "１"]))
    if rng.random() < 0.3:
        meta.pop(rng.choice(list(meta)))
    return _rewrite(table, metadata=meta)


def mutate_packet_columns(rng: random.Random, data: bytes) -> bytes:
    """Columns of other types or shapes, with the checksum recomputed where it can be."""
    import pyarrow as pa

    packets = _packets_module()
    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    n = table.num_rows
    choice = rng.randrange(7)
    columns, names = list(table.columns), list(table.schema.names)
    if choice == 0:  # a weight of the wrong length (checksum fixed: the dim check must catch it)
        lengths = [rng.choice((0, 1, 3, 4, 8, 9)) for _ in range(n)]
        flat = np.zeros(sum(lengths), np.float32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        columns[2] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        index = table.column("table").combine_chunks()
        names_list = index.dictionary.to_pylist() if n else []
        meta["checksum"] = str(
            packets._checksum(
                names_list,
                index.indices.to_numpy(zero_copy_only=False).astype(np.int16) if n else np.zeros(0, np.int16),
                table.column("id").to_numpy(),
                flat,
            )
        )
    elif choice == 1:  # unknown table names, checksum fixed
        index = pa.array(np.zeros(n, np.int16), pa.int16())
        dictionary = pa.array([rng.choice(["nope", "", "C1", "g", "../x"])], pa.string())
        columns[0] = pa.DictionaryArray.from_arrays(index, dictionary)
        flat = table.column("weight").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        meta["checksum"] = str(
            packets._checksum(
                dictionary.to_pylist() if n else [], np.zeros(n, np.int16), table.column("id").to_numpy(), flat
            )
        )
    elif choice == 2:  # ids of another type
        columns[1] = (
            pa.array([str(i) for i in range(n)]) if rng.random() < 0.5 else pa.array(np.arange(n, dtype=np.int64) - 5)
        )
    elif choice == 3:  # weights of another type
        columns[2] = pa.array([[1] * 4 for _ in range(n)], pa.list_(pa.int64()))
    elif choice == 4:  # a missing or extra column
        if rng.random() < 0.5:
            columns, names = columns[:-1], names[:-1]
        else:
            columns, names = columns + [pa.array(np.zeros(n))], names + ["extra"]
    elif choice == 5:  # table as a plain string column
        columns[0] = pa.array(["C1"] * n)
    else:  # rows interleaved across tables (non-contiguous), checksum fixed
        if n >= 2:
            order = list(range(n))
            rng.shuffle(order)
            columns = [c.take(pa.array(order)) for c in columns]
            index = columns[0].combine_chunks()
            flat = columns[2].combine_chunks().flatten().to_numpy(zero_copy_only=False)
            meta["checksum"] = str(
                packets._checksum(
                    index.dictionary.to_pylist(),
                    index.indices.to_numpy(zero_copy_only=False).astype(np.int16),
                    columns[1].to_numpy(),
                    flat,
                )
            )
    return _rewrite(table, metadata=meta, columns=columns, names=names)


def claimed_huge_packets() -> list[bytes]:
    import pyarrow as pa

    base = random_packet(random.Random(0))
    table = pa.ipc.open_file(pa.BufferReader(base)).read_all()
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    out = [
        _rewrite(table, metadata={**meta, "rows": str(10**12)}),
        _rewrite(table, metadata={**meta, "seq": str(10**30)}),
    ]
    out += [huge_word(random.Random(i), base) for i in range(8)]
    return out


def packet_input(rng: random.Random) -> bytes:
    data = random_packet(rng)
    kind = rng.random()
    if kind < 0.05:
        return data
    if kind < 0.3:
        return mutate_packet_metadata(rng, data)
    if kind < 0.55:
        return mutate_packet_columns(rng, data)
    return mutate_bytes(rng, data)


def check_packet(data: bytes) -> None:
    packets = _packets_module()
    try:
        packet = packets.decode_packet(data, EMB, "fuzz")
    except packets.PacketError as exc:
        # decode_packet wraps Arrow errors; an allocation Arrow could not make is not "corrupt
        # input" but an unbounded allocation attempt (RLIMIT_AS turns it into ArrowMemoryError).
        assert "malloc" not in str(exc) and "out of memory" not in str(exc).lower(), f"allocation attempt: {exc}"
        return
    for t in packet.tables:  # a decoded packet holds rows of known tables with vectors of their dim
        assert EMB.tables[t.table.name] == t.table and t.weights.shape == (t.ids.shape[0], t.table.dim)


# --------------------------------------------------------------------------- handler requests


def _decoder():
    from embedding_server.core.model_spec import DenseModelSpec
    from handler.request import RequestDecoder

    spec = DenseModelSpec.for_config(EMB, version=1, step=1, dense_width=DENSE_WIDTH)
    return RequestDecoder(
        spec,
        max_batch_size=64,
        max_request_bytes=1 << 20,
        max_ids_per_request=500,
        max_ids_per_sample=20,
        max_json_request_bytes=256 << 10,
    )


def _valid_request(rng: random.Random) -> dict:
    batch = rng.randint(1, 6)
    return {
        "dense": [[rng.uniform(-1, 1) for _ in range(DENSE_WIDTH)] for _ in range(batch)],
        "sparse": {
            name: [[rng.randrange(2**64) for _ in range(rng.randint(0, 3))] for _ in range(batch)]
            for name in ("C1", "C2", "H1")
        },
    }


def request_input(rng: random.Random) -> dict | list | None:
    """A TorchServe request item: ``{"body" | "data" | "batch": bytes | str | dict}`` (rarely a
    malformed item: None, a list or a dict without those keys)."""
    doc = _valid_request(rng)
    kind = rng.random()
    if kind < 0.35:
        body: Any = json.dumps(mutate_json_value(rng, doc) if rng.random() < 0.9 else doc, allow_nan=True)
    elif kind < 0.45:
        body = mutate_json_value(rng, doc)  # already parsed (TorchServe parses application/json)
    elif kind < 0.6:
        body = mutate_bytes(rng, json.dumps(doc).encode())
    elif kind < 0.85:
        data = BatchData(
            dense=[np.array(doc["dense"], np.float32)],
            sparse=[SparseFeature.from_lists(n, [[int(i) for i in s] for s in v]) for n, v in doc["sparse"].items()],
        )
        encoded = encode_batch(data)
        body = rng.choice((mutate_batch_header, mutate_batch_payload, lambda r, b: mutate_bytes(r, b)))(rng, encoded)
    else:
        body = rng.choice(
            [
                b"",
                "",
                b"{",
                "{" * 5000,
                b"{" + b"[" * 100_000,
                "\ud800{}",
                b"\xef\xbb\xbf{}",
                b"{" + os.urandom(64),
                '{"sparse": {"C1": [[1e400]]}}',
                '{"dense": [[NaN, 1, 2]], "sparse": {"C1": [[1]], "C2": [[1]], "H1": [[1]]}}',
                '{"sparse": {"C1": [[-1]], "C2": [[]], "H1": [[]]}}',
                '{"sparse": {"C1": [[true]], "C2": [[]], "H1": [[]]}}',
                12,
                None,
                ["x"],
                3.5,
            ]
        )
        if isinstance(body, str) and rng.random() < 0.5:
            body = body.encode("utf-8", errors="surrogatepass")
    key = rng.choice(("body", "data", "batch"))
    return {key: body} if rng.random() < 0.97 else rng.choice([None, {}, {"other": body}, []])


def claimed_huge_requests() -> list[dict]:
    return [{"body": b} for b in claimed_huge_batches()] + [
        {"body": json.dumps({"sparse": {"C1": [[0] * 10] * 10_000, "C2": [], "H1": []}})},
        {"body": {"dense": [[0.0] * 10**5], "sparse": {}}},
    ]


def check_request(item: Any) -> None:
    from handler.request import RequestError

    decoder = _DECODER[0] or _DECODER.__setitem__(0, _decoder()) or _DECODER[0]
    try:
        decoded = decoder.decode(item)
    except RequestError as exc:
        assert 400 <= exc.code < 500 and exc.message
        return
    limits = decoder.limits
    assert 0 < decoded.batch_size <= limits.max_batch_size
    assert decoded.dense.shape == (decoded.batch_size, DENSE_WIDTH) and np.isfinite(decoded.dense).all()
    assert [f.name for f in decoded.sparse] == decoder.feature_names
    assert sum(f.ids.shape[0] for f in decoded.sparse) <= limits.max_ids_per_request
    assert all(f.batch_size == decoded.batch_size for f in decoded.sparse)


_DECODER: list = [None]


# --------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class Target:
    make: Callable[[random.Random], Any]
    check: Callable[[Any], None]
    fixed: Callable[[], list]


TARGETS = {
    "batch": Target(batch_input, check_batch, claimed_huge_batches),
    "packet": Target(packet_input, check_packet, claimed_huge_packets),
    "request": Target(request_input, check_request, claimed_huge_requests),
}


def inputs(target: str, count: int, seed: int, start: int = 0) -> Iterator[tuple[int, Any]]:
    """``(index, input)`` pairs; the fixed huge-claim inputs first (indexes -1, -2, ...)."""
    spec = TARGETS[target]
    if start == 0:
        for i, fixed in enumerate(spec.fixed()):
            yield -1 - i, fixed
    for index in range(start, start + count):
        yield index, spec.make(random.Random(f"{seed}:{index}"))


def _size(value: Any) -> int:
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values()) + 8 * len(value)
    if isinstance(value, list):
        return sum(_size(v) for v in value) + 8 * len(value)
    return 8


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 300 else text[:300] + f"... ({len(text)} chars)"


def fuzz(target: str, count: int, seed: int, time_bound: float = 2.0, start: int = 0) -> dict:
    """Run ``count`` inputs of ``target`` in this process; a summary with every failure.

    A failure is an exception other than the documented one, a violated property of a decoded
    result, an input slower than ``time_bound`` seconds, or a traced peak above the allowance.
    """
    spec = TARGETS[target]
    failures, tried, slowest, peak_max = [], 0, 0.0, 0
    started = time.perf_counter()
    tracemalloc.start()
    for index, value in inputs(target, count, seed, start):
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        problem = None
        try:
            spec.check(value)
        except AssertionError as exc:
            problem = f"property violated: {exc!r}"
        except Exception as exc:  # anything undocumented
            problem = f"undocumented {type(exc).__name__}: {exc}"[:500]
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - base
        tried += 1
        slowest, peak_max = max(slowest, elapsed), max(peak_max, peak)
        allowance = ALLOC_FIXED + ALLOC_PER_INPUT_BYTE * _size(value)
        if problem is None and elapsed > time_bound:
            problem = f"slow: {elapsed:.2f} s > {time_bound} s"
        if problem is None and peak > allowance:
            problem = f"allocated {peak} bytes > allowance {allowance}"
        if problem:
            failures.append(
                {"target": target, "seed": seed, "index": index, "problem": problem, "input": _describe(value)}
            )
    tracemalloc.stop()
    return {
        "target": target,
        "seed": seed,
        "start": start,
        "inputs": tried,
        "seconds": round(time.perf_counter() - started, 2),
        "failures": failures,
        "max_input_seconds": round(slowest, 4),
        "max_peak_bytes": peak_max,
    }


def _import_everything() -> None:
    """Import and warm up what the targets use lazily (pyarrow, the handler), and run one valid
    input of each, so that the address-space cap measures decoding, not start-up."""
    for target in TARGETS.values():
        target.check(target.make(random.Random("warm-up")))


def limit_address_space(extra_mb: int) -> None:
    """Cap this process's address space at its current size plus ``extra_mb`` MiB."""
    import resource

    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[0])
    limit = pages * os.sysconf("SC_PAGE_SIZE") + (extra_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_in_subprocess(
    target: str,
    count: int,
    seed: int,
    start: int = 0,
    timeout: float = 600,
    time_bound: float = 2.0,
    address_space_mb: int = 2048,
) -> dict:
    """:func:`fuzz` in a child process, so a crash or hang is reported, not suffered.

    Returns:
        The child's summary; on a crash, timeout or missing summary, a summary whose single
        failure says what happened (exit status, last lines of stderr).
    """
    cmd = [
        sys.executable,
        "-m",
        "ctrserve.fuzz",
        "--target",
        target,
        "--inputs",
        str(count),
        "--seed",
        str(seed),
        "--start",
        str(start),
        "--time-bound",
        str(time_bound),
        "--address-space-mb",
        str(address_space_mb),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "target": target,
            "seed": seed,
            "start": start,
            "inputs": 0,
            "failures": [{"target": target, "problem": f"hang: no summary within {timeout} s"}],
        }
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {
            "target": target,
            "seed": seed,
            "start": start,
            "inputs": 0,
            "failures": [
                {
                    "target": target,
                    "seed": seed,
                    "problem": f"child exited with {done.returncode} (a negative value is a signal: a crash)",
                    "stderr": done.stderr[-2000:],
                }
            ],
        }
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS), required=True)
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start", type=int, default=0, help="index of the first generated input")
    parser.add_argument("--index", type=int, help="run only this input (reproduce a failure) and print it")
    parser.add_argument("--time-bound", type=float, default=2.0, help="seconds one input may take")
    parser.add_argument("--address-space-mb", type=int, default=2048, help="RLIMIT_AS above the start size (0: none)")
    args = parser.parse_args(argv)
    if args.address_space_mb:
        _import_everything()  # libraries map their code and pools at import: count only what decoding needs
        limit_address_space(args.address_space_mb)
    if args.index is not None:
        value = next(v for i, v in inputs(args.target, args.index + 1, args.seed, 0) if i == args.index)
        print(_describe(value))
        TARGETS[args.target].check(value)
        print("ok")
        return 0
    print(json.dumps(fuzz(args.target, args.inputs, args.seed, args.time_bound, args.start)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
