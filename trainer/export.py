"""Export the dense model for serving: TorchScript plus the ``model.json`` a server needs.

A version lands under ``<model root>/dense/v00000042/`` (see :mod:`embedding_server.core.model_spec`):
``model.pt`` first, ``model.json`` last, so a reader that sees the JSON sees a whole version.

Example:
    >>> version = export_dense(ctx.model, ctx.config, "/data/models/ctr", step=ctx.step, dense_width=13)
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.model_spec import (
    DENSE_DIR,
    MODEL_FILE,
    SPEC_FILE,
    DenseModelSpec,
    list_versions,
    model_signature,
    version_dir,
)
from embedding_server.storage.urls import open_storage


def latest_version(model_root: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """The highest complete dense version under ``model_root`` (0 when there is none)."""
    storage = open_storage(model_root, storage_options)
    if not storage.exists(DENSE_DIR):
        return 0
    complete = [v for v in list_versions(storage) if storage.exists(f"{version_dir(v)}/{SPEC_FILE}")]
    return max(complete, default=0)


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of the dense model (unwrapping ``DistributedDataParallel``).

    Raises:
        RuntimeError: the model is not TorchScript-able (the message says which line).
    """
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was_training = module.training
    module.eval()
    try:
        return torch.jit.script(module)
    finally:
        module.train(was_training)


def export_dense(
    model: nn.Module,
    config: EmbeddingConfig,
    model_root: str,
    *,
    step: int,
    dense_width: int,
    targets: int = 1,
    version: int | None = None,
    sparse_watermark: Mapping[str, int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Write a new dense version; returns its number.

    Args:
        model: the dense model: ``forward(dense, sparse: List[Tensor])``, or PERSIA's
            ``forward(non_id_type_tensors: List[Tensor], id_type_tensors: List[Tensor])``; the
            spec records which (``signature``), so servers call it the same way.
        config: the embedding config the model was trained with.
        model_root: a path or storage URL.
        step: the training step being exported.
        dense_width: dense input columns.
        targets: output columns.
        version: the version number; default one above the newest complete version.
        sparse_watermark: per shard, the last incremental packet the rows include.
        storage_options: how to open ``model_root``: a global config's ``storage`` section
            (connection settings; ``file_mode``/``dir_mode`` of the files and folders written
            to a local root). None: the defaults (0640/0750) and the environment.

    Raises:
        ValueError: ``version`` is not above the newest existing version.
    """
    storage = open_storage(model_root, storage_options)
    newest = latest_version(model_root, storage_options)
    version = newest + 1 if version is None else version
    if version <= newest:
        raise ValueError(f"version {version} is not above the newest exported version {newest} in {model_root}")
    scripted = script_model(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    spec = DenseModelSpec.for_config(
        config,
        version=version,
        step=step,
        dense_width=dense_width,
        targets=targets,
        sparse_watermark=dict(sparse_watermark or {}),
        model_class=scripted.original_name,
        signature=model_signature(scripted).value,
    )
    storage.write_atomic(f"{version_dir(version)}/{MODEL_FILE}", buffer.getvalue())
    storage.write_atomic(f"{version_dir(version)}/{SPEC_FILE}", spec.to_json().encode())
    return version
