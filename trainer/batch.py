"""Training and request batches built the way PERSIA's documentation shows.

Example:
    >>> batch = PyPersiaBatchData()
    >>> batch.add_dense([np.ones((2, 13), np.float32)])
    >>> batch.add_sparse([("C1", [np.array([7], np.uint64), np.array([], np.uint64)])])
    >>> batch.add_target(np.array([[1.0], [0.0]], np.float32))
    >>> PyPersiaBatchData.from_bytes(batch.to_bytes()).batch_size
    2
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from embedding_server.core.batch import SparseFeature, check_batch
from embedding_server.core.batch_codec import BatchData, check_parts, decode_batch, encode_batch
from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.dense_layout import BatchLayout, label_arrays, non_id_arrays
from embedding_server.core.errors import InvalidRequestError, describe_value


class PyPersiaBatchData:
    """Dense arrays, named sparse id lists and targets of one batch.

    Args:
        embedding_config: when given, sparse feature names are checked against it as they are
            added (they are always checked when the batch is trained on or served).

    Raises:
        InvalidRequestError: from every ``add_*`` method when a part is malformed or its batch
            size disagrees with the parts already added.
    """

    def __init__(self, embedding_config: EmbeddingConfig | None = None):
        self._config = embedding_config
        self.data = BatchData()

    # ----------------------------------------------------------------------- building

    def add_dense(self, arrays: np.ndarray | Sequence[np.ndarray]) -> None:
        """Add one 2-D array or a list of them (float32, float64, int32 or int64)."""
        for array in [arrays] if isinstance(arrays, np.ndarray) else list(arrays):
            self._add_dense(array, None)

    def add_dense_f32(self, array: np.ndarray) -> None:
        self._add_dense(array, np.float32)

    def add_dense_f64(self, array: np.ndarray) -> None:
        self._add_dense(array, np.float64)

    def add_dense_i32(self, array: np.ndarray) -> None:
        self._add_dense(array, np.int32)

    def add_dense_i64(self, array: np.ndarray) -> None:
        self._add_dense(array, np.int64)

    def add_sparse(self, features: Iterable[tuple[str, Sequence[np.ndarray]]]) -> None:
        """Add named features, each with one uint64 id array per sample (possibly empty)."""
        new = [SparseFeature.from_lists(name, samples) for name, samples in features]
        self._add(sparse=new)

    def add_sparse_feature(self, feature: SparseFeature) -> None:
        """Add a feature already in flat ``ids`` / ``offsets`` form (no per-sample copies)."""
        self._add(sparse=[feature])

    def add_target(self, array: np.ndarray) -> None:
        """Add a 2-D float32 ``[batch, t]`` target; call again for more tasks."""
        if not isinstance(array, np.ndarray) or array.dtype != np.float32 or array.ndim != 2:
            raise InvalidRequestError(f"target must be a 2-D float32 array [batch, t], got {describe_value(array)}")
        self._add(targets=[array])

    def _add_dense(self, array: np.ndarray, dtype: type | None) -> None:
        if not isinstance(array, np.ndarray) or array.ndim != 2:
            raise InvalidRequestError(f"dense arrays must be 2-D [batch, width], got {describe_value(array)}")
        if dtype is not None and array.dtype != dtype:
            raise InvalidRequestError(f"expected a {np.dtype(dtype).name} array, got {array.dtype}")
        self._add(dense=[array])

    def _add(self, dense=(), sparse=(), targets=()) -> None:
        candidate = BatchData(
            self.data.dense + list(dense),
            [*self.data.sparse, *sparse],
            self.data.targets + list(targets),
            self.data.meta,
        )
        check_parts(candidate)
        if self._config is not None and candidate.sparse:
            check_batch(candidate.sparse, self._config)
        self.data = candidate

    # ----------------------------------------------------------------------- reading

    @property
    def batch_size(self) -> int:
        return check_parts(self.data)

    @property
    def dense(self) -> list[np.ndarray]:
        return self.data.dense

    @property
    def sparse(self) -> Sequence[SparseFeature]:
        return self.data.sparse

    @property
    def targets(self) -> list[np.ndarray]:
        return self.data.targets

    def dense_matrix(self) -> np.ndarray:
        """All dense parts concatenated as float32 ``[batch, total width]``."""
        if not self.data.dense:
            return np.zeros((self.batch_size, 0), np.float32)
        return np.concatenate([d.astype(np.float32, copy=False) for d in self.data.dense], axis=1)

    @property
    def layout(self) -> BatchLayout | None:
        """The PERSIA layout of the dense and target parts (a ``PersiaBatch``'s; ``None`` for a
        batch built with ``add_dense``/``add_target``), see :mod:`embedding_server.core.dense_layout`.

        Raises:
            InvalidRequestError: the batch carries a malformed layout.
        """
        return BatchLayout.from_meta(
            self.data.meta, [d.shape[1] for d in self.data.dense], [t.shape[1] for t in self.data.targets]
        )

    def non_id_arrays(self) -> list[np.ndarray]:
        """The dense parts as the client built them (PERSIA's non-ID features: their dtypes and
        shapes); the dense arrays themselves when the batch has no layout."""
        return non_id_arrays(self.data.dense, self.layout)

    def label_arrays(self) -> list[np.ndarray]:
        """The target parts as the client built them (PERSIA's labels: their dtypes and shapes);
        the target arrays themselves when the batch has no layout."""
        return label_arrays(self.data.targets, self.layout)

    def validate(self, config: EmbeddingConfig) -> int:
        """Check the sparse names against ``config``; returns the batch size.

        Raises:
            InvalidRequestError: an unknown or repeated feature, or inconsistent parts.
        """
        batch_size = check_parts(self.data)
        if self.data.sparse:
            check_batch(self.data.sparse, config)
        return batch_size

    # ----------------------------------------------------------------------- bytes

    def to_bytes(self) -> bytes:
        """The versioned binary form (see :mod:`embedding_server.core.batch_codec`)."""
        return encode_batch(self.data)

    @classmethod
    def from_bytes(cls, data: bytes, embedding_config: EmbeddingConfig | None = None) -> PyPersiaBatchData:
        """Decode bytes made by :meth:`to_bytes`.

        Raises:
            InvalidRequestError: corrupted, truncated or inconsistent bytes.
        """
        batch = cls(embedding_config)
        decoded = decode_batch(data)
        batch._add(decoded.dense, decoded.sparse, decoded.targets)
        batch.data.meta = decoded.meta
        return batch
