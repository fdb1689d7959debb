"""The batch bytes clients send to a server: dense arrays, named sparse features and targets.

One versioned binary layout, shared by the trainer (``PyPersiaBatchData.to_bytes``) and the
TorchServe handler (which decodes what clients send). It is safe to decode untrusted bytes:
nothing is unpickled or evaluated, every size is checked against the buffer before an array is
made, and any inconsistency raises :class:`InvalidRequestError` naming the problem.

Layout (all integers little-endian)::

    magic   4 bytes  b"CTRB"
    version u16      FORMAT_VERSION
    flags   u16      0 (reserved)
    hlen    u32      length of the header
    header  hlen     UTF-8 JSON: {"batch_size": B,
                                  "dense":   [{"dtype": "f32"|"f64"|"i32"|"i64", "width": w}, ...],
                                  "sparse":  [{"name": str, "ids": n}, ...],
                                  "targets": [{"width": t}, ...],
                                  "meta":    {str: str|int|float}}
    payload          for each dense part: B*w values of its dtype, row-major;
                     for each sparse feature: int64 offsets [B+1], then uint64 ids [n];
                     for each target: float32 [B, t]
    crc32   u32      zlib.crc32 of header + payload

Example:
    >>> data = BatchData(dense=[np.ones((2, 3), np.float32)],
    ...                  sparse=[SparseFeature.from_lists("user", [[1], [2, 3]])])
    >>> decode_batch(encode_batch(data)).sparse[0].ids.tolist()
    [1, 2, 3]
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from embedding_server.core import batch_kernels
from embedding_server.core.batch import KeyedIds, SparseFeature
from embedding_server.core.errors import InvalidRequestError, describe_value

MAGIC = b"CTRB"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHHI")
_CRC = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 20
DENSE_DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype("<f4"),
    "f64": np.dtype("<f8"),
    "i32": np.dtype("<i4"),
    "i64": np.dtype("<i8"),
}
_OFFSETS = np.dtype("<i8")
_IDS = np.dtype("<u8")
_TARGET = np.dtype("<f4")


@dataclass
class BatchData:
    """A decoded batch.

    Args:
        dense: 2-D arrays ``[batch, width]`` (float32, float64, int32 or int64).
        sparse: named sparse features, each of ``batch`` samples (:func:`decode_batch` gives
            them as one :class:`~embedding_server.core.batch.KeyedIds`, itself a sequence of them).
        targets: float32 ``[batch, t]`` label arrays (training only; may be empty).
        meta: small scalar annotations (a request id, a client name).
    """

    dense: list[np.ndarray] = field(default_factory=list)
    sparse: list[SparseFeature] | KeyedIds = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)
    meta: dict[str, str | int | float] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """The batch size all parts share (checked by :func:`check_parts`)."""
        return check_parts(self)


def check_parts(data: BatchData) -> int:
    """Validate shapes and dtypes of every part; returns the shared batch size.

    Raises:
        InvalidRequestError: a part with the wrong rank or dtype, or parts disagreeing on the
            batch size, or a batch with no parts at all.
    """
    for i, d in enumerate(data.dense):
        if not isinstance(d, np.ndarray) or d.ndim != 2:
            raise InvalidRequestError(f"dense[{i}] must be a 2-D array [batch, width], got {describe_value(d)}")
        if _dtype_code(d.dtype) is None:
            raise InvalidRequestError(f"dense[{i}] has dtype {d.dtype}; use one of float32, float64, int32, int64")
    for i, t in enumerate(data.targets):
        if not isinstance(t, np.ndarray) or t.ndim != 2 or t.dtype != np.float32:
            raise InvalidRequestError(f"target[{i}] must be a 2-D float32 array [batch, t], got {describe_value(t)}")
    # The sizes alone first; the message naming every part is built only for a bad batch.
    sparse_sizes = (
        {data.sparse.batch_size}
        if isinstance(data.sparse, KeyedIds) and len(data.sparse)
        else {f.batch_size for f in data.sparse}
    )
    sizes = {d.shape[0] for d in data.dense} | sparse_sizes | {t.shape[0] for t in data.targets}
    if not sizes:
        raise InvalidRequestError("empty batch: no dense, sparse or target parts")
    if len(sizes) != 1:
        named = {f"dense[{i}]": d.shape[0] for i, d in enumerate(data.dense)}
        named.update({f"sparse '{f.name}'": f.batch_size for f in data.sparse})
        named.update({f"target[{i}]": t.shape[0] for i, t in enumerate(data.targets)})
        raise InvalidRequestError(f"batch parts disagree on the batch size: {named}")
    names = list(data.sparse.names) if isinstance(data.sparse, KeyedIds) else [f.name for f in data.sparse]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"a sparse feature appears twice: {sorted(n for n in names if names.count(n) > 1)}")
    return sizes.pop()


def encode_batch(data: BatchData) -> bytes:
    """The bytes of ``data`` in the layout above.

    Raises:
        InvalidRequestError: the parts are inconsistent (see :func:`check_parts`).
    """
    batch_size = check_parts(data)
    header = {
        "batch_size": batch_size,
        "dense": [{"dtype": _dtype_code(d.dtype), "width": int(d.shape[1])} for d in data.dense],
        "sparse": [{"name": f.name, "ids": int(f.ids.shape[0])} for f in data.sparse],
        "targets": [{"width": int(t.shape[1])} for t in data.targets],
        "meta": data.meta,
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    parts = [header_bytes]
    for d in data.dense:
        code = _dtype_code(d.dtype)
        if code is None:  # never: check_parts refused other dtypes
            raise InvalidRequestError(f"dense dtype {d.dtype}; use one of float32, float64, int32, int64")
        parts.append(np.ascontiguousarray(d, DENSE_DTYPES[code]).tobytes())
    for f in data.sparse:
        parts.append(np.ascontiguousarray(f.offsets, _OFFSETS).tobytes())
        parts.append(np.ascontiguousarray(f.ids, _IDS).tobytes())
    for t in data.targets:
        parts.append(np.ascontiguousarray(t, _TARGET).tobytes())
    body = b"".join(parts)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_bytes))
    return prefix + body + _CRC.pack(zlib.crc32(body))


def decode_batch(buffer: bytes | bytearray | memoryview, max_bytes: int | None = None) -> BatchData:
    """Decode bytes made by :func:`encode_batch`; arrays are read-only views of ``buffer``.

    Args:
        buffer: the received bytes.
        max_bytes: refuse larger buffers before looking at them (``None``: no limit).

    Raises:
        InvalidRequestError: wrong magic or version, a size that disagrees with the buffer, a
            checksum mismatch, a malformed header, or inconsistent parts.
    """
    view = memoryview(buffer).cast("B")
    if max_bytes is not None and len(view) > max_bytes:
        raise InvalidRequestError(f"batch of {len(view)} bytes exceeds the limit of {max_bytes} bytes")
    if len(view) < _PREFIX.size + _CRC.size:
        raise InvalidRequestError(f"batch bytes too short ({len(view)} bytes): not a ctrserve batch")
    magic, version, _flags, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise InvalidRequestError(f"not a ctrserve batch: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise InvalidRequestError(
            f"batch format version {version} is not supported (this build reads {FORMAT_VERSION})"
        )
    body_end = len(view) - _CRC.size
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > body_end:
        raise InvalidRequestError(f"batch header length {header_len} does not fit in {len(view)} bytes")
    body = view[_PREFIX.size : body_end]
    (crc,) = _CRC.unpack_from(view, body_end)
    if zlib.crc32(body) != crc:
        raise InvalidRequestError("batch checksum mismatch: the bytes were corrupted or truncated")
    header = _parse_header(bytes(body[:header_len]))
    return _read_payload(header, body[header_len:])


def _parse_header(raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidRequestError(f"batch header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or set(header) != {"batch_size", "dense", "sparse", "targets", "meta"}:
        raise InvalidRequestError("batch header must hold exactly batch_size, dense, sparse, targets and meta")
    if not _is_count(header["batch_size"]):
        raise InvalidRequestError(
            f"batch header: batch_size must be a non-negative integer, got {header['batch_size']!r}"
        )
    for key, fields in (("dense", {"dtype", "width"}), ("sparse", {"name", "ids"}), ("targets", {"width"})):
        entries = header[key]
        if not isinstance(entries, list) or not all(isinstance(e, dict) and e.keys() == fields for e in entries):
            raise InvalidRequestError(f"batch header: '{key}' must be a list of objects with keys {sorted(fields)}")
    if not isinstance(header["meta"], dict) or not all(
        isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in header["meta"].values()
    ):
        raise InvalidRequestError("batch header: 'meta' must map names to strings or numbers")
    return header


def _read_payload(header: dict, payload: memoryview) -> BatchData:
    reader = _Reader(payload)
    batch = header["batch_size"]
    data = BatchData(meta=header["meta"])
    for i, d in enumerate(header["dense"]):
        dtype = DENSE_DTYPES.get(d["dtype"]) if isinstance(d["dtype"], str) else None
        if dtype is None or not _is_count(d["width"]):
            raise InvalidRequestError(
                f"batch header: dense[{i}] needs a dtype in {sorted(DENSE_DTYPES)} and a width >= 0"
            )
        data.dense.append(reader.take(dtype, batch * d["width"], f"dense[{i}]").reshape(batch, d["width"]))
    data.sparse = _read_sparse(reader, batch, header["sparse"])
    for i, t in enumerate(header["targets"]):
        if not _is_count(t["width"]):
            raise InvalidRequestError(f"batch header: target[{i}] width must be >= 0")
        data.targets.append(reader.take(_TARGET, batch * t["width"], f"target[{i}]").reshape(batch, t["width"]))
    if reader.pos != len(payload):
        raise InvalidRequestError(
            f"batch payload has {len(payload) - reader.pos} bytes beyond what its header describes"
        )
    check_parts(data)
    return data


def _read_sparse(reader: _Reader, batch: int, entries: list[dict]) -> KeyedIds:
    """The sparse features: per feature int64 offsets [batch + 1], then uint64 ids.

    Offsets and ids are both 8-byte words, so the whole section is read as one array and one
    compiled pass copies every feature's offsets into one [features, batch + 1] table and the
    ids of all features into one array; :class:`KeyedIds` validates them together. A request
    has dozens of features; an array or a check per part cost more than the rest of decoding.
    """
    if not entries:
        return KeyedIds([], np.zeros(0, _IDS), np.zeros((0, batch + 1), np.int64))
    names = [f["name"] for f in entries]
    counts = [f["ids"] for f in entries]
    if not all(isinstance(n, str) and n for n in names) or not all(_is_count(c) for c in counts):
        raise InvalidRequestError("batch header: each sparse entry needs a non-empty name and an id count >= 0")
    total = len(entries) * (batch + 1) + sum(counts)
    if total * _IDS.itemsize > reader.left:
        for f in entries:  # raises, naming the first part that does not fit
            reader.take(_OFFSETS, batch + 1, f"sparse '{f['name']}' offsets")
            reader.take(_IDS, f["ids"], f"sparse '{f['name']}' ids")
    signed = reader.take(_OFFSETS, total, "sparse features")
    table = np.empty((len(entries), batch + 1), np.int64)
    ids = np.empty(total - table.size, np.uint64)
    bad = batch_kernels.split_sparse_section(
        signed, signed.view(np.uint64), batch, np.asarray(counts, np.int64), table, ids
    )
    if bad >= 0:
        raise InvalidRequestError(
            f"feature '{names[bad]}': offsets must rise from 0 to the number of ids ({counts[bad]})"
        )
    return KeyedIds(names, ids, table)  # checks the offsets, all features at once


class _Reader:
    """Sequential typed views over the payload, each checked to fit before it is made."""

    def __init__(self, payload: memoryview):
        self.payload = payload
        self.pos = 0

    @property
    def left(self) -> int:
        """Bytes not read yet."""
        return len(self.payload) - self.pos

    def take(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        nbytes = count * dtype.itemsize
        if nbytes > len(self.payload) - self.pos:
            raise InvalidRequestError(
                f"batch payload too short for {what}: needs {nbytes} bytes, {len(self.payload) - self.pos} left"
            )
        array = np.frombuffer(self.payload, dtype=dtype, count=count, offset=self.pos)
        self.pos += nbytes
        return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**40


_DTYPE_CODES = {d.newbyteorder("="): code for code, d in DENSE_DTYPES.items()}


def _dtype_code(dtype: np.dtype) -> str | None:
    return _DTYPE_CODES.get(np.dtype(dtype))
