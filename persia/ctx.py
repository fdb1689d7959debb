"""PERSIA's contexts: ``TrainCtx``, ``EmbeddingCtx``, ``eval_ctx``, ``InferCtx``, ``DataCtx``.

Each lives in its own module (training, inference and data loading run in different processes
and need different imports: a data-loader process never imports the training stack); this module
gives them PERSIA's import path, ``persia.ctx``, and resolves each name on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from persia.data_ctx import DataCtx
    from persia.infer_ctx import InferCtx
    from persia.legacy import init_backend
    from persia.train_ctx import BaseCtx, EmbeddingCtx, PreprocessMode, TrainCtx, cnt_ctx, eval_ctx

#: public name -> the module that defines it
_HOMES = {
    "BaseCtx": "persia.train_ctx",
    "EmbeddingCtx": "persia.train_ctx",
    "PreprocessMode": "persia.train_ctx",
    "TrainCtx": "persia.train_ctx",
    "cnt_ctx": "persia.train_ctx",
    "eval_ctx": "persia.train_ctx",
    "InferCtx": "persia.infer_ctx",
    "DataCtx": "persia.data_ctx",
    "init_backend": "persia.legacy",  # PERSIA's older documents
}

__all__ = [
    "BaseCtx",
    "DataCtx",
    "EmbeddingCtx",
    "InferCtx",
    "PreprocessMode",
    "TrainCtx",
    "cnt_ctx",
    "eval_ctx",
    "init_backend",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'persia.ctx' has no attribute '{name}'")
    return getattr(importlib.import_module(home), name)
