"""Training data in memory: :class:`Chunk`, its row slicing, and Parquet / ORC reading.

A :class:`Chunk` is a block of rows in the layout a batch wants: one float32 dense matrix, one
CSR :class:`~embedding_server.core.batch.SparseFeature` per sparse feature and a float32 label
matrix. Readers yield chunks (:func:`read_table` here, :func:`trainer.criteo.read_criteo` for the
Criteo text formats, :class:`trainer.synthetic.SyntheticCriteo` for planted synthetic data);
:class:`trainer.loader.DataLoader` cuts them into batches. Those modules import this one, never
the other way round.

Example:
    >>> mapping = ColumnMapping(label="clicked", dense=["age"], sparse={"user": "user_id"})
    >>> for chunk in read_table("part-0.parquet", mapping=mapping):  # doctest: +SKIP
    ...     batch = to_batch(chunk)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedding_server.core.batch import SparseFeature
from trainer.batch import PyPersiaBatchData

DenseTransform = Literal["log1p", "none"]
DEFAULT_CHUNK_ROWS = 65536


class DataFormatError(ValueError):
    """Training data that cannot be read: names the file and, where known, the line or row.

    Attributes:
        path: the file.
        line: the 1-based line number in a text file (``None`` when not known).
        row: the 0-based row index in a columnar file (``None`` when not applicable).
    """

    def __init__(self, path: str | Path, message: str, *, line: int | None = None, row: int | None = None):
        where = f"{path}" + (f", line {line}" if line is not None else "") + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
        self.row = row


# --------------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class Chunk:
    """A block of training rows.

    Args:
        dense: float32 ``[n, num_dense]`` (already transformed, see :func:`transform_dense`).
        sparse: one :class:`SparseFeature` of batch size ``n`` per sparse feature.
        labels: float32 ``[n, num_targets]``.
        raw_dense: optional float64 ``[n, num_dense]`` values before the transform, NaN where
            missing (kept by the readers so data can be written back unchanged).

    Raises:
        ValueError: parts with the wrong dtype or rank, or disagreeing on ``n``.

    Example:
        >>> c = Chunk(np.zeros((2, 1), np.float32),
        ...           [SparseFeature.from_lists("C1", [[1, 2], []])], np.ones((2, 1), np.float32))
        >>> c.slice(1, 2).sparse[0].offsets.tolist(), len(c.take(np.array([1, 0, 1])))
        ([0, 0], 3)
    """

    dense: np.ndarray
    sparse: list[SparseFeature]
    labels: np.ndarray
    raw_dense: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        n = self.labels.shape[0] if isinstance(self.labels, np.ndarray) else -1
        _check_matrix("dense", self.dense, np.float32, n)
        _check_matrix("labels", self.labels, np.float32, n)
        if self.raw_dense is not None:
            _check_matrix("raw_dense", self.raw_dense, np.float64, n)
        for f in self.sparse:
            if f.batch_size != n:
                raise ValueError(f"sparse feature '{f.name}' has {f.batch_size} rows, labels have {n}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    def feature(self, name: str) -> SparseFeature:
        """The sparse feature called ``name``.

        Raises:
            KeyError: no such feature.
        """
        for f in self.sparse:
            if f.name == name:
                return f
        raise KeyError(f"no sparse feature '{name}'; the chunk has {', '.join(self.feature_names)}")

    def slice(self, start: int, stop: int) -> Chunk:
        """Rows ``start:stop`` (clipped like a Python slice); ids are views, offsets rebased."""
        start, stop, _ = slice(start, stop).indices(len(self))
        stop = max(start, stop)
        return Chunk(
            self.dense[start:stop],
            [_slice_feature(f, start, stop) for f in self.sparse],
            self.labels[start:stop],
            None if self.raw_dense is None else self.raw_dense[start:stop],
        )

    def take(self, rows: np.ndarray) -> Chunk:
        """The given rows (any order, repeats allowed), gathering each sample's id list."""
        rows = np.asarray(rows, np.int64)
        return Chunk(
            self.dense[rows],
            [_take_feature(f, rows) for f in self.sparse],
            self.labels[rows],
            None if self.raw_dense is None else self.raw_dense[rows],
        )


