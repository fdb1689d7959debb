"""PERSIA's batch types: ``PersiaBatch`` and the ID-type, non-ID-type and label parts it holds.

A :class:`PersiaBatch` is a :class:`trainer.batch.PyPersiaBatchData`: ``to_bytes()`` gives the
batch codec's bytes (:mod:`embedding_server.core.batch_codec`), which ``PyPersiaBatchData.from_bytes``,
the TorchServe handler and ``PersiaBatch.from_bytes`` decode, and ctrserve's trainer takes it as it
is. Non-ID features and labels of every dtype and rank PERSIA allows travel flattened in a codec
dtype that holds their values exactly; the original names, dtypes and shapes, ``requires_grad``
and the ``meta`` bytes travel in the batch's layout (:mod:`embedding_server.core.dense_layout`),
so the receiver sees the arrays the client built.

Checks are PERSIA's: each part's type, dtype and rank when it is made, every part's batch size
against the batch's (at most :data:`MAX_BATCH_SIZE`) when the batch is made, and
``requires_grad=True`` without labels is a ``RuntimeError``. With the environment variable
``PERSIA_SKIP_CHECK_DATA=1`` the per-part checks are skipped, as in PERSIA (the batch codec still
refuses what it cannot carry). A failed check raises :class:`PersiaDataError`, which is both
ctrserve's ``InvalidRequestError`` and the ``AssertionError`` PERSIA raised.

Example:
    >>> import numpy as np
    >>> batch = PersiaBatch(
    ...     [IDTypeFeatureWithSingleID("user", np.array([3, 4], np.uint64))],
    ...     non_id_type_features=[NonIDTypeFeature(np.ones((2, 5), np.float32))],
    ...     labels=[Label(np.array([1, 0], np.bool_))],
    ... )
    >>> PersiaBatch.from_bytes(batch.to_bytes()).label_arrays()[0].tolist()
    [True, False]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Generic, TypeVar

import numpy as np

from embedding_server.core.batch import SparseFeature
from embedding_server.core.batch_codec import BatchData, check_parts, decode_batch
from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.dense_layout import (
    LAYOUT_KEY,
    PART_DTYPES,
    BatchLayout,
    pack_label,
    pack_non_id,
)
from embedding_server.core.errors import InvalidRequestError, describe_value
from persia.logger import get_default_logger
from trainer.batch import PyPersiaBatchData

_logger = get_default_logger()

#: the largest batch PERSIA accepts
MAX_BATCH_SIZE = 65535
#: the dtypes of non-ID features and labels (PERSIA's name)
_ND_ARRAY_SUPPORT_TYPE = {d.type for d in PART_DTYPES.values()}


class PersiaDataError(InvalidRequestError, AssertionError):
    """A part of a batch has the wrong type, dtype, rank or batch size.

    It is ctrserve's :class:`InvalidRequestError` (a ``ValueError``) and, for programs written
    against PERSIA, whose checks were assertions, an ``AssertionError``.
    """


def skip_check_data() -> bool:
    """Whether ``PERSIA_SKIP_CHECK_DATA`` asks to skip the per-part checks (read at each check,
    so setting it before building parts is enough)."""
    return os.environ.get("PERSIA_SKIP_CHECK_DATA", "0").strip() not in ("", "0")


def _check_ids(data: object, name: str) -> None:
    if not isinstance(data, np.ndarray) or data.ndim != 1 or data.dtype != np.uint64:
        raise PersiaDataError(f"id_type_feature '{name}': expected a 1-D uint64 array, got {describe_value(data)}")


_Ids = TypeVar("_Ids", list[np.ndarray], np.ndarray)


class _IDFeature(Generic[_Ids]):
    """What both ID-type features hold: the feature's name and its ids, one entry per sample."""

    def __init__(self, name: str, data: _Ids):
        self.name = name
        self.data: _Ids = data

    @property
    def batch_size(self) -> int:
        return len(self.data)


