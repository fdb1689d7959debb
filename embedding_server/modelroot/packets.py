"""Incremental embedding packets: the current values of rows a training shard changed.

A packet is one Arrow IPC file, readable by pyarrow, pandas, DuckDB or Spark::

    columns   table: dictionary<int16, string>   the embedding table of the row
              id: uint64                          the row's id
              weight: list<float32>               the row's current vector (len = the table's dim)
    metadata  format "ctrserve-packet", format_version, shard, num_shards (of the training
              servers), seq (per-shard, only grows), created_at (UNIX seconds), rows,
              config_fingerprint, checksum (CRC-32 of the table indexes, ids and weights),
              run_id (which publisher made it: one random id per publisher instance or one
              the trainer job gives; absent in older packets, which still decode)

Values, not deltas, so replaying a packet twice is harmless; no optimizer state (serving needs
none). Under a model root, packets of training shard ``s`` of ``n`` live at
``incremental/shard-0000s-of-0000n/<seq, 20 digits>.arrow``; full checkpoints at
``checkpoints/<name>/`` record the last ``seq`` per shard they include (their watermark).

Sequence numbers of a training shard strictly increase across restarts, retention (which deletes
old packets), resharding and a trainer whose local state is gone: a publisher starts above the
largest of (1) the packets it lists, (2) the shard's seq in the newest complete checkpoint of
the same training shard count, and (3) the shard's durable marker ``last-seq.json``
(:data:`LAST_SEQ_FILE`) in its packet folder, a small JSON (``format "ctrserve-last-seq"``,
``shard``, ``num_shards``, ``seq``, ``run_id``, ``written_at``) written atomically after every
published packet. It is not a packet: readers of the folder skip it without a word.

Names in listings are taken only in their exact ASCII form (``[0-9]{20}.arrow``,
``shard-[0-9]{5}-of-[0-9]{5}`` as :func:`shard_dir` makes them, checkpoint folders
``[0-9]{20}``); :func:`list_packets`, :func:`list_shard_dirs` and :func:`list_checkpoints` ignore
every other name (digits of other scripts such as ``²``, ``٣``, ``０`` included) with one WARNING
per name and reader (:mod:`embedding_server.core.names`).

Example:
    >>> data = encode_packet([rows], shard=0, num_shards=1, seq=7, fingerprint=cfg.fingerprint())
    >>> decode_packet(data, cfg).seq
    7
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

# zlib-ng's CRC-32 is the same function as zlib's, several times faster: the checksum of a large
# packet is a large share of its decode time.
from zlib_ng import zlib_ng

from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.errors import InvalidRequestError
from embedding_server.core.names import ascii_pattern, parse_listing
from embedding_server.modelroot.checkpoint import shard_dir
from embedding_server.storage.base import Storage
from embedding_server.store.store import TableRows

FORMAT = "ctrserve-packet"
FORMAT_VERSION = 1
INCREMENTAL_DIR = "incremental"
CHECKPOINTS_DIR = "checkpoints"
# A training shard's first packet has this seq; a checkpoint watermark of FIRST_SEQ - 1 (or none
# for the shard) means the checkpoint includes no packet of it.
FIRST_SEQ = 0
#: In each shard's packet folder: the last seq the shard published (see the module docstring).
LAST_SEQ_FILE = "last-seq.json"
LAST_SEQ_FORMAT = "ctrserve-last-seq"
_SEQ_DIGITS = 20
_SUFFIX = ".arrow"
_CHECKPOINT_DIGITS = 20
_PACKET_NAME = ascii_pattern(r"[0-9]{20}\.arrow")
_SHARD_DIR = ascii_pattern(r"shard-([0-9]{5})-of-([0-9]{5})")
_CHECKPOINT_NAME = ascii_pattern(r"[0-9]{20}")
_MAX_RUN_ID = 128

log = logging.getLogger("ctrserve.embedding_server.modelroot.packets")


class PacketError(InvalidRequestError):
    """A packet is corrupt, truncated, foreign or inconsistent with the embedding config."""


@dataclass
class Packet:
    """A decoded packet: which shard and sequence number, when it was made, and its rows
    (``TableRows`` with an empty ``state``)."""

    shard: int
    num_shards: int
    seq: int
    created_at: float
    tables: list[TableRows]
    run_id: str = ""  # the trainer run (publisher) that made it; "" in packets older than run ids

    @property
    def rows(self) -> int:
        return sum(t.ids.shape[0] for t in self.tables)


def packet_dir(shard: int, num_shards: int) -> str:
    """``incremental/shard-00001-of-00002``, relative to the model root."""
    return f"{INCREMENTAL_DIR}/{shard_dir(shard, num_shards)}"


def packet_name(seq: int) -> str:
    """``00000000000000000042.arrow``: zero-padded so names sort in sequence order."""
    return f"{seq:0{_SEQ_DIGITS}d}{_SUFFIX}"


def parse_packet_name(name: str) -> int | None:
    """The sequence number of a packet file name (exactly 20 ASCII digits and ``.arrow``), or
    None for any other name (temp files, :data:`LAST_SEQ_FILE`, digits of other scripts too)."""
    return int(name[:_SEQ_DIGITS]) if _PACKET_NAME.fullmatch(name) else None


def parse_shard_dir(name: str) -> tuple[int, int] | None:
    """``(shard, num_shards)`` of a ``shard-00001-of-00002`` name (exactly 5 ASCII digits each,
    as :func:`~embedding_server.modelroot.checkpoint.shard_dir` makes them), or None."""
    match = _SHARD_DIR.fullmatch(name)
    if match is None:
        return None
    shard, count = int(match.group(1)), int(match.group(2))
    return (shard, count) if shard < count else None


def checkpoint_name(number: int) -> str:
    """``00000000000000000007``: a checkpoint folder's name, zero-padded so names sort in order."""
    return f"{number:0{_CHECKPOINT_DIGITS}d}"


