"""``embedding_config.yml`` (features → tables) and ``global_config.yml`` (servers, optimizer).

Both files use PERSIA's key names. Every key has a documented default (``ctrserve
config-reference`` prints them all); unknown keys, wrong types and out-of-range values raise
:class:`~embedding_server.core.errors.ConfigError` naming the file and the key.

Example:
    >>> cfg = EmbeddingConfig.from_dict({"slots_config": {"user": {"dim": 8}}})
    >>> cfg.table_of("user").dim
    8
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from embedding_server.core.config_schema import build, log_no_effect, option, raise_unknown, read_yaml, unknown_keys
from embedding_server.core.errors import ConfigError
from embedding_server.core.feature_op_config import input_kinds, ops_to_config, parse_ops
from embedding_server.core.initializers import Initializer, initializer_from_dict
from embedding_server.core.optimizers import OPTIMIZERS, Adagrad, SparseOptimizer, optimizer_from_dict

# --------------------------------------------------------------------------- embedding_config.yml


class Pooling(str, Enum):
    """How a slot turns a sample's rows into the model's input (from the slot's PERSIA flags
    ``embedding_summation``, ``sqrt_scaling`` and ``mean_scaling``; see :attr:`SlotConfig.pooling`)."""

    SUM = "sum"  # one [dim] vector: the sum of the rows
    MEAN = "mean"  # the sum divided by the number of ids
    SQRTN = "sqrtn"  # the sum divided by sqrt(number of ids)
    TILE = "tile"  # the first tile_len ids' rows concatenated, zero-padded: one [tile_len * dim] vector
    NONE = "none"  # not pooled: [sample_fixed_size, dim] plus a mask

    def __str__(self) -> str:
        return self.value

    @property
    def pooled(self) -> bool:
        """One vector per sample (every pooling but :attr:`NONE`)."""
        return self is not Pooling.NONE

    @property
    def summed(self) -> bool:
        """A (weighted) sum of the rows: sum, mean or sqrtn."""
        return self in (Pooling.SUM, Pooling.MEAN, Pooling.SQRTN)


#: the ``combiner`` spellings a slot accepts (RecIS's names)
COMBINERS = ("sum", "mean", "sqrtn", "tile")


@dataclass(frozen=True)
class HashStackConfig:
    """Hash stacking (PERSIA): each raw id becomes ``hash_stack_rounds`` ids in a table of
    ``embedding_size`` rows per round, whose embeddings are summed. Bounds a huge vocabulary.
    PERSIA's defaults (0 rounds, size 0) mean off: a slot then reads as having no hash stacking."""

    hash_stack_rounds: int = option(0, doc="how many hashed ids each raw id expands to (0 = off, PERSIA's default)")
    embedding_size: int = option(0, doc="rows per round; ids are hashed into [0, embedding_size) (>= 1 when on)")

    def __post_init__(self) -> None:
        if self.hash_stack_rounds < 0:
            raise ValueError(f"hash_stack_rounds must be >= 0 (0 = off), got {self.hash_stack_rounds}")
        if self.hash_stack_rounds and self.embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1 with hash stacking on, got {self.embedding_size}")