class IDTypeFeature(_IDFeature[list[np.ndarray]]):
    """A categorical feature: per sample, a (possibly empty) uint64 array of ids (PERSIA's LIL form).

    Args:
        name: the feature's name in the embedding config.
        data: one 1-D ``np.uint64`` array per sample.

    Raises:
        PersiaDataError: a sample that is not a 1-D uint64 array (unless PERSIA_SKIP_CHECK_DATA).

    Example:
        >>> IDTypeFeature("tags", [np.array([1, 2], np.uint64), np.array([], np.uint64)]).batch_size
        2
    """

    def __init__(self, name: str, data: list[np.ndarray]):
        if not skip_check_data():
            if not isinstance(data, (list, tuple)):
                raise PersiaDataError(
                    f"id_type_feature '{name}': expected a list of uint64 arrays, got {describe_value(data)}"
                )
            for sample in data:
                _check_ids(sample, name)
        super().__init__(name, data)

    def to_sparse_feature(self) -> SparseFeature:
        """The feature in ctrserve's flat ``ids``/``offsets`` form."""
        return SparseFeature.from_lists(self.name, self.data)


class IDTypeFeatureWithSingleID(_IDFeature[np.ndarray]):
    """A categorical feature with exactly one id per sample: one uint64 array for the batch,
    checked once (no per-sample arrays, no empty samples).

    Args:
        name: the feature's name in the embedding config.
        data: a 1-D ``np.uint64`` array, one id per sample.

    Raises:
        PersiaDataError: ``data`` is not a 1-D uint64 array (unless PERSIA_SKIP_CHECK_DATA).

    Example:
        >>> IDTypeFeatureWithSingleID("user", np.array([10, 11, 12], np.uint64)).batch_size
        3
    """

    def __init__(self, name: str, data: np.ndarray):
        if not skip_check_data():
            _check_ids(data, name)
        super().__init__(name, data)

    def to_sparse_feature(self) -> SparseFeature:
        """The feature in ctrserve's flat ``ids``/``offsets`` form (one id per sample)."""
        return SparseFeature(self.name, self.data, np.arange(len(self.data) + 1, dtype=np.int64))


class NdarrayDataBase:
    """An array of any rank >= 1 whose first dimension is the batch, of one of the dtypes
    bool, int8, int16, int32, int64, uint8, float32, float64.

    Args:
        data: the array.
        name: its name (``DEFAULT_NAME`` when omitted).

    Raises:
        PersiaDataError: not a numpy array, another dtype, or rank 0 (unless PERSIA_SKIP_CHECK_DATA).
    """

    DEFAULT_NAME = "ndarray_base"

    def __init__(self, data: np.ndarray, name: str | None = None):
        self.data = data
        self._name = name
        if not skip_check_data():
            what = f"{type(self).__name__} '{self.name}'"
            if not isinstance(data, np.ndarray):
                raise PersiaDataError(f"{what}: expected a numpy array, got {describe_value(data)}")
            if data.dtype.type not in _ND_ARRAY_SUPPORT_TYPE:
                raise PersiaDataError(f"{what}: dtype {data.dtype} is not one of {sorted(PART_DTYPES)}")
            if data.ndim == 0:
                raise PersiaDataError(f"{what}: expected an array with a batch dimension, got a 0-d array")

    @property
    def batch_size(self) -> int:
        return self.data.shape[0]

    @property
    def name(self) -> str:
        return self._name or self.DEFAULT_NAME

    def __len__(self) -> int:
        return len(self.data)


class Label(NdarrayDataBase):
    """A label array (any supported dtype and rank; ``[batch]`` or ``[batch, tasks]`` usually).

    Example:
        >>> Label(np.array([1.0, 0.0], np.float32), "click").batch_size
        2
    """

    DEFAULT_NAME = "label_anonymous"


class NonIDTypeFeature(NdarrayDataBase):
    """A dense (non-ID) feature array (any supported dtype and rank, e.g. images as uint8).

    Example:
        >>> NonIDTypeFeature(np.zeros((4, 3, 8, 8), np.uint8), "image").batch_size
        4
    """

    DEFAULT_NAME = "non_id_type_feature_anonymous"


def _check_batch_size(size: int, expected: int, kind: str, name: str) -> None:
    if size != expected:
        raise PersiaDataError(f"{kind} '{name}': batch size {size}, expected {expected}")
    if size > MAX_BATCH_SIZE:
        raise PersiaDataError(f"{kind} '{name}': batch size {size} exceeds MAX_BATCH_SIZE ({MAX_BATCH_SIZE})")


