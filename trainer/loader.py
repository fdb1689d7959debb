"""Batches for training: read or generate this rank's rows, cut them into batches and build
:class:`~trainer.batch.PyPersiaBatchData` objects in a background thread.

Sharding over ``world_size`` ranks (``rank`` and ``world_size`` default to the ``RANK`` and
``WORLD_SIZE`` environment variables that torchrun sets, else 0 and 1):

* at least ``world_size`` files: file ``i`` (after the optional shuffle, which every rank does
  with the same seed) goes to rank ``i % world_size``, which reads it whole;
* fewer files, one file, an in-memory chunk or a :class:`~trainer.synthetic.SyntheticCriteo`:
  rows are dealt round-robin, row ``i`` (counted across the files in order) goes to rank
  ``i % world_size``. A synthetic source makes only this rank's rows.

Together the ranks see every row exactly once per epoch. They may get different numbers of
batches (files of different sizes, a remainder of rows); a data-parallel trainer must agree on a
step count itself.

Shuffling is seeded, so an epoch's order is the same on every run with the same seed:
``shuffle_files`` permutes the files with ``(seed, epoch)`` (the same on every rank), and
``shuffle_buffer_rows`` passes this rank's rows through a bounded shuffle buffer (see
:func:`shuffle_rows`) seeded with ``(seed, epoch, rank)``.

Example:
    >>> from trainer.synthetic import SyntheticCriteo
    >>> with DataLoader(SyntheticCriteo(seed=1), batch_size=512, num_rows=2048) as loader:
    ...     sizes = [batch.batch_size for batch in loader]
    >>> sizes
    [512, 512, 512, 512]
"""

from __future__ import annotations

import glob
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from embedding_server.core.feature_ops import FeaturePipeline
from trainer.batch import PyPersiaBatchData
from trainer.criteo import read_criteo
from trainer.data import DEFAULT_CHUNK_ROWS, Chunk, ColumnMapping, concat_chunks, read_table, rebatch, to_batch
from trainer.synthetic import SyntheticCriteo

log = logging.getLogger(__name__)

FileFormat = Literal["criteo", "tsv", "csv", "parquet", "orc"]
Source = str | Path | Sequence[str | Path] | SyntheticCriteo | Chunk
_JOIN_SECONDS = 30.0


@dataclass(frozen=True)
class _Plan:
    """Everything the producer thread needs, so it holds no reference to the loader."""

    files: tuple[str, ...]
    synthetic: SyntheticCriteo | None
    memory: Chunk | None
    num_rows: int | None
    start_row: int
    batch_size: int
    rank: int
    world_size: int
    drop_last: bool
    shuffle_files: bool
    shuffle_buffer_rows: int
    seed: int
    fmt: FileFormat | None
    mapping: ColumnMapping | None
    chunk_rows: int
    on_error: Literal["raise", "skip"]


