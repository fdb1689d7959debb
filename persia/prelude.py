"""The names PERSIA's older documents import from ``persia.prelude``.

``PyPersiaBatchData`` (``add_dense``, ``add_dense_f32``/``_f64``/``_i32``/``_i64``,
``add_sparse``, ``add_target``, ``to_bytes``) is ctrserve's :class:`trainer.batch.PyPersiaBatchData`;
``_PersiaBatch`` is :class:`persia.embedding.data.PersiaBatch`; ``check_pyarray_dtype_valid``
checks an array as a non-ID feature or label is checked.

Example:
    >>> from persia.prelude import PyPersiaBatchData
    >>> batch = PyPersiaBatchData()
    >>> batch.add_dense([np.ones((2, 3), np.float32)])
    >>> batch.batch_size
    2
"""

from __future__ import annotations

from typing import Any

import numpy as np

from persia.embedding.data import NdarrayDataBase, PersiaBatch
from trainer.batch import PyPersiaBatchData

_PersiaBatch = PersiaBatch


def check_pyarray_dtype_valid(data: np.ndarray, dtype: np.dtype | type | None = None) -> None:
    """Check ``data`` as a non-ID feature or label (type, dtype, rank).

    Args:
        data: the array.
        dtype: the dtype it must have (default: its own).

    Raises:
        PersiaDataError: ``data`` is not a supported array, or its dtype differs from ``dtype``.
    """
    from persia.embedding.data import PersiaDataError

    if dtype is not None and isinstance(data, np.ndarray) and data.dtype != np.dtype(dtype):
        raise PersiaDataError(f"array of dtype {data.dtype} where {np.dtype(dtype)} was given")
    NdarrayDataBase(data)


def __getattr__(name: str) -> Any:
    # PERSIA's older lookup client, loaded on first use (it brings the inference client's imports)
    if name == "PersiaEmbeddingClientPyClass":
        from persia.legacy import PersiaEmbeddingClientPyClass

        return PersiaEmbeddingClientPyClass
    raise AttributeError(f"module 'persia.prelude' has no attribute '{name}'")


__all__ = ["PyPersiaBatchData", "check_pyarray_dtype_valid"]  # and PersiaEmbeddingClientPyClass (lazily)
