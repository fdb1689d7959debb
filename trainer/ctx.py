"""The training context: PERSIA's ``TrainCtx``.

Per batch, :meth:`TrainCtx.forward` looks the sparse features up in the embedding store (rows
that collect gradients), runs the dense model, and :meth:`TrainCtx.backward` back-propagates,
hands the push of each looked-up row's gradient to its shard (where the sparse optimizer runs)
to background threads (:mod:`trainer.pusher`, PERSIA's asynchronous backward), and steps the
dense optimizer locally while the push travels.

The pushes never make training see older rows than synchronous training would: a lookup of a
plain batch (``forward``, ``predict``, ``prepare``), a new :meth:`TrainCtx.lookahead`, a
checkpoint and any use of :attr:`TrainCtx.client` first wait for every queued push; only
batches looked up ahead by a lookahead read rows without the gradients of up to
``staleness - 1`` earlier batches, as PERSIA's ``embedding_staleness`` allows.

Example:
    >>> with TrainCtx(model=model, dense_optimizer=torch.optim.Adam(model.parameters(), 1e-3),
    ...               sparse_optimizer=Adagrad(lr=0.05), embedding_config=emb) as ctx:
    ...     for batch in loader:
    ...         output, target = ctx.forward(batch)
    ...         ctx.backward(F.binary_cross_entropy(output, target))
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from embedding_server.core.config import EmbeddingConfig, GlobalConfig, JobType
from embedding_server.core.errors import InvalidRequestError
from embedding_server.core.model_spec import ModelSignature, model_signature
from embedding_server.core.optimizers import SparseOptimizer
from embedding_server.rpc.client import EmbeddingClient, InProcessEmbeddingClient, LookupResult, RawEmbedding
from embedding_server.storage.base import LocalStorage, Storage
from embedding_server.storage.urls import open_storage
from trainer.batch import PyPersiaBatchData
from trainer.lookahead import Lookahead, PrefetchedBatch
from trainer.pusher import GradientPusher

log = logging.getLogger(__name__)

DENSE_STATE_FILE = "dense.pt"
SPARSE_DIR = "sparse"


class TrainCtx:
    """Trains a dense ``nn.Module`` together with the sparse embeddings of its features.

    Args:
        model: ``forward(dense, sparse: List[Tensor])`` (see :mod:`trainer.models`).
        dense_optimizer: a ``torch.optim`` optimizer over ``model``'s parameters.
        sparse_optimizer: SGD, Adagrad or Adam (PERSIA's names), run by the embedding store;
            ``None`` for a context that only evaluates (the servers keep their optimizer).
        embedding_config: the features and tables (``EmbeddingConfig`` or a path to the YAML).
        global_config: capacity and initialisation of the in-process store (default settings
            when omitted); with ``embedding_servers`` only its ``storage`` section is used. That
            section (connection settings, ``file_mode``/``dir_mode``) opens every location the
            trainer writes: checkpoints, and the model root's dense exports and sparse
            checkpoints (:attr:`storage_options`).
        embedding_servers: ``host:port`` of remote shards in order; ``None`` keeps the sparse
            tables in this process (``num_shards`` stores). Training pushes gradients, sets the
            optimizer and dumps/loads checkpoints: admin calls, so the servers' admin token comes
            from ``CTRSERVE_EMBEDDING_ADMIN_TOKEN`` or ``CTRSERVE_EMBEDDING_ADMIN_TOKEN_FILE`` when
            they have one (docs/security.md).
        num_shards: in-process shards (answers do not depend on it).
        device_id: CUDA device index; ``None`` picks ``LOCAL_RANK`` (or 0) when CUDA is present,
            else the CPU.
        mixed_precision: ``torch.autocast`` with a gradient scaler on CUDA; ignored on the CPU.
        distributed: wrap the model in ``DistributedDataParallel``; ``None`` means "when
            ``WORLD_SIZE`` > 1" (torchrun sets it). Every rank must share remote embedding servers.
        backward_buffer_size: gradient pushes queued for the background workers before
            :meth:`backward` waits (PERSIA's); 0: :meth:`backward` pushes itself, synchronously.
        backward_workers_size: threads sending queued gradient pushes (PERSIA's).

    Raises:
        ValueError: data-parallel training without remote embedding servers, or a negative
            backward size.
    """

    def __init__(
        self,
        model: nn.Module,
        dense_optimizer: torch.optim.Optimizer,
        sparse_optimizer: SparseOptimizer | None,
        embedding_config: EmbeddingConfig | str | Path,
        global_config: GlobalConfig | str | Path | None = None,
        embedding_servers: Sequence[str] | None = None,
        num_shards: int = 1,
        device_id: int | None = None,
        mixed_precision: bool = False,
        distributed: bool | None = None,
        backward_buffer_size: int = 10,
        backward_workers_size: int = 8,
    ):
        for name, value, least in (
            ("backward_buffer_size", backward_buffer_size, 0),
            ("backward_workers_size", backward_workers_size, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.backward_buffer_size = backward_buffer_size
        self.backward_workers_size = backward_workers_size
        #: runs the gradient pushes (made by the first asynchronous backward)
        self._pusher: GradientPusher | None = None
        self.config = (
            embedding_config
            if isinstance(embedding_config, EmbeddingConfig)
            else EmbeddingConfig.load(embedding_config)
        )
        self.features = list(self.config.slots_config)
        self.device = _pick_device(device_id)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.distributed = self.world_size > 1 if distributed is None else distributed
        if self.distributed and embedding_servers is None:
            raise ValueError("data-parallel training needs embedding servers every rank shares: pass embedding_servers")
        if global_config is not None and not isinstance(global_config, GlobalConfig):
            global_config = GlobalConfig.load(global_config)
        #: the global config's ``storage`` section: how the trainer opens what it writes.
        self.storage_options: dict[str, Any] = dict(global_config.server.storage) if global_config is not None else {}
        self._client = self._make_client(global_config, embedding_servers, num_shards)
        if sparse_optimizer is not None:
            self._client.set_optimizer(sparse_optimizer)
        self.sparse_optimizer = sparse_optimizer
        self.model = model.to(self.device)
        #: how the model takes its inputs: ctrserve's ``(dense, sparse)`` or PERSIA's
        #: ``(non_id_type_tensors, id_type_tensors)`` (read from its ``forward``)
        self.signature = model_signature(model)
        self.dense_optimizer = dense_optimizer
        self.mixed_precision = mixed_precision and self.device.type == "cuda"
        if mixed_precision and not self.mixed_precision:
            log.info("mixed precision is only used on CUDA; training in float32 on %s", self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.mixed_precision)
        self.train_model: nn.Module = self._wrap_distributed(self.model) if self.distributed else self.model
        self.step = 0
        self._pending: LookupResult | None = None
        #: the batch of ``_pending`` when it was looked up ahead (its staleness permit)
        self._pending_prefetch: PrefetchedBatch | None = None
        #: the most recent :meth:`lookahead` engine (its counters: ``prefetcher.stats()``)
        self.prefetcher: Lookahead | None = None

    def _make_client(
        self, global_config: GlobalConfig | None, servers: Sequence[str] | None, num_shards: int
    ) -> EmbeddingClient:
        if servers is not None:
            from embedding_server.rpc.remote import RemoteEmbeddingClient
            from embedding_server.rpc.security import environment_client_security

            return RemoteEmbeddingClient(self.config, list(servers), security=environment_client_security(admin=True))
        if global_config is None:
            global_config = GlobalConfig.from_dict({})
        if global_config.mode is not JobType.TRAIN:
            raise ValueError("the trainer's in-process store needs common_config.job_type: train")
        return InProcessEmbeddingClient(self.config, global_config, num_shards)

    def _wrap_distributed(self, model: nn.Module) -> nn.Module:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    @property
    def client(self) -> EmbeddingClient:
        """The embedding client, once every gradient push :meth:`backward` queued has been
        applied (or has failed: the failure is raised by the next :meth:`forward`,
        :meth:`backward` or :meth:`close`), so that direct calls see every gradient."""
        self._await_pushes()
        return self._client

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> TrainCtx:
        return self

    def __exit__(self, exc_type, exc, trace) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the loop's own exception goes on; a push failure is only logged beside it
            self.close()
        except Exception:
            log.exception("while leaving the training context after %s", exc_type.__name__)

    def close(self) -> None:
        """Wait for the queued gradient pushes and stop their threads, then release the
        embedding client's connections (in-process tables stay in memory).

        Raises:
            Exception: what a background gradient push raised, if one failed.
        """
        try:
            self._close_pusher()
        finally:
            self._close_client()

    def _close_pusher(self) -> None:
        """Wait for every push and stop the pusher's threads (a later backward starts new ones);
        raises a push failure not raised yet."""
        if self._pusher is not None:
            self._pusher.close()

    def _close_client(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    # ------------------------------------------------------------------ gradient pushes

    def flush(self) -> None:
        """Wait until every gradient push :meth:`backward` queued is applied on the servers.

        Raises:
            Exception: what a background gradient push raised (the first failure not raised
                yet; later failures are counted in its note).
        """
        self._await_pushes()
        self._raise_push_failure()

    def _await_pushes(self) -> None:
        """Wait for the queued pushes; a failure is kept for :meth:`_raise_push_failure`."""
        if self._pusher is not None:
            self._pusher.wait()

    def _raise_push_failure(self) -> None:
        if self._pusher is not None:
            self._pusher.raise_failure()

    def push_stats(self) -> dict[str, int]:
        """The gradient pushes' counters (see :meth:`GradientPusher.stats`; zeros before the
        first asynchronous push; after :meth:`close`, those of the pushes before it)."""
        if self._pusher is None:
            return {"submitted": 0, "done": 0, "failed": 0, "in_flight": 0, "waiting": 0}
        return self._pusher.stats()

    # ------------------------------------------------------------------ training

    def lookahead(
        self,
        staleness: int | None = None,
        buffer_size: int = 10,
        num_workers: int = 1,
        reproducible: bool = False,
        requires_grad: Callable[[Any], bool] | None = None,
    ) -> Lookahead:
        """An engine that starts the lookups of upcoming batches ahead of the training step
        (PERSIA's ``embedding_staleness``; see :mod:`trainer.lookahead`). :meth:`forward` and
        :meth:`predict` use the prefetched lookups of the batches it yields, :meth:`backward`
        gives their staleness permits back once their gradients are pushed.

        Args:
            staleness: at most this many training batches looked up whose gradients are not
                pushed yet (1: synchronous); ``None``: bounded by ``buffer_size``.
            buffer_size: looked-up batches waiting for the training loop.
            num_workers: lookup threads.
            reproducible: lookups and pushes in an order fixed by the stream alone.
            requires_grad: whether a batch trains (default: its ``requires_grad`` where it has
                one, else whether it has targets); evaluation passes ``lambda batch: False``.

        Raises:
            ValueError: a size below 1.

        Example:
            >>> for batch in ctx.lookahead(staleness=4).iterate(batches):  # doctest: +SKIP
            ...     output, target = ctx.forward(batch)
            ...     ctx.backward(F.binary_cross_entropy(output, target))
        """
        # Its first lookups see every gradient pushed so far (an epoch's, or training's before
        # an evaluation pass): what they read does not depend on how fast earlier pushes were.
        self._await_pushes()
        self.prefetcher = Lookahead(
            lambda batch, requires_grad, insert: self._lookup(batch, requires_grad, insert),
            _trains if requires_grad is None else requires_grad,
            staleness=staleness,
            buffer_size=buffer_size,
            num_workers=num_workers,
            reproducible=reproducible,
        )
        return self.prefetcher

    def prepare(
        self, batch: PyPersiaBatchData | PrefetchedBatch, requires_grad: bool, insert: bool = True
    ) -> tuple[Tensor, list[Tensor], LookupResult]:
        """Dense matrix and sparse inputs of ``batch`` on the training device.

        ``insert=False`` looks the ids up without inserting unseen ones (they read as zeros, as
        on an inference server); see :meth:`EmbeddingClient.lookup`. A :class:`PrefetchedBatch`
        looked up with the same settings gives its prefetched lookup (else it is looked up
        again and its staleness permit given back). Any other lookup first waits for the
        gradient pushes queued so far: it reads what synchronous training would.

        Raises:
            InvalidRequestError: an unknown feature, or a feature of the model missing from the batch.
        """
        if isinstance(batch, PrefetchedBatch):
            if batch.matches(requires_grad, insert):
                return batch.result()
            batch.release()
            plain = batch.batch
        else:
            plain = batch
        self._await_pushes()
        return self._lookup(plain, requires_grad, insert)

    def _lookup(
        self, batch: PyPersiaBatchData, requires_grad: bool, insert: bool
    ) -> tuple[Tensor, list[Tensor], LookupResult]:
        """:meth:`prepare`'s lookup as it stands, without waiting for queued pushes (the
        lookahead's threads run it; their permits order them against the pushes)."""
        batch.validate(self.config)
        by_name = {f.name: f for f in batch.sparse}
        missing = [name for name in self.features if name not in by_name]
        if missing:
            raise InvalidRequestError(f"the batch lacks sparse features the model takes: {missing}")
        result = self._client.lookup(
            [by_name[name] for name in self.features], requires_grad=requires_grad, insert=insert
        )
        sparse = [_as_tensor(result.embeddings[name]).to(self.device, non_blocking=True) for name in self.features]
        dense = torch.from_numpy(batch.dense_matrix()).to(self.device, non_blocking=True)
        return dense, sparse, result

    def forward(self, batch: PyPersiaBatchData | PrefetchedBatch) -> tuple[Tensor, Tensor]:
        """Look up, run the model; returns ``(output, target)``: the target parts side by side
        (one column per task).

        Raises:
            InvalidRequestError: a malformed batch or one without targets.
            Exception: what an earlier batch's background gradient push raised.
        """
        self._raise_push_failure()
        if not batch.targets:
            raise InvalidRequestError("a training batch needs a target (add_target)")
        self.train_model.train()
        if self._pending_prefetch is not None:
            self._pending_prefetch.release()  # the previous batch got no backward(): no gradients will come
        dense, sparse, self._pending = self.prepare(batch, requires_grad=True)
        self._pending_prefetch = batch if isinstance(batch, PrefetchedBatch) else None
        target = torch.from_numpy(np.concatenate(batch.targets, axis=1))
        with torch.autocast(self.device.type, enabled=self.mixed_precision):
            output = self.train_model(*self.model_inputs(batch, dense, sparse))
        return output.float(), target.to(self.device)

    def backward(self, loss: Tensor) -> None:
        """Back-propagate ``loss``, queue the push of the sparse gradients to the store (see
        ``backward_buffer_size``), step the dense optimizer.

        A batch looked up ahead gives its staleness permit back once its push is applied.

        Raises:
            RuntimeError: no :meth:`forward` before.
            Exception: what an earlier batch's background gradient push raised (before this
                step does anything: it can be taken again).
        """
        self._raise_push_failure()
        if self._pending is None:
            raise RuntimeError("backward() needs a forward() first")
        self.dense_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.mixed_precision:
            # The rows' gradients carry the loss scale; the sparse optimizer needs true gradients.
            scale = self.scaler.get_scale()
            for group in self._pending.groups:
                if group.rows.grad is not None:
                    group.rows.grad.div_(scale)
        prefetched, self._pending_prefetch = self._pending_prefetch, None
        result, self._pending = self._pending, None
        self._push(result, prefetched)
        self.scaler.step(self.dense_optimizer)
        self.scaler.update()
        self.step += 1

    def _push(self, result: LookupResult, prefetched: PrefetchedBatch | None) -> None:
        """Push ``result``'s gradients: queued for the pusher's threads, or here with
        ``backward_buffer_size=0``. A prefetched batch's permit comes back after its push."""
        before = prefetched.before_push if prefetched is not None else None
        after = prefetched.release if prefetched is not None else None
        if self.backward_buffer_size == 0:
            try:
                if before is not None:
                    before()
                self._client.push_gradients(result)
            finally:
                if after is not None:
                    after()
            return
        if self._pusher is None or self._pusher.closed:
            self._pusher = GradientPusher(
                self._client.push_gradients, self.backward_buffer_size, self.backward_workers_size
            )
        if prefetched is not None:
            prefetched.push_queued()
        self._pusher.submit(
            result,
            before=before,
            after=after,
            # reproducible: the shards apply the gradients in batch order
            ordered=prefetched is not None and prefetched.reproducible,
            label=f"training step {self.step}",
        )

    @torch.inference_mode()
    def predict(self, batch: PyPersiaBatchData | PrefetchedBatch) -> Tensor:
        """Model output for ``batch`` without training, as serving computes it.

        Nothing changes in the embedding tables: ids the tables do not hold read as zeros and
        are not inserted, which is what an inference server answers for them. Evaluation on
        held-out data therefore neither adds rows that would be checkpointed, exported and
        served, nor scores differently from the served model.
        """
        self.model.eval()
        dense, sparse, _ = self.prepare(batch, requires_grad=False, insert=False)
        return self.model(*self.model_inputs(batch, dense, sparse)).float().cpu()

    def model_inputs(
        self, batch: PyPersiaBatchData | PrefetchedBatch, dense: Tensor, sparse: list[Tensor]
    ) -> tuple[Tensor | list[Tensor], list[Tensor]]:
        """The model's arguments in its :attr:`signature`: ``(dense, sparse)``, or PERSIA's
        ``(non_id_type_tensors, id_type_tensors)`` with each non-ID part as the client built it."""
        if self.signature is ModelSignature.CTRSERVE:
            return dense, sparse
        arrays = (batch.batch if isinstance(batch, PrefetchedBatch) else batch).non_id_arrays()
        non_id = [torch.from_numpy(a if a.flags.writeable else a.copy()).to(self.device) for a in arrays]
        return non_id, sparse

    # ------------------------------------------------------------------ checkpoints

    def dump_checkpoint(self, directory: str | os.PathLike[str]) -> None:
        """Save the dense model, the dense optimizer and every sparse table with its optimizer
        state under ``directory`` (overwriting an earlier checkpoint there). Data-parallel: rank 0
        writes; every rank waits for it.

        ``directory`` is a local path or a storage URL, as a model root is (``file://``,
        ``s3://bucket/prefix``, ``hdfs://host:port/path``; opened with :attr:`storage_options`,
        the environment filling in, see :mod:`embedding_server.storage.base`). Every part goes through the
        storage layer: the sparse tables to ``<directory>/sparse/`` (manifest last), then the
        dense state as ``<directory>/dense.pt``, published atomically.

        Every gradient :meth:`backward` queued (on every rank) is applied first, so the
        checkpoint holds it.

        Raises:
            StorageError: an unsupported scheme, an unreachable storage, or a failed write.
            Exception: what a background gradient push raised (nothing is written then).
        """
        self.flush()
        self._barrier()  # every rank's pushes are applied before rank 0 dumps
        if self.rank == 0:
            storage = open_storage(directory, self.storage_options)
            self._client.dump(_sparse_location(storage), self.storage_options)
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.dense_optimizer.state_dict(),
                "step": self.step,
            }
            if self.mixed_precision:
                state["scaler"] = self.scaler.state_dict()
            buffer = io.BytesIO()
            torch.save(state, buffer)
            storage.write_atomic(DENSE_STATE_FILE, buffer.getvalue())
        self._barrier()

    def load_checkpoint(self, directory: str | os.PathLike[str]) -> None:
        """Restore what :meth:`dump_checkpoint` saved (sparse tables into any shard count);
        ``directory`` is a path or storage URL as there.

        Raises:
            StorageNotFoundError: no checkpoint at ``directory`` (no ``dense.pt``).
            StorageError: an unsupported scheme or an unreadable storage.
            InvalidRequestError: the sparse part is missing, incomplete or does not fit the tables.
            Exception: what a background gradient push raised (nothing is loaded then).
        """
        self.flush()  # a push still queued must not land on the loaded rows
        self._barrier()
        storage = open_storage(directory, self.storage_options)
        data = storage.read_bytes(DENSE_STATE_FILE)
        state = torch.load(io.BytesIO(data), map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.dense_optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and self.mixed_precision:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if self.rank == 0:
            self._client.load(_sparse_location(storage))
            self._adopt_published(storage)
        self._barrier()

    def _adopt_published(self, storage: Storage) -> None:
        """After loading a checkpoint: adopt the rows the shards published after it (a killed run's
        packets, which followers already serve), so the trainer holds what every follower does
        (:func:`~embedding_server.modelroot.incremental.adopt_published`).

        In-process stores only. Remote train-mode servers would need the same on the server side:
        their Load (or a separate admin call) replaying their own shard's packets above the loaded
        checkpoint's watermark before they accept gradients.
        """
        client = self._client
        if not isinstance(client, InProcessEmbeddingClient) or not client.publishers:
            return
        from embedding_server.modelroot import checkpoint
        from embedding_server.modelroot.incremental import adopt_published

        manifest = checkpoint.read_manifest(storage.child(SPARSE_DIR))
        adopt_published(client.publishers, manifest)

    def _barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def _sparse_location(storage: Storage) -> str:
    """Where the sparse tables of the checkpoint in ``storage`` go: a URL below it (an absolute
    path for a local one, so that remote embedding servers with another working directory
    write to the same place)."""
    if isinstance(storage, LocalStorage):
        return str(storage.root / SPARSE_DIR)
    return storage.join_url(SPARSE_DIR)


def _trains(batch: Any) -> bool:
    """Whether ``batch`` is a training batch: PERSIA's ``requires_grad`` where the batch has
    it, else whether it carries targets."""
    requires_grad = getattr(batch, "requires_grad", None)
    return bool(batch.targets) if requires_grad is None else bool(requires_grad)


def _as_tensor(embedding: Tensor | RawEmbedding) -> Tensor:
    return embedding.values if isinstance(embedding, RawEmbedding) else embedding


def _pick_device(device_id: int | None) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0")) if device_id is None else device_id
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