class DataLoader:
    """Iterates :class:`PyPersiaBatchData` batches of this rank's rows, prepared in a background thread.

    Each ``iter(loader)`` is ``epochs`` epochs (one by default); each epoch reshuffles with its
    number (``(seed, epoch)``). Batch
    ``b`` holds dense float32 ``[B, num_dense]`` (``add_dense_f32``), one sparse feature per
    column (``add_sparse_feature``) and the labels as target ``[B, 1]`` (``add_target``).

    Args:
        source: a path, directory or glob, or a list of them (Criteo ``.tsv``/``.txt``/``.csv``
            optionally compressed, ``.parquet``/``.pq``, ``.orc``; see ``fmt``; a directory
            means its Parquet and ORC files, see :func:`expand_paths`), a
            :class:`~trainer.synthetic.SyntheticCriteo`, or an in-memory :class:`~trainer.data.Chunk`.
        batch_size: rows per batch.
        prefetch: batches prepared ahead (the bounded queue's size).
        rank: this process's rank (default ``$RANK`` or 0).
        world_size: number of ranks (default ``$WORLD_SIZE`` or 1).
        drop_last: drop a final batch smaller than ``batch_size``.
        shuffle_files: shuffle the file order each epoch (the same way on every rank).
        shuffle_buffer_rows: shuffle rows through a buffer of this many rows (0: rows in order).
        seed: the shuffle seed.
        epochs: passes over the data per ``iter(loader)`` (each one reshuffled as its epoch says).
        num_rows: for a synthetic source, rows per epoch in all ranks together (``None``: endless).
        start_row: for a synthetic source, the first row index (use disjoint ranges for train
            and test sets).
        fmt: the file format for every file instead of guessing from the extension.
        mapping: the column mapping of Parquet / ORC files (default: Criteo's column names
            ``label, I1..I13, C1..C26`` with the log1p dense transform).
        chunk_rows: rows read or generated at a time.
        on_error: malformed Criteo lines: ``"raise"`` or ``"skip"`` (see :func:`read_criteo`).
        features: the embedding config's feature ops, applied to each batch's raw inputs
            (:func:`~trainer.data.to_batch`); None or empty: the chunks' sparse features as read.

    Raises:
        FileNotFoundError: a path or glob matches no file.
        ValueError: bad sizes, rank or format.
        Exception: whatever the reader or generator raised in the background thread is raised
            again by ``next()`` in the consumer (for example a
            :class:`~trainer.data.DataFormatError`).

    Example:
        >>> loader = DataLoader(["day_0.tsv.gz", "day_1.tsv.gz"], 4096, prefetch=4)  # doctest: +SKIP
        >>> for batch in loader:  # doctest: +SKIP
        ...     output, target = ctx.forward(batch)
        >>> loader.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        source: Source,
        batch_size: int,
        *,
        prefetch: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        shuffle_files: bool = False,
        shuffle_buffer_rows: int = 0,
        seed: int = 0,
        epochs: int = 1,
        num_rows: int | None = None,
        start_row: int = 0,
        fmt: FileFormat | None = None,
        mapping: ColumnMapping | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        on_error: Literal["raise", "skip"] = "raise",
        features: FeaturePipeline | None = None,
    ):
        if batch_size < 1 or prefetch < 1 or chunk_rows < 1:
            raise ValueError("batch_size, prefetch and chunk_rows must be >= 1")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if shuffle_buffer_rows < 0:
            raise ValueError(f"shuffle_buffer_rows must be >= 0, got {shuffle_buffer_rows}")
        if num_rows is not None and num_rows < 0:
            raise ValueError(f"num_rows must be >= 0, got {num_rows}")
        if fmt not in (None, "criteo", "tsv", "csv", "parquet", "orc"):
            raise ValueError(f"unknown fmt {fmt!r}")
        rank, world_size = resolve_rank(rank, world_size)
        synthetic = source if isinstance(source, SyntheticCriteo) else None
        memory = source if isinstance(source, Chunk) else None
        files = () if isinstance(source, (SyntheticCriteo, Chunk)) else tuple(expand_paths(source))
        self.prefetch = prefetch
        self.epochs = epochs
        self.epoch = 0
        self._plan = _Plan(
            files,
            synthetic,
            memory,
            num_rows,
            start_row,
            batch_size,
            rank,
            world_size,
            drop_last,
            shuffle_files,
            shuffle_buffer_rows,
            seed,
            fmt,
            mapping,
            chunk_rows,
            on_error,
        )
        self._live: weakref.WeakSet[_Prefetcher] = weakref.WeakSet()
        self.features = features or None

    @property
    def rank(self) -> int:
        return self._plan.rank

    @property
    def world_size(self) -> int:
        return self._plan.world_size

    @property
    def files(self) -> list[str]:
        """All files of the source (every rank's), in their unshuffled order."""
        return list(self._plan.files)

    def __iter__(self) -> Iterator[PyPersiaBatchData]:
        plan, first = self._plan, self.epoch
        self.epoch += self.epochs
        epochs = range(first, first + self.epochs)
        features = self.features
        iterator = _Prefetcher(
            lambda: (to_batch(c, features) for epoch in epochs for c in _rank_batches(plan, epoch)), self.prefetch
        )
        self._live.add(iterator)
        return iterator

    def chunks(self, epoch: int = 0) -> Iterator[Chunk]:
        """This rank's rows as batch-sized chunks, in the calling thread (no prefetch)."""
        return _rank_batches(self._plan, epoch)

    def close(self) -> None:
        """Stop every running epoch's background thread (iterating again starts a new one)."""
        for iterator in list(self._live):
            iterator.close()

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank`` and ``world_size``, defaulting to ``$RANK`` / ``$WORLD_SIZE`` or 0 / 1.

    Raises:
        ValueError: not ``0 <= rank < world_size``.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


TABLE_SUFFIXES = (".parquet", ".pq", ".orc")


def expand_paths(source: str | Path | Sequence[str | Path]) -> list[str]:
    """Paths, directories and globs to a list of files.

    A glob's matches are sorted; a directory (given or matched) stands for the Parquet and ORC
    files below it (``.parquet``, ``.pq``, ``.orc``, recursively, hidden ones left out) in
    sorted order; the order of the items is otherwise kept.

    Raises:
        FileNotFoundError: a path that does not exist, a glob without matches, or a directory
            without Parquet or ORC files.
    """
    items = [source] if isinstance(source, (str, Path)) else list(source)
    files: list[str] = []
    for item in items:
        text = str(item)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else ([text] if Path(text).exists() else [])
        if not matches:
            raise FileNotFoundError(f"no training data file matches {text!r}")
        for match in matches:
            if not Path(match).is_dir():
                files.append(match)
                continue
            found = sorted(
                str(p)
                for p in Path(match).rglob("*")
                if p.suffix.lower() in TABLE_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(match).parts)
            )
            if not found:
                raise FileNotFoundError(f"directory {match!r} holds no .parquet, .pq or .orc file")
            files.extend(found)
    if not files:
        raise FileNotFoundError("no training data files given")
    return files


