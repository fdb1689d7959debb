"""PERSIA's data loading on the nn worker: ``DataLoader``, ``StreamingDataset``, ``IterableDataset``.

* :class:`StreamingDataset` receives the batches data-loader processes send with
  :meth:`persia.data_ctx.DataCtx.send_data` (over TCP, :mod:`persia.dataflow`), into a buffer of
  ``buffer_size`` batches; a full buffer makes the senders wait. It ends once every data loader
  has said it is done.
* :class:`IterableDataset` makes the batches in this process: from an iterable given to it, or
  from ``__iter__`` in a subclass (PERSIA's way), in a background thread.
* :class:`DataLoader` iterates either and starts each batch's embedding lookup ahead through
  the current context (:func:`persia.ctx.cnt_ctx`), at most ``embedding_staleness`` training
  batches whose gradients are not pushed yet (see :mod:`trainer.lookahead`).

The names of PERSIA's older documents, ``StreamDataset`` and ``Dataloader``, are the same classes.

Example:
    >>> with TrainCtx(model=model, embedding_optimizer=Adagrad(), dense_optimizer=opt) as ctx:  # doctest: +SKIP
    ...     loader = DataLoader(StreamingDataset(buffer_size=10), embedding_staleness=4)
    ...     for batch in loader:
    ...         output, labels = ctx.forward(batch)
    ...         ctx.backward(loss_fn(output, labels[0]))
"""

from __future__ import annotations

import queue
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

from persia import env
from persia.dataflow import (
    BatchReceiver,
    max_batch_bytes_from_env,
    nn_worker_addresses_from_env,
    receiver_bind_from_env,
)
from persia.embedding.data import PersiaBatch
from persia.logger import get_default_logger
from trainer.batch import PyPersiaBatchData

_logger = get_default_logger()
_POLL_S = 0.2


class IterableDatasetBase(ABC, Iterable[PersiaBatch]):
    """A source of batches for :class:`DataLoader` (PERSIA's base class).

    Args:
        buffer_size: batches made or received ahead of the lookups.
    """

    def __init__(self, buffer_size: int = 10):
        if not isinstance(buffer_size, int) or isinstance(buffer_size, bool) or buffer_size < 1:
            raise ValueError(f"buffer_size must be an integer >= 1, got {buffer_size!r}")
        self.buffer_size = buffer_size

    @abstractmethod
    def batches(self, timeout: float | None) -> Iterator[PyPersiaBatchData]:
        """The batches :class:`DataLoader` consumes, each within ``timeout`` seconds (None:
        no limit) of the previous one.

        Raises:
            TimeoutError: the next batch did not come in time.
        """