def parse_checkpoint_name(name: str) -> int | None:
    """The number of a checkpoint folder name (exactly 20 ASCII digits), or None."""
    return int(name) if _CHECKPOINT_NAME.fullmatch(name) else None


def list_packets(storage: Storage, folder: str, logger: logging.Logger | None = None) -> list[int]:
    """Sequence numbers of the packets in a shard's packet ``folder``, ascending. Other names are
    ignored, with one WARNING per name on ``logger`` (the reader's), except :data:`LAST_SEQ_FILE`.

    Raises:
        StorageError: the listing failed.
    """
    seqs = parse_listing(
        storage.list_dir(folder),
        parse_packet_name,
        logger or log,
        storage.url,
        folder,
        "packet file <20 digits>.arrow",
        allowed=[LAST_SEQ_FILE],
    )
    return sorted(seqs)


def list_shard_dirs(storage: Storage, logger: logging.Logger | None = None) -> list[tuple[int, int]]:
    """``(shard, num_shards)`` of every packet folder under ``incremental/``. Other names are
    ignored, with one WARNING per name on ``logger``.

    Raises:
        StorageError: the listing failed.
    """
    return parse_listing(
        storage.list_dir(INCREMENTAL_DIR),
        parse_shard_dir,
        logger or log,
        storage.url,
        INCREMENTAL_DIR,
        "shard-SSSSS-of-NNNNN folder",
    )


def list_checkpoints(storage: Storage, logger: logging.Logger | None = None) -> list[str]:
    """Names of the checkpoint folders under ``checkpoints/`` (complete or not), oldest first.
    Other names are ignored, with one WARNING per name on ``logger``.

    Raises:
        StorageError: the listing failed.
    """
    names = parse_listing(
        storage.list_dir(CHECKPOINTS_DIR),
        lambda name: name if parse_checkpoint_name(name) is not None else None,
        logger or log,
        storage.url,
        CHECKPOINTS_DIR,
        "checkpoint folder <20 digits>",
    )
    return sorted(names)