def _check_matrix(what: str, array: Any, dtype: type, rows: int) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != 2:
        raise ValueError(
            f"{what} must be a 2-D {np.dtype(dtype).name} array, got {getattr(array, 'dtype', type(array))}"
        )
    if array.shape[0] != rows:
        raise ValueError(f"{what} has {array.shape[0]} rows, labels have {rows}")


def _slice_feature(f: SparseFeature, start: int, stop: int) -> SparseFeature:
    offsets = f.offsets[start : stop + 1]
    return SparseFeature(f.name, f.ids[offsets[0] : offsets[-1]], offsets - offsets[0])


def _take_feature(f: SparseFeature, rows: np.ndarray) -> SparseFeature:
    starts = f.offsets[rows]
    lengths = f.offsets[rows + 1] - starts
    offsets = np.zeros(rows.shape[0] + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Id k of the output belongs to output row r: its source is starts[r] + (k - offsets[r]).
    source = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    return SparseFeature(f.name, f.ids[source], offsets)


def concat_chunks(chunks: Sequence[Chunk]) -> Chunk:
    """Rows of several chunks with the same features, in order.

    Raises:
        ValueError: no chunks, or chunks with different feature names or widths.
    """
    if not chunks:
        raise ValueError("concat_chunks needs at least one chunk")
    if len(chunks) == 1:
        return chunks[0]
    names = chunks[0].feature_names
    if any(c.feature_names != names for c in chunks):
        raise ValueError("chunks have different sparse features")
    sparse = [_concat_feature([c.sparse[i] for c in chunks]) for i in range(len(names))]
    raws = [c.raw_dense for c in chunks if c.raw_dense is not None]
    raw = np.concatenate(raws) if len(raws) == len(chunks) else None
    return Chunk(np.concatenate([c.dense for c in chunks]), sparse, np.concatenate([c.labels for c in chunks]), raw)


def _concat_feature(parts: Sequence[SparseFeature]) -> SparseFeature:
    bases = np.cumsum([0] + [p.ids.shape[0] for p in parts[:-1]])
    offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + b for p, b in zip(parts, bases)])
    return SparseFeature(parts[0].name, np.concatenate([p.ids for p in parts]), offsets)


