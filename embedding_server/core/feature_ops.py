"""Feature ops: how a slot's ids are made from named raw inputs, identically in training and serving.

A slot of ``embedding_config.yml`` may declare ``ops``, a chain applied in order to the raw
inputs of a row (RecIS's ``Feature(...).add_op(...)``)::

    slots_config:
      dense2:            {dim: 8, ops: [{select: dense2}, {bucketize: [0, 0.5, 1]}]}
      sparse3:           {dim: 8, ops: [{select: sparse3}, {mod: 10000}]}
      sparse4:           {dim: 16, ops: [{select: sparse4}, {mod: 10000},
                                         {truncate: {seq_len: 1000, side: right}}]}
      sparse1_x_sparse2: {dim: 16, ops: [{select: [sparse1, sparse2]}, cross, {mod: 1000}]}

The ops and their meanings (RecIS's ``SelectField(s)``, ``Bucketize``, ``Mod``, ``Hash``,
``FeatureCross`` and ``SequenceTruncate``):

- ``select: NAME`` or ``select: [A, B]``: the chain's input(s); always the first op. Two inputs
  must be crossed next.
- ``bucketize: [b0, b1, ...]`` (ascending): a *dense* input's values become bucket ids, the number
  of boundaries ``<=`` the value (C++ ``upper_bound``, as RecIS: a value equal to a boundary goes
  to the bucket above it). A row of ``k`` dense values gives ``k`` ids. Only directly after a
  select of one input, which makes that input dense.
- ``mod: N``: ``id % N`` on unsigned 64-bit ids.
- ``hash`` (or ``hash: farm``): FarmHash's ``Fingerprint(uint64)`` of each id. Strings are hashed
  with FarmHash's ``Fingerprint64`` when they are read (data readers, request decoding), which is
  what RecIS's ``Hash(hash_type="farm")`` does to a string column.
- ``cross``: per row, every pair of the two selected inputs' distinct ids (in first-seen order,
  ``x`` major), each pair ``(x, y)`` hashed to one id with FarmHash's ``Fingerprint(uint128)``
  (low = ``x``, high = ``y``).
- ``truncate: {seq_len: N, side: left|right}``: at most ``N`` ids per row; ``side`` is the side
  cut off (RecIS's ``truncate_side``): ``right`` keeps the first ``N``, ``left`` (the default)
  the last ``N``.

The ops' definitions and parsing live in :mod:`embedding_server.core.feature_op_config` (the config
checks them); this module runs them. Every op works on whole batches (flat uint64 ids and int64 offsets, :class:`SparseFeature`'s
layout) with numpy and numba; none loops over ids in Python.

Example:
    >>> pipeline = FeaturePipeline({"age_b": parse_ops([{"select": "age"}, {"bucketize": [18, 30]}], "age_b")})
    >>> pipeline.input_names
    {'age': 'dense'}
    >>> [f.ids.tolist() for f in pipeline.apply({"age": np.array([17.0, 18.0, 45.0])})]
    [[0, 1, 2]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit

from embedding_server.core.batch import SparseFeature
from embedding_server.core.errors import InvalidRequestError
from embedding_server.core.farmhash import fingerprint64_u64, fingerprint_pairs
from embedding_server.core.feature_op_config import (
    OP_NAMES,
    Bucketize,
    Cross,
    FeatureOp,
    Hash,
    InputKind,
    Mod,
    Select,
    Truncate,
    _selected,
    input_kinds,
    ops_input_kind,
    ops_to_config,
    parse_ops,
)

if TYPE_CHECKING:
    from embedding_server.core.config import EmbeddingConfig

__all__ = [
    "OP_NAMES",
    "Bucketize",
    "Cross",
    "FeatureInputError",
    "FeatureOp",
    "FeaturePipeline",
    "Hash",
    "InputKind",
    "Mod",
    "RawInput",
    "Select",
    "Truncate",
    "bucketize",
    "cross",
    "distinct",
    "ops_input_kind",
    "ops_to_config",
    "parse_ops",
    "truncate",
]

#: A raw input: float values ``[n]`` or ``[n, k]`` (dense), or one id list per row (ids).
RawInput = np.ndarray | SparseFeature


class FeatureInputError(InvalidRequestError):
    """Raw inputs a pipeline cannot use: missing, of the wrong kind or shape, or too many ids.
    The message names the slot and the input."""


# --------------------------------------------------------------------------- kernels


def bucketize(values: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Bucket id of each value: how many boundaries are ``<=`` it (upper bound), as uint64."""
    return np.searchsorted(boundaries, values, side="right").astype(np.uint64)


