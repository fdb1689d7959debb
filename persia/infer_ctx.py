"""PERSIA's ``InferCtx``: embedding lookups for online inference, e.g. inside a TorchServe handler.

In PERSIA, ``InferCtx(embedding_worker_addrs)`` connects to embedding workers, which forward
lookups to the embedding parameter servers. ctrserve has no embedding worker process: the
lookup client routes ids to the embedding servers itself. So each address given is resolved to
embedding servers, and may be either of:

* **the service registry** that ``persia-launcher embedding-worker`` serves (what
  ``persia.service.get_embedding_worker_services()`` returns, from ``EMBEDDING_WORKER_SERVICE``;
  PERSIA's handlers pass exactly that): the servers are its ``embedding-parameter-server``
  entries in shard order, or ``PERSIA_EMBEDDING_SERVERS`` when that is set (as
  :func:`persia.service.embedding_server_addresses` reads them);
* **embedding servers** themselves (``host:port`` of each shard, in any order: each server's
  Info says which shard it is, and they are put in shard order).

Which one an address is, is found by asking it (an embedding server answers gRPC ``Info``, the
registry answers HTTP), so a handler works unchanged with either. The features (names, dims,
pooling) come from the servers too (their Info carries their ``embedding_config.yml``); lookups
are read-only: ids the servers do not hold read as zeros and are never inserted, whatever mode
the servers run in.

:meth:`InferCtx.prepare_features` gives what PERSIA's gives: the non-ID features as the client
built them (dtype and shape, through the batch's layout), one embedding tensor per feature of
the servers' ``embedding_config.yml`` in file order (the order ctrserve's trainer feeds them: a
pooled feature ``[batch, dim]``, a raw one ``[batch, sample_fixed_size, dim]`` with zeros where
no id sits), and the labels (None when the batch has none).

Example (PERSIA's serve_handler.py, unchanged)::

    from persia.ctx import InferCtx
    from persia.service import get_embedding_worker_services

    ctx = InferCtx(get_embedding_worker_services(), device_id=None)
    ctx.wait_for_serving()
    batch = ctx.get_embedding_from_bytes(persia_batch.to_bytes())
    non_id_type_tensors, id_type_tensors, labels = ctx.prepare_features(batch)
    scores = model(non_id_type_tensors, id_type_tensors)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embedding_server.core.batch import KeyedIds
from embedding_server.core.batch_codec import BatchData, decode_batch
from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.dense_layout import BatchLayout, label_arrays, non_id_arrays
from embedding_server.core.errors import InvalidRequestError, ShardUnavailableError
from embedding_server.rpc.client import LookupResult, RawEmbedding
from embedding_server.rpc.remote import RemoteEmbeddingClient
from embedding_server.rpc.security import ClientSecurity, environment_client_security
from embedding_server.rpc.served_config import order_by_shard, read_embedding_config, server_info
from persia.registry import RegistryClient, RegistryError
from persia.service import EMBEDDING_PARAMETER_SERVER, embedding_server_addresses

_logger = logging.getLogger("persia.infer_ctx")

#: Seconds one probe of an address (gRPC Info, then the registry's HTTP API) may take.
PROBE_S = 1.0
#: the environment variable that, when set, names the embedding servers behind a registry
PERSIA_SERVERS_ENV = "PERSIA_EMBEDDING_SERVERS"


@dataclass
class PersiaInferBatch:
    """A batch with its embeddings looked up (PERSIA's ``PersiaTrainingBatch`` in inference).

    Args:
        batch_size: samples.
        non_id_type_features: the non-ID arrays as the client built them.
        labels: the label arrays as the client built them (empty when the batch has none).
        embeddings: the lookup result, per feature name.
        feature_names: the features in the order :meth:`InferCtx.prepare_features` gives them.
        meta: the client's ``meta`` bytes (PERSIA's), or None.
    """

    batch_size: int
    non_id_type_features: list[np.ndarray]
    labels: list[np.ndarray]
    embeddings: LookupResult
    feature_names: list[str]
    meta: bytes | None = None


class InferCtx:
    """Embedding lookups against running embedding servers, read-only (PERSIA's ``InferCtx``).

    Args:
        embedding_worker_addrs: ``host:port`` of the service registry (what
            ``persia.service.get_embedding_worker_services()`` returns) or of the embedding
            servers (any order); see the module docstring.
        model: accepted for PERSIA's signature (``EmbeddingCtx``'s); the handler runs the model.
        embedding_config: PERSIA's ``EmbeddingConfig`` (initialization, admit probability,
            weight bound): accepted and not applied. It configures how training creates rows;
            inference only reads them, and PERSIA's embedding servers in Infer mode ignore it too.
        threadpool_worker_size: accepted for PERSIA's signature; the lookup client asks every
            shard at once on its own channels, with no thread pool to size.
        device_id: CUDA device for the tensors :meth:`prepare_features` returns; None: the CPU.
        connect_timeout: seconds :meth:`wait_for_serving` waits for the registry and servers.
        lookup_timeout: seconds allowed per lookup (every shard, retries included).
        security: TLS and token of secured embedding servers (None: the environment's read token
            if one is set, see docs/security.md).

    Raises:
        ValueError: no address, or a ``device_id`` that is not a CUDA device here.

    Example:
        >>> with InferCtx(["127.0.0.1:8887"]) as ctx:
        ...     ctx.wait_for_serving()
        ...     non_id, id_type, labels = ctx.prepare_features(ctx.get_embedding_from_bytes(data))
    """

    def __init__(
        self,
        embedding_worker_addrs: Sequence[str],
        model: torch.nn.Module | None = None,
        embedding_config: Any = None,
        threadpool_worker_size: int = 10,
        device_id: int | None = None,
        *,
        connect_timeout: float = 60.0,
        lookup_timeout: float = 5.0,
        security: ClientSecurity | None = None,
    ):
        if isinstance(embedding_worker_addrs, str):
            embedding_worker_addrs = [embedding_worker_addrs]
        self.addresses = [a.strip() for a in embedding_worker_addrs if a and a.strip()]
        if not self.addresses:
            raise ValueError(
                "InferCtx needs the service registry's address (persia.service.get_embedding_worker_services()) "
                "or the embedding servers' addresses; got none"
            )
        self.model = model
        self.embedding_config = embedding_config
        if embedding_config is not None:
            _logger.info("InferCtx: embedding_config has no effect on inference (lookups only read rows)")
        self.threadpool_worker_size = threadpool_worker_size
        self.device_id = _check_device(device_id)
        self.device = torch.device("cpu") if self.device_id is None else torch.device(f"cuda:{self.device_id}")
        self.connect_timeout = connect_timeout
        self.lookup_timeout = lookup_timeout
        self.security = security if security is not None else environment_client_security(admin=False)
        self.client: RemoteEmbeddingClient | None = None
        self.config: EmbeddingConfig | None = None
        self.servers: list[str] = []

    # ------------------------------------------------------------------ PERSIA's API

    def wait_for_serving(self, timeout: float | None = None) -> None:
        """Block until every embedding shard answers; resolve the addresses and learn the features.

        Args:
            timeout: seconds (default ``connect_timeout``).

        Raises:
            TimeoutError: the registry or a shard did not answer within ``timeout``.
            ConfigError: the servers disagree on their shard layout or report no config.
        """
        if self.client is not None:
            return
        timeout = self.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        servers = self._resolve(deadline)
        left = max(0.1, deadline - time.monotonic())
        try:
            self.config = read_embedding_config(servers, timeout=left, security=self.security)
            self.client = RemoteEmbeddingClient(
                self.config,
                servers,
                timeout=self.lookup_timeout,
                connect_timeout=max(0.1, deadline - time.monotonic()),
                security=self.security,
            )
        except ShardUnavailableError as exc:
            raise TimeoutError(f"InferCtx: the embedding servers {servers} are not serving: {exc}") from None
        self.servers = servers
        _logger.info("InferCtx: serving with embedding servers %s, features %s", servers, self.feature_names)

    def get_embedding_from_bytes(self, data: bytes, device_id: int | None = None) -> PersiaInferBatch:
        """Decode ``data`` (``PersiaBatch.to_bytes()``) and look up its embeddings.

        Args:
            data: the batch bytes.
            device_id: accepted for PERSIA's signature; tensors go to this context's device.

        Raises:
            InvalidRequestError: undecodable bytes, an unknown feature or one missing.
            ShardUnavailableError: a shard did not answer within ``lookup_timeout``.
        """
        return self.get_embedding_from_data(decode_batch(data))

    def get_embedding_from_data(self, batch: Any, device_id: int | None = None) -> PersiaInferBatch:
        """Like :meth:`get_embedding_from_bytes` for a batch object (``PersiaBatch``,
        ``PyPersiaBatchData``) or decoded :class:`BatchData`."""
        if not isinstance(batch, BatchData):
            batch = decode_batch(batch.to_bytes())
        self.wait_for_serving()
        assert self.client is not None
        layout = BatchLayout.from_meta(
            batch.meta, [int(d.shape[1]) for d in batch.dense], [int(t.shape[1]) for t in batch.targets]
        )
        sparse = batch.sparse if isinstance(batch.sparse, KeyedIds) else KeyedIds.from_features(batch.sparse)
        names = self.feature_names
        unknown = [n for n in sparse.names if n not in set(names)]
        missing = [n for n in names if n not in sparse.names]
        if unknown or missing:
            raise InvalidRequestError(
                f"the batch's id_type_features do not match the embedding servers' features {names}: "
                + "; ".join(
                    part
                    for part in (f"unknown {unknown}" if unknown else "", f"missing {missing}" if missing else "")
                    if part
                )
            )
        looked_up = self.client.lookup(sparse.select(names), requires_grad=False, insert=False)
        return PersiaInferBatch(
            batch_size=batch.batch_size,
            non_id_type_features=non_id_arrays(batch.dense, layout),
            labels=label_arrays(batch.targets, layout),
            embeddings=looked_up,
            feature_names=names,
            meta=layout.meta if layout is not None else None,
        )

    def prepare_features(
        self, batch: PersiaInferBatch, *args: Any, **kwargs: Any
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
        """``(non_id_type_tensors, id_type_tensors, label_tensors)`` of a looked-up batch, on
        this context's device (see the module docstring for their order and shapes); the labels
        are None for a batch without labels, as ``EmbeddingCtx`` gives them in inference mode."""
        non_id = [self._tensor(a) for a in batch.non_id_type_features]
        embeddings = []
        for name in batch.feature_names:
            value = batch.embeddings.embeddings[name]
            tensor = value.values if isinstance(value, RawEmbedding) else value
            embeddings.append(tensor if tensor.device == self.device else tensor.to(self.device))
        labels = [self._tensor(a) for a in batch.labels] if batch.labels else None
        return non_id, embeddings, labels

    # ------------------------------------------------------------------ ctrserve's additions

    @property
    def feature_names(self) -> list[str]:
        """The features the servers serve, in the order :meth:`prepare_features` gives them."""
        if self.config is None:
            raise RuntimeError("InferCtx: call wait_for_serving() first")
        return list(self.config.slots_config)

    def close(self) -> None:
        """Close the lookup client's connections."""
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> InferCtx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
        return tensor if self.device.type == "cpu" else tensor.to(self.device)

    def _resolve(self, deadline: float) -> list[str]:
        """The embedding servers, in shard order, behind :attr:`addresses`."""
        kinds: dict[str, str] = {}
        while True:
            for address in self.addresses:
                if address not in kinds:
                    kind = _probe(address, self.security)
                    if kind is not None:
                        kinds[address] = kind
            registry = next((a for a in self.addresses if kinds.get(a) == "registry"), None)
            if registry is not None:
                left = max(0.1, deadline - time.monotonic())
                try:
                    if _persia_servers_set():
                        return embedding_server_addresses(left)
                    return RegistryClient(registry).wait_for(EMBEDDING_PARAMETER_SERVER, None, left)
                except RegistryError as exc:
                    raise TimeoutError(f"InferCtx: the registry at {registry} refused: {exc}") from None
            if len(kinds) == len(self.addresses):
                left = max(0.1, deadline - time.monotonic())
                try:
                    return order_by_shard(self.addresses, left, self.security)
                except ShardUnavailableError as exc:
                    raise TimeoutError(str(exc)) from None
            if time.monotonic() >= deadline:
                silent = [a for a in self.addresses if a not in kinds]
                raise TimeoutError(
                    f"InferCtx: {', '.join(silent)} answered neither as an embedding server (gRPC Info) nor as the "
                    "service registry of 'persia-launcher embedding-worker' (EMBEDDING_WORKER_SERVICE) in time"
                )
            time.sleep(0.1)


def _probe(address: str, security: ClientSecurity | None) -> str | None:
    """``"server"`` when ``address`` answers gRPC Info, ``"registry"`` when it answers the
    registry's HTTP API, None when it answers neither (yet)."""
    try:
        server_info(address, PROBE_S, security)
        return "server"
    except ShardUnavailableError:
        pass
    try:
        RegistryClient(address).services(EMBEDDING_PARAMETER_SERVER, timeout=PROBE_S)
        return "registry"
    except (TimeoutError, RegistryError, OSError, ValueError):
        return None


def _persia_servers_set() -> bool:
    return bool(os.environ.get(PERSIA_SERVERS_ENV, "").strip())


def _check_device(device_id: int | None) -> int | None:
    """PERSIA's rule: None or a negative id is the CPU; another id must be a CUDA device here."""
    if device_id is None or device_id < 0:
        return None
    if not torch.cuda.is_available() or device_id >= torch.cuda.device_count():
        raise ValueError(
            f"device_id: {device_id} invalid: {torch.cuda.device_count() if torch.cuda.is_available() else 0} "
            "CUDA devices here (None serves on the CPU)"
        )
    return device_id
