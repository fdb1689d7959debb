"""Training metrics over numpy arrays (no scikit-learn needed): the exact ROC AUC, a streaming
bucketed AUC that merges across data-parallel ranks, group AUC (GAUC) and log loss."""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative
    (ties count one half), via the Mann-Whitney rank sum with tied scores sharing their mean rank.

    Args:
        labels: 0/1 labels (any shape; flattened).
        scores: predicted scores of the same size.

    Returns:
        The AUC, or NaN when only one class is present.

    Example:
        >>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
        0.75
    """
    labels = np.asarray(labels).reshape(-1) > 0.5
    scores = np.asarray(scores, np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels ({labels.shape[0]}) and scores ({scores.shape[0]}) differ in size")
    positives = int(labels.sum())
    negatives = labels.shape[0] - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Mean 1-based rank of each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], sorted_scores.shape[0]]
    run_ranks = (starts + ends + 1) / 2.0
    ranks = np.empty_like(scores)
    ranks[order] = np.repeat(run_ranks, ends - starts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to ``[eps, 1 - eps]``)."""
    y = np.asarray(labels, np.float64).reshape(-1)
    p = np.clip(np.asarray(probabilities, np.float64).reshape(-1), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


class BucketedAUC:
    """A streaming ROC AUC over probabilities in ``[0, 1]``: per score bucket, the count of
    positives and of negatives. Memory is fixed whatever the number of samples, and two
    counters merge by adding their counts, so data-parallel ranks each count their share and
    :meth:`all_reduce` gives every rank the AUC of all of them.

    Pairs of a positive and a negative in the same bucket count one half, as ties do in
    :func:`roc_auc`; the result differs from the exact AUC by at most half the share of such
    pairs (small with thousands of buckets).

    Args:
        buckets: how many equal-width score buckets ``[0, 1]`` is cut into (>= 2).

    Raises:
        ValueError: fewer than 2 buckets; labels and scores of different sizes.

    Example:
        >>> auc = BucketedAUC(buckets=1000)
        >>> auc.update(np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.3, 0.6]))
        >>> auc.value()
        1.0
    """

    def __init__(self, buckets: int = 10_000):
        if buckets < 2:
            raise ValueError(f"buckets must be >= 2, got {buckets}")
        self.buckets = buckets
        self.counts = np.zeros((2, buckets), np.int64)  # row 0: negatives, row 1: positives

    def update(self, labels: np.ndarray, scores: np.ndarray) -> None:
        """Count a batch: 0/1 ``labels`` (> 0.5 is positive) and probabilities ``scores``
        (clipped to ``[0, 1]``), any shape, flattened."""
        y = np.asarray(labels).reshape(-1) > 0.5
        p = np.asarray(scores, np.float64).reshape(-1)
        if y.shape != p.shape:
            raise ValueError(f"labels ({y.shape[0]}) and scores ({p.shape[0]}) differ in size")
        bucket = np.clip((p * self.buckets).astype(np.int64), 0, self.buckets - 1)
        self.counts += np.bincount(y * self.buckets + bucket, minlength=2 * self.buckets).reshape(2, self.buckets)

    def merge(self, other: BucketedAUC) -> BucketedAUC:
        """Add ``other``'s counts to this counter's (both must have the same buckets); returns self."""
        if other.buckets != self.buckets:
            raise ValueError(f"cannot merge an AUC of {other.buckets} buckets into one of {self.buckets}")
        self.counts += other.counts
        return self

    def all_reduce(self) -> BucketedAUC:
        """Sum the counts over the ranks of the default ``torch.distributed`` process group
        (nothing to do outside one); returns self."""
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            counts = torch.from_numpy(self.counts.copy())
            dist.all_reduce(counts)
            self.counts = counts.numpy()
        return self

    @property
    def samples(self) -> int:
        """Samples counted so far."""
        return int(self.counts.sum())

    def value(self) -> float:
        """The AUC of everything counted, or NaN while one class is missing."""
        negatives, positives = self.counts.astype(np.float64)
        n_pos, n_neg = positives.sum(), negatives.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        below = np.cumsum(negatives) - negatives  # negatives in lower buckets
        return float((positives * (below + 0.5 * negatives)).sum() / (n_pos * n_neg))


GAUC_WEIGHTS = ("impressions", "clicks")


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, weight: str = "impressions") -> float:
    """Group AUC: the AUC of each group (e.g. each user) on its own samples, averaged with the
    group's weight: its number of samples (``impressions``) or of positives (``clicks``).
    Groups whose samples are all of one class have no AUC and are left out. Ties within a group
    count one half, as in :func:`roc_auc`. One sort for all groups, no Python loop per group.

    Args:
        labels: 0/1 labels (> 0.5 is positive).
        scores: predicted scores, same size.
        groups: the group id of each sample (any integer or string dtype), same size.
        weight: ``impressions`` or ``clicks``.

    Returns:
        The GAUC, or NaN when no group has both classes.

    Raises:
        ValueError: sizes differ, or an unknown ``weight``.

    Example:
        >>> gauc(np.array([0, 1, 0, 1, 1]), np.array([0.2, 0.9, 0.6, 0.4, 0.5]), np.array([1, 1, 2, 2, 3]))
        0.5
    """
    if weight not in GAUC_WEIGHTS:
        raise ValueError(f"weight must be one of {', '.join(GAUC_WEIGHTS)}, got {weight!r}")
    y = np.asarray(labels).reshape(-1) > 0.5
    p = np.asarray(scores, np.float64).reshape(-1)
    g = np.asarray(groups).reshape(-1)
    if not y.shape == p.shape == g.shape:
        raise ValueError(f"labels ({y.shape[0]}), scores ({p.shape[0]}) and groups ({g.shape[0]}) differ in size")
    if y.shape[0] == 0:
        return float("nan")
    codes = np.unique(g, return_inverse=True)[1].reshape(-1)
    order = np.lexsort((p, codes))
    codes, p, y = codes[order], p[order], y[order]
    n = codes.shape[0]
    new_group = np.r_[True, codes[1:] != codes[:-1]]
    group_start = np.flatnonzero(new_group)
    # Runs of equal (group, score): each member gets the run's mean rank within its group.
    run_start = np.flatnonzero(new_group | np.r_[True, p[1:] != p[:-1]])
    run_end = np.r_[run_start[1:], n]
    run_rank = (run_start + run_end + 1) / 2.0 - group_start[codes[run_start]]
    rank = np.repeat(run_rank, run_end - run_start)
    size = np.bincount(codes).astype(np.float64)
    pos = np.bincount(codes, weights=y.astype(np.float64))
    neg = size - pos
    rank_sum = np.bincount(codes, weights=rank * y)
    valid = (pos > 0) & (neg > 0)
    if not valid.any():
        return float("nan")
    auc = (rank_sum[valid] - pos[valid] * (pos[valid] + 1) / 2.0) / (pos[valid] * neg[valid])
    w = (size if weight == "impressions" else pos)[valid]
    return float((auc * w).sum() / w.sum())
