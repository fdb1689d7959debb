"""Full sparse checkpoints: every shard's rows, with optimizer state, as Arrow IPC files.

Layout under a checkpoint directory (any :mod:`~embedding_server.storage.base` URL, or an open
:class:`~embedding_server.storage.base.Storage`)::

    shard-00000-of-00002/<table>.arrow   columns id: uint64, weight: fixed_size_list<float32>[dim],
                                         state: fixed_size_list<float32>[state width]
    manifest.json                        written last: format, version, shard count, tables,
                                         optimizer, files and row counts

Arrow IPC is self-describing and readable by pyarrow, pandas, DuckDB or Spark; nothing is
pickled. Loading reads every shard's files and keeps the rows that hash to the loading shard,
so a checkpoint of 2 shards loads into 1 or 3 shards unchanged.

A directory given as a URL is opened with storage options (connection settings, and the
``file_mode``/``dir_mode`` of local files and folders): the writers take them as
``storage_options`` and default to the store's global config's ``storage`` section, so an
embedding server's Dump writes with its own configured modes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from embedding_server.core.config import JobType
from embedding_server.core.errors import InvalidRequestError
from embedding_server.core.optimizers import optimizer_from_dict
from embedding_server.storage.base import Storage
from embedding_server.storage.urls import open_storage
from embedding_server.store.store import EmbeddingStore, TableRows

FORMAT = "ctrserve-embedding-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def shard_dir(shard_index: int, num_shards: int) -> str:
    return f"shard-{shard_index:05d}-of-{num_shards:05d}"


def _open(directory: str | Storage, options: Mapping[str, Any] | None) -> Storage:
    """``directory`` opened with ``options`` (an open :class:`Storage` is used as it is)."""
    return directory if isinstance(directory, Storage) else open_storage(directory, options)


def dump_shard(
    store: EmbeddingStore, directory: str | Storage, storage_options: Mapping[str, Any] | None = None
) -> tuple[list[str], int]:
    """Write one store's tables under ``directory``; returns (relative file paths, rows).

    ``storage_options`` default to the store's global config's ``storage`` section.
    """
    options = store.global_config.server.storage if storage_options is None else storage_options
    storage = _open(directory, options)
    files, total = [], 0
    for rows in store.rows():
        path = f"{shard_dir(store.shard_index, store.num_shards)}/{rows.table.name}.arrow"
        storage.write_atomic(path, _encode(rows, store))
        files.append(path)
        total += rows.ids.shape[0]
    return files, total


def write_manifest(
    directory: str | Storage,
    num_shards: int,
    files: list[str],
    rows: int,
    config_dict: dict,
    optimizer_dict: dict,
    watermark: dict[str, int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Publish the manifest that makes a checkpoint complete (always written last).

    ``watermark`` maps each training shard (as a string) to the last incremental packet whose
    rows the checkpoint includes; a server replays only packets above it. ``storage_options``
    open ``directory`` when it is a URL (None: the defaults and the environment).
    """
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": time.time(),
        "num_shards": num_shards,
        "rows": rows,
        "files": sorted(files),
        "optimizer": optimizer_dict,
        "embedding_config": config_dict,
        "watermark": dict(watermark or {}),
    }
    _open(directory, storage_options).write_atomic(MANIFEST, json.dumps(manifest, indent=2).encode())


def dump_stores(
    stores: Sequence[EmbeddingStore],
    directory: str | Storage,
    watermark: dict[str, int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Checkpoint in-process shards: each shard's files, then the manifest (with ``watermark``).

    ``storage_options`` default to the first store's global config's ``storage`` section.
    """
    first = stores[0]
    options = first.global_config.server.storage if storage_options is None else storage_options
    storage = _open(directory, options)
    files, rows = [], 0
    for store in stores:
        f, n = dump_shard(store, storage)
        files += f
        rows += n
    write_manifest(storage, len(stores), files, rows, first.config.to_dict(), first.optimizer.to_dict(), watermark)


#: the folder of a trainer's checkpoint that holds its sparse part (trainer.ctx.SPARSE_DIR)
TRAINER_SPARSE_DIR = "sparse"


def embedding_checkpoint(location: str, storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The sparse checkpoint at ``location``: a dump of the embedding servers itself (its
    manifest at the top), or a trainer's checkpoint directory (the manifest under ``sparse/``),
    the two things PERSIA's ``infer_config.embedding_checkpoint`` may name.

    Raises:
        InvalidRequestError: neither holds a manifest.
        StorageError: an unsupported scheme or an unreachable storage.
    """
    storage = open_storage(location, storage_options)
    if storage.exists(MANIFEST):
        return storage
    sparse = storage.child(TRAINER_SPARSE_DIR)
    if sparse.exists(MANIFEST):
        return sparse
    raise InvalidRequestError(
        f"{storage.url}: no embedding checkpoint: neither {MANIFEST} nor {TRAINER_SPARSE_DIR}/{MANIFEST} "
        "(a trainer's checkpoint directory) is there"
    )


def read_manifest(storage: Storage) -> dict:
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST))
    except FileNotFoundError:
        raise InvalidRequestError(f"{storage.url}: no {MANIFEST}; not a complete checkpoint") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{storage.url}/{MANIFEST}: not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise InvalidRequestError(
            f"{storage.url}: unsupported checkpoint format {manifest.get('format')!r} version {manifest.get('version')!r}"
        )
    return manifest


