"""persia.embedding.data: PERSIA's batch types on ctrserve's batch codec."""

from __future__ import annotations

import numpy as np
import pytest

from embedding_server.core.batch_codec import decode_batch
from embedding_server.core.errors import InvalidRequestError
from persia.embedding.data import (
    IDTypeFeature,
    IDTypeFeatureWithSingleID,
    Label,
    NonIDTypeFeature,
    PersiaBatch,
    PersiaDataError,
)
from trainer.batch import PyPersiaBatchData

pytestmark = pytest.mark.unit


def _batch(**kwargs) -> PersiaBatch:
    return PersiaBatch(
        [
            IDTypeFeatureWithSingleID("user", np.array([3, 4, 5], np.uint64)),
            IDTypeFeature("tags", [np.array([1, 2], np.uint64), np.array([], np.uint64), np.array([9], np.uint64)]),
        ],
        **kwargs,
    )


def test_round_trip_keeps_dtypes_shapes_names_and_meta():
    image = np.arange(3 * 2 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 2)
    height = np.array([1.5, 2.5, 3.5])
    flags = np.array([[True, False], [False, False], [True, True]])
    batch = _batch(
        non_id_type_features=[NonIDTypeFeature(image, "image"), NonIDTypeFeature(height, "height")],
        labels=[Label(flags, "flags"), Label(np.array([7, 8, 9], np.int64))],
        meta=b"\x00meta",
    )
    back = PersiaBatch.from_bytes(batch.to_bytes())
    non_id, labels = back.non_id_arrays(), back.label_arrays()
    assert [a.dtype for a in non_id] == [np.uint8, np.float64]
    np.testing.assert_array_equal(non_id[0], image)
    np.testing.assert_array_equal(non_id[1], height)
    np.testing.assert_array_equal(labels[0], flags)
    assert labels[1].dtype == np.int64 and labels[1].tolist() == [7, 8, 9]
    assert back.meta == b"\x00meta" and back.requires_grad and back.batch_size == 3
    assert [p.name for p in back.layout.non_id] == ["image", "height"]
    assert back.sparse[1].ids.tolist() == [1, 2, 9] and back.sparse[1].offsets.tolist() == [0, 2, 2, 3]


def test_bytes_decode_as_ctrserve_batches():
    batch = _batch(non_id_type_features=[NonIDTypeFeature(np.ones((3, 2), np.float32))], requires_grad=False)
    plain = PyPersiaBatchData.from_bytes(batch.to_bytes())
    assert plain.batch_size == 3 and plain.dense_matrix().tolist() == [[1.0, 1.0]] * 3
    assert [f.name for f in decode_batch(batch.to_bytes()).sparse] == ["user", "tags"]


def test_requires_grad_without_labels_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="add label data"):
        _batch()
    assert _batch(requires_grad=False).requires_grad is False


def test_part_batch_size_mismatch_names_the_part():
    with pytest.raises(PersiaDataError, match="non_id_type_feature 'age': batch size 2, expected 3"):
        _batch(non_id_type_features=[NonIDTypeFeature(np.zeros(2, np.int32), "age")], requires_grad=False)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: NonIDTypeFeature(np.zeros(3, np.complex64), "c"), "dtype complex64"),
        (lambda: Label(np.float32(1.0), "scalar"), "expected a numpy array"),
        (lambda: IDTypeFeatureWithSingleID("user", np.array([1, 2], np.int64)), "1-D uint64"),
        (lambda: IDTypeFeature("tags", [np.array([1], np.uint32)]), "'tags'"),
    ],
)
def test_bad_parts_are_refused_as_persia_did(make, message):
    with pytest.raises(PersiaDataError, match=message) as info:
        make()
    assert isinstance(info.value, AssertionError) and isinstance(info.value, InvalidRequestError)


def test_skip_check_data_env_skips_part_checks(monkeypatch):
    monkeypatch.setenv("PERSIA_SKIP_CHECK_DATA", "1")
    feature = IDTypeFeatureWithSingleID("user", np.array([1, 2], np.int64))  # unchecked, as in PERSIA
    assert feature.batch_size == 2


def test_integer_labels_float32_cannot_hold_are_refused():
    with pytest.raises(InvalidRequestError, match="label 'big'"):
        _batch(labels=[Label(np.array([2**40 + 1, 0, 1], np.int64), "big")])


def test_wrong_id_feature_type_and_empty_features():
    with pytest.raises(TypeError, match="IDTypeFeature"):
        PersiaBatch([NonIDTypeFeature(np.zeros(2))], requires_grad=False)  # type: ignore[list-item]
    with pytest.raises(PersiaDataError, match="should not be empty"):
        PersiaBatch([], requires_grad=False)


def test_tampered_layout_is_refused():
    batch = _batch(non_id_type_features=[NonIDTypeFeature(np.zeros((3, 4), np.float32))], requires_grad=False)
    batch.data.meta["persia"] = batch.data.meta["persia"].replace("[4]", "[5]")
    with pytest.raises(InvalidRequestError, match="needs 5 columns, the part has 4"):
        PersiaBatch.from_bytes(batch.to_bytes())
