"""FarmHash fingerprints (embedding_server/core/farmhash.py) against pyfarmhash and the
reference integer mixes written out with Python integers (conftest's ``farmhash_reference``)."""

from __future__ import annotations

import random

import farmhash
import numpy as np
import pyarrow as pa
import pytest

from embedding_server.core.farmhash import (
    fingerprint64_bytes,
    fingerprint64_strings,
    fingerprint64_u64,
    fingerprint_pairs,
)

pytestmark = pytest.mark.unit


def random_text(rng: random.Random, n: int) -> str:
    """``n`` characters mixing ASCII with 2-, 3- and 4-byte UTF-8 code points."""
    ranges = [(32, 127), (0x80, 0x800), (0x800, 0xD800), (0x10000, 0x110000)]
    return "".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(n))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(18)
    # every length 0..200 (in characters), two strings each, plus a few long ones that run
    # several 64-byte rounds of the long-string loop
    values = [random_text(rng, n) for n in range(201) for _ in range(2)]
    values += ["".join(chr(rng.randrange(32, 127)) for _ in range(n)) for n in range(0, 200)]
    values += [random_text(rng, n) for n in (500, 1023, 4097)]
    return values


@pytest.mark.parametrize("arrow_type", [pa.string(), pa.large_string()])
def test_strings_match_pyfarmhash_for_every_length(texts, arrow_type):
    got = fingerprint64_strings(pa.array(texts, type=arrow_type))
    expected = np.array([farmhash.fingerprint64(t) for t in texts], dtype=np.uint64)
    assert got.dtype == np.uint64
    np.testing.assert_array_equal(got, expected)


def test_binary_of_every_byte_length_matches_pyfarmhash():
    rng = np.random.default_rng(3)
    values = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in range(260)]
    for arrow_type in (pa.binary(), pa.large_binary()):
        got = fingerprint64_strings(pa.array(values, type=arrow_type))
        np.testing.assert_array_equal(got, [farmhash.fingerprint64(v) for v in values])
    assert [fingerprint64_bytes(v) for v in values[:70]] == [farmhash.fingerprint64(v) for v in values[:70]]


def test_sliced_arrays_hash_their_own_values(texts):
    full = pa.array(texts, type=pa.large_string())
    for start, length in ((1, 10), (77, 150), (len(texts) - 3, 3), (5, 0)):
        part = full.slice(start, length)
        expected = [farmhash.fingerprint64(t) for t in texts[start : start + length]]
        np.testing.assert_array_equal(fingerprint64_strings(part), np.array(expected, dtype=np.uint64))
    small = pa.array(texts[:40]).slice(7, 20)
    np.testing.assert_array_equal(fingerprint64_strings(small), [farmhash.fingerprint64(t) for t in texts[7:27]])


def test_nulls_get_zero_and_others_their_fingerprint():
    values = ["a", None, "user_12345", None, "", "ünïcødé"]
    got = fingerprint64_strings(pa.array(values).slice(1))
    expected = [0 if v is None else farmhash.fingerprint64(v) for v in values[1:]]
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.uint64))


def test_chunked_dictionary_and_view_arrays(texts):
    chunked = pa.chunked_array([pa.array(texts[:50]), pa.array(texts[50:120])])
    expected = np.array([farmhash.fingerprint64(t) for t in texts[:120]], dtype=np.uint64)
    np.testing.assert_array_equal(fingerprint64_strings(chunked), expected)
    dictionary = pa.array(["x", None, "yy", "x", "zzz"]).dictionary_encode()
    np.testing.assert_array_equal(
        fingerprint64_strings(dictionary),
        [
            farmhash.fingerprint64("x"),
            0,
            farmhash.fingerprint64("yy"),
            farmhash.fingerprint64("x"),
            farmhash.fingerprint64("zzz"),
        ],
    )
    view = pa.array(texts[:30]).cast(pa.string_view())
    np.testing.assert_array_equal(fingerprint64_strings(view), expected[:30])
    assert fingerprint64_strings(pa.array([], type=pa.string())).shape == (0,)
    assert fingerprint64_strings(pa.array(["", "", ""])).tolist() == [farmhash.fingerprint64("")] * 3


def test_non_string_array_is_refused():
    with pytest.raises(TypeError, match="expected a string or binary array, got int64"):
        fingerprint64_strings(pa.array([1, 2]))


def test_u64_mix_matches_the_reference_for_signed_and_unsigned_ids(farmhash_reference):
    reference_fingerprint_u64, mask = farmhash_reference.fingerprint_u64, farmhash_reference.MASK
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 2**64, size=2000, dtype=np.uint64)
    ids[:3] = [0, 1, 2**64 - 1]
    got = fingerprint64_u64(ids)
    assert got.dtype == np.uint64
    assert got.tolist() == [reference_fingerprint_u64(int(x)) for x in ids]
    signed = np.array([[-1, 5], [7, -(2**63)]], dtype=np.int64)
    mixed = fingerprint64_u64(signed)
    assert mixed.shape == (2, 2)
    assert mixed.reshape(-1).tolist() == [reference_fingerprint_u64(int(x) & mask) for x in signed.reshape(-1)]
    np.testing.assert_array_equal(
        fingerprint64_u64(np.array([3, 9], dtype=np.int32)), fingerprint64_u64(np.array([3, 9], dtype=np.uint64))
    )
    with pytest.raises(TypeError, match="expected integer ids, got float64"):
        fingerprint64_u64(np.array([1.5]))


def test_pairs_match_the_reference_and_check_lengths(farmhash_reference):
    rng = np.random.default_rng(8)
    low = rng.integers(0, 2**64, size=500, dtype=np.uint64)
    high = rng.integers(0, 2**64, size=500, dtype=np.uint64)
    got = fingerprint_pairs(low, high)
    assert got.tolist() == [farmhash_reference.fingerprint_pair(int(a), int(b)) for a, b in zip(low, high)]
    assert fingerprint_pairs(low[:1], high[:1])[0] != fingerprint_pairs(high[:1], low[:1])[0]
    with pytest.raises(ValueError, match="3 low ids but 2 high ids"):
        fingerprint_pairs(np.arange(3), np.arange(2))
