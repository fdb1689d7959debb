"""Compiled checks and copies of the batch format (see :mod:`embedding_server.core.batch_codec`).

They sit in ``core`` beside the batch classes that call them, rather than with the store's
kernels, because the batch format is shared by training and serving and must not depend on the
store.
"""

from __future__ import annotations

from numba import njit


@njit(cache=True, nogil=True)
def split_sparse_section(signed, unsigned, batch, counts, offsets, ids):
    """Copy the sparse section of batch bytes (per feature: ``batch + 1`` offsets, then its
    ``counts[k]`` ids; ``signed`` and ``unsigned`` view the same words) into an offsets table
    ``[features, batch + 1]`` and one ids array. Returns the first feature whose last offset is
    not its id count (-1 when none); the offsets themselves are checked by :func:`check_offsets`."""
    pos = 0
    at = 0
    for k in range(counts.shape[0]):
        for i in range(batch + 1):
            offsets[k, i] = signed[pos + i]
        pos += batch + 1
        n = counts[k]
        if offsets[k, batch] != n:
            return k
        for j in range(n):
            ids[at + j] = unsigned[pos + j]
        pos += n
        at += n
    return -1


@njit(cache=True, nogil=True)
def check_offsets(offsets, lengths, bounds):
    """Fill ``lengths[k, i]`` (ids of sample ``i`` of feature ``k``) and ``bounds`` (where each
    feature's ids start in the concatenated ids, then their total); returns the first feature
    whose offsets do not rise from 0 (-1 when all do)."""
    bounds[0] = 0
    for k in range(offsets.shape[0]):
        if offsets[k, 0] != 0:
            return k
        for i in range(offsets.shape[1] - 1):
            n = offsets[k, i + 1] - offsets[k, i]
            if n < 0:
                return k
            lengths[k, i] = n
        bounds[k + 1] = bounds[k] + offsets[k, offsets.shape[1] - 1]
    return -1
