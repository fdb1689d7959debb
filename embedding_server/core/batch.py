"""Named sparse features of a batch: per sample, a variable-length list of uint64 ids.

A :class:`SparseFeature` keeps a feature's ids flat (``ids``) with ``offsets`` marking where each
sample's list starts, the CSR layout ``torch.nn.functional.embedding_bag`` and Arrow use.

Example:
    >>> f = SparseFeature.from_lists("user", [np.array([3, 5], np.uint64), np.array([], np.uint64)])
    >>> f.batch_size, f.ids.tolist(), f.offsets.tolist()
    (2, [3, 5], [0, 2, 2])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from embedding_server.core import batch_kernels
from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.errors import InvalidRequestError, describe_value

_INT64 = np.dtype(np.int64)
_UINT64 = np.dtype(np.uint64)


@dataclass(frozen=True)
class SparseFeature:
    """One feature's ids for a whole batch.

    Args:
        name: the feature name from ``embedding_config.yml``.
        ids: uint64 ids of all samples, concatenated.
        offsets: int64 ``[batch_size + 1]``; sample ``i`` owns ``ids[offsets[i]:offsets[i+1]]``.

    Raises:
        InvalidRequestError: wrong dtypes, or offsets that do not describe ``ids``.
    """

    name: str
    ids: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.ids, np.ndarray) or self.ids.dtype != np.uint64 or self.ids.ndim != 1:
            raise InvalidRequestError(
                f"feature '{self.name}': ids must be a 1-D uint64 array, got {describe_value(self.ids)}"
            )
        off = self.offsets
        if not isinstance(off, np.ndarray) or off.dtype != np.int64 or off.ndim != 1 or off.shape[0] < 1:
            raise InvalidRequestError(
                f"feature '{self.name}': offsets must be a 1-D int64 array of batch_size + 1 entries"
            )
        lengths = off[1:] - off[:-1]
        if off[0] != 0 or off[-1] != self.ids.shape[0] or (lengths < 0).any():
            raise InvalidRequestError(
                f"feature '{self.name}': offsets must rise from 0 to the number of ids ({self.ids.shape[0]})"
            )
        object.__setattr__(self, "lengths", lengths)  # fills the cached property: computed once

    @classmethod
    def from_lists(cls, name: str, samples: Sequence[object]) -> SparseFeature:
        """Build from one id array (or list of non-negative ints) per sample.

        Raises:
            InvalidRequestError: a sample is not 1-D, holds a non-uint64 dtype or a negative id.
        """
        arrays = [_as_ids(name, i, s) for i, s in enumerate(samples)]
        lengths = np.fromiter((a.shape[0] for a in arrays), np.int64, len(arrays))
        offsets = np.zeros(len(arrays) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.concatenate(arrays) if arrays else np.zeros(0, np.uint64)
        return cls(name, ids.astype(np.uint64, copy=False), offsets)

    @classmethod
    def _checked(cls, name: str, ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> SparseFeature:
        """A feature whose arrays :class:`KeyedIds` has validated: skips the constructor's checks."""
        feature = object.__new__(cls)
        # What __init__ and __post_init__ would set (lengths fills the cached property);
        # writing __dict__ is how a frozen dataclass is filled without its __setattr__.
        feature.__dict__.update(name=name, ids=ids, offsets=offsets, lengths=lengths)
        return feature

    @property
    def batch_size(self) -> int:
        return self.offsets.shape[0] - 1

    @cached_property
    def lengths(self) -> np.ndarray:
        """Ids per sample (set by the validation; pooling asks for it several times per lookup)."""
        return self.offsets[1:] - self.offsets[:-1]


