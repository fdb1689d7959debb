"""Criteo display-advertising data: the classic TSV and the CSV-with-header variant.

A Criteo line holds a 0/1 label, 13 integer features and 26 categorical features written as
hexadecimal hashes; fields are tab-separated and an empty field is missing. The CSV variant
(for example ``criteo_sample.csv``) has the same 40 columns, comma-separated, after a header
line ``label,I1..I13,C1..C26``. Columns are taken by position; the header only names them.

What a reader yields (see :class:`trainer.data.Chunk`):

* ``dense``: float32 ``[n, 13]``; missing becomes 0, then ``log(1 + max(x, 0))``
  (:func:`trainer.data.transform_dense`); ``raw_dense`` keeps the values as read (NaN = missing).
* ``sparse``: 26 features named ``C1..C26``; each hex string becomes one uint64 id
  (``int(x, 16)``, at most 16 digits); a missing field gives that sample an empty id list.
* ``labels``: float32 ``[n, 1]``.

Parsing and conversion are vectorised (pyarrow's CSV reader, then numpy): no Python per row.

Example:
    >>> for chunk in read_criteo("day_0.gz", chunk_rows=65536):  # doctest: +SKIP
    ...     print(len(chunk), chunk.dense.shape, chunk.feature("C1").ids[:3])
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from trainer.data import (
    DEFAULT_CHUNK_ROWS,
    Chunk,
    DataFormatError,
    DenseTransform,
    named_inputs,
    parse_hex_ids,
    single_id_feature,
    transform_dense,
)

log = logging.getLogger(__name__)

DENSE_NAMES = tuple(f"I{i}" for i in range(1, 14))
SPARSE_NAMES = tuple(f"C{i}" for i in range(1, 27))
CriteoFormat = Literal["auto", "tsv", "csv"]
OnError = Literal["raise", "skip"]

# A subset of what Arrow's string -> double cast accepts, to find the fields it refused.
_NUMBER = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_LOGGED_SKIPS = 20


class CriteoReader(Iterator[Chunk]):
    """Iterator over the chunks of one Criteo file; ``read_criteo`` is another name for it.

    Args:
        path: a ``.tsv``/``.txt``/``.csv`` file, optionally compressed (``.gz``, ``.bz2``, ...,
            detected from the extension).
        fmt: ``"tsv"``, ``"csv"`` or ``"auto"`` (a tab in the first line means TSV, else CSV).
            Either may start with a header line; it is recognised by a non-numeric first field.
        chunk_rows: the most rows per chunk.
        on_error: ``"raise"`` stops at the first malformed line with a :class:`DataFormatError`
            naming the file and line (rows from that block on are not yielded); ``"skip"``
            drops malformed lines, counts them in :attr:`skipped` and logs them.
        dense_names: names of the dense columns (their number sets the column count).
        sparse_names: names of the sparse features (ditto).
        dense_transform: ``"log1p"`` (default) or ``"none"``; see :func:`transform_dense`.

    Attributes:
        skipped: number of malformed lines dropped so far (``on_error="skip"``).
        skipped_lines: their line numbers, in the order found.

    Raises:
        DataFormatError: a malformed line (wrong column count, label not 0/1, non-numeric or
            non-finite dense value, non-hex or over-long categorical value), or a header with
            the wrong number of columns.
        ValueError: bad arguments.

    Example:
        >>> reader = read_criteo("train.tsv", on_error="skip")  # doctest: +SKIP
        >>> rows = sum(len(c) for c in reader); print(rows, reader.skipped)  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fmt: CriteoFormat = "auto",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        on_error: OnError = "raise",
        dense_names: Sequence[str] = DENSE_NAMES,
        sparse_names: Sequence[str] = SPARSE_NAMES,
        dense_transform: DenseTransform = "log1p",
    ):
        if fmt not in ("auto", "tsv", "csv"):
            raise ValueError(f"fmt must be 'auto', 'tsv' or 'csv', got {fmt!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        names = ["label", *dense_names, *sparse_names]
        if len(set(names)) != len(names):
            raise ValueError(f"column names must be distinct and not 'label': {names}")
        self.path = str(path)
        self.chunk_rows = chunk_rows
        self.on_error = on_error
        self.dense_names = list(dense_names)
        self.sparse_names = list(sparse_names)
        self.dense_transform = dense_transform
        self.skipped = 0
        self.skipped_lines: list[int] = []
        self._column_errors: list[tuple[int, str]] = []  # (line, reason) from the parser, not yet reported
        self._refused_lines: list[int] = []  # every line the parser refused, for numbering the others
        self._chunks = self._read(names, fmt)

    def __iter__(self) -> CriteoReader:
        return self

    def __next__(self) -> Chunk:
        return next(self._chunks)

    # ----------------------------------------------------------------------- reading

    def _read(self, names: list[str], fmt: CriteoFormat) -> Iterator[Chunk]:
        delimiter, has_header = self._sniff(fmt, len(names))
        first_line = 2 if has_header else 1
        reader = pa_csv.open_csv(
            pa.input_stream(self.path, compression="detect"),
            read_options=pa_csv.ReadOptions(
                column_names=names,
                skip_rows=1 if has_header else 0,
                use_threads=False,  # serial parsing is what gives the error handler line numbers
                block_size=int(np.clip(self.chunk_rows * 256, 1 << 20, 64 << 20)),
            ),
            parse_options=pa_csv.ParseOptions(
                delimiter=delimiter,
                quote_char='"' if delimiter == "," else False,
                ignore_empty_lines=False,
                invalid_row_handler=self._on_bad_row,
            ),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in names},
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )
        rows_before = 0  # rows the CSV parser accepted before this batch
        for batch in reader:
            chunk = self._convert(batch, first_line, rows_before)
            rows_before += batch.num_rows
            for start in range(0, len(chunk), self.chunk_rows):
                yield chunk.slice(start, start + self.chunk_rows)
        self._raise_or_skip_column_errors()
        if self.skipped > _LOGGED_SKIPS:
            log.warning("%s: skipped %d malformed lines in all", self.path, self.skipped)

    def _sniff(self, fmt: CriteoFormat, columns: int) -> tuple[str, bool]:
        with pa.input_stream(self.path, compression="detect") as stream:
            head = stream.read(1 << 16)
        first = head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")
        delimiter = {"tsv": "\t", "csv": ","}.get(fmt) or ("\t" if "\t" in first else ",")
        fields = first.split(delimiter)
        has_header = bool(first) and not _is_number(fields[0])
        if has_header and len(fields) != columns:
            raise DataFormatError(
                self.path, f"header has {len(fields)} columns, expected {columns} (label, dense, sparse)", line=1
            )
        return delimiter, has_header

    def _on_bad_row(self, row: pa_csv.InvalidRow) -> str:
        reason = f"expected {row.expected_columns} columns, found {row.actual_columns}"
        self._column_errors.append((row.number, reason))
        self._refused_lines.append(row.number)
        return "skip"

    def _convert(self, batch: pa.RecordBatch, first_line: int, rows_before: int) -> Chunk:
        n = batch.num_rows
        bad = np.zeros(n, bool)
        reasons: list[tuple[np.ndarray, str]] = []

        labels, label_bad = _floats(batch.column(0))
        label_bad |= ~np.isin(labels, (0.0, 1.0))
        reasons.append((label_bad, "label must be 0 or 1"))
        raw = np.empty((n, len(self.dense_names)), np.float64)
        for j, name in enumerate(self.dense_names):
            raw[:, j], col_bad = _floats(batch.column(1 + j))
            reasons.append((col_bad, f"dense feature {name} is not a finite number"))
        sparse = []
        for j, name in enumerate(self.sparse_names):
            ids, present, col_bad = parse_hex_ids(batch.column(1 + len(self.dense_names) + j))
            sparse.append((name, ids, present))
            reasons.append((col_bad, f"categorical feature {name} is not a hexadecimal id of at most 16 digits"))
        for mask, _ in reasons:
            bad |= mask

        lines = self._lines(first_line, rows_before, n)
        self._raise_or_skip(batch, bad, reasons, lines)
        keep: np.ndarray | slice = ~bad
        if not bad.any():
            keep = slice(None)
        raw = raw[keep]
        features = [single_id_feature(name, ids[keep], present[keep]) for name, ids, present in sparse]
        return Chunk(
            transform_dense(raw, self.dense_transform),
            features,
            labels[keep].astype(np.float32).reshape(-1, 1),
            raw,
            named_inputs(self.dense_names, raw, features),
        )

    # ----------------------------------------------------------------------- errors

    def _lines(self, first_line: int, rows_before: int, n: int) -> np.ndarray:
        """File line numbers of the parser's rows ``rows_before .. rows_before + n``.

        Rows the parser refused (wrong column count) have line numbers but no row, so row r is
        line ``first_line + r`` plus the number of refused lines before it.
        """
        refused = np.array(sorted(self._refused_lines), np.int64)
        lines = first_line + rows_before + np.arange(n, dtype=np.int64)
        shift = np.zeros(n, np.int64)
        while True:  # fixed point: count the refused lines at or before each (shifted) line
            new = np.searchsorted(refused, lines + shift, side="right")
            if np.array_equal(new, shift):
                return lines + shift
            shift = new

    def _raise_or_skip(
        self, batch: pa.RecordBatch, bad: np.ndarray, reasons: list[tuple[np.ndarray, str]], lines: np.ndarray
    ) -> None:
        found = [
            (int(lines[i]), _describe(batch, int(i), reason))
            for i in np.flatnonzero(bad)
            for m, reason in reasons
            if m[i]
        ]
        seen = {line for line, _ in found}
        # Column-count errors up to this batch's last line belong with it.
        last = int(lines[-1]) if lines.size else 0
        found += [(line, reason) for line, reason in self._column_errors if line <= last and line not in seen]
        self._column_errors = [(line, r) for line, r in self._column_errors if line > last]
        self._report(found)

    def _raise_or_skip_column_errors(self) -> None:
        found, self._column_errors = self._column_errors, []
        self._report(found)

    def _report(self, found: list[tuple[int, str]]) -> None:
        if not found:
            return
        found.sort()
        if self.on_error == "raise":
            line, reason = found[0]
            raise DataFormatError(self.path, reason, line=line)
        for line in dict.fromkeys(line for line, _ in found):
            self.skipped += 1
            self.skipped_lines.append(line)
            if self.skipped <= _LOGGED_SKIPS:
                reason = next(r for at, r in found if at == line)
                log.warning("%s, line %d: skipped: %s", self.path, line, reason)


