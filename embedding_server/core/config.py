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

from embedding_server.core.config_schema import build, option, read_yaml
from embedding_server.core.errors import ConfigError
from embedding_server.core.optimizers import Adagrad, SparseOptimizer, optimizer_from_dict

# --------------------------------------------------------------------------- embedding_config.yml


class Pooling(str, Enum):
    """How a slot turns a sample's rows into the model's input (from the slot's PERSIA flags
    ``embedding_summation``, ``sqrt_scaling`` and ``mean_scaling``; see :attr:`SlotConfig.pooling`)."""

    SUM = "sum"  # one [dim] vector: the sum of the rows
    MEAN = "mean"  # the sum divided by the number of ids
    SQRTN = "sqrtn"  # the sum divided by sqrt(number of ids)
    NONE = "none"  # not pooled: [sample_fixed_size, dim] plus a mask

    def __str__(self) -> str:
        return self.value

    @property
    def pooled(self) -> bool:
        """One vector per sample (every pooling but :attr:`NONE`)."""
        return self is not Pooling.NONE


@dataclass(frozen=True)
class HashStackConfig:
    """Hash stacking (PERSIA): each raw id becomes ``hash_stack_rounds`` ids in a table of
    ``embedding_size`` rows per round, whose embeddings are summed. Bounds a huge vocabulary."""

    hash_stack_rounds: int = option(doc="how many hashed ids each raw id expands to (>= 1)")
    embedding_size: int = option(doc="rows per round; ids are hashed into [0, embedding_size)")

    def __post_init__(self) -> None:
        if self.hash_stack_rounds < 1:
            raise ValueError(f"hash_stack_rounds must be >= 1, got {self.hash_stack_rounds}")
        if self.embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {self.embedding_size}")


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

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"dim must be > 0, got {self.dim}")
        if self.sample_fixed_size <= 0:
            raise ValueError(f"sample_fixed_size must be > 0, got {self.sample_fixed_size}")
        if self.sqrt_scaling and self.mean_scaling:
            raise ValueError("sqrt_scaling and mean_scaling are exclusive: pick one")

    @property
    def pooling(self) -> Pooling:
        """What the flags select (the scaling flags matter only with embedding_summation)."""
        if not self.embedding_summation:
            return Pooling.NONE
        if self.mean_scaling:
            return Pooling.MEAN
        return Pooling.SQRTN if self.sqrt_scaling else Pooling.SUM


@dataclass(frozen=True)
class TableSpec:
    """An embedding table: the rows shared by one feature group (or one ungrouped feature)."""

    name: str
    index: int
    dim: int
    features: tuple[str, ...]

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
        8, doc="PERSIA compatibility; tables are separate indexes here, so ids keep all 64 bits (0..63)"
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
            dims = {self.slots_config[m].dim for m in members}
            if len(dims) > 1:
                raise ValueError(
                    f"feature group '{group}' mixes dims {sorted(dims)}; features sharing a table need one dim"
                )
        for name in self.slots_config:
            feature_table.setdefault(name, name)
        tables: dict[str, TableSpec] = {}
        for feature, table in feature_table.items():
            table_features = tuple(f for f in self.slots_config if feature_table[f] == table)
            if table not in tables:
                tables[table] = TableSpec(table, len(tables), self.slots_config[feature].dim, table_features)
        object.__setattr__(self, "tables", tables)
        object.__setattr__(self, "_feature_table", feature_table)

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
        layout = [[t.name, t.index, t.dim] for t in self.tables.values()]
        return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]

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
            slots[name] = d
        return {
            "slots_config": slots,
            "feature_index_prefix_bit": self.feature_index_prefix_bit,
            "feature_groups": {g: list(m) for g, m in self.feature_groups.items()},
        }


# --------------------------------------------------------------------------- global_config.yml


class JobType(str, Enum):
    """What the embedding servers (and the trainer's in-process store) are for."""

    TRAIN = "train"  # lookups insert unseen rows, gradients apply
    INFER = "infer"  # read-only serving: unseen ids read as zeros

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _missing_(cls, value: object) -> JobType | None:
        # any case: PERSIA's own configs spell them Train and Infer
        if isinstance(value, str):
            return next((m for m in cls if m.value == value.lower()), None)
        return None


@dataclass(frozen=True)
class CommonConfig:
    job_type: JobType = option(
        JobType.TRAIN, doc="train (lookups insert rows, gradients apply) or infer (read-only serving); any case"
    )

    def __post_init__(self) -> None:
        # CommonConfig(job_type="infer") from code: the same spellings as the file
        try:
            object.__setattr__(self, "job_type", JobType(self.job_type))
        except ValueError:
            raise ValueError(f"job_type must be 'train' or 'infer', got {self.job_type!r}") from None


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
        "", doc="the model root's packet folder, <model root>/incremental (a path, file://, s3:// or hdfs:// URL)"
    )
    incremental_flush_interval: float = option(10.0, doc="seconds at most between a row's change and its packet")
    storage: dict[str, Any] = option(
        default_factory=dict,
        doc=(
            "options for s3:// and hdfs:// storage (endpoint, access_key, secret_key, region, ...; keys optional: "
            "the AWS default chain) and local file modes (file_mode '0640', dir_mode '0750'); see docs/operations.md, Storage"
        ),
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
    initialization: InitializationConfig = option(
        default_factory=InitializationConfig, doc="how unseen ids are initialised in train mode"
    )
    security: SecurityConfig = option(
        default_factory=SecurityConfig, doc="TLS and shared token of the gRPC service (off by default)"
    )
    sparse_optimizer: SparseOptimizer = field(default_factory=Adagrad)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "global_config.yml") -> GlobalConfig:
        data = dict(data)
        optimizer = optimizer_from_dict(data.pop("sparse_optimizer", {}) or {}, source, "sparse_optimizer")
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