@dataclass(frozen=True)
class SlotConfig:
    """One sparse feature ("slot")."""

    dim: int = option(doc="embedding width (> 0)")
    embedding_summation: bool = option(
        True, doc="pool a sample's ids into one [dim] vector; false returns [sample_fixed_size, dim] plus a mask"
    )
    sqrt_scaling: bool = option(False, doc="divide the pooled sum by sqrt(number of ids)")
    mean_scaling: bool = option(False, doc="divide the pooled sum by the number of ids (mean pooling)")
    sample_fixed_size: int = option(
        10, doc="for embedding_summation: false, ids kept per sample (extra ids are dropped, fewer are masked)"
    )
    hash_stack_config: HashStackConfig | None = option(None, doc="optional hash stacking of raw ids")
    index_prefix: int = option(
        0,
        doc="PERSIA: the feature group's id prefix, which PERSIA computes itself and refuses when set (only 0 is "
        "accepted)",
        no_effect="each table has an index of its own, so ids need no prefix to keep features apart",
    )
    table: str = option(
        "",
        doc="the table this feature's ids look up; features naming one table share its rows (RecIS's shared_name; "
        "it may be one of the features' own names); empty = the feature's feature_groups group, else its own table",
    )
    combiner: str = option(
        "",
        doc="sum, mean, sqrtn or tile (RecIS's names); empty = from embedding_summation, sqrt_scaling and "
        "mean_scaling; tile concatenates the first tile_len ids' vectors, zero-padded: [tile_len * dim] per sample",
    )
    tile_len: int = option(0, doc="combiner tile: ids kept per sample (>= 1); extra ids are dropped")
    initializer: dict[str, Any] = option(
        default_factory=dict,
        doc="this table's initializer: type normal (mean, std), truncated_normal (mean, std; redrawn beyond 2 std), "
        "uniform (lower, upper), constant (value) or zeros; empty = global_config.yml's initialization",
    )
    optimizer: dict[str, Any] = option(
        default_factory=dict,
        doc="this table's sparse optimizer: type (sgd, adagrad or adam) plus its parameters, as sparse_optimizer "
        "in global_config.yml; empty = the job's (or server's) sparse optimizer",
    )
    ops: tuple[Any, ...] = option(
        (),
        doc="feature ops making this slot's ids from named raw inputs, in order: select (an input, or two for "
        "a cross), bucketize (boundaries), mod, hash (farm), cross, truncate (seq_len, side); see docs/features.md. "
        "Empty = the id input named after the slot",
    )

    def __post_init__(self) -> None:
        if self.ops:
            object.__setattr__(self, "ops", parse_ops(self.ops))
        if self.hash_stack_config is not None and not self.hash_stack_config.hash_stack_rounds:
            object.__setattr__(self, "hash_stack_config", None)  # PERSIA's default {0, 0}: off
        if self.index_prefix:
            raise ValueError(
                f"index_prefix must not be set (got {self.index_prefix}): as in PERSIA it is derived, not given; "
                "here tables keep features apart"
            )
        if self.dim <= 0:
            raise ValueError(f"dim must be > 0, got {self.dim}")
        if self.sample_fixed_size <= 0:
            raise ValueError(f"sample_fixed_size must be > 0, got {self.sample_fixed_size}")
        if self.sqrt_scaling and self.mean_scaling:
            raise ValueError("sqrt_scaling and mean_scaling are exclusive: pick one")
        self._check_combiner()
        self.table_initializer()  # validates
        self.table_optimizer()

    def _check_combiner(self) -> None:
        if not self.combiner:
            if self.tile_len:
                raise ValueError("tile_len is for combiner: tile")
            return
        if self.combiner not in COMBINERS:
            raise ValueError(f"combiner must be one of {', '.join(COMBINERS)}, got {self.combiner!r}")
        if not self.embedding_summation:
            raise ValueError(f"combiner {self.combiner} needs embedding_summation: true (false returns raw ids)")
        flags = Pooling.MEAN if self.mean_scaling else Pooling.SQRTN if self.sqrt_scaling else None
        if flags is not None and flags.value != self.combiner:
            raise ValueError(f"combiner {self.combiner} disagrees with {flags.value}_scaling: give one of them")
        if self.combiner == "tile":
            if self.tile_len < 1:
                raise ValueError(f"combiner tile needs tile_len >= 1, got {self.tile_len}")
            if self.hash_stack_config is not None:
                raise ValueError("combiner tile cannot be combined with hash_stack_config")
        elif self.tile_len:
            raise ValueError(f"tile_len is for combiner: tile, not {self.combiner}")

    @property
    def pooling(self) -> Pooling:
        """What ``combiner``, or else the PERSIA flags, select (the scaling flags matter only with
        embedding_summation)."""
        if not self.embedding_summation:
            return Pooling.NONE
        if self.combiner:
            return Pooling(self.combiner)
        if self.mean_scaling:
            return Pooling.MEAN
        return Pooling.SQRTN if self.sqrt_scaling else Pooling.SUM

    @property
    def output_dim(self) -> int:
        """Width of this feature's model input per sample (and per id for raw slots):
        ``tile_len * dim`` for tile, else ``dim``."""
        return self.tile_len * self.dim if self.pooling is Pooling.TILE else self.dim

    def table_initializer(self) -> Initializer | None:
        """The slot's ``initializer`` parsed, or None when it gives none."""
        return initializer_from_dict(self.initializer) if self.initializer else None

    def table_optimizer(self) -> SparseOptimizer | None:
        """The slot's ``optimizer`` parsed, or None when it gives none."""
        if not self.optimizer:
            return None
        try:
            return optimizer_from_dict(self.optimizer, "optimizer")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class TableSpec:
    """An embedding table: the rows shared by one feature group (or one ungrouped feature)."""

    name: str
    index: int
    dim: int
    features: tuple[str, ...]
    initializer: Initializer | None = None  # None: global_config.yml's initialization
    optimizer: SparseOptimizer | None = None  # None: the store's (global) sparse optimizer

    @property
    def salt(self) -> int:
        """A stable 64-bit value mixed into this table's shard routing and initialisation."""
        return (zlib.crc32(self.name.encode()) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class EmbeddingConfig:
    """The contents of ``embedding_config.yml``.

    Args:
        slots_config: feature name → :class:`SlotConfig` (PERSIA also documents the spelling
            ``slot_configs``; both are accepted).
        feature_index_prefix_bit: accepted for PERSIA compatibility. PERSIA stores every
            feature in one hash map and reserves this many high id bits for the feature index;
            here each table has its own index, so ids keep all 64 bits.
        feature_groups: group name → features that share one table (same ids, same rows).
    """

    slots_config: dict[str, SlotConfig] = option(doc="feature name → slot settings (alias: slot_configs)")
    feature_index_prefix_bit: int = option(
        8,
        doc="PERSIA: high id bits reserved for the feature group's prefix in its one hash map (0..63)",
        no_effect="each table has an index of its own, so ids keep all 64 bits (PERSIA keeps the low 64 - bits)",
    )
    feature_groups: dict[str, list[str]] = option(
        default_factory=dict, doc="group name → features sharing one table (dims must agree)"
    )
    tables: dict[str, TableSpec] = field(init=False, repr=False, compare=False)
    _feature_table: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.slots_config:
            raise ValueError("slots_config must name at least one feature")
        if not 0 <= self.feature_index_prefix_bit <= 63:
            raise ValueError(f"feature_index_prefix_bit must be in [0, 63], got {self.feature_index_prefix_bit}")
        feature_table: dict[str, str] = {}
        for group, members in self.feature_groups.items():
            if group in self.slots_config:
                raise ValueError(f"feature group '{group}' has the same name as a feature")
            if not members:
                raise ValueError(f"feature group '{group}' is empty")
            for member in members:
                if member not in self.slots_config:
                    raise ValueError(f"feature group '{group}' names unknown feature '{member}'")
                if member in feature_table:
                    raise ValueError(f"feature '{member}' is in two groups: '{feature_table[member]}' and '{group}'")
                feature_table[member] = group
        for name, slot in self.slots_config.items():
            if slot.table and feature_table.get(name, slot.table) != slot.table:
                raise ValueError(
                    f"feature '{name}' names table '{slot.table}' but is in feature group '{feature_table[name]}'"
                )
            feature_table[name] = slot.table or feature_table.get(name, name)
        for name, table in feature_table.items():
            # A table may carry the name of one of its own features (RecIS), never of another's.
            if table in self.slots_config and feature_table[table] != table:
                raise ValueError(
                    f"feature '{name}' names table '{table}', the name of feature '{table}', which looks up table "
                    f"'{feature_table[table]}'"
                )
        tables: dict[str, TableSpec] = {}
        for table in feature_table.values():
            if table not in tables:
                table_features = tuple(f for f in self.slots_config if feature_table[f] == table)
                tables[table] = self._table_spec(table, len(tables), table_features)
        object.__setattr__(self, "tables", tables)
        object.__setattr__(self, "_feature_table", feature_table)
        # an input may not be bucketized by one slot and read as ids by another
        input_kinds(
            {name: slot.ops for name, slot in self.slots_config.items() if slot.ops},
            [name for name, slot in self.slots_config.items() if not slot.ops],
        )

    def _table_spec(self, name: str, index: int, features: tuple[str, ...]) -> TableSpec:
        """The table ``name`` of ``features``, whose dims (and the initializers and optimizers
        those that give one give) must agree."""
        kind = "feature group" if name in self.feature_groups else "table"
        slots = [self.slots_config[f] for f in features]
        dims = {s.dim for s in slots}
        if len(dims) > 1:
            raise ValueError(f"{kind} '{name}' mixes dims {sorted(dims)}; features sharing a table need one dim")
        settings: dict[str, Any] = {}
        for key in ("initializer", "optimizer"):
            given = {f: getattr(s, key) for f, s in zip(features, slots) if getattr(s, key)}
            if len({json.dumps(v, sort_keys=True) for v in given.values()}) > 1:
                named = ", ".join(f"'{f}'" for f in given)
                raise ValueError(f"{kind} '{name}': features {named} give different {key}s; give it once or alike")
            settings[key] = next(iter(given.values()), None)
        return TableSpec(
            name,
            index,
            slots[0].dim,
            features,
            initializer_from_dict(settings["initializer"]) if settings["initializer"] else None,
            optimizer_from_dict(settings["optimizer"], "optimizer") if settings["optimizer"] else None,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "embedding_config.yml") -> EmbeddingConfig:
        data = dict(data)
        if "slot_configs" in data:
            if "slots_config" in data:
                raise ConfigError(f"{source}: give either 'slots_config' or 'slot_configs', not both")
            data["slots_config"] = data.pop("slot_configs")
        return build(cls, data, source)

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingConfig:
        """Read and validate an ``embedding_config.yml``."""
        return cls.from_dict(read_yaml(path), str(path))

    @property
    def feature_names(self) -> list[str]:
        return list(self.slots_config)

    def slot(self, feature: str) -> SlotConfig:
        try:
            return self.slots_config[feature]
        except KeyError:
            raise ConfigError(self._unknown_feature(feature)) from None

    def table_of(self, feature: str) -> TableSpec:
        """The table that stores ``feature``'s rows."""
        if feature not in self._feature_table:
            raise ConfigError(self._unknown_feature(feature))
        return self.tables[self._feature_table[feature]]

    def _unknown_feature(self, feature: str) -> str:
        return f"unknown feature '{feature}'; embedding_config.yml defines: {', '.join(self.slots_config)}"

    def fingerprint(self) -> str:
        """A short digest of the table layout (names, order, dims) that clients and servers
        compare, so a client never addresses a server configured with other tables."""
        layout: list[list[Any]] = []
        for t in self.tables.values():
            entry: list[Any] = [t.name, t.index, t.dim]
            # A table's own initializer or optimizer changes what its rows hold (a config without
            # either keeps the fingerprint it always had).
            if t.initializer is not None or t.optimizer is not None:
                entry.append(
                    {
                        "initializer": t.initializer.to_dict() if t.initializer else None,
                        "optimizer": t.optimizer.to_dict() if t.optimizer else None,
                    }
                )
            layout.append(entry)
        return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping that :meth:`from_dict` turns back into an equal config."""
        slots = {}
        for name, s in self.slots_config.items():
            d: dict[str, Any] = {
                "dim": s.dim,
                "embedding_summation": s.embedding_summation,
                "sqrt_scaling": s.sqrt_scaling,
                "mean_scaling": s.mean_scaling,
                "sample_fixed_size": s.sample_fixed_size,
            }
            if s.hash_stack_config is not None:
                d["hash_stack_config"] = {
                    "hash_stack_rounds": s.hash_stack_config.hash_stack_rounds,
                    "embedding_size": s.hash_stack_config.embedding_size,
                }
            for key in ("table", "combiner", "tile_len", "initializer", "optimizer"):
                if getattr(s, key):  # only what is set: configs without them read as before
                    d[key] = dict(getattr(s, key)) if isinstance(getattr(s, key), dict) else getattr(s, key)
            if s.ops:
                d["ops"] = ops_to_config(s.ops)
            slots[name] = d
        out: dict[str, Any] = {"slots_config": slots}
        if self.feature_index_prefix_bit != 8:  # no effect here: written only when set, so it logs only then
            out["feature_index_prefix_bit"] = self.feature_index_prefix_bit
        out["feature_groups"] = {g: list(m) for g, m in self.feature_groups.items()}
        return out


# --------------------------------------------------------------------------- global_config.yml


class JobType(str, Enum):
    """What the embedding servers (and the trainer's in-process store) are for."""

    TRAIN = "train"  # lookups insert unseen rows, gradients apply
    EVAL = "eval"  # PERSIA's evaluation job: lookups insert nothing, no gradients apply
    INFER = "infer"  # read-only serving: unseen ids read as zeros

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _missing_(cls, value: object) -> JobType | None:
        # any case: PERSIA's own configs spell them Train, Eval and Infer
        if isinstance(value, str):
            return next((m for m in cls if m.value == value.lower()), None)
        return None

    @property
    def store_mode(self) -> JobType:
        """How a store of this job keeps its rows: an eval job's store is read-only, exactly as an
        infer-mode one (unseen ids read as zeros, gradients refused, no optimizer state kept)."""
        return JobType.INFER if self is JobType.EVAL else self


@dataclass(frozen=True)
class MetricsConfig:
    """PERSIA's ``common_config.metrics_config``: pushing the servers' metrics to a Prometheus
    Pushgateway (ctrserve's servers also serve them for scraping with ``--metrics-port``)."""

    enable_metrics: bool = option(
        True,
        doc="push the embedding server's metrics to the Pushgateway at PERSIA_METRICS_GATEWAY_ADDR (host:port) when "
        "that is set; false: never push (--metrics-port still serves them for scraping)",
    )
    job_name: str = option("persia_default_jobname", doc="the Pushgateway job the metrics are pushed under")
    push_interval_seconds: int = option(10, doc="seconds between pushes (> 0)")
    push_interval_sec: int | None = option(
        None, doc="the spelling of PERSIA's example configs for push_interval_seconds (give one of the two)"
    )

    def __post_init__(self) -> None:
        if self.push_interval_sec is not None:
            if self.push_interval_seconds != 10 and self.push_interval_seconds != self.push_interval_sec:
                raise ValueError("give push_interval_seconds or push_interval_sec, not both")
            object.__setattr__(self, "push_interval_seconds", self.push_interval_sec)
        if self.push_interval_seconds <= 0:
            raise ValueError(f"push_interval_seconds must be > 0, got {self.push_interval_seconds}")
        if not self.job_name:
            raise ValueError("job_name must not be empty")


@dataclass(frozen=True)
class InferConfig:
    """PERSIA's ``common_config.infer_config`` (read with ``job_type: infer``)."""

    servers: list[str] = option(
        default_factory=list,
        doc="host:port of every embedding server, in shard order: clients of an infer job use them; an embedding "
        "server takes their count as its --num-shards when that flag is not given",
    )
    embedding_checkpoint: str = option(
        "",
        doc="checkpoint an infer-mode embedding server loads before serving: a trainer's checkpoint directory "
        "(its sparse/ part) or an embedding dump (path or storage URL); empty: start empty",
    )

    def __post_init__(self) -> None:
        for address in self.servers:
            host, sep, port = address.rpartition(":")
            if not (host and sep and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"servers: {address!r} is not host:port")


@dataclass(frozen=True)
class CheckpointingConfig:
    """PERSIA's ``common_config.checkpointing_config``."""

    num_workers: int = option(
        4,
        doc="PERSIA: threads each embedding server dumps and loads checkpoint files with",
        no_effect="a shard writes and reads its checkpoint as one Arrow file per table, in the serving process",
    )


@dataclass(frozen=True)
class CommonConfig:
    job_type: JobType = option(
        JobType.TRAIN,
        doc="train (lookups insert rows, gradients apply), eval (lookups insert nothing, no gradients) or infer "
        "(read-only serving); any case (PERSIA writes Train, Eval, Infer)",
    )
    metrics_config: MetricsConfig = option(default_factory=MetricsConfig, doc="PERSIA's metrics push settings")
    infer_config: InferConfig = option(default_factory=InferConfig, doc="PERSIA's infer job settings")
    checkpointing_config: CheckpointingConfig = option(
        default_factory=CheckpointingConfig, doc="PERSIA's checkpointing settings"
    )

    def __post_init__(self) -> None:
        # CommonConfig(job_type="infer") from code: the same spellings as the file
        try:
            object.__setattr__(self, "job_type", JobType(self.job_type))
        except ValueError:
            raise ValueError(f"job_type must be 'train', 'eval' or 'infer', got {self.job_type!r}") from None


_NO_WORKER = "ctrserve has no embedding worker: the nn worker's client routes lookups to the embedding servers itself"


@dataclass(frozen=True)
class EmbeddingWorkerConfig:
    """PERSIA's ``embedding_worker_config`` (its embedding worker's buffers)."""

    forward_buffer_size: int = option(
        1000, doc="PERSIA: lookups an embedding worker holds for their gradients", no_effect=_NO_WORKER
    )
    buffered_data_expired_sec: int = option(
        1000, doc="PERSIA: seconds a held lookup waits for its gradients", no_effect=_NO_WORKER
    )


@dataclass(frozen=True)
class ParameterServerConfig:
    capacity: int = option(
        1_000_000, doc="rows each embedding server holds, summed over its tables; LRU eviction beyond"
    )
    max_ids_per_request: int = option(4_000_000, doc="largest number of ids one lookup or gradient request may carry")
    max_request_bytes: int = option(
        512 << 20, doc="largest gRPC message a server accepts, in bytes (larger: RESOURCE_EXHAUSTED before it is read)"
    )
    max_concurrent_rpcs: int = option(
        32,
        doc="gRPC calls a server holds at once, queued ones included; more are refused with RESOURCE_EXHAUSTED "
        "(bounds memory: docs/operations.md, Limits)",
    )
    local_socket_max_connections: int = option(
        64, doc="connections the local lookup socket serves at once; more are refused (clients use gRPC)"
    )
    local_socket_idle_timeout_s: float = option(
        300.0, doc="seconds a local lookup connection may wait for its next request before the server closes it"
    )
    weight_bound: float = option(
        0.0, doc="clip every weight to [-weight_bound, weight_bound] after an update (0 = off)"
    )
    enable_incremental_update: bool = option(False, doc="train mode: publish changed rows as incremental packets")
    incremental_buffer_size: int = option(
        1_000_000, doc="changed rows that trigger a packet as soon as they are pending"
    )
    incremental_dir: str = option(
        "/workspace/incremental_dir/",
        doc="where packets are published (PERSIA's default); with a model root: <model root>/incremental (a path, "
        "file://, s3:// or hdfs:// URL)",
    )
    incremental_flush_interval: float = option(10.0, doc="seconds at most between a row's change and its packet")
    storage: dict[str, Any] = option(
        default_factory=dict,
        doc=(
            "options for s3:// and hdfs:// storage (endpoint, access_key, secret_key, region, ...; keys optional: "
            "the AWS default chain) and local file modes (file_mode '0640', dir_mode '0750'); see docs/operations.md, "
            "Storage. PERSIA's form, Ceph or Hdfs, is accepted: a location's scheme picks the storage here"
        ),
    )
    num_hashmap_internal_shards: int = option(
        100,
        doc="PERSIA: lock stripes of a server's hash map",
        no_effect="a shard's rows are one open-addressing table whose lookups run in compiled batches under one lock",
    )
    incremental_channel_capacity: int = option(
        1000,
        doc="PERSIA: updates queued between the server and its packet writer",
        no_effect="changed rows are marked in place and written to a packet by incremental_buffer_size and "
        "incremental_flush_interval; nothing is queued",
    )
    full_amount_manager_buffer_size: int = option(
        1000, doc="PERSIA (earlier releases): rows buffered for a full dump", no_effect="dumps read the table directly"
    )
    embedding_recycle_pool_capacity: int = option(
        1_000_000,
        doc="PERSIA (earlier releases): evicted entries kept for reuse",
        no_effect="rows live in preallocated arrays; evicted rows are reused in place",
    )
    num_persistence_workers: int = option(
        4,
        doc="PERSIA (earlier releases): threads dumping a checkpoint",
        no_effect="a shard writes its checkpoint as one Arrow file per table",
    )
    num_signs_per_file: int = option(
        1_000_000,
        doc="PERSIA (earlier releases): ids per checkpoint file",
        no_effect="a checkpoint holds one Arrow file per table and shard",
    )
    local_buffer_dir: str = option(
        "/workspace/buffer_dir/",
        doc="PERSIA (earlier releases): local staging folder for dumps to remote storage",
        no_effect="files are written to the storage directly (atomically), with no local staging copy",
    )

    def __post_init__(self) -> None:
        for name in (
            "capacity",
            "max_ids_per_request",
            "max_request_bytes",
            "incremental_buffer_size",
            "max_concurrent_rpcs",
            "local_socket_max_connections",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.local_socket_idle_timeout_s < float("inf"):
            raise ValueError(f"local_socket_idle_timeout_s must be > 0 seconds, got {self.local_socket_idle_timeout_s}")
        if self.weight_bound < 0:
            raise ValueError(f"weight_bound must be >= 0, got {self.weight_bound}")
        if self.incremental_flush_interval <= 0:
            raise ValueError(f"incremental_flush_interval must be > 0 seconds, got {self.incremental_flush_interval}")
        if self.enable_incremental_update and not self.incremental_dir:
            raise ValueError("enable_incremental_update needs incremental_dir (where packets are published)")
        for name in ("num_hashmap_internal_shards", "incremental_channel_capacity"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        from embedding_server.storage.base import StorageError, StorageOptions

        try:
            StorageOptions.from_dict(self.storage, "storage")
        except StorageError as exc:
            raise ValueError(str(exc)) from None


class InitMethod(str, Enum):
    """How train mode initialises an unseen id's row (deterministically from the id)."""

    BOUNDED_UNIFORM = "bounded_uniform"  # uniform in [lower, upper)
    BOUNDED_NORMAL = "bounded_normal"  # normal(mean, std), clipped to [lower, upper]

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class InitializationConfig:
    method: InitMethod = option(
        InitMethod.BOUNDED_UNIFORM,
        doc="bounded_uniform (in [lower, upper)) or bounded_normal (mean, std, clipped to [lower, upper])",
    )
    lower: float = option(-0.01, doc="lower bound of initial values")
    upper: float = option(0.01, doc="upper bound of initial values")
    mean: float = option(0.0, doc="bounded_normal: mean")
    std: float = option(0.01, doc="bounded_normal: standard deviation")
    seed: int = option(0, doc="seed mixed with the table and id: the same id gets the same vector on any shard")

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "method", InitMethod(self.method))
        except ValueError:
            raise ValueError(f"method must be 'bounded_uniform' or 'bounded_normal', got {self.method!r}") from None
        if not self.lower < self.upper:
            raise ValueError(f"lower ({self.lower}) must be < upper ({self.upper})")
        if self.std <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def as_initializer(self) -> Initializer:
        """This section as the :class:`Initializer` of every table that gives none of its own."""
        if self.method is InitMethod.BOUNDED_UNIFORM:
            return Initializer("bounded_uniform", {"lower": self.lower, "upper": self.upper})
        return Initializer(
            "bounded_normal", {"lower": self.lower, "upper": self.upper, "mean": self.mean, "std": self.std}
        )


@dataclass(frozen=True)
class SecurityConfig:
    """TLS, the read and admin tokens, and the admin roots of the embedding servers' gRPC service
    (see :mod:`embedding_server.rpc.security`); all empty means plain text, reads without a token
    and admin calls (Dump, Load, SetOptimizer, PushGradients) refused."""

    tls_cert_file: str = option("", doc="PEM certificate the server presents; enables TLS (with tls_key_file)")
    tls_key_file: str = option("", doc="PEM private key of tls_cert_file")
    tls_client_ca_file: str = option("", doc="PEM CA bundle: clients must present a certificate it signed (mutual TLS)")
    token_file: str = option(
        "",
        doc="file holding the read token callers must send as 'authorization: Bearer <token>' for Lookup, Info and "
        "Stats (what TorchServe workers hold; it allows no admin call)",
    )
    token_env: str = option(
        "CTRSERVE_EMBEDDING_TOKEN",
        doc="environment variable holding the read token when token_file is empty (unset: reads need no token)",
    )
    admin_token_file: str = option(
        "",
        doc="file holding the admin token: needed for Dump, Load, SetOptimizer and PushGradients (trainers, "
        "operators); it allows reads too and must differ from the read token",
    )
    admin_token_env: str = option(
        "CTRSERVE_EMBEDDING_ADMIN_TOKEN",
        doc="environment variable holding the admin token when admin_token_file is empty",
    )
    allow_unauthenticated_admin: bool = option(
        False,
        doc="without an admin token, serve admin calls to every caller (that passes the read token check); only "
        "for servers bound to loopback on a machine whose users are trusted (ctrserve embedding-server "
        "--allow-unauthenticated-admin); without it and without an admin token, admin calls are refused",
    )
    admin_roots: tuple[str, ...] = option(
        (),
        doc="directories (canonicalised, symlinks resolved) and s3:// or hdfs:// URL prefixes that Dump may write "
        "and Load may read; empty: Dump and Load are refused (--admin-root)",
    )

    def __post_init__(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together (the server's certificate and key)")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")


@dataclass(frozen=True)
class GlobalConfig:
    """The contents of ``global_config.yml``.

    Sections: ``common_config`` (job type), ``embedding_parameter_server_config`` (capacity,
    limits, incremental-update keys), ``sparse_optimizer`` (``type: sgd | adagrad | adam`` plus
    that optimizer's parameters), ``initialization`` and ``security`` (TLS, shared token).
    """

    common_config: CommonConfig = option(default_factory=CommonConfig, doc="job settings")
    embedding_parameter_server_config: ParameterServerConfig = option(
        default_factory=ParameterServerConfig, doc="embedding server settings"
    )
    embedding_worker_config: EmbeddingWorkerConfig = option(
        default_factory=EmbeddingWorkerConfig, doc="PERSIA's embedding worker settings"
    )
    initialization: InitializationConfig = option(
        default_factory=InitializationConfig, doc="how unseen ids are initialised in train mode"
    )
    security: SecurityConfig = option(
        default_factory=SecurityConfig, doc="TLS and shared token of the gRPC service (off by default)"
    )
    sparse_optimizer: SparseOptimizer = field(default_factory=Adagrad)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "global_config.yml") -> GlobalConfig:
        """Validate a parsed ``global_config.yml``; every unknown key (the optimizer's included)
        is reported in one error.

        Raises:
            ConfigError: unknown keys, wrong types or out-of-range values, naming file and key.
        """
        data = dict(data)
        opt_data = data.pop("sparse_optimizer", {}) or {}
        unknown = unknown_keys(cls, data)
        kind = str(opt_data.get("type", "adagrad")).lower() if isinstance(opt_data, Mapping) else ""
        if kind in OPTIMIZERS:  # a bad type is reported by optimizer_from_dict below
            opt_keys = {k: v for k, v in opt_data.items() if k != "type"}
            unknown += unknown_keys(OPTIMIZERS[kind], opt_keys, "sparse_optimizer")
        raise_unknown(source, unknown)
        data = _persia_storage(data, source)
        optimizer = optimizer_from_dict(opt_data, source, "sparse_optimizer")
        base = build(cls, data, source)
        return dataclasses.replace(base, sparse_optimizer=optimizer)

    @classmethod
    def load(cls, path: str | Path) -> GlobalConfig:
        """Read and validate a ``global_config.yml``."""
        return cls.from_dict(read_yaml(path), str(path))

    @property
    def server(self) -> ParameterServerConfig:
        return self.embedding_parameter_server_config

    @property
    def mode(self) -> JobType:
        return self.common_config.job_type


PERSIA_STORAGES = ("ceph", "hdfs")


def _persia_storage(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` with PERSIA's ``storage: Ceph`` or ``storage: Hdfs`` (the kind of storage its
    servers dumped to) read as no storage options, after logging that it has no effect here.

    Raises:
        ConfigError: a storage given as a string other than PERSIA's two.
    """
    server = data.get("embedding_parameter_server_config")
    if not isinstance(server, Mapping) or not isinstance(server.get("storage"), str):
        return data
    kind = server["storage"]
    if kind.lower() not in PERSIA_STORAGES:
        raise ConfigError(
            f"{source}: 'embedding_parameter_server_config.storage' must be a mapping of storage options or PERSIA's "
            f"Ceph or Hdfs, got {kind!r}"
        )
    log_no_effect(
        source,
        "embedding_parameter_server_config.storage",
        f"{kind}: each location's scheme picks its storage (hdfs:// for HDFS; a plain path for a mounted file system "
        "such as CephFS; s3:// for object storage), with the options of a storage mapping",
    )
    return {**data, "embedding_parameter_server_config": {**server, "storage": {}}}