def rebatch(chunks: Iterable[Chunk], rows: int, *, drop_last: bool = False) -> Iterator[Chunk]:
    """Re-cut a stream of chunks into chunks of exactly ``rows`` rows (the last may be shorter).

    Args:
        chunks: chunks of any sizes (empty ones are ignored).
        rows: rows per output chunk, >= 1.
        drop_last: drop a final chunk shorter than ``rows``.

    Raises:
        ValueError: ``rows`` < 1.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    pending: list[Chunk] = []
    pending_rows = 0
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        pending.append(chunk)
        pending_rows += len(chunk)
        if pending_rows < rows:
            continue
        merged = concat_chunks(pending)
        cut = (len(merged) // rows) * rows
        for start in range(0, cut, rows):
            yield merged.slice(start, start + rows)
        pending = [merged.slice(cut, len(merged))] if cut < len(merged) else []
        pending_rows = len(merged) - cut
    if pending_rows and not drop_last:
        yield concat_chunks(pending)


def to_batch(chunk: Chunk) -> PyPersiaBatchData:
    """A :class:`PyPersiaBatchData` of the chunk: dense ``[B, d]`` float32, one sparse feature
    each, and the labels as the target ``[B, t]``."""
    batch = PyPersiaBatchData()
    batch.add_dense_f32(np.ascontiguousarray(chunk.dense))
    for feature in chunk.sparse:
        batch.add_sparse_feature(feature)
    batch.add_target(np.ascontiguousarray(chunk.labels))
    return batch


def transform_dense(raw: np.ndarray, kind: DenseTransform = "log1p") -> np.ndarray:
    """Dense values as the model sees them, float32.

    ``"log1p"`` (the usual Criteo transform): missing (NaN) becomes 0, then ``log(1 + max(x, 0))``,
    so negative values map to 0 as well. ``"none"``: missing becomes 0, values kept.
    """
    x = np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
    if kind == "log1p":
        x = np.log1p(np.maximum(x, 0.0))
    elif kind != "none":
        raise ValueError(f"dense transform must be 'log1p' or 'none', got {kind!r}")
    return x.astype(np.float32)


# --------------------------------------------------------------------------------- hex ids

_HEX_VALUES = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUES[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_VALUES[_c] = 10 + _i


def parse_hex_ids(strings: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse a string array of hexadecimal ids (no ``0x``, at most 16 digits), vectorised per width.

    Returns:
        ``(ids, present, bad)``: uint64 values (0 where not present), a bool mask of non-null,
        non-empty entries, and a bool mask of entries that are not valid hex.
    """
    strings = _plain_strings(strings)
    n = len(strings)
    offset_type = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    _, offsets_buf, data_buf = strings.buffers()
    offsets = np.frombuffer(offsets_buf, offset_type)[strings.offset : strings.offset + n + 1].astype(np.int64)
    lengths = np.diff(offsets)
    present = lengths > 0
    if strings.null_count:
        present &= strings.is_valid().to_numpy(zero_copy_only=False)
    ids = np.zeros(n, np.uint64)
    bad = present & (lengths > 16)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    by_length = np.bincount(np.where(present & ~bad, lengths, 0), minlength=17)
    for width in np.flatnonzero(by_length[1:17]) + 1:
        rows = np.flatnonzero(present & (lengths == width))
        # [rows, width] digit values, most significant first; 255 marks a non-hex character.
        nibbles = _HEX_VALUES[data[offsets[rows, None] + np.arange(width)]]
        bad[rows] = (nibbles == 255).any(axis=1)
        value = np.zeros(rows.shape[0], np.uint64)
        for k in range(width):
            value <<= np.uint64(4)
            value |= nibbles[:, k]
        ids[rows] = value
    ids[bad] = 0
    return ids, present, bad


def _plain_strings(array: pa.Array) -> pa.Array:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return array


def single_id_feature(name: str, ids: np.ndarray, present: np.ndarray) -> SparseFeature:
    """A feature with at most one id per row: ``ids[i]`` where ``present[i]``, else empty."""
    offsets = np.zeros(ids.shape[0] + 1, np.int64)
    np.cumsum(present, out=offsets[1:])
    return SparseFeature(name, np.ascontiguousarray(ids[present], np.uint64), offsets)


# --------------------------------------------------------------------------------- Parquet / ORC