class StreamingDataset(IterableDatasetBase):
    """The batches the data loaders send (the receiving end of :class:`~persia.data_ctx.DataCtx`).

    Made in the nn worker, it listens at once: on ``PERSIA_NN_WORKER_DATA_HOST`` (127.0.0.1)
    and ``PERSIA_NN_WORKER_DATA_PORT`` + ``LOCAL_RANK`` (any free port by default), and
    registers that address with the service registry as role ``nn-worker``, index = rank (with
    ``PERSIA_NN_WORKER_ADDRS`` set, it binds its rank's entry there and registers nothing).
    It ends when all data loaders have finished; a loader that went away before finishing
    raises :class:`~persia.dataflow.DataflowError` once its batches are used up. Closing it
    (:meth:`close`, or the end of its batches) deregisters its entry, unless a later worker of
    the same rank registered there since (a registry that cannot be reached is logged).

    Args:
        buffer_size: batches held before senders wait (PERSIA's ``buffer_size``).

    Raises:
        ValueError: a bad size or environment variable.
        OSError: the address cannot be bound.
        TimeoutError: the registry was not reachable.

    Example:
        >>> dataset = StreamingDataset(buffer_size=10)  # doctest: +SKIP
        >>> loader = DataLoader(dataset)  # doctest: +SKIP
    """

    def __init__(self, buffer_size: int = 10):
        super().__init__(buffer_size)
        rank, world_size = env.get_rank(), env.get_world_size()
        self.rank = 0 if rank is None else rank
        self.world_size = 1 if world_size is None else world_size
        local_rank = env.get_local_rank()
        host, port = receiver_bind_from_env(self.rank, 0 if local_rank is None else local_rank)
        self.receiver = BatchReceiver(
            buffer_size, host, port, decode=PersiaBatch.from_bytes, max_batch_bytes=max_batch_bytes_from_env()
        )
        #: the address registered as ``nn-worker`` ``rank``, until :meth:`close` deregisters it
        self._registered: str | None = None
        self._closing = threading.Lock()
        if nn_worker_addresses_from_env() is None:
            from persia.service import NN_WORKER, register_service

            advertised = self._advertised(host)
            try:
                register_service(NN_WORKER, self.rank, advertised, size=self.world_size)
            except BaseException:
                self.receiver.close()
                raise
            self._registered = advertised
        _logger.info(f"nn worker {self.rank} receives batches at {self.receiver.address}")

    def _advertised(self, host: str) -> str:
        port = self.receiver.address.rpartition(":")[2]
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()  # bound everywhere: the loaders need a name they can reach
        return f"{host}:{port}"

    @property
    def address(self) -> str:
        """Where this worker receives (``host:port``)."""
        return self.receiver.address

    def stats(self) -> dict[str, int]:
        """The buffer's counters: ``received``, ``consumed``, ``depth``, ``waited_puts``
        (batches that waited for room: back-pressure), ``max_depth``."""
        return self.receiver.inbox.stats()

    def close(self) -> None:
        """Stop receiving (senders still sending get an error) and deregister this worker's
        address from the service registry (only while its entry still holds it). Closing again
        does nothing more."""
        self.receiver.close()
        with self._closing:
            registered, self._registered = self._registered, None
        if registered is not None:
            from persia.service import NN_WORKER, deregister_service

            deregister_service(NN_WORKER, self.rank, registered)

    def __iter__(self) -> Iterator[PersiaBatch]:
        raise NotImplementedError(
            "StreamingDataset cannot be iterated directly: iterate DataLoader(StreamingDataset(...)) "
            "inside a TrainCtx or eval_ctx"
        )

    def batches(self, timeout: float | None) -> Iterator[PyPersiaBatchData]:
        inbox = self.receiver.inbox
        while True:
            batch = inbox.get(timeout)
            if batch is None:
                self.close()  # every data loader is done: nothing more will come
                return
            yield batch


