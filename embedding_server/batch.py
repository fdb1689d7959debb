"""Named sparse features of a batch: per sample, a variable-length list of uint64 ids.

A :class:`SparseFeature` keeps a feature's ids flat (``ids``) with ``offsets`` marking where each
sample's list starts, the CSR layout ``torch.nn.functional.embedding_bag`` and Arrow use.

Example:
    >>> f = SparseFeature.from_lists("user", [np.array([3, 5], np.uint64), np.array([], np.uint64)])
    >>> f.batch_size, f.ids.tolist(), f.offsets.tolist()
    (2, [3, 5], [0, 2, 2])
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from embedding_server.config import EmbeddingConfig
from embedding_server.errors import InvalidRequestError, describe_value


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
            raise InvalidRequestError(f"feature '{self.name}': ids must be a 1-D uint64 array, got {describe_value(self.ids)}")
        off = self.offsets
        if not isinstance(off, np.ndarray) or off.dtype != np.int64 or off.ndim != 1 or off.shape[0] < 1:
            raise InvalidRequestError(f"feature '{self.name}': offsets must be a 1-D int64 array of batch_size + 1 entries")
        lengths = off[1:] - off[:-1]
        if off[0] != 0 or off[-1] != self.ids.shape[0] or (lengths < 0).any():
            raise InvalidRequestError(
                f"feature '{self.name}': offsets must rise from 0 to the number of ids ({self.ids.shape[0]})"
            )
        object.__setattr__(self, "lengths", lengths)  # fills the cached property: computed once

    @classmethod
    def from_lists(cls, name: str, samples: Sequence[object]) -> "SparseFeature":
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
    def many(
        cls, names: Sequence[str], ids: Sequence[np.ndarray], offsets: Sequence[np.ndarray] | np.ndarray
    ) -> list["SparseFeature"]:
        """Features of one batch, validated together.

        The same checks as the constructor, done with one set of numpy calls for all features
        instead of one per feature: decoding a request of 26 features spent most of its time
        in per-feature validation.

        Args:
            names: feature names.
            ids: each feature's uint64 ids.
            offsets: each feature's int64 offsets, all of one length, or them as the rows of
                one ``[features, batch_size + 1]`` int64 array.

        Raises:
            InvalidRequestError: as the constructor, naming the first bad feature.
        """
        if not len(names) == len(ids) == len(offsets):
            raise ValueError(f"{len(names)} names, {len(ids)} id arrays and {len(offsets)} offsets arrays")
        if len(names) == 0:
            return []
        table = offsets if isinstance(offsets, np.ndarray) and offsets.ndim == 2 else None
        if table is None and all(
            isinstance(o, np.ndarray) and o.dtype == _INT64 and o.ndim == 1 and o.shape == offsets[0].shape for o in offsets
        ):
            table = np.stack(offsets)
        ids_ok = all(isinstance(i, np.ndarray) and i.dtype == _UINT64 and i.ndim == 1 for i in ids)
        if table is not None and ids_ok and table.dtype == _INT64 and table.shape[1] >= 1:
            lengths = table[:, 1:] - table[:, :-1]
            counts = np.fromiter((i.shape[0] for i in ids), np.int64, len(ids))
            if not (table[:, 0].any() or (table[:, -1] != counts).any() or (lengths < 0).any()):
                return [cls._checked(n, i, o, l) for n, i, o, l in zip(names, ids, offsets, lengths)]
        return [cls(n, i, o) for n, i, o in zip(names, ids, offsets)]  # raises, naming the bad feature

    @classmethod
    def _checked(cls, name: str, ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> "SparseFeature":
        """A feature whose arrays :meth:`many` has validated: skips the constructor's checks."""
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


def check_batch(features: Sequence[SparseFeature], config: EmbeddingConfig) -> int:
    """Validate a batch against the config; returns its batch size.

    Raises:
        InvalidRequestError: no features, an unknown or repeated feature, disagreeing batch sizes,
            or an empty batch.
    """
    if not features:
        raise InvalidRequestError("empty batch: no sparse features given")
    seen: set[str] = set()
    for f in features:
        if f.name not in config.slots_config:
            raise InvalidRequestError(
                f"unknown feature '{f.name}'; embedding_config.yml defines: {', '.join(config.slots_config)}"
            )
        if f.name in seen:
            raise InvalidRequestError(f"feature '{f.name}' appears twice in the batch")
        seen.add(f.name)
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
            raise InvalidRequestError(
                f"feature '{name}', sample {index}: ids must be uint64, got {sample.dtype}"
            )
        if sample.ndim != 1:
            raise InvalidRequestError(f"feature '{name}', sample {index}: ids must be 1-D, got shape {sample.shape}")
        return sample
    if isinstance(sample, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in sample):
            raise InvalidRequestError(f"feature '{name}', sample {index}: ids must be integers")
        if any(v < 0 or v >= 2**64 for v in sample):
            raise InvalidRequestError(f"feature '{name}', sample {index}: ids must be in [0, 2**64)")
        return np.array(sample, np.uint64)
    raise InvalidRequestError(f"feature '{name}', sample {index}: expected a uint64 array or a list, got {type(sample).__name__}")