def encode_last_seq(seq: int, run_id: str, shard: int, num_shards: int) -> bytes:
    """The content of a shard's :data:`LAST_SEQ_FILE`: the last seq it published (JSON)."""
    marker = {"format": LAST_SEQ_FORMAT, "shard": shard, "num_shards": num_shards, "seq": seq, "run_id": run_id}
    return json.dumps({**marker, "written_at": time.time()}).encode()


def decode_last_seq(data: bytes, where: str = LAST_SEQ_FILE) -> int:
    """The seq a :data:`LAST_SEQ_FILE` records.

    Raises:
        PacketError: not such a file (unreadable JSON, another format, no integer seq).
    """
    try:
        marker = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PacketError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(marker, dict):
        raise PacketError(f"{where}: not a {LAST_SEQ_FORMAT} file")
    seq = marker.get("seq")
    if marker.get("format") != LAST_SEQ_FORMAT or not isinstance(seq, int) or isinstance(seq, bool) or seq < -1:
        raise PacketError(f"{where}: not a {LAST_SEQ_FORMAT} file with an integer seq")
    return seq


def encode_packet(
    tables: Sequence[TableRows],
    *,
    shard: int,
    num_shards: int,
    seq: int,
    fingerprint: str,
    created_at: float | None = None,
    run_id: str = "",
) -> bytes:
    """The bytes of one packet holding ``tables``' ids and weights (their ``state`` is ignored).

    ``run_id`` names the trainer run that made it (printable ASCII, at most 128 characters;
    "" leaves it out, as packets older than run ids).

    Raises:
        ValueError: a negative sequence number, a malformed ``run_id``, or weights that disagree
            with their table's dim.
    """
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")
    if not _valid_run_id(run_id):
        raise ValueError(f"run_id must be at most {_MAX_RUN_ID} printable ASCII characters, got {run_id!r}")
    names = [t.table.name for t in tables]
    index = (
        np.concatenate([np.full(t.ids.shape[0], i, np.int16) for i, t in enumerate(tables)])
        if tables
        else np.zeros(0, np.int16)
    )
    ids = np.concatenate([t.ids for t in tables]).astype(np.uint64) if tables else np.zeros(0, np.uint64)
    for t in tables:
        if t.weights.ndim != 2 or t.weights.shape != (t.ids.shape[0], t.table.dim):
            raise ValueError(
                f"table '{t.table.name}': weights {t.weights.shape} do not match {t.ids.shape[0]} ids of dim {t.table.dim}"
            )
    flat = (
        np.concatenate([t.weights.reshape(-1) for t in tables]).astype(np.float32)
        if tables
        else np.zeros(0, np.float32)
    )
    lengths = (
        np.concatenate([np.full(t.ids.shape[0], t.table.dim, np.int32) for t in tables])
        if tables
        else np.zeros(0, np.int32)
    )
    offsets = np.zeros(lengths.shape[0] + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "shard": str(shard),
        "num_shards": str(num_shards),
        "seq": str(seq),
        "created_at": repr(time.time() if created_at is None else created_at),
        "rows": str(ids.shape[0]),
        "config_fingerprint": fingerprint,
        "checksum": str(_checksum(names, index, ids, flat)),
    }
    if run_id:
        metadata["run_id"] = run_id
    batch = pa.RecordBatch.from_arrays(
        [
            pa.DictionaryArray.from_arrays(pa.array(index, pa.int16()), pa.array(names, pa.string())),
            pa.array(ids, pa.uint64()),
            pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.float32())),
        ],
        names=["table", "id", "weight"],
    ).replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def decode_packet(data: bytes | memoryview, config: EmbeddingConfig, where: str = "packet") -> Packet:
    """Read and verify a packet.

    Args:
        data: the packet file's bytes (or a buffer of them, e.g. :meth:`Storage.read_buffer`'s).
        config: the embedding config the reader serves (tables and dims are checked against it).
        where: the packet's name or URL, for error messages.

    Raises:
        PacketError: not an Arrow file, a foreign or newer format, a checksum mismatch (corrupt or
            truncated data), an unknown table, a vector of the wrong length, or a config
            fingerprint other than ``config``'s.
    """
    try:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        # Buffer sizes against the lengths the file claims. What only a full validation checks
        # (values of list offsets, dictionary indices, string offsets) is checked below before
        # anything reads through them: the table dictionary is validated in full (a few names),
        # indices and list offsets in numpy. A full validation of the whole table holds the GIL
        # for a time that grows with the packet, stalling every lookup of a serving embedding server.
        table.validate()
        column_names = table.schema.names  # decodes the names: a flipped byte there is bad UTF-8
    except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: e.g. invalid UTF-8 in a string column
        raise PacketError(f"{where}: not a readable Arrow file (truncated or corrupt?): {exc}") from None
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (table.schema.metadata or {}).items()}
    if meta.get("format") != FORMAT:
        raise PacketError(f"{where}: not a ctrserve packet (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise PacketError(f"{where}: packet format version {meta.get('format_version')!r} is not {FORMAT_VERSION}")
    if meta.get("config_fingerprint") != config.fingerprint():
        raise PacketError(
            f"{where}: written for other tables (fingerprint {meta.get('config_fingerprint')} != {config.fingerprint()})"
        )
    if column_names != ["table", "id", "weight"]:
        raise PacketError(f"{where}: unexpected columns {column_names}")
    _check_column_types(table.schema, where)
    nulls = [name for name in table.schema.names if table.column(name).null_count]
    if nulls:
        raise PacketError(f"{where}: null values in column(s) {', '.join(nulls)}")
    try:
        shard, num_shards, seq, rows = (int(meta[k]) for k in ("shard", "num_shards", "seq", "rows"))
        created_at, checksum = float(meta["created_at"]), int(meta["checksum"])
        run_id = meta.get("run_id", "")  # absent in packets older than run ids
        if not _valid_run_id(run_id):
            raise ValueError(f"run_id {run_id[:_MAX_RUN_ID]!r} is not at most {_MAX_RUN_ID} printable ASCII characters")
        column = _one_array(table.column("table"))
        if table.num_rows:
            column.dictionary.validate(full=True)
        names = [str(x) for x in column.dictionary.to_pylist()] if table.num_rows else []
        index = (
            column.indices.to_numpy(zero_copy_only=False).astype(np.int16) if table.num_rows else np.zeros(0, np.int16)
        )
        ids = table.column("id").to_numpy().astype(np.uint64, copy=False)
        weight = _one_array(table.column("weight"))
        # The list offsets index the child values directly (flatten() would copy every vector).
        offsets = weight.offsets.to_numpy().astype(np.int64)
        values = weight.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    except (KeyError, ValueError, TypeError, pa.ArrowException) as exc:
        raise PacketError(f"{where}: malformed packet: {exc}") from None
    if offsets.shape[0] != table.num_rows + 1 or (
        offsets.shape[0] and (offsets[0] < 0 or offsets[-1] > values.shape[0])
    ):
        raise PacketError(f"{where}: malformed packet: the weight column's list offsets point outside its values")
    tables = _split_tables(names, index, ids, values, offsets, config, where)
    flat = values[offsets[0] : offsets[-1]] if offsets.shape[0] else values[:0]
    if rows != table.num_rows or _checksum(names, index, ids, flat) != checksum:
        raise PacketError(f"{where}: checksum mismatch: the packet is corrupt or truncated")
    return Packet(shard, num_shards, seq, created_at, tables, run_id)


def read_packet_origin(data: bytes | memoryview, where: str = "packet") -> tuple[int, int, int, str]:
    """``(shard, num_shards, seq, run_id)`` from a packet's metadata alone (its rows are neither
    read nor verified; :func:`decode_packet` does that).

    Raises:
        PacketError: not a readable ctrserve packet.
    """
    try:
        meta = pa.ipc.open_file(pa.BufferReader(data)).schema.metadata or {}
        values = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in meta.items()}
        if values.get("format") != FORMAT:
            raise ValueError(f"format {values.get('format')!r}")
        run_id = values.get("run_id", "")
        if not _valid_run_id(run_id):
            raise ValueError(f"run_id {run_id[:_MAX_RUN_ID]!r}")
        return int(values["shard"]), int(values["num_shards"]), int(values["seq"]), run_id
    except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
        raise PacketError(f"{where}: not a readable ctrserve packet: {exc}") from None