class KeyedIds(Sequence[SparseFeature]):
    """Every sparse feature of one batch in one flat layout (what TorchRec calls a keyed jagged
    tensor): the ids of all features concatenated, and one offsets table.

    Serving handles a whole request's features with a few numpy calls on these arrays instead
    of a few calls per feature (a Criteo request has 26 features, and per-feature Python work
    cost more than the lookup itself). It is also a sequence of :class:`SparseFeature` views,
    so code written for a list of features takes it as it is.

    Args:
        names: feature names, each once.
        ids: uint64 ids of feature 0, then of feature 1, ...
        offsets: int64 ``[features, batch_size + 1]``; row ``k`` rises from 0 to feature ``k``'s
            id count, sample ``i`` of feature ``k`` owning ids ``offsets[k, i]:offsets[k, i + 1]``
            of that feature.

    Raises:
        InvalidRequestError: wrong dtypes or shapes, a repeated name, or offsets that do not
            describe ``ids`` (naming the first bad feature).

    Example:
        >>> keyed = KeyedIds.from_features([SparseFeature.from_lists("a", [[1, 2], []]),
        ...                                 SparseFeature.from_lists("b", [[3], [4]])])
        >>> keyed.ids.tolist(), keyed.lengths.tolist(), keyed[1].ids.tolist()
        ([1, 2, 3, 4], [[2, 0], [1, 1]], [3, 4])
    """

    def __init__(self, names: Sequence[str], ids: np.ndarray, offsets: np.ndarray):
        self.names = tuple(names)
        if not isinstance(ids, np.ndarray) or ids.dtype != _UINT64 or ids.ndim != 1:
            raise InvalidRequestError(f"ids must be a 1-D uint64 array, got {describe_value(ids)}")
        if (
            not isinstance(offsets, np.ndarray)
            or offsets.dtype != _INT64
            or offsets.ndim != 2
            or offsets.shape[0] != len(self.names)
            or offsets.shape[1] < 1
        ):
            raise InvalidRequestError(
                f"offsets must be an int64 array [{len(self.names)} features, batch_size + 1], got {describe_value(offsets)}"
            )
        if len(set(self.names)) != len(self.names):
            raise InvalidRequestError(
                f"a sparse feature appears twice: {sorted({n for n in self.names if self.names.count(n) > 1})}"
            )
        lengths = np.empty((offsets.shape[0], offsets.shape[1] - 1), np.int64)
        bounds = np.empty(offsets.shape[0] + 1, np.int64)
        bad = batch_kernels.check_offsets(offsets, lengths, bounds)
        if bad >= 0:
            raise InvalidRequestError(f"feature '{self.names[bad]}': offsets must rise from 0 to the number of ids")
        if bounds[-1] != ids.shape[0]:
            raise InvalidRequestError(
                f"the features' offsets describe {int(bounds[-1])} ids, but {ids.shape[0]} ids were given"
            )
        self.ids, self.offsets, self.lengths, self.bounds = ids, offsets, lengths, bounds

    @classmethod
    def from_features(cls, features: Sequence[SparseFeature]) -> KeyedIds:
        """The features (each valid, all of one batch size) in one layout; ``features`` itself
        when it already is one.

        Raises:
            InvalidRequestError: features disagreeing on the batch size, or a repeated name.
        """
        if isinstance(features, KeyedIds):
            return features
        sizes = {f.batch_size for f in features}
        if len(sizes) > 1:
            raise InvalidRequestError(
                f"features disagree on the batch size: { {f.name: f.batch_size for f in features} }"
            )
        offsets = np.stack([f.offsets for f in features]) if features else np.zeros((0, 1), np.int64)
        ids = np.concatenate([f.ids for f in features]) if features else np.zeros(0, np.uint64)
        return cls([f.name for f in features], ids, offsets)

    @property
    def batch_size(self) -> int:
        return self.offsets.shape[1] - 1

    @property
    def counts(self) -> np.ndarray:
        """Ids per feature, int64 ``[features]``."""
        return self.offsets[:, -1]

    def select(self, names: Sequence[str]) -> KeyedIds:
        """These features (a subset, in this order) in a new layout; ``self`` when it is already that."""
        if tuple(names) == self.names:
            return self
        index = {n: k for k, n in enumerate(self.names)}
        picked = [index[n] for n in names]
        ids = (
            np.concatenate([self.ids[self.bounds[k] : self.bounds[k + 1]] for k in picked]) if picked else self.ids[:0]
        )
        return KeyedIds(names, ids, self.offsets[picked])

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, k):  # a SparseFeature view (validated here already)
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        k = range(len(self))[k]
        ids = self.ids[self.bounds[k] : self.bounds[k + 1]]
        return SparseFeature._checked(self.names[k], ids, self.offsets[k], self.lengths[k])

    def __repr__(self) -> str:
        return f"KeyedIds(names={list(self.names)}, batch_size={self.batch_size}, ids={self.ids.shape[0]})"


def check_batch(features: Sequence[SparseFeature], config: EmbeddingConfig) -> int:
    """Validate a batch against the config; returns its batch size.

    Raises:
        InvalidRequestError: no features, an unknown or repeated feature, disagreeing batch sizes,
            or an empty batch.
    """
    if not features:
        raise InvalidRequestError("empty batch: no sparse features given")
    names = features.names if isinstance(features, KeyedIds) else [f.name for f in features]
    unknown = [n for n in names if n not in config.slots_config]
    if unknown:
        raise InvalidRequestError(
            f"unknown feature '{unknown[0]}'; embedding_config.yml defines: {', '.join(config.slots_config)}"
        )
    if len(set(names)) != len(names):
        raise InvalidRequestError(
            f"feature '{next(n for n in names if names.count(n) > 1)}' appears twice in the batch"
        )
    if isinstance(features, KeyedIds):
        batch_size = features.batch_size  # one offsets table: the features agree
    else:
        sizes = {f.name: f.batch_size for f in features}
        if len(set(sizes.values())) != 1:
            raise InvalidRequestError(f"features disagree on the batch size: {sizes}")
        batch_size = next(iter(sizes.values()))
    if batch_size == 0:
        raise InvalidRequestError("empty batch: batch size is 0")
    return batch_size


def _as_ids(name: str, index: int, sample: object) -> np.ndarray:
    if isinstance(sample, np.ndarray):
        if sample.dtype != np.uint64:
            raise InvalidRequestError(f"feature '{name}', sample {index}: ids must be uint64, got {sample.dtype}")
        if sample.ndim != 1:
            raise InvalidRequestError(f"feature '{name}', sample {index}: ids must be 1-D, got shape {sample.shape}")
        return sample
    if isinstance(sample, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in sample):
            raise InvalidRequestError(f"feature '{name}', sample {index}: ids must be integers")
        if any(v < 0 or v >= 2**64 for v in sample):
            raise InvalidRequestError(f"feature '{name}', sample {index}: ids must be in [0, 2**64)")
        return np.array(sample, np.uint64)
    raise InvalidRequestError(
        f"feature '{name}', sample {index}: expected a uint64 array or a list, got {type(sample).__name__}"
    )
