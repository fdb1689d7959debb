"""How a table's unseen ids get their first vector (train mode), with RecIS's initializer names.

A table may carry its own initializer (the slot key ``initializer`` in ``embedding_config.yml``);
tables without one use ``global_config.yml``'s ``initialization`` section. Whichever applies,
element ``j`` of id ``x``'s row in table ``t`` is a function of (seed, ``t``, ``x``, ``j``) alone
(see ``kernels._init_row``), so every shard, replica and restart initialises an id identically.

Types and their parameters (unknown parameters are an error):

========================  =================================================================
``normal``                ``mean`` (0), ``std`` (0.01)
``truncated_normal``      ``mean`` (0), ``std`` (0.01); values beyond 2 std are drawn again
``uniform``               ``lower`` (-0.01), ``upper`` (0.01): uniform in ``[lower, upper)``
``constant``              ``value`` (0)
``zeros``                 none
``bounded_uniform``       ``lower``, ``upper`` (global ``initialization``'s spelling of uniform)
``bounded_normal``        ``mean``, ``std``, ``lower``, ``upper``: normal, clipped to the bounds
========================  =================================================================

Example:
    >>> init = initializer_from_dict({"type": "truncated_normal", "std": 0.02})
    >>> init.kernel_params(seed=7)[0]
    2
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Kernel selector codes (see kernels._init_row).
UNIFORM_KIND, NORMAL_KIND, TRUNCATED_NORMAL_KIND, CONSTANT_KIND = 0, 1, 2, 3
#: Columns of a table's row in the kernels' init parameter matrix.
PARAMS = ("lower", "upper", "mean", "std", "seed", "value")

#: type -> (kernel kind, parameters it takes with their defaults)
_TYPES: dict[str, tuple[int, dict[str, float]]] = {
    "normal": (NORMAL_KIND, {"mean": 0.0, "std": 0.01}),
    "truncated_normal": (TRUNCATED_NORMAL_KIND, {"mean": 0.0, "std": 0.01}),
    "uniform": (UNIFORM_KIND, {"lower": -0.01, "upper": 0.01}),
    "constant": (CONSTANT_KIND, {"value": 0.0}),
    "zeros": (CONSTANT_KIND, {}),
    "bounded_uniform": (UNIFORM_KIND, {"lower": -0.01, "upper": 0.01}),
    "bounded_normal": (NORMAL_KIND, {"mean": 0.0, "std": 0.01, "lower": -0.01, "upper": 0.01}),
}
INITIALIZER_TYPES = tuple(_TYPES)


@dataclass(frozen=True)
class Initializer:
    """One initializer: its type and its parameters (defaults filled in).

    Args:
        type: one of :data:`INITIALIZER_TYPES`.
        params: the type's parameters (see the module docstring).

    Raises:
        ValueError: an unknown type, an unknown or non-numeric parameter, or a bad range.

    Example:
        >>> Initializer("uniform", {"lower": -0.1, "upper": 0.1}).to_dict()
        {'type': 'uniform', 'lower': -0.1, 'upper': 0.1}
    """

    type: str
    params: tuple[tuple[str, float], ...]

    def __init__(self, type: str, params: Mapping[str, Any] | None = None):
        if type not in _TYPES:
            raise ValueError(f"initializer type must be one of {', '.join(INITIALIZER_TYPES)}, got {type!r}")
        defaults = _TYPES[type][1]
        given = dict(params or {})
        for key, value in given.items():
            if key not in defaults:
                known = ", ".join(defaults) or "none"
                raise ValueError(f"initializer '{type}' has no parameter '{key}' (its parameters: {known})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"initializer '{type}': '{key}' must be a finite number, got {value!r}")
        merged = {k: float(given.get(k, v)) for k, v in defaults.items()}
        if "std" in merged and merged["std"] <= 0:
            raise ValueError(f"initializer '{type}': std must be > 0, got {merged['std']}")
        if "lower" in merged and not merged["lower"] < merged["upper"]:
            raise ValueError(f"initializer '{type}': lower ({merged['lower']}) must be < upper ({merged['upper']})")
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "params", tuple(merged.items()))

    def to_dict(self) -> dict[str, Any]:
        """``{"type": ..., <parameters>}``, what :func:`initializer_from_dict` reads back."""
        return {"type": self.type, **dict(self.params)}

    def kernel_params(self, seed: int) -> tuple[int, np.ndarray]:
        """The kernel's selector and its float64 parameter row (columns :data:`PARAMS`)."""
        p = dict(self.params)
        kind = _TYPES[self.type][0]
        lower, upper = p.get("lower", -math.inf), p.get("upper", math.inf)
        row = [lower, upper, p.get("mean", 0.0), p.get("std", 1.0), float(seed), p.get("value", 0.0)]
        return kind, np.array(row, np.float64)


def initializer_from_dict(data: Mapping[str, Any]) -> Initializer:
    """An :class:`Initializer` from ``{"type": "normal", "std": 0.01}``.

    Raises:
        ValueError: not a mapping, no or an unknown type, or bad parameters.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"initializer must be a mapping with a 'type', got {data!r}")
    params = dict(data)
    if "type" not in params:
        raise ValueError(f"initializer needs a 'type' (one of {', '.join(INITIALIZER_TYPES)})")
    kind = params.pop("type")
    return Initializer(str(kind).lower(), params)
