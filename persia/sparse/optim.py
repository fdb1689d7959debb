"""``persia.sparse.optim``: the older documents' name of :mod:`persia.embedding.optim`.

Example:
    >>> from persia.sparse.optim import Adagrad
    >>> Adagrad(lr=1e-3).lr
    0.001
"""

from __future__ import annotations

from persia.embedding.optim import SGD, Adagrad, Adam, Optimizer

__all__ = ["SGD", "Adagrad", "Adam", "Optimizer"]