class IterableDataset(IterableDatasetBase):
    """Batches made in this process: an iterable's, or a subclass's ``__iter__`` (PERSIA's way),
    run in a background thread ``buffer_size`` batches ahead. It can be iterated again (each
    :class:`DataLoader` pass starts it over).

    Args:
        source: an iterable of :class:`~persia.embedding.data.PersiaBatch` (or
            ``PyPersiaBatchData``); an integer here is ``buffer_size``, as PERSIA's first argument.
        buffer_size: batches made ahead.

    Raises:
        ValueError: a bad ``buffer_size``.

    Example:
        >>> dataset = IterableDataset([batch_a, batch_b])  # doctest: +SKIP
        >>> class TestDataset(IterableDataset):  # doctest: +SKIP
        ...     def __iter__(self):
        ...         yield from make_test_batches()
    """

    def __init__(self, source: Iterable[PersiaBatch] | int | None = None, buffer_size: int = 10):
        iterable: Iterable[PersiaBatch] | None
        if isinstance(source, int):
            iterable, buffer_size = None, source
        else:
            iterable = source
        super().__init__(buffer_size)
        self.source = iterable

    def __iter__(self) -> Iterator[PersiaBatch]:
        if self.source is None:
            raise NotImplementedError(
                f"{type(self).__name__}: pass an iterable of PersiaBatch or implement __iter__ in a subclass"
            )
        return iter(self.source)

    def batches(self, timeout: float | None) -> Iterator[PyPersiaBatchData]:
        made: queue.Queue[tuple[str, Any]] = queue.Queue(self.buffer_size)
        stop = threading.Event()

        def put(item: tuple[str, Any]) -> bool:
            while not stop.is_set():
                try:
                    made.put(item, timeout=_POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for position, batch in enumerate(self):
                    if not isinstance(batch, PyPersiaBatchData):
                        raise TypeError(
                            f"{type(self).__name__} item {position}: expected a PersiaBatch, got {type(batch).__name__}"
                        )
                    if not put(("batch", batch)):
                        return
                put(("end", None))
            except BaseException as exc:  # raised again in the training loop
                put(("error", exc))

        thread = threading.Thread(target=produce, name="iterable-dataset", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    kind, value = made.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"{type(self).__name__} made no batch in {timeout:g} s") from None
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
            thread.join(timeout=2 * _POLL_S + 1.0)


class DataLoader:
    """Iterates a dataset's batches with their embedding lookups started ahead (PERSIA's).

    Iterate it inside a context (``with TrainCtx(...)`` or ``with eval_ctx(...)``): the context
    current when iteration starts looks the batches up. The batches it yields go to that
    context's ``forward``.

    Args:
        dataset: a :class:`StreamingDataset` or :class:`IterableDataset`.
        forward_buffer_size: looked-up batches held ready for the training loop.
        timeout_ms: the longest wait for the next batch; after it the iteration stops with a
            warning, as in PERSIA.
        num_workers: threads running lookups.
        reproducible: the same batch order and the same lookups every run: batches in order
            of (data loader, sequence) round-robin, lookups in order, each push waiting for the
            lookups staleness allows before it.
        embedding_staleness: at most this many training batches looked up whose gradients are
            not pushed yet (1: synchronous); None: bounded by ``forward_buffer_size``.

    Raises:
        TypeError: ``dataset`` is not one of this module's datasets.
        ValueError: a size below 1.

    Example:
        >>> loader = DataLoader(StreamingDataset(10), embedding_staleness=4)  # doctest: +SKIP
        >>> for batch in loader:  # doctest: +SKIP
        ...     output, labels = ctx.forward(batch)
    """

    def __init__(
        self,
        dataset: IterableDatasetBase,
        forward_buffer_size: int = 10,
        timeout_ms: int = 1000 * 60 * 10,
        num_workers: int = 10,
        reproducible: bool = False,
        embedding_staleness: int | None = None,
    ):
        if not isinstance(dataset, IterableDatasetBase):
            raise TypeError(
                "dataset must be a persia.data.StreamingDataset or IterableDataset (an IterableDatasetBase), "
                f"got {type(dataset).__name__}"
            )
        for name, value in (
            ("forward_buffer_size", forward_buffer_size),
            ("timeout_ms", timeout_ms),
            ("num_workers", num_workers),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if embedding_staleness is not None and (
            not isinstance(embedding_staleness, int) or isinstance(embedding_staleness, bool) or embedding_staleness < 1
        ):
            raise ValueError(f"embedding_staleness must be None or an integer >= 1, got {embedding_staleness!r}")
        self.dataset = dataset
        self.forward_buffer_size = forward_buffer_size
        self.timeout_ms = timeout_ms
        self.num_workers = num_workers
        self.reproducible = reproducible
        self.embedding_staleness = embedding_staleness
        #: the lookahead engine of the current iteration (its ``stats()``: lookups, permits)
        self.engine: Any = None
        if reproducible and isinstance(dataset, StreamingDataset):
            dataset.receiver.inbox.set_ordered(True)

    def __iter__(self) -> Iterator[Any]:
        from persia.train_ctx import cnt_ctx

        ctx = cnt_ctx()
        if ctx is None:
            raise RuntimeError(
                "DataLoader needs a current context: iterate it inside `with TrainCtx(...)` or `with eval_ctx(...)`"
            )
        source = self.dataset.batches(self.timeout_ms / 1000.0)
        # PERSIA's contexts drive a trainer.ctx.TrainCtx (their ``engine``), which looks ahead.
        lookahead = getattr(getattr(ctx, "engine", ctx), "lookahead", None)
        mode = getattr(ctx, "preprocess_mode", None)
        trains = mode is None or mode.name == "TRAIN"
        try:
            if lookahead is None:  # a context without lookahead looks each batch up in forward
                yield from source
                return
            self.engine = lookahead(
                staleness=self.embedding_staleness,
                buffer_size=self.forward_buffer_size,
                num_workers=self.num_workers,
                reproducible=self.reproducible,
                requires_grad=None if trains else _never,
            )
            yield from self.engine.iterate(source)
        except TimeoutError as exc:
            _logger.warning(f"get_batch time out, stop iter data: {exc}")


def _never(batch: Any) -> bool:
    """Evaluation and inference contexts: no batch collects gradients."""
    return False


#: the names of PERSIA's older documents
StreamDataset = StreamingDataset
Dataloader = DataLoader