# --------------------------------------------------------------------------------- this rank's rows


def _rank_batches(plan: _Plan, epoch: int) -> Iterator[Chunk]:
    chunks = _rank_chunks(plan, epoch)
    if plan.shuffle_buffer_rows:
        rng = np.random.default_rng([plan.seed, epoch, plan.rank])
        chunks = shuffle_rows(chunks, plan.shuffle_buffer_rows, rng)
    return rebatch(chunks, plan.batch_size, drop_last=plan.drop_last)


def shuffle_rows(chunks: Iterator[Chunk], buffer_rows: int, rng: np.random.Generator) -> Iterator[Chunk]:
    """Rows of ``chunks`` in a random order, holding at most ``buffer_rows`` plus one chunk.

    The incoming chunk joins the buffer; once the buffer holds more than ``buffer_rows`` rows,
    it is permuted and the rows beyond ``buffer_rows`` leave, so every row that leaves is a
    uniform pick among the rows buffered at that time (the bounded shuffle buffer of
    ``tf.data``, done a chunk at a time). At the end the rest leaves, permuted.

    Args:
        chunks: the rows in file order.
        buffer_rows: rows kept back, >= 1 (more mixes rows from further apart).
        rng: the generator (seed it for a reproducible order).

    Returns:
        An iterator of chunks holding every input row exactly once.
    """
    buffer: Chunk | None = None
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        buffer = chunk if buffer is None else concat_chunks([buffer, chunk])
        if len(buffer) > buffer_rows:
            mixed = buffer.take(rng.permutation(len(buffer)))
            leaving = len(buffer) - buffer_rows
            yield mixed.slice(0, leaving)
            buffer = mixed.slice(leaving, len(mixed))
    if buffer is not None and len(buffer):
        yield buffer.take(rng.permutation(len(buffer)))


def _rank_chunks(plan: _Plan, epoch: int) -> Iterator[Chunk]:
    if plan.synthetic is not None:
        return _synthetic_chunks(plan)
    if plan.memory is not None:
        return _rows_of_rank(iter([plan.memory]), plan.rank, plan.world_size)
    files = list(plan.files)
    if plan.shuffle_files:
        np.random.default_rng([plan.seed, epoch]).shuffle(files)
    if plan.world_size > 1 and len(files) >= plan.world_size:
        return _file_chunks(plan, files[plan.rank :: plan.world_size])
    return _rows_of_rank(_file_chunks(plan, files), plan.rank, plan.world_size)


