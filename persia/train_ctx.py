"""PERSIA's training and evaluation contexts: ``BaseCtx``, ``EmbeddingCtx``, ``TrainCtx``,
``PreprocessMode``, ``eval_ctx`` and ``cnt_ctx`` (imported as ``persia.ctx``).

Each context drives one :class:`trainer.ctx.TrainCtx` (its :attr:`EmbeddingCtx.engine`), which
looks the batches' ids up in the embedding servers, calls the model in its signature (PERSIA's
``forward(non_id_type_tensors, id_type_tensors)`` or ctrserve's ``forward(dense, sparse)``),
pushes the embeddings' gradients and steps the dense optimizer. This module adds PERSIA's
signatures and behaviour on top: labels as a list of tensors, checkpoints in PERSIA's file names,
asynchronous embedding dumps and loads, modes with and without gradients.

Where the embeddings live (ctrserve extensions, keyword ``embedding_servers``):

* ``None`` (default): PERSIA's way, the servers ``persia.service.embedding_server_addresses()``
  names (``PERSIA_EMBEDDING_SERVERS``, else the ``persia-launcher`` registry); a context created
  inside another one shares its servers (and its in-process tables);
* a list of ``host:port``: those servers, in shard order;
* ``[]``: no servers, the tables live in this process (tests, small jobs); PERSIA's
  :class:`~persia.embedding.EmbeddingConfig` sets their initialisation and weight bound.

The features and tables (``embedding_config.yml``) come from the keyword ``slots_config`` (a
path or :class:`embedding_server.core.config.EmbeddingConfig`), else the file that
``PERSIA_EMBEDDING_CONFIG`` names, else the servers themselves (their ``Info`` answer).

Example:
    >>> with TrainCtx(model=model, embedding_optimizer=Adagrad(lr=1e-2),  # doctest: +SKIP
    ...               dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1)) as ctx:
    ...     for batch in loader:
    ...         output, labels = ctx.forward(batch)
    ...         ctx.backward(loss_fn(output, labels[0]))
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from embedding_server.core.config import EmbeddingConfig as SlotsConfig
from embedding_server.core.config import GlobalConfig
from embedding_server.core.errors import InvalidRequestError
from embedding_server.rpc.client import LookupResult
from embedding_server.storage.base import LocalStorage
from embedding_server.storage.urls import open_storage
from persia.embedding import EmbeddingConfig, get_default_embedding_config
from persia.embedding.data import PersiaBatch
from persia.embedding.optim import as_sparse_optimizer
from persia.logger import get_default_logger
from trainer import ctx as trainer_ctx
from trainer.batch import PyPersiaBatchData
from trainer.export import script_model
from trainer.lookahead import PrefetchedBatch

_logger = get_default_logger()

#: the context entered most recently (PERSIA's ``cnt_ctx()``)
_CURRENT_CXT: BaseCtx | None = None
#: parameters already logged as having no effect (each once per process)
_NOTED: set[str] = set()


def _note_unused(name: str, why: str) -> None:
    if name not in _NOTED:
        _NOTED.add(name)
        _logger.info(f"{name}: no effect in ctrserve: {why}")


class PreprocessMode(Enum):
    """How :meth:`EmbeddingCtx.prepare_features` looks embeddings up.

    ``TRAIN``: embeddings collect gradients and unseen ids get rows. ``EVAL``: no gradients, no
    new rows (unseen ids read as zeros, as served). ``INFERENCE``: as ``EVAL``, and the batch may
    come without labels.
    """

    TRAIN = 1
    EVAL = 2
    INFERENCE = 3


@dataclass
class PersiaTrainingBatch:
    """A batch with its embeddings looked up (:meth:`EmbeddingCtx.get_embedding_from_data`).

    Args:
        batch: the batch.
        dense: its dense parts concatenated (ctrserve's dense input), on the context's device.
        embeddings: one tensor per feature of the model, in ``embedding_config.yml`` order.
        lookup: the lookup (its rows collect the gradients in ``TRAIN`` mode).
        mode: the mode it was looked up in.
    """

    batch: Any
    dense: Tensor
    embeddings: list[Tensor]
    lookup: LookupResult
    mode: PreprocessMode


class BaseCtx:
    """What every PERSIA context shares: the device and entering/leaving (``cnt_ctx()``).

    Args:
        threadpool_worker_size: PERSIA's RPC thread pool; ctrserve's clients size their own
            (accepted, logged once).
        device_id: the CUDA device; ``None``: ``LOCAL_RANK``'s device when CUDA is present, else the CPU.

    Raises:
        ValueError: ``device_id`` names no CUDA device.
    """

    def __init__(self, threadpool_worker_size: int = 10, device_id: int | None = None):
        if threadpool_worker_size != 10:
            _note_unused("threadpool_worker_size", "the embedding client's gRPC channels pool their own threads")
        if device_id is not None and device_id >= 0:
            if not torch.cuda.is_available() or device_id >= torch.cuda.device_count():
                raise ValueError(f"device_id: {device_id} invalid! ({torch.cuda.device_count()} CUDA devices present)")
        else:
            device_id = None
        self.device_id = device_id
        self.origin_context: BaseCtx | None = None

    def _enter(self) -> None:
        """Hook run on entering the context."""

    def _exit(self) -> None:
        """Hook run on leaving the context."""

    def __enter__(self) -> Any:
        global _CURRENT_CXT
        self._enter()
        self.origin_context = _CURRENT_CXT
        _CURRENT_CXT = self
        return self

    def __exit__(self, exc_type, value, trace) -> None:
        global _CURRENT_CXT
        try:
            self._exit()
        finally:
            _CURRENT_CXT = self.origin_context


class _Engine(trainer_ctx.TrainCtx):
    """ctrserve's training context, optionally on the embedding client of another context's
    engine (``parent``), whose queued gradient pushes its lookups then wait for too."""

    def __init__(self, *args: Any, parent: trainer_ctx.TrainCtx | None = None, **kwargs: Any):
        self._parent = parent
        super().__init__(*args, **kwargs)

    def _make_client(self, global_config, servers, num_shards):
        if self._parent is not None:
            return self._parent.client
        return super()._make_client(global_config, servers, num_shards)

    def _await_pushes(self) -> None:
        super()._await_pushes()
        if self._parent is not None:
            self._parent._await_pushes()

    def close(self) -> None:
        if self._parent is None:
            super().close()
        else:
            self._close_pusher()


class EmbeddingCtx(BaseCtx):
    """Looks embeddings up for a model and runs it; dumps and loads embeddings and checkpoints.

    Args:
        preprocess_mode: gradients and inserts (``TRAIN``) or neither (``EVAL``, ``INFERENCE``).
        model: the dense model (PERSIA's or ctrserve's signature).
        embedding_config: PERSIA's :class:`~persia.embedding.EmbeddingConfig` (initialisation,
            admission, weight bound), default :func:`~persia.embedding.get_default_embedding_config`.
        threadpool_worker_size: see :class:`BaseCtx`.
        device_id: see :class:`BaseCtx`.
        embedding_servers: ctrserve extension, see the module docstring (``[]``: in-process tables).
        slots_config: ctrserve extension: the ``embedding_config.yml`` (path or parsed); see the
            module docstring for where it comes from otherwise.
        global_config: ctrserve extension: a ``global_config.yml`` (path or parsed) for the
            in-process tables and the storage options of checkpoints.

    Raises:
        ValueError: no embedding servers could be found or no ``embedding_config.yml``.

    Example:
        >>> with eval_ctx(model=model) as ctx:  # doctest: +SKIP
        ...     output, labels = ctx.forward(ctx.get_embedding_from_data(batch))
    """

    def __init__(
        self,
        preprocess_mode: PreprocessMode,
        model: nn.Module | None = None,
        embedding_config: EmbeddingConfig | None = None,
        threadpool_worker_size: int = 10,
        device_id: int | None = None,
        *,
        embedding_servers: list[str] | None = None,
        slots_config: SlotsConfig | str | os.PathLike[str] | None = None,
        global_config: GlobalConfig | str | os.PathLike[str] | None = None,
        _sparse_optimizer: Any = None,
        _dense_optimizer: torch.optim.Optimizer | None = None,
        _mixed_precision: bool = False,
        _backward_buffer_size: int = 10,
        _backward_workers_size: int = 8,
    ):
        super().__init__(threadpool_worker_size, device_id)
        self.preprocess_mode = preprocess_mode
        self.model = model
        if isinstance(embedding_config, (SlotsConfig, str, Path)):
            # ctrserve's own programs pass the embedding_config.yml here
            slots_config, embedding_config = embedding_config, None
        self.embedding_config = embedding_config or get_default_embedding_config()
        self.current_batch: PersiaTrainingBatch | None = None
        self._jobs: dict[str, threading.Thread] = {}
        self._job_errors: dict[str, BaseException] = {}
        current = _CURRENT_CXT
        parent = current if isinstance(current, EmbeddingCtx) and current.engine is not None else None
        parent_engine = None
        if embedding_servers is None and parent is not None:
            embedding_servers = parent.embedding_servers
            parent_engine = parent._require_engine()
            slots_config = slots_config if slots_config is not None else parent_engine.config
            global_config = global_config if global_config is not None else parent.global_config
        elif embedding_servers is None:
            from persia.service import embedding_server_addresses

            embedding_servers = embedding_server_addresses()
        #: the embedding servers (``[]``: tables in this process)
        self.embedding_servers: list[str] = list(embedding_servers)
        #: the global config: in-process tables' settings, checkpoint storage options
        self.global_config: GlobalConfig = self._make_global_config(global_config)
        slots = self._resolve_slots(slots_config)
        if model is None:
            self.engine: _Engine | None = None
            return
        #: ctrserve's training context doing the work (lookups, model call, gradients)
        self.engine = _Engine(
            model,
            _dense_optimizer,  # None: the context never steps
            _sparse_optimizer,
            slots,
            global_config=self.global_config,
            embedding_servers=self.embedding_servers or None,
            device_id=self.device_id,
            mixed_precision=_mixed_precision,
            backward_buffer_size=_backward_buffer_size,
            backward_workers_size=_backward_workers_size,
            parent=parent_engine,
        )
        self._note_server_settings()

    def _make_global_config(self, global_config: Any) -> GlobalConfig:
        if isinstance(global_config, GlobalConfig):
            return global_config
        if global_config is not None:
            return GlobalConfig.load(global_config)
        if self.embedding_servers:
            return GlobalConfig.from_dict({})
        lower, upper = (float(x) for x in self.embedding_config.emb_initialization)
        return GlobalConfig.from_dict(
            {
                "initialization": {"lower": lower, "upper": upper},
                "embedding_parameter_server_config": {
                    "weight_bound": max(float(self.embedding_config.weight_bound), 0.0)
                },
            }
        )

    def _resolve_slots(self, slots_config: Any) -> SlotsConfig:
        if isinstance(slots_config, SlotsConfig):
            return slots_config
        if slots_config is not None:
            return SlotsConfig.load(slots_config)
        path = os.environ.get("PERSIA_EMBEDDING_CONFIG", "").strip()
        if path:
            return SlotsConfig.load(path)
        if self.embedding_servers:
            from embedding_server.rpc.served_config import read_embedding_config

            return read_embedding_config(self.embedding_servers)
        raise ValueError(
            "no embedding_config.yml: pass slots_config=, set PERSIA_EMBEDDING_CONFIG, or use embedding servers"
        )

    def _note_server_settings(self) -> None:
        if self.embedding_config.admit_probability != 1.0:
            _logger.warning(
                f"admit_probability={self.embedding_config.admit_probability}: ctrserve's embedding servers "
                "admit every new id (probability 1.0)"
            )
        if self.embedding_servers and repr(self.embedding_config) != repr(get_default_embedding_config()):
            _note_unused(
                "EmbeddingConfig(emb_initialization, weight_bound) with remote servers",
                "the servers take them from their global_config.yml (initialization, weight_bound)",
            )

    def _exit(self) -> None:
        self.wait_for_dump_embedding()
        self.wait_for_load_embedding()

    # ------------------------------------------------------------------ features

    def _require_engine(self) -> _Engine:
        if self.engine is None:
            raise RuntimeError("model not found, please init context with model")
        return self.engine

    def get_embedding_from_data(
        self, persia_batch: PyPersiaBatchData, device_id: int | None = None
    ) -> PersiaTrainingBatch:
        """Look the batch's ids up (in this context's mode).

        Args:
            persia_batch: a :class:`~persia.embedding.data.PersiaBatch` (or ``PyPersiaBatchData``).
            device_id: accepted for PERSIA's signature; tensors go to the context's device.

        Returns:
            The batch with its embeddings.

        Raises:
            InvalidRequestError: an unknown feature or one of the model's features missing.
        """
        engine = self._require_engine()
        train = self.preprocess_mode is PreprocessMode.TRAIN
        dense, embeddings, lookup = engine.prepare(persia_batch, requires_grad=train, insert=train)
        return PersiaTrainingBatch(persia_batch, dense, embeddings, lookup, self.preprocess_mode)

    def get_embedding_from_bytes(self, data: bytes, device_id: int | None = None) -> PersiaTrainingBatch:
        """:meth:`get_embedding_from_data` of the batch ``data`` encodes (``PersiaBatch.to_bytes``).

        Raises:
            InvalidRequestError: corrupted bytes, or as :meth:`get_embedding_from_data`.
        """
        return self.get_embedding_from_data(PersiaBatch.from_bytes(data), device_id)

    def prepare_features(
        self, persia_training_batch: PersiaTrainingBatch | PyPersiaBatchData | bytes
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        """The model's inputs and the labels as tensors.

        Returns:
            ``(non_id_type_tensors, id_type_embedding_tensors, label_tensors)``: non-ID features
            and labels with the dtypes and shapes the batch was built with; labels ``None`` for
            an ``INFERENCE`` batch without labels.

        Raises:
            InvalidRequestError: a batch without labels outside ``INFERENCE`` mode.
        """
        training = self._as_training_batch(persia_training_batch)
        self.current_batch = training
        device = self._require_engine().device
        source = training.batch
        non_id = [_tensor(a, device) for a in source.non_id_arrays()]
        label_arrays = source.label_arrays()
        if not label_arrays and self.preprocess_mode is not PreprocessMode.INFERENCE:
            raise InvalidRequestError(f"a batch without labels in {self.preprocess_mode.name} mode")
        labels = [_tensor(a, device) for a in label_arrays] if label_arrays else None
        return non_id, training.embeddings, labels

    def _as_training_batch(self, batch: Any) -> PersiaTrainingBatch:
        if isinstance(batch, PersiaTrainingBatch):
            return batch
        if isinstance(batch, (bytes, bytearray, memoryview)):
            return self.get_embedding_from_bytes(bytes(batch))
        return self.get_embedding_from_data(batch)

    def forward(self, batch: PersiaTrainingBatch | PyPersiaBatchData | bytes) -> tuple[Tensor, list[Tensor] | None]:
        """Run the model on the batch (looked up here unless it already is).

        Returns:
            ``(output, labels)``: labels as :meth:`prepare_features` gives them.
        """
        engine = self._require_engine()
        training = self._as_training_batch(batch)
        _, _, labels = self.prepare_features(training)
        engine.model.eval()
        with torch.no_grad():
            output = engine.model(*engine.model_inputs(training.batch, training.dense, training.embeddings))
        return output, labels

    # ------------------------------------------------------------------ checkpoints

    def _storage(self, directory: str | os.PathLike[str]) -> Any:
        return open_storage(directory, self.global_config.server.storage)

    def _location(self, directory: str | os.PathLike[str]) -> str:
        """Where the servers write and read embeddings: an absolute path for a local directory
        (servers may run with another working directory), the URL otherwise."""
        storage = self._storage(directory)
        return str(storage.root) if isinstance(storage, LocalStorage) else storage.url

    def _run(self, job: str, blocking: bool, work: Any) -> None:
        self._wait(job)
        if blocking:
            work()
            return

        def run() -> None:
            try:
                work()
            except BaseException as exc:  # handed to the caller of wait_for_*
                self._job_errors[job] = exc

        thread = threading.Thread(target=run, name=f"persia-{job}", daemon=True)
        self._jobs[job] = thread
        thread.start()

    def _wait(self, job: str) -> None:
        thread = self._jobs.pop(job, None)
        if thread is not None:
            thread.join()
        error = self._job_errors.pop(job, None)
        if error is not None:
            raise error

    def dump_embedding(self, dst_dir: str, blocking: bool = True) -> None:
        """Write every embedding row (and its optimizer state) under ``dst_dir`` (a path or
        storage URL); with ``blocking=False`` return at once (:meth:`wait_for_dump_embedding`).

        Raises:
            StorageError: an unwritable location (from :meth:`wait_for_dump_embedding` when not blocking).
        """
        engine = self._require_engine()
        location = self._location(dst_dir)
        self._run("dump", blocking, lambda: engine.client.dump(location, self.global_config.server.storage))

    def load_embedding(self, src_dir: str, blocking: bool = True) -> None:
        """Load the rows :meth:`dump_embedding` wrote (into any number of shards); with
        ``blocking=False`` return at once (:meth:`wait_for_load_embedding`).

        Raises:
            InvalidRequestError: no complete embedding dump there, or one that does not fit the tables.
        """
        engine = self._require_engine()
        location = self._location(src_dir)
        self._run("load", blocking, lambda: engine.client.load(location))

    def wait_for_dump_embedding(self) -> None:
        """Wait for a ``blocking=False`` :meth:`dump_embedding`; raises what it raised."""
        self._wait("dump")

    def wait_for_load_embedding(self) -> None:
        """Wait for a ``blocking=False`` :meth:`load_embedding`; raises what it raised."""
        self._wait("load")

    def get_embedding_size(self) -> list[int]:
        """Rows held by each embedding server (shard order)."""
        return [int(s.get("rows", 0)) for s in self._require_engine().client.stats()]

    def dump_torch_state_dict(
        self, torch_instance: nn.Module | torch.optim.Optimizer, dst_dir: str, file_name: str, is_jit: bool = False
    ) -> None:
        """Write ``torch_instance``'s state dict (or, ``is_jit``, the TorchScript of a model) to
        ``dst_dir/file_name`` (atomically; ``dst_dir`` a path or storage URL)."""
        buffer = io.BytesIO()
        if is_jit:
            if not isinstance(torch_instance, nn.Module):
                raise TypeError(f"only a torch.nn.Module is saved as TorchScript, got {type(torch_instance).__name__}")
            torch.jit.save(script_model(torch_instance), buffer)
        else:
            torch.save(torch_instance.state_dict(), buffer)
        self._storage(dst_dir).write_atomic(file_name, buffer.getvalue())

    def load_torch_state_dict(
        self, torch_instance: nn.Module | torch.optim.Optimizer, src_dir: str, map_location: str | None = None
    ) -> None:
        """Load a state dict :meth:`dump_torch_state_dict` wrote (``src_dir``: the file's path or URL);
        tensors only (``weights_only``), nothing else is unpickled."""
        storage = self._storage(os.path.dirname(src_dir) or ".")
        data = storage.read_bytes(os.path.basename(src_dir))
        device = map_location or self._require_engine().device
        torch_instance.load_state_dict(torch.load(io.BytesIO(data), map_location=device, weights_only=True))

    def dump_checkpoint(
        self,
        dst_dir: str,
        dense_filename: str = "dense.pt",
        jit_dense_filename: str = "jit_dense.pt",
        blocking: bool = True,
        with_jit_model: bool = False,
    ) -> None:
        """Save the dense model's state dict as ``dst_dir/dense_filename``, with ``with_jit_model``
        its TorchScript as ``dst_dir/jit_dense_filename`` (servable: ctrserve's handler and
        ``torch.jit.load`` take it), and the embeddings under ``dst_dir``."""
        engine = self._require_engine()
        if with_jit_model:
            self.dump_torch_state_dict(engine.model, dst_dir, jit_dense_filename, True)
        self.dump_torch_state_dict(engine.model, dst_dir, dense_filename)
        self.dump_embedding(dst_dir, blocking=blocking)

    def load_checkpoint(
        self, src_dir: str, map_location: str | None = None, dense_filename: str = "dense.pt", blocking: bool = True
    ) -> None:
        """Load what :meth:`dump_checkpoint` saved (the dense part when present)."""
        engine = self._require_engine()
        if self._storage(src_dir).exists(dense_filename):
            self.load_torch_state_dict(engine.model, os.path.join(str(src_dir), dense_filename), map_location)
        self.load_embedding(src_dir, blocking=blocking)


class TrainCtx(EmbeddingCtx):
    """Trains a dense model and its embeddings (PERSIA's ``TrainCtx``).

    Args:
        embedding_optimizer: :mod:`persia.embedding.optim` ``SGD``, ``Adagrad`` or ``Adam`` (run
            by the embedding servers). The older keyword ``sparse_optimizer`` works too; a
            context made with it returns PERSIA's older ``(output, target)`` from
            :meth:`forward` (the labels side by side in one tensor).
        dense_optimizer: a ``torch.optim`` optimizer of the model's parameters.
        grad_scalar_update_factor: accepted (logged once): ctrserve's gradient scaler backs
            off on non-finite dense and embedding gradients alike.
        backward_buffer_size: gradient pushes :meth:`backward` queues for the background
            workers before it waits (0, a ctrserve extension: ``backward`` pushes itself).
            A batch of a ``DataLoader`` with ``embedding_staleness`` gives its permit back once
            its push is applied; a failed push is raised by the next ``forward``/``backward``
            or on leaving the context, which waits for every push.
        backward_workers_size: threads sending the queued gradient pushes.
        grad_update_buffer_size: accepted (logged once): each queued push holds its batch's
            gradients until it is applied.
        lookup_emb_directly: accepted (logged once when False): the nn worker's client always
            talks to the embedding servers directly (ctrserve has no embedding worker).
        mixed_precision: ``torch.autocast`` and a gradient scaler on CUDA; on the CPU it is
            logged and training runs in float32 (PERSIA refused it there).
        distributed_option: accepted (logged once): data parallelism follows ``WORLD_SIZE``
            (``DistributedDataParallel``, NCCL on CUDA, Gloo on the CPU).
        model, embedding_config, threadpool_worker_size, device_id, embedding_servers,
        slots_config, global_config: as :class:`EmbeddingCtx`.

    Raises:
        TypeError: no embedding optimizer, or one of another kind.
        ValueError: ``grad_scalar_update_factor <= 0`` or no model.

    Example:
        >>> ctx = TrainCtx(model=model, embedding_optimizer=Adagrad(), dense_optimizer=opt,  # doctest: +SKIP
        ...                embedding_servers=[], slots_config="embedding_config.yml")

    Called without a model and with only the keywords of PERSIA's older ``TrainCtx``
    (``grad_scaler``, ``sparse_optimizer``, ``port``, ``data_queue_size``, ...; none at all in a
    TorchServe handler), it makes that older context, :class:`persia.legacy.LegacyTrainCtx`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from persia.legacy import LEGACY_TRAIN_CTX_KEYWORDS, LegacyTrainCtx

        if cls is TrainCtx and not args and set(kwargs) <= LEGACY_TRAIN_CTX_KEYWORDS:
            return LegacyTrainCtx(**kwargs)  # not a TrainCtx: Python calls no __init__ on it
        return super().__new__(cls)

    def __init__(
        self,
        embedding_optimizer: Any = None,
        dense_optimizer: torch.optim.Optimizer | None = None,
        grad_scalar_update_factor: float = 4,
        backward_buffer_size: int = 10,
        backward_workers_size: int = 8,
        grad_update_buffer_size: int = 60,
        lookup_emb_directly: bool = True,
        mixed_precision: bool = True,
        distributed_option: Any = None,
        *args: Any,
        sparse_optimizer: Any = None,
        **kwargs: Any,
    ):
        if embedding_optimizer is None and sparse_optimizer is None:
            raise TypeError("TrainCtx needs an embedding_optimizer (persia.embedding.optim.SGD, Adagrad or Adam)")
        if embedding_optimizer is not None and sparse_optimizer is not None:
            raise TypeError("give embedding_optimizer or its older name sparse_optimizer, not both")
        #: True for a context made with the older keyword: forward returns one target tensor
        self.legacy_target = sparse_optimizer is not None
        optimizer = as_sparse_optimizer(embedding_optimizer if sparse_optimizer is None else sparse_optimizer)
        if grad_scalar_update_factor <= 0:
            raise ValueError(f"grad_scalar_update_factor must be > 0, got {grad_scalar_update_factor}")
        if dense_optimizer is None:
            raise TypeError("TrainCtx needs a dense_optimizer (a torch.optim optimizer of the model's parameters)")
        if kwargs.get("model", args[0] if args else None) is None:
            raise ValueError("Model not found, please init context with pytorch model")
        defaults = {
            "grad_scalar_update_factor": (grad_scalar_update_factor, 4, "the gradient scaler's own back-off applies"),
            "grad_update_buffer_size": (
                grad_update_buffer_size,
                60,
                "each queued gradient push holds its batch's gradients until it is applied",
            ),
            "lookup_emb_directly": (lookup_emb_directly, True, "the client always looks embeddings up directly"),
            "distributed_option": (distributed_option, None, "data parallelism follows WORLD_SIZE (DDP)"),
        }
        for name, (value, default, why) in defaults.items():
            if value != default:
                _note_unused(name, why)
        if mixed_precision and not torch.cuda.is_available():
            _note_unused("mixed_precision=True", "mixed precision needs CUDA; training runs in float32 on the CPU")
        self.embedding_optimizer = optimizer
        self.dense_optimizer = dense_optimizer
        self.mixed_precision = mixed_precision
        super().__init__(
            PreprocessMode.TRAIN,
            *args,
            _sparse_optimizer=optimizer,
            _dense_optimizer=dense_optimizer,
            _mixed_precision=mixed_precision,
            _backward_buffer_size=backward_buffer_size,
            _backward_workers_size=backward_workers_size,
            **kwargs,
        )

    def _exit(self) -> None:
        try:
            super()._exit()
        finally:
            # Leaving the context waits for every queued gradient push; a failed one is raised here.
            self._require_engine()._close_pusher()

    def forward(self, batch: Any) -> tuple[Tensor, Any]:
        """Look the batch up (with gradients) and run the model in training mode.

        Args:
            batch: a :class:`~persia.embedding.data.PersiaBatch` (or ``PyPersiaBatchData``, its
                bytes, or a batch ``persia.data.DataLoader`` looked up ahead).

        Returns:
            ``(output, labels)``: the labels as a list of tensors with the dtypes and shapes
            the batch was built with (a context made with ``sparse_optimizer=``: one float32
            tensor of all labels side by side).

        Raises:
            InvalidRequestError: a malformed batch or one without labels.
        """
        engine = self._require_engine()
        if isinstance(batch, (bytes, bytearray, memoryview)):
            batch = PersiaBatch.from_bytes(bytes(batch))
        output, target = engine.forward(batch)
        if self.legacy_target:
            return output, target
        source = batch.batch if isinstance(batch, PrefetchedBatch) else batch
        return output, [_tensor(a, engine.device) for a in source.label_arrays()]

    def backward(self, loss: Tensor, embedding_gradient_check_frequency: int = 20) -> Tensor:
        """Back-propagate ``loss``, push the embeddings' gradients, step the dense optimizer.

        Args:
            loss: the batch's loss.
            embedding_gradient_check_frequency: accepted (logged once when changed): the
                gradient scaler checks every step.

        Returns:
            The loss as back-propagated (scaled by the gradient scaler under mixed precision).

        Raises:
            RuntimeError: no :meth:`forward` before.
        """
        if embedding_gradient_check_frequency != 20:
            _note_unused("embedding_gradient_check_frequency", "the gradient scaler checks every step")
        engine = self._require_engine()
        scale = engine.scaler.get_scale() if engine.mixed_precision else 1.0
        scaled = loss.detach() * scale
        engine.backward(loss)
        return scaled

    def dump_checkpoint(  # type: ignore[override]
        self,
        dst_dir: str,
        dense_model_filename: str = "dense.pt",
        jit_dense_model_filename: str = "jit_dense.pt",
        opt_filename: str = "opt.pt",
        blocking: bool = True,
        with_jit_model: bool = False,
    ) -> None:
        """Save the dense model (state dict, with ``with_jit_model`` also its TorchScript), the
        dense optimizer's state as ``opt_filename`` and the embeddings under ``dst_dir``.

        Raises:
            StorageError: an unwritable ``dst_dir``.
        """
        super().dump_checkpoint(
            dst_dir,
            dense_filename=dense_model_filename,
            jit_dense_filename=jit_dense_model_filename,
            blocking=blocking,
            with_jit_model=with_jit_model,
        )
        self.dump_torch_state_dict(self.dense_optimizer, dst_dir, opt_filename)

    def load_checkpoint(  # type: ignore[override]
        self,
        src_dir: str,
        map_location: str | None = None,
        dense_model_filename: str = "dense.pt",
        opt_filename: str = "opt.pt",
        blocking: bool = True,
    ) -> None:
        """Load what :meth:`dump_checkpoint` saved (dense model and optimizer when present)."""
        super().load_checkpoint(
            src_dir, map_location=map_location, dense_filename=dense_model_filename, blocking=blocking
        )
        if self._storage(src_dir).exists(opt_filename):
            self.load_torch_state_dict(self.dense_optimizer, os.path.join(str(src_dir), opt_filename), map_location)


def cnt_ctx() -> BaseCtx | None:
    """The context entered most recently (``None`` outside every context)."""
    return _CURRENT_CXT


def eval_ctx(*args: Any, **kwargs: Any) -> EmbeddingCtx:
    """An :class:`EmbeddingCtx` in ``EVAL`` mode (no gradients, no new rows); inside a
    :class:`TrainCtx` it shares that context's embedding servers or in-process tables."""
    return EmbeddingCtx(PreprocessMode.EVAL, *args, **kwargs)


def _tensor(array: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(array if array.flags.writeable else array.copy()).to(device)


__all__ = ["BaseCtx", "EmbeddingCtx", "PersiaTrainingBatch", "PreprocessMode", "TrainCtx", "cnt_ctx", "eval_ctx"]
