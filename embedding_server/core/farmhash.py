"""FarmHash's 64-bit fingerprint, compiled, over Arrow string buffers.

RecIS hashes string features with FarmHash's ``Fingerprint64`` (``farmhashna::Hash64``, the
``farm`` hash type), so ids built here agree with ids in RecIS-prepared data and with
``pyfarmhash``'s ``farmhash.fingerprint64``. The function is written out below from Google's
public FarmHash algorithm and compiled with numba; it walks an Arrow array's value offsets and
data bytes directly, so hashing a column costs no Python object per string.

Two entry points:

- :func:`fingerprint64_strings` hashes every string (or binary) value of a pyarrow array.
- :func:`fingerprint64_u64` applies FarmHash's ``Fingerprint(uint64)`` mix to integer ids.

Example:
    >>> import pyarrow as pa
    >>> fingerprint64_strings(pa.array(["", "a"])).tolist()
    [11160318154034397263, 12917804110809363939]
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from numba import njit

__all__ = [
    "fingerprint64_bytes",
    "fingerprint64_strings",
    "fingerprint64_u64",
    "fingerprint_pairs",
]

# Every constant is a uint64 so that numba keeps the arithmetic in wrapping 64-bit integers
# (a plain Python int mixed with a uint64 would promote to float64).
_K0 = np.uint64(0xC3A5C85C97CB3127)
_K1 = np.uint64(0xB492B66FBE98F273)
_K2 = np.uint64(0x9AE16A3B2F90404F)
_KMUL = np.uint64(0x9DDFEA08EB382D69)
_SEED = np.uint64(81)
_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U2 = np.uint64(2)
_U3 = np.uint64(3)
_U8 = np.uint64(8)
_U9 = np.uint64(9)
_U18 = np.uint64(18)
_U21 = np.uint64(21)
_U25 = np.uint64(25)
_U30 = np.uint64(30)
_U33 = np.uint64(33)
_U37 = np.uint64(37)
_U41 = np.uint64(41)
_U42 = np.uint64(42)
_U43 = np.uint64(43)
_U44 = np.uint64(44)
_U47 = np.uint64(47)
_U63 = np.uint64(63)
_U64 = np.uint64(64)
_U113 = np.uint64(113)
_UFF = np.uint64(0xFF)


@njit(cache=True, nogil=True, inline="always")
def _fetch64(data, p):
    """The little-endian uint64 at byte ``p`` of ``data`` (any alignment)."""
    v = _U0
    for k in range(7, -1, -1):
        v = (v << _U8) | np.uint64(data[p + k])
    return v


@njit(cache=True, nogil=True, inline="always")
def _fetch32(data, p):
    """The little-endian uint32 at byte ``p`` of ``data``, widened to uint64."""
    v = _U0
    for k in range(3, -1, -1):
        v = (v << _U8) | np.uint64(data[p + k])
    return v


@njit(cache=True, nogil=True, inline="always")
def _rotate(v, shift):
    # every caller passes a shift in 1..63, so the shift-by-zero case of the reference is moot
    return (v >> shift) | (v << (_U64 - shift))


@njit(cache=True, nogil=True, inline="always")
def _shift_mix(v):
    return v ^ (v >> _U47)


@njit(cache=True, nogil=True, inline="always")
def _hash_len16(u, v, mul):
    a = (u ^ v) * mul
    a ^= a >> _U47
    b = (v ^ a) * mul
    b ^= b >> _U47
    return b * mul


@njit(cache=True, nogil=True)
def _hash_len0to16(data, s, n):
    un = np.uint64(n)
    if n >= 8:
        mul = _K2 + un * _U2
        a = _fetch64(data, s) + _K2
        b = _fetch64(data, s + n - 8)
        c = _rotate(b, _U37) * mul + a
        d = (_rotate(a, _U25) + b) * mul
        return _hash_len16(c, d, mul)
    if n >= 4:
        mul = _K2 + un * _U2
        a = _fetch32(data, s)
        return _hash_len16(un + (a << _U3), _fetch32(data, s + n - 4), mul)
    if n > 0:
        a = np.uint64(data[s])
        b = np.uint64(data[s + (n >> 1)])
        c = np.uint64(data[s + n - 1])
        y = a + (b << _U8)
        z = un + (c << _U2)
        return _shift_mix(y * _K2 ^ z * _K0) * _K2
    return _K2


@njit(cache=True, nogil=True)
def _hash_len17to32(data, s, n):
    mul = _K2 + np.uint64(n) * _U2
    a = _fetch64(data, s) * _K1
    b = _fetch64(data, s + 8)
    c = _fetch64(data, s + n - 8) * mul
    d = _fetch64(data, s + n - 16) * _K2
    return _hash_len16(_rotate(a + b, _U43) + _rotate(c, _U30) + d, a + _rotate(b + _K2, _U18) + c, mul)


@njit(cache=True, nogil=True)
def _hash_len33to64(data, s, n):
    mul = _K2 + np.uint64(n) * _U2
    a = _fetch64(data, s) * _K2
    b = _fetch64(data, s + 8)
    c = _fetch64(data, s + n - 8) * mul
    d = _fetch64(data, s + n - 16) * _K2
    y = _rotate(a + b, _U43) + _rotate(c, _U30) + d
    z = _hash_len16(y, a + _rotate(b + _K2, _U18) + c, mul)
    e = _fetch64(data, s + 16) * mul
    f = _fetch64(data, s + 24)
    g = (y + _fetch64(data, s + n - 32)) * mul
    h = (z + _fetch64(data, s + n - 24)) * mul
    return _hash_len16(_rotate(e + f, _U43) + _rotate(g, _U30) + h, e + _rotate(f + a, _U18) + g, mul)


@njit(cache=True, nogil=True, inline="always")
def _weak_hash_len32_with_seeds(data, p, a, b):
    """FarmHash's WeakHashLen32WithSeeds over the 32 bytes at ``p``, as a pair."""
    w = _fetch64(data, p)
    x = _fetch64(data, p + 8)
    y = _fetch64(data, p + 16)
    z = _fetch64(data, p + 24)
    a += w
    b = _rotate(b + a + z, _U21)
    c = a
    a += x
    a += y
    b += _rotate(a, _U44)
    return a + z, b + c