def _valid_run_id(run_id: str) -> bool:
    return isinstance(run_id, str) and len(run_id) <= _MAX_RUN_ID and all(" " <= c <= "~" for c in run_id)


def _one_array(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array: its only chunk as it is (a packet file holds one record batch);
    ``combine_chunks`` would copy it, 32 MB of vectors for a 500k-row packet."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _check_column_types(schema: pa.Schema, where: str) -> None:
    """Refuse columns of other types than the writer's (found by fuzzing: a plain string
    ``table`` column passed every other check).

    Raises:
        PacketError: naming the column and its type.
    """
    types = {name: schema.field(name).type for name in schema.names}
    checks = {
        "table": lambda t: (
            pa.types.is_dictionary(t) and pa.types.is_integer(t.index_type) and pa.types.is_string(t.value_type)
        ),
        "id": pa.types.is_uint64,
        "weight": lambda t: pa.types.is_list(t) and pa.types.is_float32(t.value_type),
    }
    wrong = [f"'{name}' is {types[name]}" for name, ok in checks.items() if not ok(types[name])]
    if wrong:
        raise PacketError(
            f"{where}: columns of the wrong type ({', '.join(wrong)}); expected table: "
            "dictionary<string>, id: uint64, weight: list<float32>"
        )


def _split_tables(names, index, ids, values, offsets, config: EmbeddingConfig, where: str) -> list[TableRows]:
    """The rows of each table: one run of consecutive rows per table (the writer concatenates
    table by table), each vector exactly the table's dim long and right after the previous one,
    so a run's vectors are one slice of ``values``, reshaped without a copy."""
    tables = []
    starts = (
        np.concatenate([[0], np.flatnonzero(index[1:] != index[:-1]) + 1]) if index.shape[0] else np.zeros(0, np.int64)
    )
    ends = np.append(starts[1:], index.shape[0])
    seen: set[int] = set()
    for lo, hi in zip(starts.tolist(), ends.tolist()):
        i = int(index[lo])
        if not 0 <= i < len(names):
            raise PacketError(f"{where}: table index {i} is outside the table dictionary")
        name = names[i]
        if i in seen:
            raise PacketError(f"{where}: rows of table '{name}' are not contiguous")
        seen.add(i)
        spec = config.tables.get(name)
        if spec is None:
            raise PacketError(f"{where}: table '{name}' is not in this server's embedding_config.yml")
        # Runs share their boundary offset, so every vector starts where the previous one ends.
        if (np.diff(offsets[lo : hi + 1]) != spec.dim).any():
            raise PacketError(f"{where}: table '{name}' has vectors whose length is not its dim {spec.dim}")
        weights = values[offsets[lo] : offsets[hi]].reshape(hi - lo, spec.dim)
        tables.append(TableRows(spec, ids[lo:hi], weights, np.zeros((hi - lo, 0), np.float32)))
    return tables


def _checksum(names: list[str], index: np.ndarray, ids: np.ndarray, flat: np.ndarray) -> int:
    crc = zlib_ng.crc32("\0".join(names).encode())
    for array, dtype in ((index, "<i2"), (ids, "<u8"), (flat, "<f4")):
        # No copies on little-endian machines: crc32 reads the array's buffer in place.
        crc = zlib_ng.crc32(np.ascontiguousarray(array.astype(dtype, copy=False)).data.cast("B"), crc)
    return crc
