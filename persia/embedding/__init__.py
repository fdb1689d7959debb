"""PERSIA's embedding hyperparameters: ``EmbeddingConfig`` and ``get_default_embedding_config``.

PERSIA's ``EmbeddingConfig`` is not the ``embedding_config.yml`` (the features and their tables,
ctrserve's :class:`embedding_server.core.config.EmbeddingConfig`): it holds how new rows are
initialised, how they are admitted and how far weights may grow, which ctrserve's embedding
servers take from ``global_config.yml`` (``initialization``, ``embedding_parameter_server_config.
weight_bound``). :class:`persia.ctx.TrainCtx` applies it to the tables it keeps in its own process;
remote servers keep the values they were started with (a difference is logged).

Example:
    >>> from persia.embedding import EmbeddingConfig
    >>> EmbeddingConfig(emb_initialization=(-0.05, 0.05)).weight_bound
    10
"""

from __future__ import annotations

import math


class EmbeddingConfig:
    """Embedding hyperparameters, the ``embedding_config`` argument of :class:`persia.ctx.TrainCtx`.

    Args:
        emb_initialization: lower and upper bound of the uniform initialisation of new rows.
        admit_probability: the probability (in ``[0, 1]``) that a new id gets a row; ctrserve's
            servers admit every new id, so only 1.0 is honoured exactly (another value is logged).
        weight_bound: every weight is clipped to ``[-weight_bound, weight_bound]`` after an
            update (``0`` or less: no clipping).

    Raises:
        ValueError: ``emb_initialization`` not two finite numbers with lower < upper, or
            ``admit_probability`` outside ``[0, 1]``.
    """

    def __init__(
        self,
        emb_initialization: tuple[float, float] = (-0.01, 0.01),
        admit_probability: float = 1.0,
        weight_bound: float = 10,
    ):
        lower, upper = (float(x) for x in emb_initialization)
        if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
            raise ValueError(f"emb_initialization must be (lower, upper) with lower < upper, got {emb_initialization}")
        if not 0.0 <= admit_probability <= 1.0:
            raise ValueError(f"admit_probability must be in [0, 1], got {admit_probability}")
        self.emb_initialization = emb_initialization
        self.admit_probability = admit_probability
        self.weight_bound = weight_bound

    def __repr__(self) -> str:
        return (
            f"EmbeddingConfig(emb_initialization={self.emb_initialization!r}, "
            f"admit_probability={self.admit_probability!r}, weight_bound={self.weight_bound!r})"
        )


def get_default_embedding_config() -> EmbeddingConfig:
    """PERSIA's defaults: ``EmbeddingConfig()``."""
    return EmbeddingConfig()


__all__ = ["EmbeddingConfig", "get_default_embedding_config"]