class PersiaBatch(PyPersiaBatchData):
    """One batch: ID-type features, non-ID-type features, labels and ``meta`` bytes.

    Args:
        id_type_features: the categorical features (at least one).
        non_id_type_features: the dense features.
        labels: the labels (needed when ``requires_grad``).
        batch_size: the batch size; default the first ID-type feature's.
        requires_grad: whether training computes gradients for this batch's embeddings.
        meta: opaque bytes travelling with the batch (a non-bytes value is ignored with a
            warning, as in PERSIA).

    Raises:
        PersiaDataError: no ID-type feature, or a part whose batch size differs from the batch's.
        TypeError: an ID-type feature of another type.
        RuntimeError: ``requires_grad=True`` without labels.

    Example:
        >>> batch = PersiaBatch([IDTypeFeature("tags", [np.array([1], np.uint64)])], requires_grad=False)
        >>> PyPersiaBatchData.from_bytes(batch.to_bytes()).sparse[0].name
        'tags'
    """

    def __init__(
        self,
        id_type_features: Sequence[IDTypeFeature | IDTypeFeatureWithSingleID],
        non_id_type_features: Sequence[NonIDTypeFeature] | None = None,
        labels: Sequence[Label] | None = None,
        batch_size: int | None = None,
        requires_grad: bool = True,
        meta: bytes | None = None,
    ):
        super().__init__()
        if len(id_type_features) == 0:
            raise PersiaDataError("id_type_features should not be empty")
        batch_size = batch_size or id_type_features[0].batch_size
        sparse = []
        for feature in id_type_features:
            if not isinstance(feature, (IDTypeFeature, IDTypeFeatureWithSingleID)):
                raise TypeError(
                    "expected type of id_type_feature to be Union[IDTypeFeatureWithSingleID, IDTypeFeature] "
                    f"but got {type(feature)}"
                )
            _check_batch_size(feature.batch_size, batch_size, "id_type_feature", feature.name)
            sparse.append(feature.to_sparse_feature())
        non_id = list(non_id_type_features or [])
        for part in non_id:
            _check_batch_size(part.batch_size, batch_size, "non_id_type_feature", part.name)
        label_parts = list(labels or [])
        for label in label_parts:
            _check_batch_size(label.batch_size, batch_size, "label", label.name)
        if requires_grad and not label_parts:
            raise RuntimeError("add label data when requires_grad set to true.")
        if meta is not None and not isinstance(meta, bytes):
            _logger.warning(f"expect PersiaBatch.meta type is bytes but got {type(meta)}")
            meta = None
        self._layout = BatchLayout.of(
            [(p.name, p.data) for p in non_id], [(p.name, p.data) for p in label_parts], requires_grad, meta
        )
        self.data = BatchData(
            [pack_non_id(p.data) for p in non_id],
            sparse,
            [pack_label(p.data, p.name) for p in label_parts],
            {LAYOUT_KEY: self._layout.to_meta_value()},
        )
        check_parts(self.data)
        self._batch_size = batch_size

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def layout(self) -> BatchLayout:
        """Names, dtypes and shapes of the non-ID features and labels, ``requires_grad``, ``meta``."""
        return self._layout

    @property
    def requires_grad(self) -> bool:
        """Whether training computes gradients for this batch's embeddings."""
        return self._layout.requires_grad

    @property
    def meta(self) -> bytes | None:
        """The ``meta`` bytes given when the batch was made."""
        return self._layout.meta

    @classmethod
    def from_bytes(cls, data: bytes, embedding_config: EmbeddingConfig | None = None) -> PersiaBatch:
        """Decode the bytes of :meth:`to_bytes` (or of ``PyPersiaBatchData.to_bytes``: its dense
        and target parts keep their codec dtypes, ``requires_grad`` is whether it has targets).

        Args:
            data: the bytes.
            embedding_config: when given, the feature names are checked against it.

        Raises:
            InvalidRequestError: corrupted or inconsistent bytes, or a malformed layout.
        """
        decoded = decode_batch(data)
        batch = cls.__new__(cls)
        PyPersiaBatchData.__init__(batch, embedding_config)
        batch._add(decoded.dense, decoded.sparse, decoded.targets)
        batch.data.meta = decoded.meta
        layout = BatchLayout.from_meta(
            decoded.meta, [d.shape[1] for d in decoded.dense], [t.shape[1] for t in decoded.targets]
        )
        if layout is None:
            layout = BatchLayout.of(
                [(NonIDTypeFeature.DEFAULT_NAME, d) for d in decoded.dense],
                [(Label.DEFAULT_NAME, t) for t in decoded.targets],
                requires_grad=bool(decoded.targets),
            )
        batch._layout = layout
        batch._batch_size = check_parts(batch.data)
        return batch