StringIds = Literal["hex", "decimal"]


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns of a Parquet / ORC file feed the label, the dense matrix and each sparse feature.

    Args:
        label: the label column (numeric or bool, no nulls), or a list of them for multi-task.
        dense: numeric columns, in order, for the dense matrix (nulls become 0).
        sparse: feature name -> column. A sparse column may be an integer column (one id per
            row, non-negative), a string column (one id per row: hexadecimal such as Criteo's
            ``"05db9164"`` when ``string_ids="hex"``, base 10 when ``"decimal"``), or a
            ``list<integer>`` column (variable-length ids). Null or empty means no id.
        string_ids: how string sparse columns are parsed: ``"hex"`` or ``"decimal"``.
        dense_transform: ``"none"`` (default: values as stored, nulls 0) or ``"log1p"`` (the
            Criteo transform, see :func:`transform_dense`).

    Example:
        >>> m = ColumnMapping(label="y", dense=["I1", "I2"], sparse={"C1": "c1", "tags": "tag_ids"})
    """

    label: str | Sequence[str]
    dense: Sequence[str] = ()
    sparse: Mapping[str, str] = field(default_factory=dict)
    string_ids: StringIds = "hex"
    dense_transform: DenseTransform = "none"

    @classmethod
    def criteo(cls, dense_transform: DenseTransform = "log1p") -> ColumnMapping:
        """Criteo's columns by name: ``label``, ``I1..I13`` dense, ``C1..C26`` hex strings."""
        return cls(
            label="label",
            dense=[f"I{i}" for i in range(1, 14)],
            sparse={f"C{i}": f"C{i}" for i in range(1, 27)},
            dense_transform=dense_transform,
        )

    @property
    def label_columns(self) -> list[str]:
        return [self.label] if isinstance(self.label, str) else list(self.label)

    def columns(self) -> list[str]:
        """Every column the mapping reads, without repeats."""
        return list(dict.fromkeys(self.label_columns + list(self.dense) + list(self.sparse.values())))

    def validate(self, schema: pa.Schema, path: str | Path = "<table>") -> None:
        """Check every mapped column exists with a usable type.

        Raises:
            DataFormatError: an unknown column or a column of the wrong type, naming both.
            ValueError: a malformed mapping (no label, unknown ``string_ids``).
        """
        if not self.label_columns:
            raise ValueError("ColumnMapping needs a label column")
        if self.string_ids not in ("hex", "decimal"):
            raise ValueError(f"string_ids must be 'hex' or 'decimal', got {self.string_ids!r}")
        for role, column in [("label", c) for c in self.label_columns] + [("dense", c) for c in self.dense]:
            _check_numeric(path, schema, role, column)
        for name, column in self.sparse.items():
            kind = _sparse_kind(_field(path, schema, f"sparse feature '{name}'", column).type)
            if kind is None:
                raise DataFormatError(
                    path,
                    f"sparse feature '{name}': column '{column}' has type {schema.field(column).type}; "
                    "expected an integer, string or list<integer> column",
                )


def _field(path: str | Path, schema: pa.Schema, role: str, column: str) -> pa.Field:
    index = schema.get_field_index(column)
    if index < 0:
        raise DataFormatError(path, f"{role}: no column '{column}'; the file has {', '.join(schema.names)}")
    return schema.field(index)


def _check_numeric(path: str | Path, schema: pa.Schema, role: str, column: str) -> None:
    t = _field(path, schema, role, column).type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)):
        raise DataFormatError(path, f"{role}: column '{column}' has type {t}; expected a numeric column")


def _sparse_kind(t: pa.DataType) -> str | None:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type):
        return "list"
    return None


