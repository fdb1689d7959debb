"""PyPersiaBatchData: building with validation, and the batch bytes round trip (incl. corruption)."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_server.core.batch_codec import MAGIC, decode_batch
from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.errors import InvalidRequestError
from trainer.batch import PyPersiaBatchData

pytestmark = pytest.mark.unit

CONFIG = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 4}, "item": {"dim": 4}}})


def _sample_batch() -> PyPersiaBatchData:
    rng = np.random.default_rng(1)
    b = PyPersiaBatchData()
    b.add_dense([rng.random((3, 2), dtype=np.float32), rng.random((3, 1))])
    b.add_dense_i32(np.arange(6, dtype=np.int32).reshape(3, 2))
    b.add_dense_i64(np.arange(3, dtype=np.int64).reshape(3, 1))
    b.add_sparse(
        [
            ("user", [np.array([2**64 - 1], np.uint64), np.array([], np.uint64), np.array([5, 6, 7], np.uint64)]),
            ("item", [np.array([1], np.uint64)] * 3),
        ]
    )
    b.add_target(np.array([[1], [0], [1]], np.float32))
    b.add_target(np.array([[0.5], [0.25], [0]], np.float32))
    return b


def test_round_trip_keeps_every_part_bit_for_bit():
    b = _sample_batch()
    b.data.meta["request_id"] = "r-1"
    back = PyPersiaBatchData.from_bytes(b.to_bytes(), CONFIG)
    assert back.batch_size == 3
    assert [d.dtype for d in back.dense] == [np.float32, np.float64, np.int32, np.int64]
    for x, y in zip(b.dense + b.targets, back.dense + back.targets):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(b.sparse, back.sparse):
        assert x.name == y.name
        np.testing.assert_array_equal(x.ids, y.ids)
        np.testing.assert_array_equal(x.offsets, y.offsets)
    assert back.data.meta == {"request_id": "r-1"}
    assert back.dense_matrix().shape == (3, 6) and back.dense_matrix().dtype == np.float32


def test_disagreeing_batch_sizes_are_refused_and_the_batch_is_unchanged():
    b = PyPersiaBatchData()
    b.add_dense_f32(np.zeros((4, 2), np.float32))
    with pytest.raises(InvalidRequestError, match="disagree on the batch size"):
        b.add_target(np.zeros((3, 1), np.float32))
    with pytest.raises(InvalidRequestError, match="disagree on the batch size"):
        b.add_sparse([("user", [np.array([1], np.uint64)] * 5)])
    assert b.batch_size == 4 and not b.targets and not b.sparse


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda b: b.add_dense(np.zeros(3, np.float32)), "must be 2-D"),
        (lambda b: b.add_dense_f32(np.zeros((2, 2), np.float64)), "expected a float32 array"),
        (lambda b: b.add_dense([np.zeros((2, 2), np.float16)]), "dtype float16"),
        (lambda b: b.add_target(np.zeros((2, 1), np.float64)), "2-D float32"),
        (lambda b: b.add_target(np.zeros(2, np.float32)), "2-D float32"),
        (lambda b: b.add_sparse([("user", [np.array([1], np.int64)])]), "must be uint64"),
        (lambda b: b.add_sparse([("nope", [np.array([1], np.uint64)])]), "unknown feature 'nope'"),
        (lambda b: b.add_sparse([("user", [[1]]), ("user", [[2]])]), "appears twice"),
    ],
)
def test_malformed_parts_get_a_precise_error(call, message):
    with pytest.raises(InvalidRequestError, match=message):
        call(PyPersiaBatchData(CONFIG))


def test_validate_names_unknown_features_against_the_config():
    b = PyPersiaBatchData()
    b.add_sparse([("other", [[1]])])
    with pytest.raises(InvalidRequestError, match="unknown feature 'other'"):
        b.validate(CONFIG)


def _reframe(header: dict, payload: bytes) -> bytes:
    """Bytes with a consistent checksum around a hand-made header: tests the size checks."""
    h = json.dumps(header).encode()
    body = h + payload
    return struct.pack("<4sHHI", MAGIC, 1, 0, len(h)) + body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: raw[:-5], "checksum mismatch"),
        (lambda raw: raw[:10], "does not fit|too short"),
        (lambda raw: b"XXXX" + raw[4:], "not a ctrserve batch"),
        (lambda raw: raw[:4] + struct.pack("<H", 9) + raw[6:], "version 9 is not supported"),
        (lambda raw: raw[:40] + bytes([raw[40] ^ 0xFF]) + raw[41:], "checksum mismatch"),
        (lambda raw: b"", "too short"),
    ],
)
def test_corrupted_or_truncated_bytes_are_refused(mutate, message):
    with pytest.raises(InvalidRequestError, match=message):
        decode_batch(mutate(_sample_batch().to_bytes()))


@pytest.mark.parametrize(
    "header, payload, message",
    [
        (
            {"batch_size": 2, "dense": [{"dtype": "f32", "width": 1000}], "sparse": [], "targets": [], "meta": {}},
            b"\0" * 8,
            "too short for dense",
        ),
        (
            {"batch_size": 1, "dense": [{"dtype": "f16", "width": 1}], "sparse": [], "targets": [], "meta": {}},
            b"\0" * 2,
            "needs a dtype",
        ),
        (
            {"batch_size": 1, "dense": [], "sparse": [], "targets": [{"width": 1}], "meta": {}},
            b"\0" * 12,
            "beyond what its header",
        ),
        (
            {"batch_size": 1, "dense": [], "sparse": [{"name": "user", "ids": 1}], "targets": [], "meta": {}},
            np.array([0, 2], np.int64).tobytes() + b"\0" * 8,
            "offsets must rise",
        ),
        ({"batch_size": -1, "dense": [], "sparse": [], "targets": [], "meta": {}}, b"", "batch_size must be"),
        ({"batch_size": 1, "dense": [], "sparse": [], "targets": [], "meta": {}, "x": 1}, b"", "exactly batch_size"),
        ({"batch_size": 1, "dense": [], "sparse": [], "targets": [], "meta": {"a": [1]}}, b"", "'meta' must map"),
        ({"batch_size": 0, "dense": [], "sparse": [], "targets": [], "meta": {}}, b"", "empty batch"),
    ],
)
def test_headers_that_lie_about_sizes_are_refused_before_allocating(header, payload, message):
    with pytest.raises(InvalidRequestError, match=message):
        decode_batch(_reframe(header, payload))


def test_size_limit_is_enforced_before_decoding():
    raw = _sample_batch().to_bytes()
    with pytest.raises(InvalidRequestError, match=f"exceeds the limit of {len(raw) - 1} bytes"):
        decode_batch(raw, max_bytes=len(raw) - 1)
    assert decode_batch(raw, max_bytes=len(raw)).batch_size == 3


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 10_000))
def test_random_bytes_only_ever_raise_invalid_request(noise, position):
    raw = bytearray(_sample_batch().to_bytes())
    for candidate in (bytes(noise), bytes(raw[: position % (len(raw) + 1)]) + bytes(noise)):
        try:
            decode_batch(candidate)
        except InvalidRequestError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2**64 - 1), max_size=5), min_size=1, max_size=8))
def test_any_id_lists_round_trip(samples):
    b = PyPersiaBatchData()
    b.add_sparse([("user", [np.array(s, np.uint64) for s in samples])])
    back = PyPersiaBatchData.from_bytes(b.to_bytes())
    offsets = back.sparse[0].offsets
    assert [back.sparse[0].ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(samples))] == samples
