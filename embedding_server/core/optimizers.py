"""Sparse optimizers applied by the embedding servers, with PERSIA's parameter names.

Each optimizer is a small frozen dataclass. The server keeps, per stored row, ``state_width(dim)``
float32 values of optimizer state next to the embedding vector; the update itself runs in the
compiled kernels of :mod:`embedding_server.store.kernels`. Gradients for duplicate ids in one push are
summed before the update, exactly as a dense ``torch.optim`` optimizer sees them.

Example:
    >>> opt = Adagrad(lr=0.05, initial_accumulator_value=0.1)
    >>> opt.state_width(16)
    16
    >>> optimizer_from_dict(opt.to_dict()) == opt
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from embedding_server.core.config_schema import build, option
from embedding_server.core.errors import ConfigError

# Kernel selector codes (see kernels.apply_gradients).
SGD_KIND, ADAGRAD_KIND, ADAM_KIND = 0, 1, 2


@dataclass(frozen=True)
class SGD:
    """Plain SGD: ``w -= lr * (g + weight_decay * w)``. No per-row state."""

    lr: float = option(0.01, doc="learning rate")
    weight_decay: float = option(0.0, doc="L2 penalty added to the gradient")

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_non_negative("weight_decay", self.weight_decay)

    def state_width(self, dim: int) -> int:
        return 0

    def initial_state(self, dim: int) -> list[float]:
        return []

    def params(self) -> tuple[int, list[float]]:
        return SGD_KIND, [self.lr, self.weight_decay]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "sgd", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Adagrad:
    """Adagrad with PERSIA's decayed accumulator.

    ``g += weight_decay * w; s = g_square_momentum * s + g^2; w -= lr * g / (sqrt(s) + eps)``.
    With ``g_square_momentum=1`` this is ``torch.optim.Adagrad``. With ``vectorwise_shared`` the
    accumulator is one value per row fed by the mean of ``g^2`` (memory: 1 float instead of dim).
    """

    lr: float = option(0.01, doc="learning rate")
    initial_accumulator_value: float = option(
        0.01, doc="starting value of the squared-gradient accumulator (PERSIA's 0.01; torch.optim.Adagrad's is 0)"
    )
    weight_decay: float = option(0.0, doc="L2 penalty added to the gradient")
    g_square_momentum: float = option(1.0, doc="decay of the accumulator before adding g^2 (1 = plain Adagrad)")
    eps: float = option(1e-10, doc="added to sqrt(accumulator) for numerical stability")
    vectorwise_shared: bool = option(False, doc="one accumulator per row instead of per element")

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_non_negative("initial_accumulator_value", self.initial_accumulator_value)
        _check_non_negative("weight_decay", self.weight_decay)
        if not 0.0 < self.g_square_momentum <= 1.0:
            raise ValueError(f"g_square_momentum must be in (0, 1], got {self.g_square_momentum}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")

    def state_width(self, dim: int) -> int:
        return 1 if self.vectorwise_shared else dim

    def initial_state(self, dim: int) -> list[float]:
        return [self.initial_accumulator_value] * self.state_width(dim)

    def params(self) -> tuple[int, list[float]]:
        return ADAGRAD_KIND, [
            self.lr,
            self.weight_decay,
            self.g_square_momentum,
            self.eps,
            1.0 if self.vectorwise_shared else 0.0,
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "adagrad", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Adam:
    """Adam with a per-row step count (rows are updated at different times).

    State per row: first moment (dim), second moment (dim) and the row's step count (1).
    """

    lr: float = option(0.001, doc="learning rate")
    betas: tuple[float, float] = option((0.9, 0.999), doc="decay rates of the first and second moments")
    eps: float = option(1e-8, doc="added to the denominator for numerical stability")
    weight_decay: float = option(0.0, doc="L2 penalty added to the gradient")

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        _check_non_negative("weight_decay", self.weight_decay)

    def state_width(self, dim: int) -> int:
        return 2 * dim + 1

    def initial_state(self, dim: int) -> list[float]:
        return [0.0] * self.state_width(dim)

    def params(self) -> tuple[int, list[float]]:
        return ADAM_KIND, [self.lr, self.weight_decay, self.betas[0], self.betas[1], self.eps]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return {"type": "adam", **d}


SparseOptimizer = SGD | Adagrad | Adam
OPTIMIZERS: dict[str, type] = {"sgd": SGD, "adagrad": Adagrad, "adam": Adam}


def optimizer_from_dict(data: Mapping[str, Any], source: str = "optimizer", path: str = "") -> SparseOptimizer:
    """Build an optimizer from ``{"type": "adagrad", "lr": ...}``.

    Raises:
        ConfigError: unknown type, unknown key or out-of-range value.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: '{path or 'optimizer'}' must be a mapping")
    params = dict(data)
    kind = str(params.pop("type", "adagrad")).lower()
    if kind not in OPTIMIZERS:
        raise ConfigError(f"{source}: '{_join(path, 'type')}' must be one of {sorted(OPTIMIZERS)}, got {kind!r}")
    return build(OPTIMIZERS[kind], params, source, path)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_lr(lr: float) -> None:
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")


def _check_non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
