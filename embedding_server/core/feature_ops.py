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

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit

from embedding_server.core.batch import KeyedIds, SparseFeature
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
    "RawInputs",
    "Select",
    "Truncate",
    "bucketize",
    "cross",
    "distinct",
    "ops_input_kind",
    "ops_to_config",
    "parse_ops",
    "truncate",
    "truncate_rows",
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
    out_ids, out_offsets = truncate_rows(ids, offsets[None], seq_len, side)
    return out_ids, out_offsets[0]


def truncate_rows(ids: np.ndarray, offsets: np.ndarray, seq_len: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`truncate` of several features at once, in :class:`KeyedIds`' layout.

    Args:
        ids: the ids of feature 0, then of feature 1, ...
        offsets: int64 ``[features, rows + 1]``, each feature's row rising from 0.
        seq_len: most ids kept per row.
        side: the side cut off (``right`` keeps the first ids, ``left`` the last).

    Returns:
        ``(ids, offsets)`` in the same layout (the inputs themselves when no row is too long).
    """
    if _longest_row(offsets) <= seq_len:  # the usual case: one pass, no temporaries
        return ids, offsets
    lengths = offsets[:, 1:] - offsets[:, :-1]
    kept = np.minimum(lengths, seq_len)
    out_offsets = np.zeros_like(offsets)
    np.cumsum(kept, axis=1, out=out_offsets[:, 1:])
    # where each feature's ids start in the concatenated input and output
    base_in = np.cumsum(offsets[:, -1]) - offsets[:, -1]
    base_out = np.cumsum(out_offsets[:, -1]) - out_offsets[:, -1]
    start = (offsets[:, :-1] if side == "right" else offsets[:, 1:] - kept) + base_in[:, None]
    # the source position of output id j: its row's first kept id plus j's place in the row
    shift = np.repeat((start - out_offsets[:, :-1] - base_out[:, None]).ravel(), kept.ravel())
    return ids[shift + np.arange(shift.shape[0], dtype=np.int64)], out_offsets


@njit(cache=True, nogil=True)
def _longest_row(offsets):
    """The most ids of one row in offsets ``[features, rows + 1]`` (0 when there is no row)."""
    longest = 0
    for k in range(offsets.shape[0]):
        for i in range(offsets.shape[1] - 1):
            longest = max(longest, offsets[k, i + 1] - offsets[k, i])
    return longest


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

#: One compiled op after a chain's select (and bucketize or cross): ``("mod", np.uint64(n))``,
#: ``("hash",)`` or ``("truncate", seq_len, side)``. Equal chains give equal tuples.
_Step = tuple


def _compile_steps(ops: Sequence[FeatureOp]) -> tuple[_Step, ...]:
    steps: list[_Step] = []
    for op in ops:
        if isinstance(op, Mod):
            steps.append(("mod", np.uint64(op.n)))
        elif isinstance(op, Hash):
            steps.append(("hash",))
        elif isinstance(op, Truncate):
            steps.append(("truncate", op.seq_len, op.side))
        else:  # parse_ops allows select, bucketize and cross only at the chain's start
            raise ValueError(f"op {type(op).__name__.lower()} cannot follow the start of a chain")
    return tuple(steps)


def _run_steps(steps: tuple[_Step, ...], ids: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The steps on ids in :class:`KeyedIds`' layout (offsets ``[features, rows + 1]``): mod and
    hash per id, truncate per row, so one call serves every feature of the layout."""
    for step in steps:
        if step[0] == "mod":
            ids = ids % step[1]
        elif step[0] == "hash":
            ids = fingerprint64_u64(ids)
        else:
            ids, offsets = truncate_rows(ids, offsets, step[1], step[2])
    return ids, offsets


@dataclass(frozen=True)
class _Group:
    """Slots whose chains select one id input and then run the same steps: the steps run once
    over all their inputs' ids together (``inputs``: one per slot, in slot order)."""

    slots: tuple[str, ...]
    inputs: tuple[str, ...]
    steps: tuple[_Step, ...]


@dataclass(frozen=True)
class _Single:
    """A slot that bucketizes a dense input (``boundaries``) or crosses two id inputs, then runs its steps."""

    slot: str
    inputs: tuple[str, ...]
    boundaries: np.ndarray | None
    steps: tuple[_Step, ...]


class RawInputs(Mapping[str, RawInput]):
    """A batch's raw inputs as decoded batch bytes hold them: the id inputs in one
    :class:`KeyedIds` (no object per input), the dense ones by name.

    It is a mapping like the dict :meth:`FeaturePipeline.apply` takes (``inputs["x"]`` is a
    :class:`SparseFeature` view or the dense array), and the pipeline runs its ops on the keyed
    ids directly.

    Args:
        ids: the id inputs, one feature each.
        dense: input name -> float values ``[n]`` / ``[n, k]``.

    Raises:
        ValueError: a name among both the id and the dense inputs.

    Example:
        >>> keyed = KeyedIds.from_features([SparseFeature.from_lists("c", [[13, 7], []])])
        >>> raw = RawInputs(keyed, {"age": np.array([17.0, 45.0])})
        >>> sorted(raw), raw["c"].ids.tolist()
        (['age', 'c'], [13, 7])
    """

    def __init__(self, ids: KeyedIds, dense: Mapping[str, np.ndarray]):
        self.ids = ids
        self.dense = dict(dense)
        both = sorted(set(ids.names).intersection(self.dense)) if self.dense else []
        if both:
            raise ValueError(f"inputs given both as ids and as dense values: {both}")

    @cached_property
    def _index(self) -> dict[str, int]:
        """Id input name -> its feature in :attr:`ids` (only made when a view is asked for)."""
        return {name: k for k, name in enumerate(self.ids.names)}

    def __getitem__(self, name: str) -> RawInput:
        value = self.dense.get(name)
        if value is not None:
            return value
        return self.ids[self._index[name]]

    def __contains__(self, name: object) -> bool:
        return name in self.dense or name in self._index

    def __iter__(self) -> Iterator[str]:
        return itertools.chain(self.ids.names, self.dense)

    def __len__(self) -> int:
        return len(self.ids.names) + len(self.dense)


class FeaturePipeline:
    """The ops of every slot that has them, run on a batch of named raw inputs.

    The chains are compiled once: slots that select one id input and then run the same steps
    (e.g. every feature ``mod``-ed by one modulus) form a group whose steps run once over all
    their ids together, so a request's cost hardly grows with its number of features.

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
        self._names = tuple(self.slots)
        # every input once, with the first slot that selects it (the order inputs are checked in)
        self._uses: dict[str, str] = {}
        for slot, ops in self.slots.items():
            for name in _selected(ops):
                self._uses.setdefault(name, slot)
        self._id_inputs = frozenset(n for n, kind in self._kinds.items() if kind == "ids")
        self._dense_inputs = tuple(n for n, kind in self._kinds.items() if kind == "dense")
        self._drop = frozenset(self.slots) | (frozenset(self._kinds) - frozenset(self.plain))
        members: dict[tuple[_Step, ...], list[tuple[str, str]]] = {}
        singles: list[_Single] = []
        for slot, ops in self.slots.items():
            second = ops[1] if len(ops) > 1 else None
            if isinstance(second, Bucketize):
                boundaries = np.asarray(second.boundaries, np.float64)
                singles.append(_Single(slot, _selected(ops), boundaries, _compile_steps(ops[2:])))
            elif isinstance(second, Cross):
                singles.append(_Single(slot, _selected(ops), None, _compile_steps(ops[2:])))
            else:
                members.setdefault(_compile_steps(ops[1:]), []).append((slot, _selected(ops)[0]))
        self._groups = tuple(
            _Group(tuple(s for s, _ in m), tuple(n for _, n in m), steps) for steps, m in members.items()
        )
        self._singles = tuple(singles)
        self._piece_slots = [g.slots for g in self._groups] + [(s.slot,) for s in self._singles]
        # the output in slot order from the pieces (groups, then singles): runs of consecutive
        # slots that are consecutive members of one piece are one slice of that piece's ids
        where = {slot: (p, m) for p, g in enumerate(self._groups) for m, slot in enumerate(g.slots)}
        where.update({s.slot: (len(self._groups) + p, 0) for p, s in enumerate(self._singles)})
        runs: list[list[int]] = []
        for slot in self._names:
            p, m = where[slot]
            if runs and runs[-1][0] == p and runs[-1][2] == m:
                runs[-1][2] = m + 1
            else:
                runs.append([p, m, m + 1])
        self._runs = tuple((p, a, b) for p, a, b in runs)
        first_row = np.cumsum([0] + [len(g.slots) for g in self._groups] + [1] * len(self._singles))
        perm = np.array([first_row[where[s][0]] + where[s][1] for s in self._names], np.intp)
        self._perm = None if np.array_equal(perm, np.arange(perm.size)) else perm
        self._gathers: dict[tuple[str, ...], tuple[slice | list[int], ...] | None] = {}

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
                :class:`SparseFeature` of ``n`` rows (id inputs), or :class:`RawInputs`;
                extra names are ignored.
            max_ids: refuse (before making them) more ids than this from one cross.

        Returns:
            One :class:`SparseFeature` per slot with ops, named after the slot, in slot order.

        Raises:
            FeatureInputError: an input is missing, of the wrong kind, or the inputs disagree on
                the number of rows (naming the slot and the input).
        """
        if not self.slots:
            return []
        made: dict[str, SparseFeature] = {}
        for (ids, offsets), slots in zip(self._pieces(inputs, max_ids)[0], self._piece_slots):
            # views of each piece's ids: a training batch's ids are not copied into one layout
            lengths = offsets[:, 1:] - offsets[:, :-1]
            if len(slots) == 1:
                made[slots[0]] = SparseFeature._checked(slots[0], ids, offsets[0], lengths[0])
                continue
            bounds = np.zeros(len(slots) + 1, np.int64)
            np.cumsum(offsets[:, -1], out=bounds[1:])
            for m, slot in enumerate(slots):
                made[slot] = SparseFeature._checked(slot, ids[bounds[m] : bounds[m + 1]], offsets[m], lengths[m])
        return [made[slot] for slot in self._names]

    def apply_keyed(self, inputs: Mapping[str, RawInput], max_ids: int | None = None) -> KeyedIds:
        """:meth:`apply`, the slots' features in one :class:`KeyedIds` (what serving looks up).

        Raises:
            FeatureInputError: see :meth:`apply`.
        """
        return self._assemble(*self._pieces(inputs, max_ids))

    def _pieces(
        self, inputs: Mapping[str, RawInput], max_ids: int | None
    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
        """Each group's and each single slot's ``(ids, offsets [slots, rows + 1])``, and the rows."""
        gather = self._keyed_gather(inputs) if isinstance(inputs, RawInputs) else None
        keyed = inputs.ids if isinstance(inputs, RawInputs) else None
        rows = self._check(inputs) if gather is None or keyed is None else keyed.batch_size
        pieces = []
        for g, group in enumerate(self._groups):
            if gather is None or keyed is None:
                ids, offsets = _gather(inputs, group.inputs)
            else:
                ids, offsets = _gather_keyed(keyed, gather[g])
            pieces.append(_run_steps(group.steps, ids, offsets))
        for single in self._singles:
            pieces.append(self._run_single(single, inputs, rows, max_ids))
        return pieces, rows

    def features(self, inputs: Mapping[str, RawInput], sparse: Sequence[SparseFeature]) -> list[SparseFeature]:
        """A batch's features: the given ``sparse`` ones, less the slots the ops make and the
        inputs only the ops read (not slots of their own), then the ops' slots.

        Raises:
            FeatureInputError: see :meth:`apply`.
        """
        if not self.slots:
            return list(sparse)
        return [f for f in sparse if f.name not in self._drop] + self.apply(inputs)

    def _keyed_gather(self, inputs: RawInputs) -> tuple[slice | list[int], ...] | None:
        """Where each group's inputs lie in ``inputs.ids`` (a slice when together and in order),
        remembered per order of names; None when an input is missing or a dense input does not
        fit (then :meth:`_check` says which)."""
        names = inputs.ids.names
        try:
            gather = self._gathers[names]
        except KeyError:
            gather = None
            if self._id_inputs <= set(names):
                index = {n: k for k, n in enumerate(names)}
                positions = [[index[n] for n in group.inputs] for group in self._groups]
                gather = tuple(
                    slice(p[0], p[0] + len(p)) if p == list(range(p[0], p[0] + len(p))) else p for p in positions
                )
            if len(self._gathers) >= 64:  # clients keep to a few orders; bound it all the same
                self._gathers.clear()
            self._gathers[names] = gather
        if gather is None or not self._id_inputs and self._dense_inputs:
            return None  # no id input fixes the rows: the checks find them
        rows = inputs.ids.batch_size
        for name in self._dense_inputs:
            value = inputs.dense.get(name)
            if value is None or value.ndim not in (1, 2) or value.dtype.kind not in "fiu" or value.shape[0] != rows:
                return None
        return gather

    def _check(self, inputs: Mapping[str, RawInput]) -> int:
        """Every input the ops select is there, of its kind, all of one number of rows (returned).

        Raises:
            FeatureInputError: naming the first slot that selects the bad input, and the input.
        """
        rows: tuple[int, str] | None = None
        for name, slot in self._uses.items():
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
        return 0 if rows is None else rows[0]

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

    def _run_single(
        self, single: _Single, inputs: Mapping[str, RawInput], rows: int, max_ids: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if single.boundaries is not None:
            values = np.asarray(inputs[single.inputs[0]], np.float64)
            k = 1 if values.ndim == 1 else values.shape[1]
            ids = bucketize(values.reshape(-1), single.boundaries)
            offsets = np.arange(rows + 1, dtype=np.int64)[None] * k
        else:
            x, y = (inputs[name] for name in single.inputs)
            assert isinstance(x, SparseFeature) and isinstance(y, SparseFeature)
            try:
                ids, flat = cross((x.ids, x.offsets), (y.ids, y.offsets), max_ids)
            except FeatureInputError as exc:
                raise FeatureInputError(f"slot '{single.slot}': {exc}") from None
            offsets = flat[None]
        return _run_steps(single.steps, ids, offsets)

    def _assemble(self, pieces: list[tuple[np.ndarray, np.ndarray]], rows: int) -> KeyedIds:
        """The slots' features in slot order from the pieces' (groups', then singles') ids."""
        if not pieces:
            return KeyedIds((), np.zeros(0, np.uint64), np.zeros((0, rows + 1), np.int64))
        if len(self._runs) == 1:  # one group in slot order: its ids are the output as they are
            ids, offsets = pieces[0]
            return KeyedIds(self._names, ids, offsets)
        parts = []
        for p, a, b in self._runs:
            piece_ids, piece_offsets = pieces[p]
            if a == 0 and b == piece_offsets.shape[0]:
                parts.append(piece_ids)
            else:
                counts = piece_offsets[:, -1]
                start = int(counts[:a].sum())
                parts.append(piece_ids[start : start + int(counts[a:b].sum())])
        offsets = np.concatenate([o for _, o in pieces])
        return KeyedIds(self._names, np.concatenate(parts), offsets if self._perm is None else offsets[self._perm])


def _gather_keyed(keyed: KeyedIds, where: slice | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The ids and offsets of some of ``keyed``'s features, in ``where``'s order (no copy for a slice)."""
    bounds = keyed.bounds
    if isinstance(where, slice):
        return keyed.ids[bounds[where.start] : bounds[where.stop]], keyed.offsets[where]
    return np.concatenate([keyed.ids[bounds[k] : bounds[k + 1]] for k in where]), keyed.offsets[where]


def _gather(inputs: Mapping[str, RawInput], names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The ids of the named (checked) id inputs in :class:`KeyedIds`' layout."""
    features = [inputs[name] for name in names]
    if len(features) == 1:
        (only,) = features
        assert isinstance(only, SparseFeature)
        return only.ids, only.offsets[None]
    return (
        np.concatenate([f.ids for f in features]),  # type: ignore[union-attr]
        np.stack([f.offsets for f in features]),  # type: ignore[union-attr]
    )
