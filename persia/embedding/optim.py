"""PERSIA's embedding optimizers: ``SGD``, ``Adam`` and ``Adagrad``, with PERSIA's arguments
(positional order included) and defaults.

Each is ctrserve's sparse optimizer of the same name (:mod:`embedding_server.core.optimizers`),
which the embedding servers run on every looked-up row's gradient; pass one to
:class:`persia.ctx.TrainCtx` as ``embedding_optimizer``.

Example:
    >>> from persia.embedding.optim import Adagrad
    >>> Adagrad(lr=0.05).to_core()
    Adagrad(lr=0.05, initial_accumulator_value=0.01, weight_decay=0.0, g_square_momentum=1.0, eps=1e-10, vectorwise_shared=False)
"""

from __future__ import annotations

from embedding_server.core import optimizers as core
from embedding_server.core.optimizers import SparseOptimizer, optimizer_from_dict
from persia.logger import get_default_logger

_logger = get_default_logger()


class Optimizer:
    """What PERSIA's embedding optimizers share: :meth:`to_core` gives the ctrserve optimizer the
    embedding servers run (the same parameters, ctrserve's own type)."""

    def to_core(self) -> SparseOptimizer:
        return optimizer_from_dict(self.to_dict())  # type: ignore[attr-defined]


def _init(self: object, **values: object) -> None:
    for name, value in values.items():
        object.__setattr__(self, name, value)
    self.__post_init__()  # type: ignore[attr-defined]


class SGD(Optimizer, core.SGD):
    """Stochastic gradient descent: ``w -= lr * (g + weight_decay * w)``.

    Args:
        lr: learning rate.
        momentum: accepted for PERSIA's signature; PERSIA's embedding SGD does not use it and
            neither does ctrserve's (a non-zero value is logged).
        weight_decay: L2 penalty added to the gradient.

    Raises:
        ValueError: ``lr <= 0`` or ``weight_decay < 0``.
    """

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        _init(self, lr=lr, weight_decay=weight_decay)
        object.__setattr__(self, "momentum", momentum)
        if momentum:
            _logger.info("SGD(momentum=%s): embedding SGD has no momentum (as in PERSIA); it is not used", momentum)


class Adam(Optimizer, core.Adam):
    """Adam with a per-row step count.

    Args:
        lr: learning rate.
        betas: decay rates of the first and second moments.
        weight_decay: L2 penalty added to the gradient.
        eps: added to the denominator.

    Raises:
        ValueError: an out-of-range argument.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0,
        eps: float = 1e-8,
    ):
        _init(self, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


class Adagrad(Optimizer, core.Adagrad):
    """Adagrad with PERSIA's decayed accumulator (``g_square_momentum``) and optional one
    accumulator per row (``vectorwise_shared``).

    Args:
        lr: learning rate.
        initial_accumulator_value: starting value of the squared-gradient accumulator.
        weight_decay: L2 penalty added to the gradient.
        g_square_momentum: decay of the accumulator before adding ``g**2`` (1 = plain Adagrad).
        eps: added to the accumulator's square root.
        vectorwise_shared: one accumulator per row instead of per element.

    Raises:
        ValueError: an out-of-range argument.
    """

    def __init__(
        self,
        lr: float = 1e-2,
        initial_accumulator_value: float = 1e-2,
        weight_decay: float = 0,
        g_square_momentum: float = 1,
        eps: float = 1e-10,
        vectorwise_shared: bool = False,
    ):
        _init(
            self,
            lr=lr,
            initial_accumulator_value=initial_accumulator_value,
            weight_decay=weight_decay,
            g_square_momentum=g_square_momentum,
            eps=eps,
            vectorwise_shared=vectorwise_shared,
        )


def as_sparse_optimizer(optimizer: object) -> SparseOptimizer:
    """The ctrserve optimizer for ``optimizer`` (one of this module's or ctrserve's own).

    Raises:
        TypeError: anything else (a ``torch.optim`` optimizer, say).
    """
    if isinstance(optimizer, Optimizer):
        return optimizer.to_core()
    if isinstance(optimizer, (core.SGD, core.Adagrad, core.Adam)):
        return optimizer
    raise TypeError(
        f"embedding_optimizer must be persia.embedding.optim.SGD, Adagrad or Adam, got {type(optimizer).__name__}"
    )


__all__ = ["Adagrad", "Adam", "Optimizer", "SGD", "as_sparse_optimizer"]