def truncate(ids: np.ndarray, offsets: np.ndarray, seq_len: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """At most ``seq_len`` ids per row: ``side="right"`` keeps each row's first ids, ``"left"`` its last."""
    lengths = offsets[1:] - offsets[:-1]
    if lengths.size == 0 or int(lengths.max()) <= seq_len:
        return ids, offsets
    kept = np.minimum(lengths, seq_len)
    out_offsets = np.zeros_like(offsets)
    np.cumsum(kept, out=out_offsets[1:])
    start = offsets[:-1] if side == "right" else offsets[1:] - kept
    # the source position of output id j: its row's first kept id plus j's place in the row
    shift = np.repeat(start - out_offsets[:-1], kept)
    return ids[shift + np.arange(out_offsets[-1], dtype=np.int64)], out_offsets


@njit(cache=True, nogil=True)
def _distinct_rows(ids, offsets, out_ids, out_offsets):
    """Each row's distinct ids in first-seen order (rows are short: a linear scan per id)."""
    m = 0
    out_offsets[0] = 0
    for r in range(offsets.shape[0] - 1):
        row_start = m
        for j in range(offsets[r], offsets[r + 1]):
            v = ids[j]
            seen = False
            for t in range(row_start, m):
                if out_ids[t] == v:
                    seen = True
                    break
            if not seen:
                out_ids[m] = v
                m += 1
        out_offsets[r + 1] = m
    return m


@njit(cache=True, nogil=True)
def _pairs(x_ids, x_offsets, y_ids, y_offsets, out_offsets, low, high):
    for r in range(x_offsets.shape[0] - 1):
        at = out_offsets[r]
        for i in range(x_offsets[r], x_offsets[r + 1]):
            for j in range(y_offsets[r], y_offsets[r + 1]):
                low[at] = x_ids[i]
                high[at] = y_ids[j]
                at += 1


def distinct(ids: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's distinct ids, in first-seen order."""
    out_ids = np.empty_like(ids)
    out_offsets = np.empty_like(offsets)
    m = _distinct_rows(ids, offsets, out_ids, out_offsets)
    return out_ids[:m], out_offsets


def cross(
    x: tuple[np.ndarray, np.ndarray], y: tuple[np.ndarray, np.ndarray], max_ids: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, every pair of ``x``'s and ``y``'s distinct ids hashed to one id.

    Raises:
        FeatureInputError: the pairs would exceed ``max_ids`` (counted before they are made).
    """
    x_ids, x_offsets = distinct(*x)
    y_ids, y_offsets = distinct(*y)
    counts = (x_offsets[1:] - x_offsets[:-1]) * (y_offsets[1:] - y_offsets[:-1])
    out_offsets = np.zeros_like(x_offsets)
    np.cumsum(counts, out=out_offsets[1:])
    total = int(out_offsets[-1])
    if max_ids is not None and total > max_ids:
        raise FeatureInputError(f"the cross makes {total} ids, over the limit of {max_ids}")
    low = np.empty(total, np.uint64)
    high = np.empty(total, np.uint64)
    _pairs(x_ids, x_offsets, y_ids, y_offsets, out_offsets, low, high)
    return fingerprint_pairs(low, high), out_offsets


# --------------------------------------------------------------------------- the pipeline


class FeaturePipeline:
    """The ops of every slot that has them, run on a batch of named raw inputs.

    Args:
        slots: slot name -> its ops (each chain checked by :func:`parse_ops`), in slot order.
        plain: names of the config's slots without ops: they read the id input of their own
            name, so that name may not also be a dense (bucketized) input.

    Raises:
        ValueError: an input bucketized by one slot and used as ids by another (or by a plain
            slot of the same name).

    Example:
        >>> p = FeaturePipeline({"c": parse_ops([{"select": "c"}, {"mod": 10}], "c")})
        >>> p.apply({"c": SparseFeature.from_lists("c", [[13, 7], []])})[0].ids.tolist()
        [3, 7]
    """

    def __init__(self, slots: Mapping[str, Sequence[FeatureOp]], plain: Sequence[str] = ()):
        self.slots: dict[str, tuple[FeatureOp, ...]] = {name: tuple(ops) for name, ops in slots.items()}
        self.plain = tuple(plain)
        self._kinds = input_kinds(self.slots, self.plain)
        self._boundaries = {
            slot: np.asarray(op.boundaries, np.float64)
            for slot, ops in self.slots.items()
            for op in ops[1:2]
            if isinstance(op, Bucketize)
        }

    @classmethod
    def from_config(cls, config: EmbeddingConfig) -> FeaturePipeline:
        """The pipeline of ``config``'s slots that declare ``ops`` (empty when none does)."""
        slots = {name: slot.ops for name, slot in config.slots_config.items() if slot.ops}
        return cls(slots, [name for name, slot in config.slots_config.items() if not slot.ops])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeaturePipeline:
        """From ``{slot: [op, ...]}`` as :meth:`to_config` writes it.

        Raises:
            ValueError: a malformed op or chain.
        """
        return cls({slot: parse_ops(ops, slot) for slot, ops in data.items()})

    def to_config(self) -> dict[str, list[Any]]:
        """``{slot: [op, ...]}`` in YAML form."""
        return {slot: ops_to_config(ops) for slot, ops in self.slots.items()}

    def __bool__(self) -> bool:
        return bool(self.slots)

    def __repr__(self) -> str:
        return f"FeaturePipeline({self.to_config()!r})"

    @property
    def slot_names(self) -> list[str]:
        """The slots the pipeline computes, in order."""
        return list(self.slots)

    @property
    def input_names(self) -> dict[str, InputKind]:
        """Every raw input the ops read, with its kind: ``dense`` (bucketized values) or ``ids``."""
        return dict(self._kinds)

    def check_inputs(self, available: Mapping[str, InputKind], where: str) -> None:
        """Check that every input the ops select is ``available`` with the right kind.

        Args:
            available: input name -> kind of what the data (or the request) provides.
            where: what provides them, for the message (e.g. ``job.yml 'data.mapping'``).

        Raises:
            ValueError: naming the slot and the unknown or mismatched input.
        """
        for slot, ops in self.slots.items():
            kind = ops_input_kind(ops)
            for name in _selected(ops):
                if name not in available:
                    raise ValueError(
                        f"slot '{slot}' selects unknown input '{name}'; {where} provides: "
                        f"{', '.join(sorted(available)) or '(nothing)'}"
                    )
                if available[name] != kind:
                    raise ValueError(
                        f"slot '{slot}' {'bucketizes' if kind == 'dense' else 'reads ids of'} input '{name}', but "
                        f"{where} provides it as {'dense values' if available[name] == 'dense' else 'ids'}"
                    )

    def apply(self, inputs: Mapping[str, RawInput], max_ids: int | None = None) -> list[SparseFeature]:
        """Compute every slot with ops from a batch of raw inputs.

        Args:
            inputs: input name -> float values ``[n]`` / ``[n, k]`` (dense inputs) or a
                :class:`SparseFeature` of ``n`` rows (id inputs); extra names are ignored.
            max_ids: refuse (before making them) more ids than this from one cross.

        Returns:
            One :class:`SparseFeature` per slot with ops, named after the slot, in slot order.

        Raises:
            FeatureInputError: an input is missing, of the wrong kind, or the inputs disagree on
                the number of rows (naming the slot and the input).
        """
        rows: tuple[int, str] | None = None
        out = []
        for slot, ops in self.slots.items():
            selected = []
            for name in _selected(ops):
                value = inputs.get(name)
                if value is None:
                    raise FeatureInputError(
                        f"slot '{slot}' selects input '{name}', which is missing; the inputs are: "
                        f"{', '.join(sorted(inputs)) or '(none)'}"
                    )
                n = self._rows(slot, name, value)
                if rows is None:
                    rows = (n, name)
                elif n != rows[0]:
                    raise FeatureInputError(
                        f"input '{name}' has {n} rows but input '{rows[1]}' has {rows[0]} (slot '{slot}')"
                    )
                selected.append(value)
            out.append(self._run(slot, ops, selected, max_ids))
        return out

    def features(self, inputs: Mapping[str, RawInput], sparse: Sequence[SparseFeature]) -> list[SparseFeature]:
        """A batch's features: the given ``sparse`` ones, less the slots the ops make and the
        inputs only the ops read (not slots of their own), then the ops' slots.

        Raises:
            FeatureInputError: see :meth:`apply`.
        """
        if not self.slots:
            return list(sparse)
        drop = set(self.slots) | (set(self._kinds) - set(self.plain))
        return [f for f in sparse if f.name not in drop] + self.apply(inputs)

    def _rows(self, slot: str, name: str, value: RawInput) -> int:
        kind = self._kinds[name]
        if kind == "dense":
            if not isinstance(value, np.ndarray) or value.ndim not in (1, 2) or value.dtype.kind not in "fiu":
                raise FeatureInputError(
                    f"slot '{slot}' bucketizes input '{name}': it must be dense values ([rows] or [rows, k] numbers), "
                    f"got {'ids' if isinstance(value, SparseFeature) else type(value).__name__}"
                )
            return int(value.shape[0])
        if not isinstance(value, SparseFeature):
            raise FeatureInputError(
                f"slot '{slot}' reads ids of input '{name}': it must be one id list per row, got dense values"
            )
        return value.batch_size

    def _run(
        self, slot: str, ops: tuple[FeatureOp, ...], selected: list[RawInput], max_ids: int | None
    ) -> SparseFeature:
        if len(ops) > 1 and isinstance(ops[1], Bucketize):
            values = np.asarray(selected[0], np.float64)
            k = 1 if values.ndim == 1 else values.shape[1]
            ids = bucketize(values.reshape(-1), self._boundaries[slot])
            offsets = np.arange(values.shape[0] + 1, dtype=np.int64) * k
            rest = ops[2:]
        elif len(ops) > 1 and isinstance(ops[1], Cross):
            x, y = selected
            assert isinstance(x, SparseFeature) and isinstance(y, SparseFeature)
            try:
                ids, offsets = cross((x.ids, x.offsets), (y.ids, y.offsets), max_ids)
            except FeatureInputError as exc:
                raise FeatureInputError(f"slot '{slot}': {exc}") from None
            rest = ops[2:]
        else:
            source = selected[0]
            assert isinstance(source, SparseFeature)
            ids, offsets = source.ids, source.offsets
            rest = ops[1:]
        for op in rest:
            if isinstance(op, Mod):
                ids = ids % np.uint64(op.n)
            elif isinstance(op, Hash):
                ids = fingerprint64_u64(ids)
            elif isinstance(op, Truncate):
                ids, offsets = truncate(ids, offsets, op.seq_len, op.side)
        return SparseFeature._checked(slot, ids, offsets, offsets[1:] - offsets[:-1])
