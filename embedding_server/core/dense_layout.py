"""The shapes, dtypes and names PERSIA's batches give their non-ID features and labels.

PERSIA's ``PersiaBatch`` carries N-dimensional non-ID features and labels of eight dtypes (bool,
int8, int16, int32, int64, uint8, float32, float64) and opaque ``meta`` bytes. The batch codec
(:mod:`embedding_server.core.batch_codec`) carries 2-D dense parts of four dtypes and float32
targets. A :class:`BatchLayout` bridges the two without a second wire format: every part travels
flattened to ``[batch, width]`` in a codec dtype that holds its values exactly, and the layout,
recorded as one JSON string under the batch's ``meta`` key :data:`LAYOUT_KEY`, lets the receiver
(trainer or handler) hand the model the arrays the client built. Batches without the key (ctrserve's
own clients) read exactly as before.

Example:
    >>> layout = BatchLayout.of(non_id=[("age", np.zeros((2,), np.int8))], labels=[], requires_grad=False)
    >>> packed = pack_non_id(np.array([3, 4], np.int8))
    >>> packed.dtype, packed.shape
    (dtype('int32'), (2, 1))
    >>> unpack(packed, layout.non_id[0]).tolist()
    [3, 4]
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from embedding_server.core.errors import InvalidRequestError, describe_value

#: the batch ``meta`` key holding the layout (a JSON string)
LAYOUT_KEY = "persia"
#: the dtypes PERSIA accepts for non-ID features and labels, by name
PART_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name) for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "float32", "float64")
}
#: the codec dtype each PERSIA dtype travels as (exact for every value of the source dtype)
_WIRE_DTYPE = {
    "bool": np.int32,
    "int8": np.int32,
    "int16": np.int32,
    "uint8": np.int32,
    "int32": np.int32,
    "int64": np.int64,
    "float32": np.float32,
    "float64": np.float64,
}
_MAX_RANK = 32


@dataclass(frozen=True)
class PartLayout:
    """One non-ID feature or label as the client built it.

    Args:
        name: the part's name (PERSIA's ``NonIDTypeFeature``/``Label`` name).
        dtype: a key of :data:`PART_DTYPES`.
        shape: the dimensions after the batch dimension (``()`` for a 1-D array).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def width(self) -> int:
        """Columns of the flattened ``[batch, width]`` form."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class BatchLayout:
    """The layout of every non-ID feature and label of a batch, its ``requires_grad`` flag and
    PERSIA's opaque ``meta`` bytes.

    Args:
        non_id: one entry per dense part, in order.
        labels: one entry per target part, in order.
        requires_grad: whether the batch's embeddings collect gradients (PERSIA's flag).
        meta: the client's ``meta`` bytes, or ``None``.
    """

    non_id: tuple[PartLayout, ...]
    labels: tuple[PartLayout, ...]
    requires_grad: bool
    meta: bytes | None = None

    @classmethod
    def of(
        cls,
        non_id: Sequence[tuple[str, np.ndarray]],
        labels: Sequence[tuple[str, np.ndarray]],
        requires_grad: bool,
        meta: bytes | None = None,
    ) -> BatchLayout:
        """The layout of named arrays (dtype and trailing shape of each)."""

        def part(name: str, array: np.ndarray) -> PartLayout:
            return PartLayout(name, array.dtype.name, tuple(int(d) for d in array.shape[1:]))

        return cls(tuple(part(*p) for p in non_id), tuple(part(*p) for p in labels), requires_grad, meta)

    def to_meta_value(self) -> str:
        """The JSON string stored under :data:`LAYOUT_KEY`."""
        return json.dumps(
            {
                "non_id": [[p.name, p.dtype, list(p.shape)] for p in self.non_id],
                "labels": [[p.name, p.dtype, list(p.shape)] for p in self.labels],
                "requires_grad": self.requires_grad,
                "meta": None if self.meta is None else base64.b64encode(self.meta).decode("ascii"),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_meta(
        cls, meta: Mapping[str, object], dense_widths: Sequence[int], target_widths: Sequence[int]
    ) -> BatchLayout | None:
        """The layout recorded in a decoded batch's ``meta``, checked against its parts;
        ``None`` when the batch has none (a ctrserve client's batch).

        Raises:
            InvalidRequestError: a malformed layout, or one that does not match the parts' count
                or widths (the bytes may come from the network).
        """
        raw = meta.get(LAYOUT_KEY)
        if raw is None:
            return None
        try:
            doc = json.loads(raw) if isinstance(raw, str) else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or set(doc) != {"non_id", "labels", "requires_grad", "meta"}:
            raise InvalidRequestError(
                f"batch meta '{LAYOUT_KEY}' must be a JSON object with non_id, labels, requires_grad and meta"
            )
        non_id = _parts(doc["non_id"], dense_widths, "non_id")
        labels = _parts(doc["labels"], target_widths, "labels")
        if not isinstance(doc["requires_grad"], bool):
            raise InvalidRequestError(f"batch meta '{LAYOUT_KEY}': requires_grad must be true or false")
        meta_bytes = None
        if doc["meta"] is not None:
            try:
                meta_bytes = base64.b64decode(doc["meta"], validate=True) if isinstance(doc["meta"], str) else None
            except (binascii.Error, ValueError):
                meta_bytes = None
            if meta_bytes is None:
                raise InvalidRequestError(f"batch meta '{LAYOUT_KEY}': meta must be base64 text or null")
        return cls(non_id, labels, doc["requires_grad"], meta_bytes)


def _parts(entries: object, widths: Sequence[int], what: str) -> tuple[PartLayout, ...]:
    if not isinstance(entries, list) or len(entries) != len(widths):
        raise InvalidRequestError(
            f"batch meta '{LAYOUT_KEY}': {what} must list one entry per part ({len(widths)}), "
            f"got {len(entries) if isinstance(entries, list) else type(entries).__name__}"
        )
    parts = []
    for i, (entry, width) in enumerate(zip(entries, widths)):
        ok = (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and entry[1] in PART_DTYPES
            and isinstance(entry[2], list)
            and len(entry[2]) < _MAX_RANK
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in entry[2])
        )
        if not ok:
            raise InvalidRequestError(
                f"batch meta '{LAYOUT_KEY}': {what}[{i}] must be [name, dtype in {sorted(PART_DTYPES)}, shape]"
            )
        part = PartLayout(entry[0], entry[1], tuple(entry[2]))
        if part.width != width:
            raise InvalidRequestError(
                f"batch meta '{LAYOUT_KEY}': {what}[{i}] '{part.name}' of shape {part.shape} "
                f"needs {part.width} columns, the part has {width}"
            )
        parts.append(part)
    return tuple(parts)


def pack_non_id(array: np.ndarray) -> np.ndarray:
    """``array`` as a 2-D codec dense part (``[batch, width]``, values unchanged).

    Raises:
        InvalidRequestError: not an array of rank >= 1 with one of :data:`PART_DTYPES`.
    """
    wire = _wire_dtype(array, "non-ID feature")
    return np.ascontiguousarray(_flat(array), wire)


def pack_label(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` as a 2-D float32 codec target.

    Raises:
        InvalidRequestError: a dtype outside :data:`PART_DTYPES`, or integer label values that
            float32 cannot hold exactly (the codec's targets are float32).
    """
    _wire_dtype(array, f"label '{name}'")
    flat = _flat(array)
    packed = np.ascontiguousarray(flat, np.float32)
    if array.dtype.kind in "iu" and not np.array_equal(packed.astype(array.dtype), flat):
        raise InvalidRequestError(
            f"label '{name}': {array.dtype} values beyond 2**24 do not survive the float32 targets batches carry"
        )
    return packed


def unpack(array: np.ndarray, part: PartLayout) -> np.ndarray:
    """A codec part back in the dtype and shape the client built."""
    return array.astype(PART_DTYPES[part.dtype], copy=False).reshape((array.shape[0], *part.shape))


def _flat(array: np.ndarray) -> np.ndarray:
    return array if array.ndim == 2 else array.reshape(array.shape[0], math.prod(array.shape[1:]))


def _wire_dtype(array: object, what: str) -> type:
    if not isinstance(array, np.ndarray) or array.ndim < 1:
        raise InvalidRequestError(f"a {what} must be a numpy array with a batch dimension, got {describe_value(array)}")
    wire = _WIRE_DTYPE.get(array.dtype.name)
    if wire is None:
        raise InvalidRequestError(f"a {what} has dtype {array.dtype}; use one of {sorted(PART_DTYPES)}")
    return wire


def non_id_arrays(dense: Sequence[np.ndarray], layout: BatchLayout | None) -> list[np.ndarray]:
    """The dense parts as the client built them (unchanged without a layout)."""
    if layout is None:
        return list(dense)
    return [unpack(a, p) for a, p in zip(dense, layout.non_id)]


def label_arrays(targets: Sequence[np.ndarray], layout: BatchLayout | None) -> list[np.ndarray]:
    """The target parts as the client built them (unchanged without a layout)."""
    if layout is None:
        return list(targets)
    return [unpack(a, p) for a, p in zip(targets, layout.labels)]
