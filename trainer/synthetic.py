"""Synthetic Criteo-like data drawn from a planted logistic model, so a trained model's AUC can be
read against the best achievable (the Bayes AUC of the true probabilities).

Every random draw is a hash of ``(seed, row index, field)`` (splitmix64, vectorised in numpy), so
row ``i`` is the same whatever chunking produced it, any set of rows can be made directly (a rank
makes only its own rows) and nothing grows with the data.

The planted model, with ``d`` the transformed dense features of the row (as in
:attr:`trainer.data.Chunk.dense`) and ``ids_f`` the ids of sparse feature ``f``::

    logit = bias + beta . d + sum_f scale_f * mean_{id in ids_f} w_f(id)
            + gamma * mean a(ids_i) * mean b(ids_k)          (one pairwise interaction)
    label ~ Bernoulli(sigmoid(logit))

``w_f``, ``a`` and ``b`` are standard-normal-like values derived from a hash of the id, so no
weight table is stored; an empty id list contributes 0. ``bias`` is calibrated once at
construction so that about ``positive_rate`` of the labels are 1.

Ids follow a Zipf-like law over each feature's vocabulary (rank ``r`` has weight ``r**-s``) and
are hashed to ``id_bits``-bit values, as Criteo's hexadecimal categorical values are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedding_server.core.batch import SparseFeature
from trainer.data import Chunk, named_inputs, transform_dense
from trainer.metrics import roc_auc

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_CALIBRATION_ROWS = 20000


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on a uint64 array (returns a new array)."""
    x = x ^ (x >> np.uint64(30))
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _unit(h: np.ndarray) -> np.ndarray:
    """Hashes to floats uniform in (0, 1]."""
    return ((h >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0**-53


def _normal_from_hash(h: np.ndarray) -> np.ndarray:
    """Approximately standard normal values, one per hash: the sum of its four 16-bit parts
    (an Irwin-Hall sum, mean 0 and variance 1 after scaling)."""
    total = np.zeros(h.shape, np.float64)
    for shift in (0, 16, 32, 48):
        total += ((h >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.float64)
    return (total / 65536.0 - 2.0) * np.sqrt(3.0)


class SyntheticCriteo:
    """A deterministic, endless source of Criteo-like rows with a known true click probability.

    Args:
        seed: fixes the model and every row.
        num_dense: dense features (named ``I1..``).
        num_sparse: sparse features (named ``C1..``).
        vocab_sizes: ids per sparse feature: one int for all, a sequence of ``num_sparse``, or
            ``None`` for sizes spread log-uniformly over ``[1e3, 1e6]``.
        zipf_exponent: ``s`` of the id popularity law ``r**-s`` (``> 0``).
        missing_rates: per sparse feature, the chance a sample has no id; ``None`` gives most
            features a few percent and a handful 30-45 % (like Criteo's C19..C26).
        multi_id_features: how many of the last sparse features hold 1..``max_ids`` ids per
            sample instead of one (0, the default, keeps the data writable as Criteo TSV).
        max_ids: the most ids of a multi-id sample.
        positive_rate: the share of 1 labels the bias is calibrated to.
        sparse_signal: the standard deviation of the sparse part of the logit.
        dense_signal: the standard deviation (roughly) of the dense part of the logit.
        interaction: the weight ``gamma`` of the pairwise interaction (0 disables it).
        id_bits: ids are hashed to this many bits (32 like Criteo's, up to 64).

    Raises:
        ValueError: inconsistent sizes or out-of-range parameters.

    Example:
        >>> gen = SyntheticCriteo(seed=7)
        >>> chunk = gen.chunk(1000, start=5000)
        >>> chunk.dense.shape, len(chunk.sparse), 0.6 < gen.bayes_auc(gen.chunk(20000)) < 1.0
        ((1000, 13), 26, True)
    """

    def __init__(
        self,
        seed: int = 0,
        num_dense: int = 13,
        num_sparse: int = 26,
        vocab_sizes: int | Sequence[int] | None = None,
        zipf_exponent: float = 1.1,
        missing_rates: Sequence[float] | None = None,
        multi_id_features: int = 0,
        max_ids: int = 5,
        positive_rate: float = 0.25,
        sparse_signal: float = 1.4,
        dense_signal: float = 0.5,
        interaction: float = 0.6,
        id_bits: int = 32,
    ):
        if num_dense < 0 or num_sparse < 0 or not 0 <= multi_id_features <= num_sparse:
            raise ValueError("need num_dense >= 0, num_sparse >= 0 and 0 <= multi_id_features <= num_sparse")
        if zipf_exponent <= 0 or not 0 < positive_rate < 1 or max_ids < 1 or not 1 <= id_bits <= 64:
            raise ValueError("need zipf_exponent > 0, 0 < positive_rate < 1, max_ids >= 1, 1 <= id_bits <= 64")
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.dense_names = [f"I{i + 1}" for i in range(num_dense)]
        self.sparse_names = [f"C{i + 1}" for i in range(num_sparse)]
        self.vocab_sizes = self._vocab(vocab_sizes, num_sparse, rng)
        self.zipf_exponent = float(zipf_exponent)
        self.missing_rates = self._missing(missing_rates, num_sparse, rng)
        self.multi_id_features = multi_id_features
        self.max_ids = max_ids
        self.id_mask = np.uint64((1 << id_bits) - 1) if id_bits < 64 else np.uint64(2**64 - 1)
        # Dense features: x = floor(expm1(max(N(mu, sigma), 0))), integers >= 0; some missing.
        self.dense_mu = rng.uniform(0.3, 4.0, num_dense)
        self.dense_sigma = rng.uniform(0.6, 2.0, num_dense)
        self.dense_missing = np.where(
            rng.random(num_dense) < 0.3, rng.uniform(0.2, 0.45, num_dense), rng.uniform(0, 0.05, num_dense)
        )
        # The planted model.
        beta = rng.normal(size=num_dense)
        self.beta = beta * dense_signal / max(np.sqrt(np.sum((beta * self.dense_sigma) ** 2)), 1e-12)
        importance = rng.exponential(size=num_sparse)
        self.sparse_scale = importance * sparse_signal / max(np.sqrt(np.sum(importance**2)), 1e-12)
        self.interaction = float(interaction)
        self.pair = tuple(rng.choice(num_sparse, 2, replace=False)) if num_sparse >= 2 else None
        keys = rng.integers(0, 2**63, size=(5, max(num_sparse, num_dense, 1)), dtype=np.uint64)
        self._key_missing, self._key_rank, self._key_id, self._key_weight, self._key_dense = keys
        self._key_a, self._key_b, self._key_label, self._key_row, self._key_count = rng.integers(
            0, 2**63, 5, dtype=np.uint64
        )
        self.bias = 0.0
        self.bias = self._calibrate(positive_rate)

    # ----------------------------------------------------------------------- set-up

    @staticmethod
    def _vocab(vocab_sizes: int | Sequence[int] | None, n: int, rng: np.random.Generator) -> np.ndarray:
        if vocab_sizes is None:
            return np.round(10 ** rng.uniform(3, 6, n)).astype(np.int64)
        sizes = np.full(n, vocab_sizes, np.int64) if np.isscalar(vocab_sizes) else np.asarray(vocab_sizes, np.int64)
        if sizes.shape != (n,) or (sizes < 1).any():
            raise ValueError(f"vocab_sizes must be one positive int or {n} of them")
        return sizes

    @staticmethod
    def _missing(rates: Sequence[float] | None, n: int, rng: np.random.Generator) -> np.ndarray:
        if rates is None:
            high = rng.random(n) < 0.25
            return np.where(high, rng.uniform(0.3, 0.45, n), rng.uniform(0.0, 0.05, n))
        array = np.asarray(rates, np.float64)
        if array.shape != (n,) or (array < 0).any() or (array > 1).any():
            raise ValueError(f"missing_rates must be {n} values in [0, 1]")
        return array

    def _calibrate(self, positive_rate: float) -> float:
        logits = self.logits(self._features(np.arange(_CALIBRATION_ROWS, dtype=np.int64)))
        low, high = -20.0, 20.0
        for _ in range(60):
            mid = (low + high) / 2
            rate = np.mean(1.0 / (1.0 + np.exp(-(logits + mid))))
            low, high = (mid, high) if rate < positive_rate else (low, mid)
        return (low + high) / 2

    # ----------------------------------------------------------------------- rows

    def chunk(self, n: int, start: int = 0) -> Chunk:
        """Rows ``start .. start + n - 1``.

        Returns:
            A :class:`~trainer.data.Chunk` with ``raw_dense`` (integers, NaN where missing).
        """
        return self.rows(np.arange(start, start + n, dtype=np.int64))

    def rows(self, indices: np.ndarray) -> Chunk:
        """The rows with the given indices (any order; row ``i`` never depends on the others)."""
        rows = np.asarray(indices, np.int64)
        chunk = self._features(rows)
        u = _unit(_mix(self._row_hash(rows) ^ self._key_label))
        labels = (u < self.true_probability(chunk)).astype(np.float32).reshape(-1, 1)
        return Chunk(chunk.dense, chunk.sparse, labels, chunk.raw_dense, chunk.inputs)

    def _row_hash(self, rows: np.ndarray) -> np.ndarray:
        return _mix(rows.astype(np.uint64) * _GOLDEN + self._key_row)

    def _features(self, rows: np.ndarray) -> Chunk:
        row_hash = self._row_hash(rows)
        raw = self._dense(row_hash)
        sparse = [self._sparse(f, row_hash) for f in range(len(self.sparse_names))]
        inputs = named_inputs(self.dense_names, raw, sparse)
        return Chunk(transform_dense(raw), sparse, np.zeros((rows.shape[0], 1), np.float32), raw, inputs)

    def _dense(self, row_hash: np.ndarray) -> np.ndarray:
        k = len(self.dense_names)
        h = _mix(row_hash[:, None] ^ self._key_dense[None, :k])
        z = _normal_from_hash(h)
        raw = np.floor(np.expm1(np.maximum(self.dense_mu + self.dense_sigma * z, 0.0)))
        raw[_unit(_mix(h ^ _GOLDEN)) <= self.dense_missing] = np.nan
        return raw

    def _sparse(self, f: int, row_hash: np.ndarray) -> SparseFeature:
        name = self.sparse_names[f]
        h = _mix(row_hash ^ self._key_missing[f])
        present = _unit(h) > self.missing_rates[f]
        multi = f >= len(self.sparse_names) - self.multi_id_features
        counts = present.astype(np.int64)
        if multi:
            counts *= 1 + (_unit(_mix(h ^ self._key_count)) * self.max_ids).astype(np.int64).clip(0, self.max_ids - 1)
        offsets = np.zeros(row_hash.shape[0] + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        if multi:  # the j-th id of a sample draws from (row, feature, j)
            slot = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], counts)
            draw = _mix(np.repeat(row_hash, counts) ^ self._key_rank[f] ^ (slot.astype(np.uint64) * _GOLDEN))
        else:  # the same draw as slot 0 above
            draw = _mix(row_hash[present] ^ self._key_rank[f])
        ranks = self._zipf_ranks(_unit(draw), int(self.vocab_sizes[f]))
        ids = _mix(ranks.astype(np.uint64) * _GOLDEN ^ self._key_id[f]) & self.id_mask
        return SparseFeature(name, ids, offsets)

    def _zipf_ranks(self, u: np.ndarray, vocab: int) -> np.ndarray:
        """Ranks in ``[1, vocab]`` with ``P(r) ~ r**-s``, by inverting the continuous law's CDF."""
        s = self.zipf_exponent
        if abs(s - 1.0) < 1e-9:
            x = np.exp(u * np.log(vocab + 1.0))
        else:
            top = (vocab + 1.0) ** (1.0 - s)
            x = (1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - s))
        return np.clip(np.floor(x), 1, vocab).astype(np.int64)

    # ----------------------------------------------------------------------- the planted model

    def logits(self, chunk: Chunk) -> np.ndarray:
        """The true logit of each row of ``chunk`` (made by this generator, or read back from a
        file it was written to), from its dense matrix and its sparse features by name.

        Raises:
            KeyError: the chunk lacks one of the generator's sparse features.
        """
        logit = self.bias + chunk.dense[:, : len(self.dense_names)].astype(np.float64) @ self.beta
        for f, name in enumerate(self.sparse_names):
            logit += self.sparse_scale[f] * self._mean_hashed(chunk.feature(name), self._key_weight[f])
        if self.pair is not None and self.interaction:
            i, k = self.pair
            a = self._mean_hashed(chunk.feature(self.sparse_names[i]), self._key_a)
            b = self._mean_hashed(chunk.feature(self.sparse_names[k]), self._key_b)
            logit += self.interaction * a * b
        return logit

    @staticmethod
    def _mean_hashed(feature: SparseFeature, key: np.uint64) -> np.ndarray:
        """Per sample, the mean of the hidden weights of its ids (0 for an empty list)."""
        weights = _normal_from_hash(_mix(feature.ids ^ key))
        lengths = feature.lengths
        owner = np.repeat(np.arange(lengths.shape[0]), lengths)
        sums = np.bincount(owner, weights=weights, minlength=lengths.shape[0])
        return sums / np.maximum(lengths, 1)

    def true_probability(self, chunk: Chunk) -> np.ndarray:
        """The planted click probability of each row, float64 ``[n]``."""
        return 1.0 / (1.0 + np.exp(-self.logits(chunk)))

    def bayes_auc(self, chunk: Chunk) -> float:
        """The AUC of the true probabilities against the chunk's labels: what a perfect model
        would score on these rows."""
        return roc_auc(chunk.labels[:, 0], self.true_probability(chunk))