def load_store(store: EmbeddingStore, directory: str | Storage) -> int:
    """Replace ``store``'s rows with the checkpoint rows that belong to its shard.

    In train mode the store adopts the checkpoint's optimizer (and its state); in infer mode only
    the vectors are kept. Returns the number of rows loaded.

    Raises:
        InvalidRequestError: missing or foreign manifest, unknown table, dim mismatch, or more
            rows than the shard's capacity.
    """
    storage = open_storage(directory)
    manifest = read_manifest(storage)
    optimizer = optimizer_from_dict(manifest["optimizer"], storage.join_url(MANIFEST), "optimizer")
    decoded = [_decode(storage, path, store) for path in manifest["files"]]
    masks = [store.owns(r.ids, np.full(r.ids.shape[0], r.table.index, np.uint16)) for r in decoded]
    total = sum(int(m.sum()) for m in masks)
    if total > store.capacity:  # refuse before clearing: a failed load keeps the current rows
        raise InvalidRequestError(
            f"{storage.url}: {total} rows belong to shard {store.shard_index} of {store.num_shards}, more than its "
            f"capacity of {store.capacity} rows; raise capacity or use more shards"
        )
    store.clear()
    if store.mode is JobType.TRAIN:
        store.set_optimizer(optimizer)
    loaded = 0
    for rows, mine in zip(decoded, masks):
        width = store.state_width(rows.table)
        state = rows.state[mine] if store.mode is JobType.TRAIN else np.zeros((int(mine.sum()), width), np.float32)
        store.put(TableRows(rows.table, rows.ids[mine], rows.weights[mine], state))
        loaded += int(mine.sum())
    return loaded


def read_table_file(directory: str | Storage, path: str, store: EmbeddingStore) -> TableRows:
    """One table file of a checkpoint (a path its manifest lists), checked against ``store``'s
    tables; all of the file's rows, whichever shard they belong to.

    Raises:
        InvalidRequestError: the file is missing or unreadable, or its table or dim is not
            ``store``'s.
        StorageError: the storage could not be read.
    """
    return _decode(open_storage(directory), path, store)


def _encode(rows: TableRows, store: EmbeddingStore) -> bytes:
    dim = rows.table.dim
    width = rows.state.shape[1]
    columns = [
        ("id", pa.array(rows.ids, pa.uint64())),
        ("weight", pa.FixedSizeListArray.from_arrays(pa.array(rows.weights.reshape(-1), pa.float32()), dim)),
    ]
    if width:  # optimizer state (absent for SGD and in infer mode)
        columns.append(
            ("state", pa.FixedSizeListArray.from_arrays(pa.array(rows.state.reshape(-1), pa.float32()), width))
        )
    metadata = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "table": rows.table.name,
        "dim": str(dim),
        "state_width": str(width),
        "optimizer": json.dumps(store.table_optimizer(rows.table).to_dict()),
    }
    batch = pa.RecordBatch.from_arrays([c for _, c in columns], names=[n for n, _ in columns])
    batch = batch.replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _decode(storage: Storage, path: str, store: EmbeddingStore) -> TableRows:
    where = f"{storage.url}/{path}"
    try:
        table = pa.ipc.open_file(pa.BufferReader(storage.read_buffer(path))).read_all()
        table.validate(full=True)  # bounds-checks every offset before any column is read
    except FileNotFoundError:
        raise InvalidRequestError(f"{where}: listed in the manifest but missing") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InvalidRequestError(f"{where}: not a readable Arrow file: {exc}") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    name = meta.get("table", "")
    spec = store.config.tables.get(name)
    if spec is None:
        raise InvalidRequestError(f"{where}: table '{name}' is not in this server's embedding_config.yml")
    dim = int(meta.get("dim", -1))
    if dim != spec.dim:
        raise InvalidRequestError(
            f"{where}: table '{name}' has dim {dim} in the checkpoint but {spec.dim} in the config"
        )
    width = int(meta.get("state_width", 0))
    n = table.num_rows
    ids = table.column("id").to_numpy().astype(np.uint64, copy=False)
    weights = _fixed_list_to_numpy(table.column("weight"), dim, n)
    state = _fixed_list_to_numpy(table.column("state"), width, n) if width else np.zeros((n, 0), np.float32)
    return TableRows(spec, ids, weights, state)


def _fixed_list_to_numpy(column: pa.ChunkedArray, width: int, n: int) -> np.ndarray:
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(n, width), np.float32)
