"""Training data in memory: :class:`Chunk`, its row slicing, and Parquet / ORC reading.

A :class:`Chunk` is a block of rows in the layout a batch wants: one float32 dense matrix, one
CSR :class:`~embedding_server.core.batch.SparseFeature` per sparse feature and a float32 label
matrix, plus every mapped column as a named raw input (:attr:`Chunk.inputs`, what feature ops
read). :class:`ColumnMapping` says which columns of a Parquet / ORC file are labels, dense values
(numeric or fixed-length ``list<numeric>`` columns with defaults, as RecIS's
``fixedlen_feature``) and sparse ids (integers, strings or lists of either; strings parsed as
hex or decimal, or hashed with FarmHash's ``Fingerprint64`` like RecIS's ``farm`` hash).
:func:`read_table` streams a file row group by row group (Parquet) or stripe by stripe (ORC), so
a file larger than memory trains. Readers yield chunks (:func:`read_table` here, :func:`trainer.criteo.read_criteo` for the
Criteo text formats, :class:`trainer.synthetic.SyntheticCriteo` for planted synthetic data);
:class:`trainer.loader.DataLoader` cuts them into batches. Those modules import this one, never
the other way round.

Example:
    >>> mapping = ColumnMapping(label="clicked", dense=[DenseColumn("age")], sparse={"user": "user_id"})
    >>> for chunk in read_table("part-0.parquet", mapping=mapping):  # doctest: +SKIP
    ...     batch = to_batch(chunk)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedding_server.core.batch import SparseFeature
from embedding_server.core.config_schema import option
from embedding_server.core.errors import ConfigError
from embedding_server.core.farmhash import fingerprint64_strings
from embedding_server.core.feature_ops import FeaturePipeline
from trainer.batch import PyPersiaBatchData

DenseTransform = Literal["log1p", "none"]
DEFAULT_CHUNK_ROWS = 65536


class DataFormatError(ConfigError):
    """Training data that cannot be read: names the file and, where known, the line or row.

    A :class:`~embedding_server.core.errors.ConfigError`, so ``ctrserve train`` and ``ctrserve
    predict`` report it as one line and exit 2, like a bad config.

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
        raw_dense: optional float64 ``[n, num_dense]`` values before the transform (the
            Criteo readers keep NaN where missing, so data can be written back unchanged; the
            table reader fills in the columns' defaults).
        inputs: every mapped column by its mapping name, as the raw inputs of feature ops:
            float64 ``[n, length]`` values of a dense column (defaults filled in, before the
            dense transform), or a :class:`SparseFeature` of a sparse column's ids. Sliced,
            taken and concatenated with the rest of the chunk.

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
    inputs: dict[str, np.ndarray | SparseFeature] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        n = self.labels.shape[0] if isinstance(self.labels, np.ndarray) else -1
        _check_matrix("dense", self.dense, np.float32, n)
        _check_matrix("labels", self.labels, np.float32, n)
        if self.raw_dense is not None:
            _check_matrix("raw_dense", self.raw_dense, np.float64, n)
        for f in self.sparse:
            if f.batch_size != n:
                raise ValueError(f"sparse feature '{f.name}' has {f.batch_size} rows, labels have {n}")
        for name, value in self.inputs.items():
            if isinstance(value, SparseFeature):
                if value.batch_size != n:
                    raise ValueError(f"input '{name}' has {value.batch_size} rows, labels have {n}")
            elif not isinstance(value, np.ndarray) or value.ndim not in (1, 2) or value.shape[0] != n:
                raise ValueError(
                    f"input '{name}' must be a [n] or [n, k] array of {n} rows, got {getattr(value, 'shape', type(value))}"
                )

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
        cut = _SameFeatures(lambda f: _slice_feature(f, start, stop))
        return Chunk(
            self.dense[start:stop],
            [cut(f) for f in self.sparse],
            self.labels[start:stop],
            None if self.raw_dense is None else self.raw_dense[start:stop],
            {k: cut(v) if isinstance(v, SparseFeature) else v[start:stop] for k, v in self.inputs.items()},
        )

    def take(self, rows: np.ndarray) -> Chunk:
        """The given rows (any order, repeats allowed), gathering each sample's id list."""
        rows = np.asarray(rows, np.int64)
        gather = _SameFeatures(lambda f: _take_feature(f, rows))
        return Chunk(
            self.dense[rows],
            [gather(f) for f in self.sparse],
            self.labels[rows],
            None if self.raw_dense is None else self.raw_dense[rows],
            {k: gather(v) if isinstance(v, SparseFeature) else v[rows] for k, v in self.inputs.items()},
        )


class _SameFeatures:
    """Applies a row operation to sparse features once per feature object: a sparse feature of
    the chunk is usually also one of its inputs, and must not be cut twice."""

    def __init__(self, operation: Callable[[SparseFeature], SparseFeature]):
        self._operation = operation
        self._done: dict[int, SparseFeature] = {}

    def __call__(self, feature: SparseFeature) -> SparseFeature:
        key = id(feature)
        if key not in self._done:
            self._done[key] = self._operation(feature)
        return self._done[key]


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
    input_names = list(chunks[0].inputs)
    if any(list(c.inputs) != input_names for c in chunks):
        raise ValueError("chunks have different inputs")
    sparse = [_concat_feature([c.sparse[i] for c in chunks]) for i in range(len(names))]
    raws = [c.raw_dense for c in chunks if c.raw_dense is not None]
    raw = np.concatenate(raws) if len(raws) == len(chunks) else None
    inputs: dict[str, np.ndarray | SparseFeature] = {}
    for name in input_names:
        first = chunks[0].inputs[name]
        if isinstance(first, SparseFeature):
            # reuse the concatenation of a sparse feature that is also this input
            same = [i for i, f in enumerate(chunks[0].sparse) if f is first]
            if same and all(c.inputs[name] is c.sparse[same[0]] for c in chunks):
                inputs[name] = sparse[same[0]]
            else:
                inputs[name] = _concat_feature([c.inputs[name] for c in chunks])  # type: ignore[misc]
        else:
            inputs[name] = np.concatenate([c.inputs[name] for c in chunks])
    return Chunk(
        np.concatenate([c.dense for c in chunks]), sparse, np.concatenate([c.labels for c in chunks]), raw, inputs
    )


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


def to_batch(chunk: Chunk, features: FeaturePipeline | None = None) -> PyPersiaBatchData:
    """A :class:`PyPersiaBatchData` of the chunk: dense ``[B, d]`` float32, one sparse feature
    each, and the labels as the target ``[B, t]``.

    Args:
        chunk: the rows.
        features: the embedding config's feature ops: the slots with ops are computed from the
            chunk's :attr:`Chunk.inputs` (the serving handler applies the same ops to raw requests).

    Raises:
        FeatureInputError: an input the ops select is missing from the chunk or of the wrong kind.
    """
    batch = PyPersiaBatchData()
    batch.add_dense_f32(np.ascontiguousarray(chunk.dense))
    for feature in chunk.sparse if features is None else features.features(chunk.inputs, chunk.sparse):
        batch.add_sparse_feature(feature)
    batch.add_target(np.ascontiguousarray(chunk.labels))
    return batch


def named_inputs(
    dense_names: Sequence[str], raw_dense: np.ndarray, sparse: Sequence[SparseFeature]
) -> dict[str, np.ndarray | SparseFeature]:
    """The raw inputs of a chunk whose columns have fixed names (Criteo's readers, generated
    data): each dense column as float64 ``[n, 1]`` before the transform, missing values 0 (the
    default a mapping's dense column has), then each sparse feature under its own name.

    Example:
        >>> sorted(named_inputs(["I1"], np.array([[np.nan]]), []))
        ['I1']
    """
    values = np.nan_to_num(raw_dense, nan=0.0)
    inputs: dict[str, np.ndarray | SparseFeature] = {name: values[:, j : j + 1] for j, name in enumerate(dense_names)}
    inputs.update((f.name, f) for f in sparse)
    return inputs


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

StringIds = Literal["hex", "decimal", "farm"]
_STRING_IDS = ("hex", "decimal", "farm")
_TRANSFORMS = ("none", "log1p")


@dataclass(frozen=True)
class DenseColumn:
    """One dense input: a numeric column (one value per row) or a fixed-length ``list<numeric>``
    column (``length`` values per row), as RecIS's ``fixedlen_feature(name, defaults)``.

    Args:
        name: the input's name (in :attr:`Chunk.inputs` and for feature ops).
        column: the file's column (empty: ``name``).
        length: values per row. A list shorter than ``length`` (empty and null included) takes
            the defaults for its missing positions; a longer list is an error naming the row.
        defaults: ``length`` values for missing entries (empty: zeros).
        in_dense: part of the model's dense matrix; ``False`` keeps it as a raw input only
            (e.g. a column that a feature op bucketizes into ids).

    Raises:
        ValueError: an empty name, a length below 1, or defaults of another length.

    Example:
        >>> DenseColumn("dense1", length=8).default_values().tolist()
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """

    name: str = option(doc="the input's name (and the file's column unless 'column' is given)")
    column: str = option("", doc="the file's column (empty = name)")
    length: int = option(
        1,
        doc="values per row: a numeric column gives 1; a list<numeric> column up to length "
        "(shorter, empty or null lists take the defaults; a longer list is an error naming the row)",
    )
    defaults: list[float] = option(default_factory=list, doc="the 'length' values of missing entries (empty = zeros)")
    in_dense: bool = option(True, doc="part of the model's dense matrix (false: a raw input for feature ops only)")

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a dense column needs a name")
        if self.length < 1:
            raise ValueError(f"dense column '{self.name}': length must be >= 1, got {self.length}")
        if self.defaults and len(self.defaults) != self.length:
            raise ValueError(f"dense column '{self.name}': {len(self.defaults)} defaults for length {self.length}")
        object.__setattr__(self, "defaults", [float(v) for v in self.defaults])

    @property
    def source(self) -> str:
        """The file's column."""
        return self.column or self.name

    def default_values(self) -> np.ndarray:
        """float64 ``[length]``: the declared defaults, or zeros."""
        if self.defaults:
            return np.asarray(self.defaults, np.float64)
        return np.zeros(self.length, np.float64)


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns of a Parquet / ORC file feed the labels, the dense matrix and each sparse feature.

    Args:
        label: the label column: numeric or bool (no nulls), or a ``list<numeric>`` of at most
            one value per row (an empty or null list is ``label_default``, as RecIS's
            ``fixedlen_feature("label", [0.0])``).
        labels: several label columns (multi-task) instead of ``label``.
        label_default: the label of a row whose list label is empty or null.
        dense: :class:`DenseColumn` entries in order; the dense matrix is the concatenation of
            those with ``in_dense``.
        sparse: feature name -> column. A sparse column holds integers (non-negative), strings,
            or lists of either; null, an empty list and an empty string mean no id.
        string_ids: how strings become ids: ``"hex"`` (Criteo's, e.g. ``"05db9164"``),
            ``"decimal"``, or ``"farm"`` (FarmHash ``Fingerprint64`` of the UTF-8 bytes, RecIS's
            ``farm`` hash, see :mod:`embedding_server.core.farmhash`).
        dense_transform: ``"none"`` (values as stored) or ``"log1p"`` (the Criteo transform, see
            :func:`transform_dense`); the raw inputs stay untransformed.

    Raises:
        ValueError: no label, both ``label`` and ``labels``, an unknown ``string_ids`` or
            transform, or two inputs of the same name.

    Example:
        >>> m = ColumnMapping(label="y", dense=[DenseColumn("dense1", length=8)], sparse={"tags": "tag_ids"},
        ...                   string_ids="farm")
        >>> m.dense_width, m.input_names
        (8, ['dense1', 'tags'])
    """

    label: str = option("label", doc="the label column: numeric, or a list<numeric> of at most one value")
    labels: list[str] = option(default_factory=list, doc="several label columns (multi-task), instead of 'label'")
    label_default: float = option(0.0, doc="the label of a row whose list label is empty or null")
    dense: list[DenseColumn] = option(
        default_factory=list, doc="dense inputs in order: {name, column, length, defaults, in_dense} each"
    )
    sparse: dict[str, str] = option(
        default_factory=dict,
        doc="sparse feature -> column: integer, string, list<integer> or list<string> (null or empty = no id)",
    )
    string_ids: str = option(
        "hex", doc="how strings become ids: hex (Criteo's), decimal, or farm (FarmHash Fingerprint64, RecIS's farm)"
    )
    dense_transform: str = option("none", doc="transform of the dense matrix: none or log1p (Criteo's)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", list(self.labels))
        object.__setattr__(self, "dense", list(self.dense))
        object.__setattr__(self, "sparse", dict(self.sparse))
        if self.labels and self.label not in ("", "label"):
            raise ValueError("give 'label' or 'labels', not both")
        if not self.label_columns:
            raise ValueError("the column mapping needs a label column")
        if self.string_ids not in _STRING_IDS:
            raise ValueError(f"string_ids must be hex, decimal or farm, got {self.string_ids!r}")
        if self.dense_transform not in _TRANSFORMS:
            raise ValueError(f"dense_transform must be none or log1p, got {self.dense_transform!r}")
        seen: set[str] = set()
        for name in self.input_names:
            if name in seen:
                raise ValueError(f"input '{name}' is mapped twice (dense and sparse names must be unique)")
            seen.add(name)

    @classmethod
    def criteo(cls, dense_transform: DenseTransform = "log1p") -> ColumnMapping:
        """Criteo's columns by name: ``label``, ``I1..I13`` dense, ``C1..C26`` hex strings."""
        return cls(
            label="label",
            dense=[DenseColumn(f"I{i}") for i in range(1, 14)],
            sparse={f"C{i}": f"C{i}" for i in range(1, 27)},
            dense_transform=dense_transform,
        )

    @classmethod
    def load(cls, path: str | Path) -> ColumnMapping:
        """A mapping from a YAML file holding the keys of ``job.yml``'s ``data.mapping``.

        Raises:
            ConfigError: a missing file, an unknown key or a bad value (naming the key).
        """
        from embedding_server.core.config_schema import build, read_yaml

        return build(cls, read_yaml(path), str(path))

    @property
    def label_columns(self) -> list[str]:
        return list(self.labels) if self.labels else ([self.label] if self.label else [])

    @property
    def input_names(self) -> list[str]:
        """The names of :attr:`Chunk.inputs`: dense inputs, then sparse features."""
        return [c.name for c in self.dense] + list(self.sparse)

    @property
    def dense_width(self) -> int:
        """Columns of the dense matrix."""
        return sum(c.length for c in self.dense if c.in_dense)

    def columns(self) -> list[str]:
        """Every column the mapping reads, without repeats."""
        return list(dict.fromkeys(self.label_columns + [c.source for c in self.dense] + list(self.sparse.values())))

    def validate(self, schema: pa.Schema, path: str | Path = "<table>") -> None:
        """Check every mapped column exists with a usable type.

        Raises:
            DataFormatError: an unknown column or a column of the wrong type, naming both.
        """
        for column in self.label_columns:
            t = _field(path, schema, "label", column).type
            if not (_is_number(t) or (_is_list(t) and _is_number(t.value_type))):
                raise DataFormatError(
                    path, f"label: column '{column}' has type {t}; expected a numeric or list<numeric> column"
                )
        for dense in self.dense:
            role = f"dense input '{dense.name}'"
            t = _field(path, schema, role, dense.source).type
            if _is_list(t) and _is_number(t.value_type):
                continue
            if not _is_number(t):
                raise DataFormatError(
                    path, f"{role}: column '{dense.source}' has type {t}; expected a numeric or list<numeric> column"
                )
            if dense.length != 1:
                raise DataFormatError(
                    path,
                    f"{role}: column '{dense.source}' has type {t}, one value per row, but length is {dense.length}; "
                    "a length above 1 needs a list column",
                )
        for name, column in self.sparse.items():
            t = _field(path, schema, f"sparse feature '{name}'", column).type
            if _sparse_kind(t) is None:
                raise DataFormatError(
                    path,
                    f"sparse feature '{name}': column '{column}' has type {t}; "
                    "expected an integer, string, list<integer> or list<string> column",
                )


def _field(path: str | Path, schema: pa.Schema, role: str, column: str) -> pa.Field:
    index = schema.get_field_index(column)
    if index < 0:
        raise DataFormatError(path, f"{role}: no column '{column}'; the file has {', '.join(schema.names)}")
    return schema.field(index)


def _is_number(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _sparse_kind(t: pa.DataType) -> str | None:
    """``"int"``, ``"string"``, ``"list"`` (of either) or ``None`` for any other type."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "int"
    if _is_text(t):
        return "string"
    if _is_list(t) and (pa.types.is_integer(t.value_type) or _is_text(t.value_type)):
        return "list"
    return None


def read_table(
    path: str | Path,
    fmt: Literal["parquet", "orc"] | None = None,
    *,
    mapping: ColumnMapping,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Iterator[Chunk]:
    """Read a Parquet or ORC file through a column mapping, streaming it in chunks.

    A Parquet file is read row group by row group and an ORC file stripe by stripe, only the
    mapped columns, so memory holds one row group or stripe (plus the chunk being built) however
    large the file is.

    Args:
        path: the file.
        fmt: ``"parquet"`` or ``"orc"``; by default from the extension (``.parquet``/``.pq``, ``.orc``).
        mapping: which columns are labels, dense and sparse (see :class:`ColumnMapping`).
        chunk_rows: the most rows per yielded chunk.

    Returns:
        An iterator of :class:`Chunk` (the dense matrix follows ``mapping.dense``, sparse
        features are named by the mapping's keys, :attr:`Chunk.inputs` holds every mapped
        column by its mapping name).

    Raises:
        DataFormatError: an unreadable file, mapping and schema disagreeing, a null label, a
            list longer than its declared length, a negative or null id, or a string id that
            does not parse (naming the file, the column and the row, 0-based in the file).
        ValueError: unknown format.
    """
    fmt = fmt or table_format(path)
    schema, batches = _columnar_batches(path, fmt, mapping, chunk_rows)
    mapping.validate(schema, path)
    row = 0
    while True:
        try:
            record_batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(path, f"cannot read the {fmt} file after row {row}: {exc}") from None
        if record_batch is None:
            return
        if record_batch.num_rows:
            yield _table_chunk(path, record_batch, mapping, row)
            row += record_batch.num_rows


def _columnar_batches(
    path: str | Path, fmt: str, mapping: ColumnMapping, chunk_rows: int
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The file's schema and a lazy iterator of its mapped columns' record batches."""
    import pyarrow.orc as orc
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            parquet = pq.ParquetFile(str(path))
            schema = parquet.schema_arrow
        elif fmt == "orc":
            orc_file = orc.ORCFile(str(path))
            schema = orc_file.schema
        else:
            raise ValueError(f"unknown table format {fmt!r}")
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(path, f"not a readable {fmt} file: {exc}") from None
    columns = [c for c in mapping.columns() if schema.get_field_index(c) >= 0]

    def parquet_batches() -> Iterator[pa.RecordBatch]:
        # iter_batches decodes one row group at a time (only the mapped columns)
        yield from parquet.iter_batches(batch_size=chunk_rows, columns=columns, use_threads=False)

    def orc_batches() -> Iterator[pa.RecordBatch]:
        for stripe in range(orc_file.nstripes):
            record_batch = orc_file.read_stripe(stripe, columns=columns)
            for start in range(0, record_batch.num_rows, chunk_rows):
                yield record_batch.slice(start, chunk_rows)

    return schema, parquet_batches() if fmt == "parquet" else orc_batches()


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
    n = batch.num_rows
    labels = np.concatenate(
        [_label_values(path, batch.column(c), c, mapping.label_default, first_row) for c in mapping.label_columns],
        axis=1,
    )
    inputs: dict[str, np.ndarray | SparseFeature] = {}
    dense_parts = []
    for dense in mapping.dense:
        values = _fixed_values(path, batch.column(dense.source), dense, f"dense input '{dense.name}'", first_row)
        inputs[dense.name] = values
        if dense.in_dense:
            dense_parts.append(values)
    raw = np.concatenate(dense_parts, axis=1) if dense_parts else np.zeros((n, 0))
    sparse = []
    for name, column in mapping.sparse.items():
        feature = _sparse_column(path, name, batch.column(column), column, mapping.string_ids, first_row)
        sparse.append(feature)
        inputs[name] = feature
    transform: DenseTransform = "log1p" if mapping.dense_transform == "log1p" else "none"
    return Chunk(transform_dense(raw, transform), sparse, labels.astype(np.float32), raw, inputs)


def _numeric(column: pa.Array) -> np.ndarray:
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _plain(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array, dictionaries decoded, string views as large strings."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_string_view(column.type):
        column = column.cast(pa.large_string())
    if pa.types.is_fixed_size_list(column.type):
        column = column.cast(pa.large_list(column.type.value_type))
    return column


def _label_values(path: str | Path, column: pa.Array, name: str, default: float, first_row: int) -> np.ndarray:
    """float64 ``[n, 1]`` labels of one label column."""
    column = _plain(column)
    if _is_list(column.type):
        return _fixed_values(path, column, DenseColumn(name, defaults=[default]), "label", first_row)
    if column.null_count:
        bad = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataFormatError(path, f"label: column '{name}' is null", row=first_row + bad)
    return _numeric(column).reshape(-1, 1)


def _fixed_values(path: str | Path, column: pa.Array, dense: DenseColumn, role: str, first_row: int) -> np.ndarray:
    """float64 ``[n, length]``: a numeric column's values, or the first ``length`` values of
    each list, defaults where an entry, a list position or a list element is missing."""
    column = _plain(column)
    n = len(column)
    defaults = dense.default_values()
    if not _is_list(column.type):
        values = _numeric(column)
        if column.null_count:
            values[column.is_null().to_numpy(zero_copy_only=False)] = defaults[0]
        return values.reshape(n, 1)
    k = dense.length
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    too_long = _first(lengths > k)
    if too_long is not None:
        raise DataFormatError(
            path,
            f"{role}: column '{dense.source}' holds a list of {lengths[too_long]} values; its length is {k}",
            row=first_row + too_long,
        )
    flat = column.flatten()  # the values of the non-null lists, in order
    out = np.broadcast_to(defaults, (n, k)).copy()
    if len(flat) == 0:
        return out
    values = _numeric(flat)
    present = np.ones(len(flat), bool) if not flat.null_count else flat.is_valid().to_numpy(zero_copy_only=False)
    starts = np.zeros(n, np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    position = np.arange(k)
    inside = position < lengths[:, None]
    index = np.where(inside, starts[:, None] + position, 0)
    take = inside & present[index]
    out[take] = values[index[take]]
    return out


def _sparse_column(
    path: str | Path, name: str, column: pa.Array, column_name: str, string_ids: str, first_row: int
) -> SparseFeature:
    column = _plain(column)
    role = f"sparse feature '{name}': column '{column_name}'"
    if _is_list(column.type):
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.zeros(len(column) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = _plain(column.flatten())
        if values.null_count:
            bad = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            row = int(np.searchsorted(offsets, bad, side="right")) - 1
            raise DataFormatError(path, f"{role} holds a null id", row=first_row + row)
        ids, present, bad_ids = _ids(values, string_ids)
        first_bad = _first(bad_ids)
        if first_bad is not None:
            row = int(np.searchsorted(offsets, first_bad, side="right")) - 1
            raise DataFormatError(path, f"{role}: {_bad_id(values, first_bad, string_ids)}", row=first_row + row)
        if not present.all():  # empty strings are no id: drop them from their lists
            rows = np.repeat(np.arange(len(column)), lengths)
            np.cumsum(np.bincount(rows[present], minlength=len(column)), out=offsets[1:])
            ids = ids[present]
        return SparseFeature(name, np.ascontiguousarray(ids, np.uint64), offsets)
    ids, present, bad_ids = _ids(column, string_ids)
    first_bad = _first(bad_ids)
    if first_bad is not None:
        raise DataFormatError(path, f"{role}: {_bad_id(column, first_bad, string_ids)}", row=first_row + first_bad)
    return single_id_feature(name, ids, present)


def _ids(values: pa.Array, string_ids: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, present, bad)`` of an integer or string array: uint64 ids, a mask of entries that
    are ids (not null, not an empty string) and a mask of entries that are not valid ids."""
    if pa.types.is_integer(values.type):
        present = (
            np.ones(len(values), bool) if not values.null_count else values.is_valid().to_numpy(zero_copy_only=False)
        )
        raw = values.fill_null(0).to_numpy(zero_copy_only=False) if values.null_count else values.to_numpy()
        bad = present & (raw < 0) if raw.dtype.kind == "i" else np.zeros(len(values), bool)
        return raw.astype(np.uint64), present, bad
    if string_ids == "hex":
        return parse_hex_ids(values)
    if string_ids == "decimal":
        return _parse_decimal_ids(values)
    present = pc.fill_null(pc.binary_length(values), 0).to_numpy(zero_copy_only=False) > 0
    return fingerprint64_strings(values), present, np.zeros(len(values), bool)


def _bad_id(values: pa.Array, index: int, string_ids: str) -> str:
    value = values[index].as_py()
    if isinstance(value, int):
        return f"negative id {value}"
    return f"{value!r} is not a {string_ids} id"


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


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


CriteoChunk = Chunk
"""The chunks of the Criteo readers are ordinary :class:`Chunk` objects."""

__all__ = [
    "Chunk",
    "CriteoChunk",
    "ColumnMapping",
    "DenseColumn",
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
