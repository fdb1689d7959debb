"""Raw little-endian buffers of the embedding service: numpy arrays to bytes and back.

Decoding validates sizes and raises :class:`InvalidRequestError` naming the field, so a
malformed request is refused before any state is touched.
"""

from __future__ import annotations

import ctypes

import numpy as np

from embedding_server.core.errors import InvalidRequestError

#: Largest message either end of a lookup sends or accepts: a lookup of ~100k keys moves several
#: MB, and gRPC's default 4 MB cap is too small (gRPC channels and the local socket alike).
MAX_MESSAGE_BYTES = 512 * 1024 * 1024

IDS = np.dtype("<u8")
TABLES = np.dtype("<u2")
VALUES = np.dtype("<f4")


def encode(array: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def decode(buffer: bytes | bytearray | memoryview, dtype: np.dtype, field: str) -> np.ndarray:
    """A 1-D array over ``buffer`` (no copy; read-only)."""
    if len(buffer) % dtype.itemsize:
        raise InvalidRequestError(
            f"'{field}' holds {len(buffer)} bytes, not a whole number of {dtype.itemsize}-byte {dtype.name} values"
        )
    return np.frombuffer(buffer, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)


def decode_keys(
    ids: bytes | bytearray | memoryview, tables: bytes | bytearray | memoryview
) -> tuple[np.ndarray, np.ndarray]:
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


# --------------------------------------------------------------------------- Lookup without protobuf copies
#
# A lookup answer is ~100k vectors (6.5 MB). Through protobuf objects it is copied four times
# (array to bytes, into the message, serialized, parsed on the client). The Lookup RPC therefore
# moves hand-encoded messages: the server gathers the vectors straight into the bytes it sends and
# the client reads them in place. The bytes are ordinary protobuf encodings of LookupRequest and
# LookupResponse (protos/embedding_service.proto), so any protobuf client still reads them.

_LEN = 2  # protobuf wire type of bytes fields
_VARINT = 0
_REQUEST_IDS = 1 << 3 | _LEN  # LookupRequest.ids = 1
_REQUEST_TABLES = 2 << 3 | _LEN  # LookupRequest.tables = 2
_REQUEST_NO_INSERT = 3 << 3 | _VARINT  # LookupRequest.no_insert = 3
_RESPONSE_DIM = 1 << 3 | _VARINT  # LookupResponse.dim = 1
_RESPONSE_VALUES = 2 << 3 | _LEN  # LookupResponse.values = 2
_RESPONSE_PADDING = 3 << 3 | _LEN  # LookupResponse.padding = 3
#: Where LookupResponse.values starts in the message: a multiple of this many bytes. A bytes
#: object's data and a numpy buffer are 16-byte aligned, so the float32 rows are too: unaligned
#: rows are slower for the server to fill and for every reader after.
VALUES_ALIGN = 16

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_char_p, ctypes.c_ssize_t]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _read_varint(buffer: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buffer) or shift > 63:
            raise ValueError("truncated or oversized varint")
        byte = buffer[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def encode_lookup_request(ids: np.ndarray, tables: np.ndarray, insert: bool = True) -> bytes:
    """A serialized LookupRequest, built with one copy of each array; ``insert=False`` sets
    ``no_insert`` (train-mode servers then answer zeros for unseen keys without inserting them)."""
    id_array = np.ascontiguousarray(ids, dtype=IDS)
    table_array = np.ascontiguousarray(tables, dtype=TABLES)
    return b"".join(
        (
            bytes([_REQUEST_IDS]),
            _varint(id_array.nbytes),
            id_array.data.cast("B"),
            bytes([_REQUEST_TABLES]),
            _varint(table_array.nbytes),
            table_array.data.cast("B"),
            b"" if insert else bytes([_REQUEST_NO_INSERT, 1]),
        )
    )


def lookup_response(num_keys: int, dim: int) -> tuple[bytes, np.ndarray]:
    """A serialized LookupResponse for ``num_keys`` vectors of ``dim``, and a writable float32
    ``[num_keys, dim]`` view of its ``values`` for the caller to fill before sending the bytes.

    The bytes object is created uninitialised (``PyBytes_FromStringAndSize(NULL, n)``) and only
    written through the view while this process alone holds it; nothing may hash or share it
    before the view is filled. The view holds a reference to the bytes, so it never outlives them.
    """
    payload = num_keys * dim * VALUES.itemsize
    head = bytes([_RESPONSE_DIM]) + _varint(dim)
    tail = bytes([_RESPONSE_VALUES]) + _varint(payload)
    pad = -(len(head) + 2 + len(tail)) % VALUES_ALIGN  # the padding field: tag, length < 128, zeros
    header = head + bytes([_RESPONSE_PADDING, pad]) + bytes(pad) + tail
    message = _new_bytes(None, len(header) + payload)
    address = ctypes.cast(ctypes.c_char_p(message), ctypes.c_void_p).value
    if address is None:  # never: a bytes object always has a buffer
        raise MemoryError("no buffer address for a new bytes object")
    memory = (ctypes.c_char * len(message)).from_address(address)
    # the values view keeps the bytes alive (from_address alone does not); ctypes instances take
    # new attributes, which typeshed's Array does not declare
    memory.owner = message  # type: ignore[attr-defined]
    ctypes.memmove(address, header, len(header))
    values = np.frombuffer(memoryview(memory), dtype=VALUES, count=num_keys * dim, offset=len(header))
    return message, values.reshape(num_keys, dim)


def _scan(message: bytes | bytearray | memoryview, what: str) -> dict[int, int | tuple[int, int]]:
    """Field tag -> varint value, or (start, length) of a length-delimited field, of a flat
    message (no nested messages; the last occurrence of a field wins, as protobuf says).

    Raises:
        ValueError: ``message`` is not a well-formed ``what``.
    """
    fields: dict[int, int | tuple[int, int]] = {}
    pos = 0
    try:
        while pos < len(message):
            tag, pos = _read_varint(message, pos)
            if tag & 7 == _VARINT:
                fields[tag], pos = _read_varint(message, pos)
            elif tag & 7 == _LEN:
                length, pos = _read_varint(message, pos)
                fields[tag] = (pos, length)
                pos += length
            else:
                raise ValueError(f"unexpected wire type {tag & 7}")
        if pos != len(message):
            raise ValueError("truncated message")
    except ValueError as exc:
        raise ValueError(f"malformed {what}: {exc}") from None
    return fields


def decode_lookup_request(message: bytes | bytearray | memoryview) -> tuple[memoryview, memoryview, bool]:
    """(ids bytes, tables bytes, insert) of a serialized LookupRequest: the buffers as views of
    ``message``; ``insert`` is False where the request sets ``no_insert``.

    Raises:
        ValueError: ``message`` is not a LookupRequest.
    """
    fields = _scan(message, "LookupRequest")
    view = memoryview(message)
    ids_span = fields.get(_REQUEST_IDS, (0, 0))
    tables_span = fields.get(_REQUEST_TABLES, (0, 0))
    no_insert = fields.get(_REQUEST_NO_INSERT, 0)
    if not isinstance(ids_span, tuple) or not isinstance(tables_span, tuple):
        raise ValueError("malformed LookupRequest: ids and tables must be bytes fields")
    (ids_at, ids_len), (tables_at, tables_len) = ids_span, tables_span
    return view[ids_at : ids_at + ids_len], view[tables_at : tables_at + tables_len], not no_insert


def decode_lookup_response(message: bytes | bytearray) -> tuple[int, np.ndarray]:
    """(dim, flat float32 values) of a serialized LookupResponse; the values are a view of
    ``message``, not a copy (read-only when ``message`` is bytes).

    Raises:
        ValueError: ``message`` is not a LookupResponse.
    """
    fields = _scan(message, "LookupResponse")
    dim = fields.get(_RESPONSE_DIM, 0)
    values = fields.get(_RESPONSE_VALUES, (0, 0))
    if not isinstance(dim, int) or not isinstance(values, tuple) or values[1] % VALUES.itemsize:
        raise ValueError("malformed LookupResponse: truncated message")
    start, size = values
    return dim, np.frombuffer(message, dtype=VALUES, count=size // VALUES.itemsize, offset=start)