@njit(cache=True, nogil=True)
def _hash64(data, s, n):
    """farmhashna::Hash64 of the ``n`` bytes of ``data`` starting at ``s``."""
    if n <= 16:
        return _hash_len0to16(data, s, n)
    if n <= 32:
        return _hash_len17to32(data, s, n)
    if n <= 64:
        return _hash_len33to64(data, s, n)
    x = _SEED
    y = _SEED * _K1 + _U113
    z = _shift_mix(y * _K2 + _U113) * _K2
    v0 = _U0
    v1 = _U0
    w0 = _U0
    w1 = _U0
    x = x * _K2 + _fetch64(data, s)
    end = s + ((n - 1) // 64) * 64
    last64 = end + ((n - 1) & 63) - 63
    p = s
    while True:
        x = _rotate(x + y + v0 + _fetch64(data, p + 8), _U37) * _K1
        y = _rotate(y + v1 + _fetch64(data, p + 48), _U42) * _K1
        x ^= w1
        y += v0 + _fetch64(data, p + 40)
        z = _rotate(z + w0, _U33) * _K1
        v0, v1 = _weak_hash_len32_with_seeds(data, p, v1 * _K1, x + w0)
        w0, w1 = _weak_hash_len32_with_seeds(data, p + 32, z + w1, y + _fetch64(data, p + 16))
        x, z = z, x
        p += 64
        if p == end:
            break
    mul = _K1 + ((z & _UFF) << _U1)
    p = last64
    w0 += np.uint64((n - 1) & 63)
    v0 += w0
    w0 += v0
    x = _rotate(x + y + v0 + _fetch64(data, p + 8), _U37) * mul
    y = _rotate(y + v1 + _fetch64(data, p + 48), _U42) * mul
    x ^= w1 * _U9
    y += v0 * _U9 + _fetch64(data, p + 40)
    z = _rotate(z + w0, _U33) * mul
    v0, v1 = _weak_hash_len32_with_seeds(data, p, v1 * mul, x + w0)
    w0, w1 = _weak_hash_len32_with_seeds(data, p + 32, z + w1, y + _fetch64(data, p + 16))
    x, z = z, x
    return _hash_len16(
        _hash_len16(v0, w0, mul) + _shift_mix(y) * _K0 + z,
        _hash_len16(v1, w1, mul) + x,
        mul,
    )


@njit(cache=True, nogil=True)
def _hash_offsets(data, offsets, out):
    """``out[i]`` = Hash64 of ``data[offsets[i]:offsets[i + 1]]`` for every ``i``."""
    for i in range(out.shape[0]):
        start = offsets[i]
        out[i] = _hash64(data, start, offsets[i + 1] - start)


@njit(cache=True, nogil=True, inline="always")
def _fingerprint_u64(x):
    """FarmHash's Fingerprint(uint64); Fingerprint(uint128) ends with the same steps."""
    b = x * _KMUL
    b ^= b >> _U44
    b *= _KMUL
    b ^= b >> _U41
    return b * _KMUL


@njit(cache=True, nogil=True)
def _mix_u64(ids, out):
    for i in range(ids.shape[0]):
        out[i] = _fingerprint_u64(ids[i])


@njit(cache=True, nogil=True)
def _mix_pairs(low, high, out):
    for i in range(out.shape[0]):
        a = (low[i] ^ high[i]) * _KMUL
        a ^= a >> _U47
        out[i] = _fingerprint_u64(high[i] ^ a)


_EMPTY_BYTES = np.zeros(1, dtype=np.uint8)


def _string_buffers(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The value offsets (int32 or int64, ``len + 1`` of them, slice offset applied) and data
    bytes of a string or binary array, as zero-copy numpy views."""
    offset_type = np.int64 if pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type) else np.int32
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], dtype=offset_type)[array.offset : array.offset + len(array) + 1]
    data_buffer = buffers[2]
    # an array of empty strings may have no data buffer at all
    data = _EMPTY_BYTES if data_buffer is None or data_buffer.size == 0 else np.frombuffer(data_buffer, dtype=np.uint8)
    return offsets, data


def fingerprint64_strings(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """FarmHash ``Fingerprint64`` of every value of a string or binary array.

    Args:
        array: a pyarrow ``string``, ``large_string``, ``binary``, ``large_binary`` or
            ``string_view`` array (sliced arrays included), a dictionary array of one of these,
            or a chunked array of them. Strings are hashed as their UTF-8 bytes.

    Returns:
        uint64 array of ``len(array)`` fingerprints. A null value gets 0; callers that must
        tell nulls apart read ``array.is_valid()``.

    Raises:
        TypeError: when the array holds neither strings nor binary values.

    Example:
        >>> fingerprint64_strings(pa.array(["user_1", None])).tolist()[1]
        0
    """
    if isinstance(array, pa.ChunkedArray):
        if array.num_chunks == 0:
            return np.zeros(0, dtype=np.uint64)
        return np.concatenate([fingerprint64_strings(chunk) for chunk in array.chunks])
    kind = array.type
    if pa.types.is_dictionary(kind):
        assert isinstance(array, pa.DictionaryArray)
        # hash each distinct value once, then spread by index
        table = fingerprint64_strings(array.dictionary)
        indices = array.indices
        out = (
            table[indices.fill_null(0).to_numpy(zero_copy_only=False)]
            if len(table)
            else np.zeros(len(array), dtype=np.uint64)
        )
        if array.null_count:
            out[np.asarray(array.is_null())] = 0
        return np.ascontiguousarray(out, dtype=np.uint64)
    if pa.types.is_string_view(kind) or pa.types.is_binary_view(kind):
        array = array.cast(pa.large_binary())
        kind = array.type
    if not (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        raise TypeError(f"fingerprint64_strings: expected a string or binary array, got {kind}")
    out = np.empty(len(array), dtype=np.uint64)
    if len(array) == 0:
        return out
    offsets, data = _string_buffers(array)
    _hash_offsets(data, offsets, out)
    if array.null_count:
        out[np.asarray(array.is_null())] = 0
    return out


def fingerprint64_bytes(value: bytes | str) -> int:
    """FarmHash ``Fingerprint64`` of one byte string (a ``str`` is hashed as UTF-8).

    Args:
        value: the bytes (or text) to hash.

    Returns:
        The fingerprint as a Python int in ``[0, 2**64)``.
    """
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    data = np.frombuffer(raw, dtype=np.uint8) if raw else _EMPTY_BYTES
    out = np.empty(1, dtype=np.uint64)
    _hash_offsets(data, np.array([0, len(raw)], dtype=np.int64), out)
    return int(out[0])


def _as_u64(ids: np.ndarray, what: str) -> np.ndarray:
    flat = np.ascontiguousarray(np.asarray(ids).reshape(-1))
    if flat.dtype == np.uint64:
        return flat
    if not np.issubdtype(flat.dtype, np.integer):
        raise TypeError(f"{what}: expected integer ids, got {flat.dtype}")
    if flat.dtype.kind == "i":
        return flat.astype(np.int64, copy=False).view(np.uint64)
    return flat.astype(np.uint64)


def fingerprint64_u64(ids: np.ndarray) -> np.ndarray:
    """FarmHash's ``Fingerprint(uint64)`` mix of every integer id.

    Args:
        ids: integer array of any shape (signed values are taken as their two's-complement
            uint64 bits).

    Returns:
        uint64 array of the same shape.

    Example:
        >>> fingerprint64_u64(np.array([0, 1], dtype=np.uint64)).tolist()[0]
        0
    """
    flat = _as_u64(ids, "fingerprint64_u64")
    out = np.empty(flat.shape[0], dtype=np.uint64)
    _mix_u64(flat, out)
    return out.reshape(np.shape(ids))


def fingerprint_pairs(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """FarmHash's ``Fingerprint(uint128)`` of each pair ``(low[i], high[i])``: one uint64 id
    for two ids, e.g. for crossing two features.

    Args:
        low: integer ids, the low 64 bits of each pair.
        high: integer ids of the same length, the high 64 bits.

    Returns:
        uint64 array of ``len(low)`` fingerprints.

    Raises:
        ValueError: when the two arrays differ in length.
    """
    lo = _as_u64(low, "fingerprint_pairs")
    hi = _as_u64(high, "fingerprint_pairs")
    if lo.shape != hi.shape:
        raise ValueError(f"fingerprint_pairs: {lo.shape[0]} low ids but {hi.shape[0]} high ids")
    out = np.empty(lo.shape[0], dtype=np.uint64)
    _mix_pairs(lo, hi, out)
    return out
