"""Embedding lookups for whole batches, against in-process stores or remote sharded servers.

:class:`EmbeddingClient` turns a batch of named sparse features into tensors:

1. hash stacking expands ids where a slot asks for it;
2. keys of all features whose tables share a ``dim`` are deduplicated together;
3. each distinct key is routed to its shard (a stable hash), shards are asked in parallel;
4. the distinct rows are pooled per sample with ``embedding_bag`` (sum, mean or sqrt scaling),
   tiled (``combiner: tile``: the first ``tile_len`` rows side by side, zero-padded, as one
   ``[batch, tile_len * dim]`` tensor), or laid out as ``[batch, sample_fixed_size, dim]`` with a
   mask for raw slots.

Step 4 runs on a tensor of distinct rows that can require grad: after ``loss.backward()``,
:meth:`EmbeddingClient.push_gradients` sends each row's summed gradient to its shard. The
transport (step 3) is the only difference between :class:`InProcessEmbeddingClient` and
:class:`embedding_server.rpc.remote.RemoteEmbeddingClient`, so both give identical answers.

Example:
    >>> emb = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 4}}})
    >>> client = InProcessEmbeddingClient(emb, GlobalConfig.from_dict({}), num_shards=2)
    >>> out = client.lookup([SparseFeature.from_lists("user", [[1, 2], []])])
    >>> out.embeddings["user"].shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from embedding_server.core.batch import KeyedIds, SparseFeature, check_batch
from embedding_server.core.config import EmbeddingConfig, GlobalConfig, Pooling, SlotConfig
from embedding_server.core.optimizers import SparseOptimizer
from embedding_server.store import kernels
from embedding_server.store.store import EmbeddingStore, unique_keys

_NO_WEIGHTS = np.zeros(0, np.float32)
_MAX_PLANS = 64  # feature lists whose lookup plan a client keeps (see EmbeddingClient._plan)


@dataclass(frozen=True)
class RawEmbedding:
    """A non-pooled slot: ``values [batch, sample_fixed_size, dim]``; ``mask`` is True where a
    real id sits (padding positions hold zeros)."""

    values: torch.Tensor
    mask: torch.Tensor


@dataclass
class _KeyGroup:
    """The distinct keys of one dim and the tensor holding their rows."""

    ids: np.ndarray
    tables: np.ndarray
    rows: torch.Tensor


@dataclass
class LookupResult:
    """Per feature, a pooled ``[batch, dim]`` tensor (``[batch, tile_len * dim]`` for tile), or
    a :class:`RawEmbedding`."""

    embeddings: dict[str, torch.Tensor | RawEmbedding]
    groups: list[_KeyGroup] = field(default_factory=list, repr=False)

    def __getitem__(self, name: str) -> torch.Tensor | RawEmbedding:
        return self.embeddings[name]


class EmbeddingClient(abc.ABC):
    """Batch lookups and gradient pushes over ``num_shards`` shards.

    Subclasses provide the transport: :meth:`_lookup_shards` and :meth:`_push_shards`.
    """

    def __init__(self, config: EmbeddingConfig, num_shards: int):
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.config = config
        self.num_shards = num_shards
        tables = list(config.tables.values())
        self._salts = np.array([t.salt for t in tables], np.uint64)
        self._plans: dict[tuple[str, ...], list[_DimGroup]] = {}  # see _plan

    # ------------------------------------------------------------------ transport

    @abc.abstractmethod
    def _lookup_shards(
        self, requests: list[tuple[int, np.ndarray, np.ndarray]], dim: int, insert: bool = True
    ) -> list[np.ndarray]:
        """Vectors for each (shard, ids, tables) request, asked concurrently where possible;
        ``insert=False`` asks train-mode shards not to insert unseen keys (see :meth:`lookup`)."""

    @abc.abstractmethod
    def _push_shards(self, requests: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Apply each (shard, ids, tables, grads) request."""

    # ------------------------------------------------------------------ keys → rows

    def shard_of(self, ids: np.ndarray, tables: np.ndarray) -> np.ndarray:
        """The shard owning each (table, id) key."""
        out = np.empty(ids.shape[0], np.int64)
        kernels.shard_of(ids, tables, self._salts, self.num_shards, out)
        return out

    def lookup_rows(self, ids: np.ndarray, tables: np.ndarray, dim: int, insert: bool = True) -> np.ndarray:
        """Vectors of the given keys (all of tables with this ``dim``) as float32 ``[n, dim]``;
        ``insert`` as in :meth:`lookup`."""
        if ids.shape[0] == 0:
            return np.zeros((0, dim), np.float32)
        if self.num_shards == 1:
            return self._lookup_shards([(0, ids, tables)], dim, insert)[0]
        order, bounds = self._route(ids, tables)
        shards = [s for s in range(self.num_shards) if bounds[s] < bounds[s + 1]]
        parts = self._lookup_shards(
            [(s, ids[order[bounds[s] : bounds[s + 1]]], tables[order[bounds[s] : bounds[s + 1]]]) for s in shards],
            dim,
            insert,
        )
        out = np.empty((ids.shape[0], dim), np.float32)
        for s, part in zip(shards, parts):
            out[order[bounds[s] : bounds[s + 1]]] = part
        return out

    def _lookup_keys(self, ids: np.ndarray, tables: np.ndarray, dim: int, insert: bool = True) -> np.ndarray:
        """Vectors of every key in order, repeated keys included, as a new writable float32
        ``[n, dim]`` array. The shards are asked for each distinct key once (and count it once),
        as :meth:`lookup` always does; a transport that can deduplicate more cheaply overrides
        this."""
        uniq_ids, uniq_tabs, inverse = unique_keys(ids, tables)
        values = self.lookup_rows(uniq_ids, uniq_tabs, dim, insert)
        return np.take(values, inverse, axis=0, mode="clip")  # inverse is valid; "raise" gathers via a temporary

    def push_rows(self, ids: np.ndarray, tables: np.ndarray, grads: np.ndarray) -> None:
        """Send one gradient per key to the key's shard (repeated keys are summed there)."""
        if ids.shape[0] == 0:
            return
        if self.num_shards == 1:
            self._push_shards([(0, ids, tables, grads)])
            return
        order, bounds = self._route(ids, tables)
        self._push_shards(
            [
                (s, ids[sel], tables[sel], np.ascontiguousarray(grads[sel]))
                for s in range(self.num_shards)
                if bounds[s] < bounds[s + 1]
                for sel in [order[bounds[s] : bounds[s + 1]]]
            ]
        )

    def _route(self, ids: np.ndarray, tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        owners = self.shard_of(ids, tables)
        order = np.argsort(owners, kind="stable")
        bounds = np.zeros(self.num_shards + 1, np.int64)
        np.cumsum(np.bincount(owners, minlength=self.num_shards), out=bounds[1:])
        return order, bounds

    # ------------------------------------------------------------------ batches

    def lookup(
        self, features: Sequence[SparseFeature], requires_grad: bool = False, insert: bool = True
    ) -> LookupResult:
        """Embeddings of a batch of named sparse features.

        Args:
            features: one :class:`SparseFeature` per feature, all of one batch size, or them
                as one :class:`~embedding_server.core.batch.KeyedIds` (what decoded batch bytes
                hold; the cheapest form).
            requires_grad: make the distinct rows a leaf tensor that collects gradients, for
                :meth:`push_gradients` after ``backward()``.
            insert: train-mode shards insert ids they have not seen with their deterministic
                initial value (the default: training). False reads such ids as zeros and leaves
                the shards' rows as they are, which is what infer-mode servers answer: use it
                for evaluation, so that held-out ids never become rows that get checkpointed,
                exported and served. Infer-mode shards never insert.

        Raises:
            InvalidRequestError: unknown feature, disagreeing batch sizes, empty batch, or a
                request a server refuses.
        """
        batch_size = check_batch(features, self.config)
        keyed = KeyedIds.from_features(features)
        result = LookupResult({})
        for group in self._plan(keyed.names):
            part = keyed.select(group.names)
            if group.stacked:
                part = KeyedIds.from_features([_hash_stacked(f, slot) for f, slot in zip(part, group.slots)])
            ids = part.ids
            tables = np.repeat(group.tables, part.counts)
            if (
                not requires_grad
                and group.all_pooled
                and ids.shape[0] == part.lengths.size
                and (part.lengths == 1).all()
            ):
                # Every sample of every feature pools exactly one row: the pooled result is that
                # row (sum of one; mean and sqrt scaling divide by 1), so key i's vector is row i
                # of the answer and feature k is the k-th block of batch_size rows.
                rows_per_key = torch.from_numpy(self._lookup_keys(ids, tables, group.dim, insert))
                result.embeddings.update(zip(group.names, rows_per_key.split(batch_size)))
                continue
            uniq_ids, uniq_tabs, inverse = unique_keys(ids, tables)
            values = self.lookup_rows(uniq_ids, uniq_tabs, group.dim, insert)
            if not requires_grad and group.all_pooled:
                # Serving: pool in one compiled pass; each feature is a view of the result.
                lengths = part.lengths.reshape(-1)
                weights = (
                    _fill_weights([(part.lengths[k], slot) for k, slot in enumerate(group.slots)])
                    if group.scaled
                    else None
                )
                bags = np.empty((lengths.shape[0], group.dim), np.float32)
                kernels.pool_bags(values, inverse, lengths, _NO_WEIGHTS if weights is None else weights.numpy(), bags)
                result.embeddings.update(
                    zip(group.names, torch.from_numpy(bags).view(len(group.names), batch_size, group.dim).unbind(0))
                )
                continue
            # Rows decoded straight from a gRPC buffer are read-only; torch needs its own copy.
            rows = torch.from_numpy(values if values.flags.writeable else values.copy())
            if requires_grad:
                rows.requires_grad_(True)
            result.groups.append(_KeyGroup(uniq_ids, uniq_tabs, rows))
            result.embeddings.update(_assemble(group, part, torch.from_numpy(inverse), rows))
        return result

    def _plan(self, names: tuple[str, ...]) -> list[_DimGroup]:
        """The features of each dim, resolved once per feature list (serving sends the same
        list every request; per-feature Python work cost more than the lookup itself)."""
        plan = self._plans.get(names)
        if plan is None:
            by_dim: dict[int, list[str]] = {}
            for name in names:
                by_dim.setdefault(self.config.table_of(name).dim, []).append(name)
            plan = [_DimGroup.of(self.config, dim, members) for dim, members in by_dim.items()]
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()  # clients sending ever new feature lists: no unbounded cache
            self._plans[names] = plan
        return plan

    def push_gradients(self, result: LookupResult) -> None:
        """Send the gradients collected on ``result``'s rows (after ``backward()``) to the servers."""
        for group in result.groups:
            if group.rows.grad is None:
                continue
            grads = group.rows.grad.detach().to("cpu", torch.float32).contiguous().numpy()
            self.push_rows(group.ids, group.tables, grads)

    # ------------------------------------------------------------------ administration

    @abc.abstractmethod
    def set_optimizer(self, optimizer: SparseOptimizer) -> None:
        """Use ``optimizer`` on every shard."""

    @abc.abstractmethod
    def stats(self) -> list[dict]:
        """One dict of counters per shard."""

    @abc.abstractmethod
    def dump(self, directory: str, storage_options: Mapping[str, Any] | None = None) -> None:
        """Write every shard's rows (with optimizer state) as a checkpoint under ``directory``.

        ``storage_options`` (a global config's ``storage`` section: connection settings and the
        ``file_mode``/``dir_mode`` of local files) open ``directory`` for what this process
        writes; None uses the client's own global config's where it has one.
        """

    @abc.abstractmethod
    def load(self, directory: str) -> None:
        """Replace every shard's rows with a checkpoint's (any shard count)."""


def _hash_stacked(f: SparseFeature, slot: SlotConfig) -> SparseFeature:
    """Expand each id into ``hash_stack_rounds`` ids in ``[round * size, (round + 1) * size)``."""
    hs = slot.hash_stack_config
    if hs is None:
        return f
    rounds = hs.hash_stack_rounds
    size = np.uint64(hs.embedding_size)
    salts = (np.arange(1, rounds + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))[None, :]
    hashed = np.empty((f.ids.shape[0], rounds), np.uint64)
    mixed = np.empty(f.ids.shape[0] * rounds, np.uint64)
    kernels.mix_array((f.ids[:, None] ^ salts).reshape(-1), mixed)
    hashed[:] = (mixed.reshape(-1, rounds) % size) + np.arange(rounds, dtype=np.uint64)[None, :] * size
    return SparseFeature(f.name, hashed.reshape(-1), f.offsets * rounds)


#: the poolings that weigh each id (by 1/n or 1/sqrt(n)) before summing
_SCALED = frozenset({Pooling.MEAN, Pooling.SQRTN})


@dataclass(frozen=True)
class _DimGroup:
    """The features of one batch that share an embedding dim: they are deduplicated and looked
    up together. Built once per feature list by :meth:`EmbeddingClient._plan`."""

    dim: int
    names: tuple[str, ...]
    slots: tuple[SlotConfig, ...]
    tables: np.ndarray  # uint16 table index per feature
    pooled: np.ndarray  # int64 positions of the summed features (sum, mean, sqrtn)
    all_pooled: bool  # every feature is summed
    scaled: bool  # some pooled feature has mean or sqrt scaling
    stacked: bool  # some feature has hash stacking

    @classmethod
    def of(cls, config: EmbeddingConfig, dim: int, names: list[str]) -> _DimGroup:
        slots = tuple(config.slots_config[n] for n in names)
        pooled = [k for k, slot in enumerate(slots) if slot.pooling.summed]
        return cls(
            dim,
            tuple(names),
            slots,
            np.array([config.table_of(n).index for n in names], np.uint16),
            np.array(pooled, np.int64),
            len(pooled) == len(slots),
            any(slots[k].pooling in _SCALED for k in pooled),
            any(slot.hash_stack_config is not None for slot in slots),
        )


def _assemble(
    group: _DimGroup, part: KeyedIds, inverse: torch.Tensor, rows: torch.Tensor
) -> dict[str, torch.Tensor | RawEmbedding]:
    """Pool (or lay out) each feature's rows. All summed features go through one pooling call
    on their concatenated keys (``inverse`` holds each key's row in ``rows``, features in
    order); the per-feature work is only for raw and tiled slots."""
    out: dict[str, torch.Tensor | RawEmbedding] = {}
    batch_size, bounds = part.batch_size, part.bounds
    for k, slot in enumerate(group.slots):
        if not slot.pooling.summed:
            raw = _raw(
                inverse[bounds[k] : bounds[k + 1]],
                torch.from_numpy(part.offsets[k]),
                rows,
                slot.tile_len if slot.pooling is Pooling.TILE else slot.sample_fixed_size,
                batch_size,
                group.dim,
            )
            # tile: the kept rows side by side; padding positions are zeros already
            out[group.names[k]] = raw.values.reshape(batch_size, -1) if slot.pooling is Pooling.TILE else raw
    if group.pooled.shape[0]:
        idx = inverse if group.all_pooled else torch.cat([inverse[bounds[k] : bounds[k + 1]] for k in group.pooled])
        lengths = part.lengths if group.all_pooled else part.lengths[group.pooled]
        weights = (
            _fill_weights([(lengths[i], group.slots[k]) for i, k in enumerate(group.pooled)]) if group.scaled else None
        )
        bags = _pool(idx, lengths.reshape(-1), weights, rows, group.dim)
        out.update(zip((group.names[k] for k in group.pooled), bags.split(batch_size)))
    return out


def _pool(
    idx: torch.Tensor, lengths: np.ndarray, weights: torch.Tensor | None, rows: torch.Tensor, dim: int
) -> torch.Tensor:
    """``[bags, dim]``: bag ``j`` sums the rows of its ``lengths[j]`` keys (``idx`` holds each
    key's row in ``rows``, bags in order), each times its ``weights`` entry when given (mean and
    sqrt scaling weigh the one id of a bag by 1, so bags of at most one id need none)."""
    if (lengths == 1).all():
        # One id per bag: the pooled value is that id's row. index_select gives the same values
        # without embedding_bag's intra-op threads (slow when another process keeps a core
        # busy); its backward sums repeated rows' gradients.
        return rows.index_select(0, idx)
    if (lengths <= 1).all():
        # Bags of zero or one id (missing values): the row where there is an id, a zero row
        # (appended) where not, in one gather instead of zeros plus an index_copy. cat and
        # index_select are differentiable, so gradients flow as above.
        src = np.full(lengths.shape[0], rows.shape[0], np.int64)
        src[lengths == 1] = idx.numpy()
        return torch.cat([rows, rows.new_zeros((1, dim))]).index_select(0, torch.from_numpy(src))
    offsets = np.zeros(lengths.shape[0], np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    return F.embedding_bag(
        idx,
        # embedding_bag needs a non-empty table even when every bag is empty; the extra zero
        # row keeps the result attached to ``rows`` for autograd.
        rows if rows.shape[0] else torch.cat([rows, rows.new_zeros((1, dim))]),
        torch.from_numpy(offsets),
        mode="sum",
        per_sample_weights=weights,
    )


def _bag_weights(lengths: np.ndarray, slot: SlotConfig) -> torch.Tensor | None:
    """Per-id weights for mean or sqrt scaling. ``lengths`` count hash-stacked ids; the scale
    uses the number of raw ids (the rounds of one raw id sum into that id's embedding)."""
    pooling = slot.pooling
    if pooling not in _SCALED:
        return None
    rounds = slot.hash_stack_config.hash_stack_rounds if slot.hash_stack_config else 1
    n = np.maximum(lengths // rounds, 1).astype(np.float32)
    scale = 1.0 / (n if pooling is Pooling.MEAN else np.sqrt(n))
    return torch.from_numpy(np.repeat(scale, lengths).astype(np.float32))


def _fill_weights(parts: list[tuple[np.ndarray, SlotConfig]]) -> torch.Tensor | None:
    """Per-id weights of every pooled feature in order (ones where a feature needs none), or
    None when no feature scales."""
    weights = [_bag_weights(lengths, slot) for lengths, slot in parts]
    if all(w is None for w in weights):
        return None
    return torch.cat(
        [w if w is not None else torch.ones(int(lengths.sum())) for w, (lengths, _) in zip(weights, parts)]
    )


def _raw(
    idx: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor, fixed: int, batch_size: int, dim: int
) -> RawEmbedding:
    lengths = offsets[1:] - offsets[:-1]
    pos = torch.arange(idx.shape[0]) - torch.repeat_interleave(offsets[:-1], lengths)
    keep = pos < fixed
    sample = torch.repeat_interleave(torch.arange(batch_size), lengths)[keep]
    slot_pos = pos[keep]
    values = torch.zeros((batch_size, fixed, dim), dtype=rows.dtype)
    mask = torch.zeros((batch_size, fixed), dtype=torch.bool)
    mask[sample, slot_pos] = True
    if keep.any():
        values = values.index_put((sample, slot_pos), rows[idx[keep]])
    return RawEmbedding(values, mask)


class InProcessEmbeddingClient(EmbeddingClient):
    """Shards held as :class:`EmbeddingStore` objects in this process (training default).

    Args:
        config: features and tables.
        global_config: capacity per shard, mode, optimizer, initialisation.
        num_shards: how many stores the keys are split across (answers do not depend on it).

    With ``enable_incremental_update`` (train mode) every store publishes its changed rows as
    packets to ``incremental_dir``; :meth:`close` publishes what is still pending.
    """

    def __init__(self, config: EmbeddingConfig, global_config: GlobalConfig, num_shards: int = 1):
        super().__init__(config, num_shards)
        self.global_config = global_config
        self.stores = [EmbeddingStore(config, global_config, i, num_shards) for i in range(num_shards)]
        self.publishers = []
        if self.stores[0].tracks_changes:
            from embedding_server.modelroot.incremental import PacketPublisher

            self.publishers = [PacketPublisher(store).start() for store in self.stores]

    def close(self) -> None:
        """Stop the packet publishers (publishing what is pending); the tables stay readable."""
        publishers, self.publishers = self.publishers, []
        for publisher in publishers:
            publisher.close()

    def __enter__(self) -> InProcessEmbeddingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lookup_shards(self, requests, dim, insert=True):
        return [self.stores[s].lookup(ids, tables, insert=insert) for s, ids, tables in requests]

    def _push_shards(self, requests):
        for s, ids, tables, grads in requests:
            self.stores[s].apply_gradients(ids, tables, grads)

    def _lookup_keys(self, ids, tables, dim, insert=True):
        # One store can take the keys as they are, repeats included: it counts each distinct key
        # once and gathers straight into the answer, saving the deduplication and the expansion.
        # (A request over the store's id limit goes the deduplicating way, which may fit under it.)
        store = self.stores[0]
        if self.num_shards == 1 and ids.shape[0] <= self.global_config.server.max_ids_per_request:
            return store.lookup(ids, tables, count_repeats=False, insert=insert)
        return super()._lookup_keys(ids, tables, dim, insert)

    def set_optimizer(self, optimizer: SparseOptimizer) -> None:
        for store in self.stores:
            store.set_optimizer(optimizer)

    def stats(self) -> list[dict]:
        return [store.counters() for store in self.stores]

    def dump(self, directory: str, storage_options: Mapping[str, Any] | None = None) -> None:
        from embedding_server.modelroot import checkpoint
        from embedding_server.modelroot.incremental import watermark_of

        # Publish pending rows first: the checkpoint then includes every packet up to its watermark.
        watermark = watermark_of(self.publishers) if self.publishers else None
        checkpoint.dump_stores(self.stores, directory, watermark, storage_options)

    def load(self, directory: str) -> None:
        from embedding_server.modelroot import checkpoint

        for store in self.stores:
            checkpoint.load_store(store, directory)
