"""PERSIA's ``DataCtx``: a data-loader process's link to the nn workers.

A data loader (``persia-launcher data-loader``, which sets ``REPLICA_INDEX`` and
``REPLICA_SIZE``) builds :class:`~persia.embedding.data.PersiaBatch` objects and sends each with
:meth:`DataCtx.send_data`; the nn workers' :class:`~persia.data.StreamingDataset` receives them.
The batches travel as the batch codec's bytes over TCP (:mod:`persia.dataflow`), dealt
round-robin to the nn workers by rank; a worker whose buffer is full makes ``send_data`` wait.
Leaving the ``with`` block normally tells every nn worker that this loader is done; training
ends once all ``REPLICA_SIZE`` loaders are. Leaving it with an exception does not: the nn
workers then report this loader as lost instead of ending as if the data were complete.

In PERSIA the data loader also sent the ID features to the embedding workers; ctrserve's nn
workers look embeddings up themselves, so everything goes to the nn worker.

The nn workers are found through ``PERSIA_NN_WORKER_ADDRS`` (comma-separated ``host:port`` in
rank order; ctrserve extension) when set, else through the service registry
(:func:`persia.service.wait_for_services`, role ``nn-worker``), waiting for as many as they
declared.

Example:
    >>> with DataCtx() as ctx:  # doctest: +SKIP
    ...     for batch in make_batches():
    ...         ctx.send_data(batch)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from persia import env
from persia.dataflow import BatchSender, max_batch_bytes_from_env, nn_worker_addresses_from_env
from persia.logger import get_default_logger

_logger = get_default_logger()


class DataCtx:
    """Sends batches from a data-loader process to the nn workers.

    Args:
        nn_worker_addrs: the nn workers' data addresses in rank order (ctrserve extension;
            default ``PERSIA_NN_WORKER_ADDRS``, else the registry).
        replica_index: this loader's index (default ``REPLICA_INDEX``, else 0).
        replica_size: how many loaders there are (default ``REPLICA_SIZE``, else 1).
        timeout: seconds to wait for the nn workers to be registered and reachable.

    Raises:
        TimeoutError: the nn workers did not show up in ``timeout`` seconds.
        DataflowError: an nn worker refused this loader (e.g. its index is taken).
        ValueError: a malformed address or index.

    Example:
        >>> with DataCtx() as ctx:  # doctest: +SKIP
        ...     ctx.send_data(PersiaBatch([IDTypeFeatureWithSingleID("user", ids)], labels=[Label(y)]))
    """

    def __init__(
        self,
        nn_worker_addrs: Sequence[str] | None = None,
        replica_index: int | None = None,
        replica_size: int | None = None,
        timeout: float = 60.0,
    ):
        index = replica_index if replica_index is not None else env.get_replica_index()
        size = replica_size if replica_size is not None else env.get_replica_size()
        addresses = list(nn_worker_addrs) if nn_worker_addrs is not None else nn_worker_addresses_from_env()
        if addresses is None:
            from persia.service import NN_WORKER, wait_for_services

            addresses = wait_for_services(NN_WORKER, None, timeout)
        self.sender = BatchSender(
            addresses,
            0 if index is None else index,
            1 if size is None else size,
            connect_timeout=timeout,
            max_batch_bytes=max_batch_bytes_from_env(),
        )
        _logger.info(
            f"data loader {self.sender.replica_index} of {self.sender.replica_size} sends to nn workers {addresses}"
        )

    def __enter__(self) -> DataCtx:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.sender.finish()
        finally:
            self.sender.close()

    def send_data(self, persia_batch: Any) -> None:
        """Send one batch to the next nn worker in turn, waiting while its buffer is full.

        Args:
            persia_batch: a :class:`~persia.embedding.data.PersiaBatch` (or any batch with
                ``to_bytes()``, e.g. ``PyPersiaBatchData``).

        Raises:
            TypeError: not a batch.
            DataflowError: an nn worker refused the batch (its message says why) or went away.
        """
        to_bytes = getattr(persia_batch, "to_bytes", None)
        if to_bytes is None:
            raise TypeError(f"send_data expects a PersiaBatch, got {type(persia_batch).__name__}")
        self.sender.send(to_bytes())

    @property
    def sent(self) -> int:
        """Batches sent so far."""
        return self.sender.sent

    @property
    def waited_sends(self) -> int:
        """Batches that had to wait for room in an nn worker's buffer (back-pressure)."""
        return self.sender.waited_sends
