"""Raw inputs in prediction requests: named dense values and id lists that the served version's
feature ops (:mod:`embedding_server.core.feature_ops`) turn into the model's sparse features.

A request may carry, beside (or instead of) the model's features, the raw inputs its version's
ops read, so clients send raw rows and the handler applies exactly the transforms the version
was trained with. The response is the one the pre-transformed ids would get.

JSON: an ``"inputs"`` object, per input one entry per sample: a number or a list of numbers for
a dense input, a list of ids for an id input, where an id is a non-negative integer or a string
(hashed to an id with FarmHash's ``Fingerprint64``, as the data readers hash string columns)::

    {"dense": [[0.1, ...], ...],
     "inputs": {"dense2": [0.3, 0.8], "sparse1": [[4], [7]], "sparse5": [["ab", "cd"], []]}}

Batch bytes: raw id inputs travel as sparse features, raw dense inputs as extra dense parts at
the end, and the batch's meta key :data:`RAW_INPUTS_KEY` names them (:func:`add_raw_inputs`
builds such a batch)::

    meta["ctrserve.raw_inputs"] = '{"ids": ["sparse1", "sparse5"], "dense": ["dense2"]}'

When a request carries raw inputs, every slot with ops is computed from them (sending such a
slot's ids as well is refused), and a slot without ops may come from the raw input of its own
name. Nothing here imports TorchServe.

Example:
    >>> data = add_raw_inputs(BatchData(), {"dense2": np.array([0.3, 0.8]), "sparse5": [["ab"], []]})
    >>> sorted(split_raw_inputs(data))
    ['dense2', 'sparse5']
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from embedding_server.core.batch import KeyedIds, SparseFeature
from embedding_server.core.batch_codec import BatchData
from embedding_server.core.errors import InvalidRequestError
from embedding_server.core.farmhash import fingerprint64_strings
from embedding_server.core.feature_ops import FeatureInputError, FeaturePipeline, RawInput, RawInputs

#: The batch meta key that names a batch's raw inputs (JSON: ``{"ids": [...], "dense": [...]}``).
RAW_INPUTS_KEY = "ctrserve.raw_inputs"


def id_lists(name: str, rows: Any) -> SparseFeature:
    """One id list per sample, ids as non-negative integers or strings (FarmHash Fingerprint64).

    Raises:
        InvalidRequestError: not a list of lists, or an id that is neither.
    """
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise InvalidRequestError(f"input '{name}' must be a list with one list of ids per sample")
    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = [v for r in rows for v in r]  # the JSON parser made these objects already, one per id
    if all(isinstance(v, str) for v in flat):
        ids = fingerprint64_strings(pa.array(flat, pa.string())) if flat else np.zeros(0, np.uint64)
    elif all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64 for v in flat):
        ids = np.array(flat, np.uint64)
    else:
        strings = np.fromiter((isinstance(v, str) for v in flat), bool, len(flat))
        ints = [v for v, s in zip(flat, strings) if not s]
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64 for v in ints):
            bad = next(v for v in ints if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64))
            raise InvalidRequestError(f"input '{name}': ids must be integers in [0, 2**64) or strings, got {bad!r}")
        ids = np.empty(len(flat), np.uint64)
        ids[strings] = fingerprint64_strings(pa.array([v for v, s in zip(flat, strings) if s], pa.string()))
        ids[~strings] = np.array(ints, np.uint64)
    return SparseFeature(name, ids, offsets)


def dense_values(name: str, rows: Any) -> np.ndarray:
    """A number, or a list of numbers (all rows the same length), per sample: float64 ``[n]`` or ``[n, k]``.

    Raises:
        InvalidRequestError: anything else, or a non-finite value.
    """
    ok = isinstance(rows, (list, np.ndarray))
    if ok and isinstance(rows, list):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rows)
        lists = not numbers and all(
            isinstance(r, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)
            for r in rows
        )
        ok = numbers or lists
        if lists and len({len(r) for r in rows}) > 1:
            raise InvalidRequestError(f"input '{name}': rows have different lengths {sorted({len(r) for r in rows})}")
    values = np.asarray(rows, np.float64) if ok else None
    if values is None or values.ndim not in (1, 2):
        raise InvalidRequestError(f"input '{name}' must hold a number or a list of numbers per sample")
    if values.size and not np.isfinite(values).all():
        raise InvalidRequestError(f"input '{name}': values must be finite (NaN or infinity given)")
    return values


def add_raw_inputs(data: BatchData, inputs: Mapping[str, RawInput | list]) -> BatchData:
    """Add raw inputs to a batch (what a client sends): dense ones as float64 parts at the end,
    id ones as sparse features, their names under :data:`RAW_INPUTS_KEY`.

    Args:
        data: the batch (its dense and sparse parts are the model's own).
        inputs: name -> float values (an array ``[n]`` / ``[n, k]``, or a list of numbers), a
            :class:`SparseFeature`, or a list with one list of ids (integers or strings) per sample.

    Returns:
        ``data``, changed.

    Raises:
        InvalidRequestError: a malformed input, or a name given twice.
    """
    if RAW_INPUTS_KEY in data.meta:
        raise InvalidRequestError(f"the batch already carries raw inputs ({RAW_INPUTS_KEY})")
    ids_names, dense_names = [], []
    given = {f.name for f in data.sparse}
    for name, value in inputs.items():
        if name in given:
            raise InvalidRequestError(
                f"feature '{name}' given as ids and made from raw inputs (input '{name}'): send one or the other"
            )
        if isinstance(value, SparseFeature) or (isinstance(value, list) and all(isinstance(r, list) for r in value)):
            feature = value if isinstance(value, SparseFeature) else id_lists(name, value)
            data.sparse = [*data.sparse, SparseFeature._checked(name, feature.ids, feature.offsets, feature.lengths)]
            ids_names.append(name)
        else:
            values = dense_values(name, value)
            data.dense.append(values.reshape(values.shape[0], -1))
            dense_names.append(name)
    data.meta[RAW_INPUTS_KEY] = json.dumps({"ids": ids_names, "dense": dense_names})
    return data


def json_inputs(body: Any, data: BatchData, kinds: Mapping[str, str]) -> None:
    """Add the ``"inputs"`` object of a JSON request to ``data``, each input read as the kind
    the model reads it as (``kinds``: name -> ``dense`` or ``ids``).

    Raises:
        InvalidRequestError: not an object, an input the model does not read, or a malformed one.
    """
    if not isinstance(body, dict) or not body:
        raise InvalidRequestError("'inputs' must be an object mapping each raw input to one value per sample")
    parsed: dict[str, RawInput] = {}
    for name, rows in body.items():
        kind = kinds.get(name)
        if kind is None:
            raise InvalidRequestError(
                f"unknown input {name!r}; the model reads the inputs: {', '.join(kinds) or '(none)'}"
            )
        parsed[name] = dense_values(name, rows) if kind == "dense" else id_lists(name, rows)
    add_raw_inputs(data, parsed)


def split_raw_inputs(data: BatchData) -> Mapping[str, RawInput]:
    """Take a batch's raw inputs out of it (see :data:`RAW_INPUTS_KEY`); ``{}`` when it has none.

    Returns:
        input name -> its value; for decoded batch bytes (whose features are one
        :class:`KeyedIds`) a :class:`RawInputs` holding the id inputs as they were decoded.

    Raises:
        InvalidRequestError: the meta entry is malformed or names parts the batch lacks.
    """
    raw = data.meta.pop(RAW_INPUTS_KEY, None)
    if raw is None:
        return {}
    try:
        names = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        names = None
    if (
        not isinstance(names, dict)
        or set(names) != {"ids", "dense"}
        or not all(isinstance(v, list) and all(map(str.__instancecheck__, v)) for v in names.values())
    ):
        raise InvalidRequestError(
            f'batch meta \'{RAW_INPUTS_KEY}\' must be JSON {{"ids": [names], "dense": [names]}}, got {raw!r}'
        )
    ids_names, dense_names = names["ids"], names["dense"]
    if len(set(ids_names + dense_names)) != len(ids_names) + len(dense_names):
        raise InvalidRequestError(f"batch meta '{RAW_INPUTS_KEY}' names an input twice")
    if len(dense_names) > len(data.dense):
        raise InvalidRequestError(
            f"batch meta '{RAW_INPUTS_KEY}' names {len(dense_names)} dense inputs, the batch has {len(data.dense)} dense parts"
        )
    sparse = data.sparse
    sparse_names = sparse.names if isinstance(sparse, KeyedIds) else tuple(f.name for f in sparse)
    taken, present = set(ids_names), set(sparse_names)
    missing = [n for n in ids_names if n not in present]
    if missing:
        raise InvalidRequestError(f"batch meta '{RAW_INPUTS_KEY}' names id inputs the batch lacks: {missing}")
    dense: dict[str, np.ndarray] = {}
    first = len(data.dense) - len(dense_names)
    for name, part in zip(dense_names, data.dense[first:]):
        values = np.asarray(part, np.float64)
        if values.size and not np.isfinite(values).all():
            raise InvalidRequestError(f"input '{name}': values must be finite (NaN or infinity given)")
        dense[name] = values
    data.dense = data.dense[:first]
    if isinstance(sparse, KeyedIds):  # decoded bytes: split the layout, no object per feature
        kept = [n for n in sparse_names if n not in taken]
        data.sparse = sparse.select(kept) if kept else []
        return RawInputs(sparse.select([n for n in sparse_names if n in taken]), dense)
    inputs: dict[str, RawInput] = {f.name: f for f in sparse if f.name in taken}
    data.sparse = [f for f in sparse if f.name not in taken]
    return {**inputs, **dense}


class RawFeatures:
    """A served version's way from raw inputs to its features.

    Args:
        pipeline: the version's feature ops.
        feature_names: the features the model takes.

    Example:
        >>> raw = RawFeatures(spec.feature_pipeline(), [f.name for f in spec.features])  # doctest: +SKIP
        >>> features = raw.features(inputs, given, max_ids=4_000_000)  # doctest: +SKIP
    """

    def __init__(self, pipeline: FeaturePipeline, feature_names: Sequence[str]):
        self.pipeline = pipeline
        self.computed = frozenset(pipeline.slot_names)
        self.plain = [n for n in feature_names if n not in self.computed]
        self.known = {**{n: "ids" for n in self.plain}, **pipeline.input_names}
        self._known = frozenset(self.known)

    def features(
        self, inputs: Mapping[str, RawInput], given: Sequence[SparseFeature], max_ids: int | None = None
    ) -> Sequence[SparseFeature]:
        """The request's features: those it gave, those the ops compute, and plain slots read
        from raw inputs of their names (one :class:`KeyedIds` when the ops make them all).

        Raises:
            InvalidRequestError: an unknown input, a slot both given and computed, an input the
                ops cannot use (naming it), or a cross over ``max_ids``.
        """
        unknown = sorted(set(inputs) - self._known)
        if unknown:
            raise InvalidRequestError(
                f"unknown input{'s' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)}; the model "
                f"reads the inputs: {', '.join(self.known) or '(none)'}"
            )
        given_names = set(given.names) if isinstance(given, KeyedIds) else {f.name for f in given}
        twice = sorted(given_names & (self.computed | {n for n in self.plain if n in inputs}))
        if twice:
            raise InvalidRequestError(
                f"feature{'s' if len(twice) > 1 else ''} {', '.join(repr(n) for n in twice)} given as ids and made "
                "from raw inputs: send one or the other"
            )
        computed = self.pipeline.apply_keyed(inputs, max_ids) if self.computed else []
        read = []
        for name in self.plain:
            value = inputs.get(name)
            if value is None:
                continue
            if not isinstance(value, SparseFeature):
                raise FeatureInputError(
                    f"input '{name}' feeds feature '{name}' (no ops): it must be ids, got dense values"
                )
            read.append(SparseFeature._checked(name, value.ids, value.offsets, value.lengths))
        if not given and not read and isinstance(computed, KeyedIds):
            return computed  # the ops made every feature: already the layout the lookup takes
        return [*given, *computed, *read]