read_criteo = CriteoReader
"""``read_criteo(path, *, fmt="auto", chunk_rows=..., on_error="raise", dense_names=...,
sparse_names=..., dense_transform="log1p")``: read a Criteo TSV or CSV-with-header file in
chunks of at most ``chunk_rows`` rows; returns a :class:`CriteoReader` (an iterator of
:class:`~trainer.data.Chunk` with a ``skipped`` counter). See :class:`CriteoReader` for the
arguments and errors."""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _floats(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """float64 values (NaN where null) and a mask of present fields that are not finite numbers."""
    try:
        values = pc.cast(column, pa.float64())
        syntax_bad = np.zeros(len(column), bool)
    except pa.ArrowInvalid:
        ok = pc.fill_null(pc.match_substring_regex(column, _NUMBER), True).to_numpy(zero_copy_only=False)
        syntax_bad = ~ok
        values = pc.cast(pc.if_else(pa.array(ok), column, pa.scalar(None, pa.string())), pa.float64())
    floats = values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    present = column.is_valid().to_numpy(zero_copy_only=False)
    return floats, syntax_bad | (present & ~np.isfinite(floats))


def _describe(batch: pa.RecordBatch, row: int, reason: str) -> str:
    values = [batch.column(j)[row].as_py() for j in range(batch.num_columns)]
    shown = "\t".join("" if v is None else v for v in values)
    return f"{reason}: {shown[:200]!r}"


# --------------------------------------------------------------------------------- writing

_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)