def _file_chunks(plan: _Plan, files: Sequence[str]) -> Iterator[Chunk]:
    for path in files:
        fmt = plan.fmt or file_format(path)
        if fmt == "parquet" or fmt == "orc":
            mapping = plan.mapping or ColumnMapping.criteo()
            yield from read_table(path, fmt, mapping=mapping, chunk_rows=plan.chunk_rows)
        else:
            criteo_fmt = "auto" if fmt == "criteo" else fmt
            yield from read_criteo(path, fmt=criteo_fmt, chunk_rows=plan.chunk_rows, on_error=plan.on_error)


def file_format(path: str) -> FileFormat:
    """A file's format from its suffixes: ``"parquet"``, ``"orc"``, else ``"criteo"`` (text)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if ".parquet" in suffixes or ".pq" in suffixes:
        return "parquet"
    if ".orc" in suffixes:
        return "orc"
    return "criteo"


def _rows_of_rank(chunks: Iterator[Chunk], rank: int, world_size: int) -> Iterator[Chunk]:
    """Keep rows ``i`` with ``i % world_size == rank``, ``i`` counted over the whole stream."""
    if world_size == 1:
        yield from chunks
        return
    seen = 0
    for chunk in chunks:
        first = (rank - seen) % world_size
        yield chunk.take(np.arange(first, len(chunk), world_size))
        seen += len(chunk)


def _synthetic_chunks(plan: _Plan) -> Iterator[Chunk]:
    generator = plan.synthetic
    assert generator is not None
    end = None if plan.num_rows is None else plan.start_row + plan.num_rows
    span = plan.chunk_rows * plan.world_size
    start = plan.start_row
    while end is None or start < end:
        stop = start + span if end is None else min(start + span, end)
        yield generator.rows(np.arange(start + plan.rank, stop, plan.world_size, dtype=np.int64))
        start = stop


# --------------------------------------------------------------------------------- prefetching

_END = object()


@dataclass(frozen=True)
class _Failure:
    error: BaseException


class _Prefetcher(Iterator[PyPersiaBatchData]):
    """Runs ``make_items()`` in a daemon thread, ``capacity`` items ahead of the consumer.

    The thread holds only the queue, the stop event and the item iterator, never this object,
    so dropping the last reference stops it (through ``weakref.finalize``) as ``close()`` does.
    """

    def __init__(self, make_items: Callable[[], Iterator[PyPersiaBatchData]], capacity: int):
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce, args=(make_items, self._queue, self._stop), name="ctrserve-data-prefetch", daemon=True
        )
        self._finished = False
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shut_down, self._thread, self._queue, self._stop)

    def __next__(self) -> PyPersiaBatchData:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stop the thread and wait for it; later ``next()`` calls raise StopIteration."""
        self._finished = True
        self._finalizer()

    @property
    def thread(self) -> threading.Thread:
        return self._thread


def _produce(make_items: Callable[[], Iterator[object]], out: queue.Queue, stop: threading.Event) -> None:
    items: Iterator[object] | None = None
    try:
        items = make_items()
        for item in items:
            if not _put(out, stop, item):
                return
        _put(out, stop, _END)
    except BaseException as error:  # handed to the consumer, which raises it again
        _put(out, stop, _Failure(error))
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()  # releases open files of a generator stopped early


def _put(out: queue.Queue, stop: threading.Event, item: object) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _shut_down(thread: threading.Thread, out: queue.Queue, stop: threading.Event) -> None:
    stop.set()
    while True:  # free queue slots so a blocked put returns at once
        try:
            out.get_nowait()
        except queue.Empty:
            break
    if thread is not threading.current_thread():
        thread.join(_JOIN_SECONDS)
        if thread.is_alive():
            log.warning("data prefetch thread did not stop within %.0f s", _JOIN_SECONDS)
