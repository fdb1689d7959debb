"""The API of PERSIA's older documents, on the current one.

PERSIA's first documents (the getting-started guide of the DLRM example, "Customize a PERSIA
job", the TorchServe inference guide) use names that PERSIA later replaced. They keep working:

* ``persia.ctx.init_backend(init_output=True, wait_server_ready=True)``: the data loader's link
  to the nn workers, a :class:`~persia.data_ctx.DataCtx` (``send_data``);
* ``persia.ctx.TrainCtx(grad_scaler=..., sparse_optimizer=..., port=..., data_queue_size=...)``
  without a model: :class:`LegacyTrainCtx`, where the training loop runs the model, the loss
  and the dense optimizer itself and the context supplies the batches (``data_loader()``), their
  embeddings (``prepare_features``) and pushes the embeddings' gradients
  (``on_after_backward``); ``TrainCtx()`` with no argument prepares served batches
  (``prepare_features(batch, is_training=False)``) inside a TorchServe handler;
* ``persia.prelude.PersiaEmbeddingClientPyClass(worker_size, middleware_services)``: the
  handler's lookup client (``batch_to_device_dirct``, the documents' spelling, and
  ``batch_to_device_direct``) and the gRPC client's encoder (``batch_to_bytes``).

PERSIA's "middleware" (later the embedding worker) is the embedding worker of
:mod:`persia.infer_ctx`: an address given for it is the service registry of
``persia-launcher embedding-worker`` or the embedding servers themselves.

Example:
    >>> with TrainCtx(sparse_optimizer=Adagrad(lr=1e-3), port=23333) as ctx:  # doctest: +SKIP
    ...     for batch_idx, data in enumerate(ctx.data_loader()):
    ...         (dense, sparse), target = ctx.prepare_features(data)
    ...         loss = loss_fn(model(dense, sparse), target)
    ...         loss.backward()
    ...         ctx.on_after_backward(1.0, batch_idx)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from embedding_server.core.config import EmbeddingConfig as SlotsConfig
from embedding_server.core.config import GlobalConfig
from embedding_server.core.errors import InvalidRequestError
from embedding_server.rpc.client import EmbeddingClient, LookupResult, RawEmbedding
from persia.data_ctx import DataCtx
from persia.embedding.data import PersiaBatch
from persia.embedding.optim import as_sparse_optimizer
from persia.infer_ctx import InferCtx, PersiaInferBatch
from persia.logger import get_default_logger
from trainer.batch import PyPersiaBatchData

_logger = get_default_logger()

#: the keywords of the older ``TrainCtx`` (a ``TrainCtx`` made with only these and no model is one)
LEGACY_TRAIN_CTX_KEYWORDS = frozenset(
    {
        "grad_scaler",
        "sparse_optimizer",
        "port",
        "data_queue_size",
        "device_id",
        "timeout",
        "embedding_servers",
        "slots_config",
        "global_config",
    }
)


def init_backend(
    worker_size: int = 20, wait_server_ready: bool = False, init_output: bool = False, timeout: float = 60.0
) -> DataCtx:
    """The data loader's link to the nn workers (PERSIA's older ``init_backend``).

    Args:
        worker_size: PERSIA's thread pool; the batches go out on one connection per nn worker.
        wait_server_ready: wait up to ``timeout`` seconds for the nn workers to be registered and
            reachable; without it they must be there at once (one second).
        init_output: PERSIA's switch for the trainer-bound output; ctrserve's nn workers look the
            embeddings up themselves, so everything always goes to them.
        timeout: seconds to wait with ``wait_server_ready``.

    Returns:
        A :class:`~persia.data_ctx.DataCtx`; its ``send_data`` sends a batch. Leave it with
        ``with`` (or call ``__exit__``) to tell the nn workers the data is complete.

    Raises:
        TimeoutError: the nn workers were not there in time.
    """
    if not init_output:
        _logger.info("init_backend(init_output=False): the batches go to the nn workers all the same")
    return DataCtx(timeout=timeout if wait_server_ready else 1.0)


class LegacyTrainCtx:
    """PERSIA's older ``TrainCtx``: the training loop runs the model; the context gives it the
    batches and their embeddings and pushes the embeddings' gradients.

    Made by ``persia.ctx.TrainCtx(...)`` called with only these keywords and no model.

    Args:
        grad_scaler: the loop's ``torch.cuda.amp.GradScaler`` (kept as :attr:`grad_scaler`; the
            loop passes its scale to :meth:`on_after_backward`).
        sparse_optimizer: :mod:`persia.sparse.optim` ``SGD``, ``Adagrad`` or ``Adam``, set on
            the embedding servers; None (inference) leaves theirs.
        port: where :meth:`data_loader` receives the data loaders' batches (``0``/None: any free
            port); registered with the service registry as nn worker ``RANK`` unless
            ``PERSIA_NN_WORKER_ADDRS`` names the nn workers.
        data_queue_size: batches held before the data loaders wait.
        device_id: the CUDA device of the tensors; None (or negative): the CPU.
        timeout: seconds :meth:`data_loader` waits for a batch (and for the registry).
        embedding_servers, slots_config, global_config: as :class:`~persia.train_ctx.EmbeddingCtx`;
            found when first needed, so an inference context needs none of them.

    Raises:
        ValueError: a bad port, a queue size below 1, or a ``device_id`` that is no CUDA device here.

    Example:
        >>> ctx = TrainCtx()  # in a TorchServe handler  # doctest: +SKIP
        >>> (dense, sparse), _ = ctx.prepare_features(client.batch_to_device_dirct(data, 0), is_training=False)
    """

    def __init__(
        self,
        grad_scaler: Any = None,
        sparse_optimizer: Any = None,
        port: int | None = None,
        data_queue_size: int = 10,
        device_id: int | None = None,
        timeout: float = 600.0,
        *,
        embedding_servers: list[str] | None = None,
        slots_config: SlotsConfig | str | os.PathLike[str] | None = None,
        global_config: GlobalConfig | str | os.PathLike[str] | None = None,
    ):
        if device_id is not None and device_id >= 0:
            if not torch.cuda.is_available() or device_id >= torch.cuda.device_count():
                raise ValueError(f"device_id: {device_id} invalid! ({torch.cuda.device_count()} CUDA devices present)")
        else:
            device_id = None
        self.device_id = device_id
        if port is not None and not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be 0..65535, got {port}")
        if int(data_queue_size) < 1:
            raise ValueError(f"data_queue_size must be >= 1, got {data_queue_size}")
        self.grad_scaler = grad_scaler
        self.sparse_optimizer = None if sparse_optimizer is None else as_sparse_optimizer(sparse_optimizer)
        self.port = 0 if port is None else int(port)
        self.data_queue_size = int(data_queue_size)
        self.timeout = timeout
        self.device = torch.device("cpu") if self.device_id is None else torch.device(f"cuda:{self.device_id}")
        self._servers = embedding_servers
        self._slots = slots_config
        self._global = global_config
        self._client: EmbeddingClient | None = None
        self._config: SlotsConfig | None = None
        self._pending: LookupResult | None = None
        self._receiver: Any = None
        #: ``(rank, address)`` registered as an nn worker, until :meth:`close` deregisters it
        self._registered: tuple[int, str] | None = None

    # ------------------------------------------------------------------ embedding servers

    @property
    def client(self) -> EmbeddingClient:
        """The embedding client (connected on first use; the sparse optimizer set then)."""
        if self._client is None:
            self._client, self._config = self._connect()
            if self.sparse_optimizer is not None:
                self._client.set_optimizer(self.sparse_optimizer)
        return self._client

    def _connect(self) -> tuple[EmbeddingClient, SlotsConfig]:
        from persia.service import embedding_server_addresses

        servers = embedding_server_addresses() if self._servers is None else list(self._servers)
        if isinstance(self._slots, SlotsConfig):
            config = self._slots
        elif self._slots is not None:
            config = SlotsConfig.load(os.fspath(self._slots))
        elif os.environ.get("PERSIA_EMBEDDING_CONFIG", "").strip():
            config = SlotsConfig.load(os.environ["PERSIA_EMBEDDING_CONFIG"].strip())
        elif servers:
            from embedding_server.rpc.served_config import read_embedding_config

            config = read_embedding_config(servers)
        else:
            raise ValueError("no embedding_config.yml: pass slots_config=, set PERSIA_EMBEDDING_CONFIG, or use servers")
        if servers:
            from embedding_server.rpc.remote import RemoteEmbeddingClient
            from embedding_server.rpc.security import environment_client_security

            return RemoteEmbeddingClient(config, servers, security=environment_client_security(admin=True)), config
        from embedding_server.rpc.client import InProcessEmbeddingClient

        if isinstance(self._global, GlobalConfig):
            glob = self._global
        else:
            glob = (
                GlobalConfig.load(os.fspath(self._global)) if self._global is not None else GlobalConfig.from_dict({})
            )
        return InProcessEmbeddingClient(config, glob, 1), config

    # ------------------------------------------------------------------ data

    def data_loader(self) -> Iterator[PyPersiaBatchData]:
        """The batches the data loaders send (``init_backend().send_data``), in arrival order;
        it ends when every data loader has left its ``with`` block.

        Raises:
            DataflowError: a data loader went away before finishing.
        """
        from persia import env
        from persia.dataflow import BatchReceiver, max_batch_bytes_from_env, nn_worker_addresses_from_env

        if self._receiver is None:
            host = os.environ.get("PERSIA_NN_WORKER_DATA_HOST", "").strip() or "127.0.0.1"
            self._receiver = BatchReceiver(
                self.data_queue_size,
                host,
                self.port,
                decode=PersiaBatch.from_bytes,
                max_batch_bytes=max_batch_bytes_from_env(),
            )
            if nn_worker_addresses_from_env() is None:
                from persia.service import NN_WORKER, register_service

                port = self._receiver.address.rpartition(":")[2]
                advertised = socket.getfqdn() if host in ("0.0.0.0", "::") else host
                rank, size = env.get_rank(), env.get_world_size()
                register_service(
                    NN_WORKER, rank or 0, f"{advertised}:{port}", size=size or 1, timeout=min(self.timeout, 60.0)
                )
                self._registered = (rank or 0, f"{advertised}:{port}")
            _logger.info(f"TrainCtx receives batches at {self._receiver.address}")
        while True:
            batch = self._receiver.inbox.get(self.timeout)
            if batch is None:
                return
            yield batch

    @property
    def data_address(self) -> str | None:
        """Where :meth:`data_loader` receives (``host:port``), once it started."""
        return None if self._receiver is None else self._receiver.address

    # ------------------------------------------------------------------ features

    def prepare_features(
        self, data: PyPersiaBatchData | PersiaInferBatch | bytes, is_training: bool = True
    ) -> tuple[tuple[Tensor, list[Tensor]], Tensor | None]:
        """The model's inputs and the target of a batch.

        Args:
            data: a batch (or its bytes), looked up here (with gradients and new rows when
                ``is_training``; read-only otherwise), or one looked up already
                (``PersiaEmbeddingClientPyClass.batch_to_device_dirct``).
            is_training: the batch trains (:meth:`on_after_backward` pushes its gradients).

        Returns:
            ``((dense, sparse), target)``: the dense parts side by side as float32
            ``[batch, width]``, one embedding tensor per feature (pooled ``[batch, dim]``, raw
            ``[batch, sample_fixed_size, dim]``) in ``embedding_config.yml`` order, and the
            targets side by side (None when the batch has none).

        Raises:
            InvalidRequestError: an unknown feature, one of the features missing, or a training
                batch without a target.
        """
        if isinstance(data, PersiaInferBatch):
            dense = _dense(data.non_id_type_features, data.batch_size)
            sparse = [_as_tensor(data.embeddings.embeddings[name]) for name in data.feature_names]
            targets = data.labels
        else:
            if isinstance(data, (bytes, bytearray, memoryview)):
                data = PersiaBatch.from_bytes(bytes(data))
            client = self.client
            assert self._config is not None
            data.validate(self._config)
            by_name = {f.name: f for f in data.sparse}
            names = list(self._config.slots_config)
            missing = [name for name in names if name not in by_name]
            if missing:
                raise InvalidRequestError(f"the batch lacks the features {missing} of embedding_config.yml")
            if is_training and not data.targets:
                raise InvalidRequestError("a training batch needs a target (add_target)")
            result = client.lookup([by_name[n] for n in names], requires_grad=is_training, insert=is_training)
            self._pending = result if is_training else None
            dense = torch.from_numpy(data.dense_matrix())
            sparse = [_as_tensor(result.embeddings[n]) for n in names]
            targets = data.targets
        target = torch.from_numpy(np.concatenate(targets, axis=1).astype(np.float32, copy=False)) if targets else None
        return (dense.to(self.device), [s.to(self.device) for s in sparse]), (
            None if target is None else target.to(self.device)
        )

    def on_after_backward(self, loss_scale: float, batch_idx: int, emb_grad_check_interval: int = 20) -> bool:
        """Push the embeddings' gradients of the batch :meth:`prepare_features` prepared last,
        unscaled by ``loss_scale``; nothing is pushed when one of them is not finite.

        Args:
            loss_scale: the gradient scaler's scale (1.0 without one).
            batch_idx: the step (for the log).
            emb_grad_check_interval: accepted; every step's gradients are checked.

        Returns:
            Whether the gradients were finite (the loop backs its scaler off when not).

        Raises:
            RuntimeError: no training batch prepared since the last call.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("on_after_backward() needs a prepare_features() of a training batch first")
        finite = True
        for group in pending.groups:
            if group.rows.grad is not None:
                if loss_scale != 1.0:
                    group.rows.grad.div_(loss_scale)
                finite = finite and bool(torch.isfinite(group.rows.grad).all())
        if finite:
            self.client.push_gradients(pending)
        else:
            _logger.warning(f"step {batch_idx}: embedding gradients not finite (scale {loss_scale}); not pushed")
        return finite

    # ------------------------------------------------------------------ embeddings

    def dump(self, dst_dir: str | os.PathLike[str]) -> None:
        """Write every embedding row (and optimizer state) under ``dst_dir`` (a path or storage URL).

        Raises:
            StorageError: an unwritable location.
        """
        self.client.dump(_location(dst_dir))

    def load(self, src_dir: str | os.PathLike[str]) -> None:
        """Load what :meth:`dump` wrote (into any number of shards).

        Raises:
            InvalidRequestError: no complete dump there, or one that does not fit the tables.
        """
        self.client.load(_location(src_dir))

    def __enter__(self) -> LegacyTrainCtx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop receiving (deregistering this nn worker's data address) and close the embedding client."""
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
        if self._registered is not None:
            from persia.service import NN_WORKER, deregister_service

            rank, address = self._registered
            self._registered = None
            deregister_service(NN_WORKER, rank, address)
        close = getattr(self._client, "close", None)
        if close is not None:
            close()
        self._client = None


class PersiaEmbeddingClientPyClass:
    """PERSIA's older lookup client of a TorchServe handler (and encoder of its gRPC client).

    Args:
        worker_size: PERSIA's thread pool; the lookups ask every shard at once.
        middleware_services: ``host:port`` of the service registry or of the embedding servers
            (see :class:`~persia.infer_ctx.InferCtx`); may be empty for a client that only
            encodes batches.

    Example:
        >>> client = PersiaEmbeddingClientPyClass(0, [])
        >>> data = client.batch_to_bytes(batch)  # doctest: +SKIP
    """

    def __init__(self, worker_size: int, middleware_services: Sequence[str]):
        self.worker_size = worker_size
        self.middleware_services = [a for a in middleware_services if a and a.strip()]
        self._infer: InferCtx | None = None

    def batch_to_bytes(self, batch: Any) -> bytes:
        """The batch's bytes (``PyPersiaBatchData``/``PersiaBatch.to_bytes()``)."""
        to_bytes = getattr(batch, "to_bytes", None)
        if to_bytes is None:
            raise TypeError(f"batch_to_bytes expects a PyPersiaBatchData, got {type(batch).__name__}")
        return bytes(to_bytes())

    def batch_to_device_direct(self, batch: bytes, device_id: int | None = None) -> PersiaInferBatch:
        """Decode the batch's bytes and look its ids up (read-only: ids the servers do not hold
        read as zeros), for ``TrainCtx().prepare_features(..., is_training=False)``.

        Raises:
            ValueError: the client was made without middleware services.
            InvalidRequestError: undecodable bytes, an unknown feature or one missing.
        """
        if self._infer is None:
            if not self.middleware_services:
                raise ValueError("PersiaEmbeddingClientPyClass was given no middleware_services to look up from")
            self._infer = InferCtx(self.middleware_services)
            self._infer.wait_for_serving()
        return self._infer.get_embedding_from_bytes(bytes(batch))

    #: the spelling of PERSIA's inference guide
    batch_to_device_dirct = batch_to_device_direct

    def close(self) -> None:
        """Close the lookup connections."""
        if self._infer is not None:
            self._infer.close()
            self._infer = None


def _as_tensor(embedding: Tensor | RawEmbedding) -> Tensor:
    return embedding.values if isinstance(embedding, RawEmbedding) else embedding


def _dense(arrays: list[np.ndarray], batch_size: int) -> Tensor:
    parts = [a.reshape(batch_size, -1).astype(np.float32, copy=False) for a in arrays]
    return torch.from_numpy(np.concatenate(parts, axis=1) if parts else np.zeros((batch_size, 0), np.float32))


def _location(directory: str | os.PathLike[str]) -> str:
    """An absolute path for a local directory (the servers may run elsewhere), the URL otherwise."""
    text = os.fspath(directory)
    return text if "://" in text else str(Path(text).resolve())


__all__ = ["LegacyTrainCtx", "PersiaEmbeddingClientPyClass", "init_backend"]