def write_criteo_tsv(path: str | Path, chunk: Chunk, *, append: bool = False) -> None:
    """Write a chunk as Criteo TSV lines (no header): label, dense values, hex ids.

    Dense values come from ``chunk.raw_dense`` (NaN written as an empty field; integral values
    without a decimal point). Ids below ``2**32`` are written with 8 hex digits like Criteo's,
    larger ones with 16; an empty id list is an empty field.

    Args:
        path: the output file (plain text).
        chunk: rows to write; every sample must have at most one id per feature.
        append: add to an existing file instead of replacing it.

    Raises:
        ValueError: no ``raw_dense``, a multi-id sample, or a label that is not 0/1.
    """
    if chunk.raw_dense is None:
        raise ValueError("write_criteo_tsv needs chunk.raw_dense (the dense values before the log transform)")
    if chunk.labels.shape[1] != 1 or not np.isin(chunk.labels, (0.0, 1.0)).all():
        raise ValueError("Criteo labels are one 0/1 column")
    columns = [pa.array(chunk.labels[:, 0].astype(np.int64))]
    columns += [_dense_column(chunk.raw_dense[:, j]) for j in range(chunk.raw_dense.shape[1])]
    for feature in chunk.sparse:
        lengths = feature.lengths
        if lengths.size and lengths.max() > 1:
            raise ValueError(f"feature '{feature.name}' has samples with several ids; Criteo TSV holds one per field")
        columns.append(_hex_column(feature.ids, lengths.astype(bool)))
    table = pa.table(columns, names=[f"c{i}" for i in range(len(columns))])
    options = pa_csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with open(path, "ab" if append else "wb") as out:
        pa_csv.write_csv(table, out, write_options=options)


def _dense_column(values: np.ndarray) -> pa.Array:
    missing = np.isnan(values)
    finite = values[~missing]
    if np.array_equal(finite, np.round(finite)) and (np.abs(finite) < 2**53).all():
        return pa.array(np.where(missing, 0, values).astype(np.int64), mask=missing)
    return pa.array(values, mask=missing)


def _hex_column(ids: np.ndarray, present: np.ndarray) -> pa.Array:
    """One lowercase hex string per row (``present`` rows take the next id), built without a loop."""
    widths = np.where(ids < 2**32, 8, 16)
    shifts = np.arange(15, -1, -1, dtype=np.uint64) * np.uint64(4)
    digits = _HEX_DIGITS[((ids[:, None] >> shifts) & np.uint64(15)).astype(np.intp)]  # [m, 16]
    keep = np.arange(16)[None, :] >= (16 - widths)[:, None]
    data = digits[keep]
    lengths = np.zeros(present.shape[0], np.int32)
    lengths[present] = widths
    offsets = np.zeros(present.shape[0] + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.StringArray.from_buffers(
        present.shape[0], pa.py_buffer(offsets), pa.py_buffer(data.tobytes()), pa.array(present).buffers()[1]
    )
