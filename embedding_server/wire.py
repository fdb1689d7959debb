"""Raw little-endian buffers of the embedding service: numpy arrays to bytes and back.

Decoding validates sizes and raises :class:`InvalidRequestError` naming the field, so a
malformed request is refused before any state is touched.
"""

from __future__ import annotations

import numpy as np

from embedding_server.errors import InvalidRequestError

IDS = np.dtype("<u8")
TABLES = np.dtype("<u2")
VALUES = np.dtype("<f4")


def encode(array: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def decode(buffer: bytes, dtype: np.dtype, field: str) -> np.ndarray:
    """A 1-D array over ``buffer`` (no copy; read-only)."""
    if len(buffer) % dtype.itemsize:
        raise InvalidRequestError(
            f"'{field}' holds {len(buffer)} bytes, not a whole number of {dtype.itemsize}-byte {dtype.name} values"
        )
    return np.frombuffer(buffer, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)


def decode_keys(ids: bytes, tables: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 ids, uint16 table indexes) of a request, checked to have equal lengths."""
    id_array = decode(ids, IDS, "ids")
    table_array = decode(tables, TABLES, "tables")
    if id_array.shape != table_array.shape:
        raise InvalidRequestError(f"'ids' has {id_array.shape[0]} entries but 'tables' has {table_array.shape[0]}")
    return id_array, table_array


def decode_matrix(buffer: bytes, rows: int, field: str) -> np.ndarray:
    """A float32 ``[rows, dim]`` matrix; ``dim`` follows from the buffer size."""
    flat = decode(buffer, VALUES, field)
    if rows == 0 or flat.shape[0] % rows:
        raise InvalidRequestError(f"'{field}' holds {flat.shape[0]} floats, not a whole row for each of {rows} ids")
    return flat.reshape(rows, flat.shape[0] // rows)