def read_table(
    path: str | Path,
    fmt: Literal["parquet", "orc"] | None = None,
    *,
    mapping: ColumnMapping,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Iterator[Chunk]:
    """Read a Parquet or ORC file through a column mapping, in chunks.

    Args:
        path: the file.
        fmt: ``"parquet"`` or ``"orc"``; by default from the extension (``.parquet``/``.pq``, ``.orc``).
        mapping: which columns are label, dense and sparse (see :class:`ColumnMapping`).
        chunk_rows: the most rows per yielded chunk.

    Returns:
        An iterator of :class:`Chunk` (dense names follow ``mapping.dense``, sparse features
        are named by the mapping's keys).

    Raises:
        DataFormatError: mapping and schema disagree, a null label, a negative id, or a string
            id that does not parse (naming the file and the row).
        ValueError: unknown format.
    """
    import pyarrow.dataset as ds

    fmt = fmt or table_format(path)
    dataset = ds.dataset(str(path), format=fmt)
    mapping.validate(dataset.schema, path)
    row = 0
    for record_batch in dataset.to_batches(columns=mapping.columns(), batch_size=chunk_rows):
        if record_batch.num_rows:
            yield _table_chunk(path, record_batch, mapping, row)
            row += record_batch.num_rows


def table_format(path: str | Path) -> Literal["parquet", "orc"]:
    """``"parquet"`` or ``"orc"`` from a file name.

    Raises:
        ValueError: neither extension.
    """
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".orc":
        return "orc"
    raise ValueError(f"{path}: cannot tell the format from the extension; pass fmt='parquet' or 'orc'")


def _table_chunk(path: str | Path, batch: pa.RecordBatch, mapping: ColumnMapping, first_row: int) -> Chunk:
    labels = np.stack([_label_column(path, batch.column(c), c, first_row) for c in mapping.label_columns], axis=1)
    n = batch.num_rows
    raw = np.stack([_numeric(batch.column(c)) for c in mapping.dense], axis=1) if mapping.dense else np.zeros((n, 0))
    sparse = [
        _sparse_column(path, name, batch.column(column), column, mapping.string_ids, first_row)
        for name, column in mapping.sparse.items()
    ]
    return Chunk(transform_dense(raw, mapping.dense_transform), sparse, labels.astype(np.float32), raw)


def _numeric(column: pa.Array) -> np.ndarray:
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _label_column(path: str | Path, column: pa.Array, name: str, first_row: int) -> np.ndarray:
    if column.null_count:
        bad = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataFormatError(path, f"label column '{name}' is null", row=first_row + bad)
    return _numeric(column)


def _sparse_column(
    path: str | Path, name: str, column: pa.Array, column_name: str, string_ids: StringIds, first_row: int
) -> SparseFeature:
    column = _plain_strings(column)
    kind = _sparse_kind(column.type)
    if kind == "list":
        values = column.flatten()
        if values.null_count:
            raise DataFormatError(path, f"sparse feature '{name}': column '{column_name}' holds a null id")
        ids = _non_negative(path, name, values.to_numpy(zero_copy_only=False), None)
        offsets = column.offsets.to_numpy().astype(np.int64)
        return SparseFeature(name, ids, offsets - offsets[0])
    if kind == "int":
        present = column.is_valid().to_numpy(zero_copy_only=False)
        values = column.fill_null(0).to_numpy(zero_copy_only=False)
        first_bad = _first(present & (values < 0)) if values.dtype.kind == "i" else None
        if first_bad is not None:
            raise DataFormatError(
                path, f"sparse feature '{name}': negative id {values[first_bad]}", row=first_row + first_bad
            )
        return single_id_feature(name, values.astype(np.uint64), present)
    if string_ids == "hex":
        ids, present, bad = parse_hex_ids(column)
    else:
        ids, present, bad = _parse_decimal_ids(column)
    first_bad = _first(bad)
    if first_bad is not None:
        raise DataFormatError(
            path,
            f"sparse feature '{name}': {column[first_bad].as_py()!r} is not a {string_ids} id",
            row=first_row + first_bad,
        )
    return single_id_feature(name, ids, present)


def _parse_decimal_ids(column: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    present = pc.fill_null(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False) > 0
    digits = pc.fill_null(pc.match_substring_regex(column, r"^[0-9]{1,20}$"), False).to_numpy(zero_copy_only=False)
    # 20 digits may exceed 2**64 - 1; such rare values are checked one by one.
    long = np.flatnonzero(digits & (pc.fill_null(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False) == 20))
    for i in long:
        digits[i] = int(column[int(i)].as_py()) < 2**64
    ok = present & digits
    cleaned = pc.if_else(pa.array(ok), column, pa.scalar("0"))
    ids = pc.cast(cleaned, pa.uint64()).to_numpy(zero_copy_only=False).astype(np.uint64)
    return ids, present, present & ~digits


def _non_negative(path: str | Path, name: str, values: np.ndarray, row: int | None) -> np.ndarray:
    if values.dtype.kind == "i" and values.size and values.min() < 0:
        raise DataFormatError(path, f"sparse feature '{name}': negative id {values.min()}", row=row)
    return values.astype(np.uint64)


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


CriteoChunk = Chunk
"""The chunks of the Criteo readers are ordinary :class:`Chunk` objects."""

__all__ = [
    "Chunk",
    "CriteoChunk",
    "ColumnMapping",
    "DataFormatError",
    "concat_chunks",
    "parse_hex_ids",
    "read_table",
    "rebatch",
    "single_id_feature",
    "table_format",
    "to_batch",
    "transform_dense",
]
