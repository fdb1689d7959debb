"""``serving.yml``: what the TorchServe handler needs beyond the exported model.

The file is optional and shipped inside the ``.mar`` (``ctrserve archive --serving-config``).
Every key has a default; unknown keys and mistyped values are errors. The environment variable
``CTRSERVE_EMBEDDING_SERVERS`` (``host:port`` of shard 0, 1, ... separated by ``,``; replicas of
one shard separated by ``|``, e.g. ``h1:7001|h2:7001,h3:7002``) overrides ``embedding_servers``,
so one archive can be served against different embedding clusters. ``PERSIA_EMBEDDING_SERVERS``
(the name ``persia.service`` reads, same form) is used when ``CTRSERVE_EMBEDDING_SERVERS`` is not set.

Example ``serving.yml``::

    embedding_servers: ["127.0.0.1:7001", "127.0.0.1:7002"]   # shard order
    # or with replicas per shard: [["h1:7001", "h2:7001"], ["h3:7002"]] or ["h1:7001|h2:7001", "h3:7002"]
    embedding_timeout_s: 5.0      # per lookup, failover to other replicas included
    connect_timeout_s: 30.0       # worker start: wait this long for every shard
    embedding_resolve_interval_s: 30.0   # re-resolve DNS names (e.g. a headless Service per shard)
    max_batch_size: 4096          # samples in one request
    max_request_bytes: 67108864   # bytes of one request body
    watermark_refresh_s: 1.0      # how often the embedding watermark is re-read
    metrics_interval_s: 1.0       # the handler's timing metrics: mean per interval (0: every request)
    max_ids_per_request: 4000000  # ids of all features of one request
    max_ids_per_sample: 10000     # ids of one feature in one sample
    max_json_request_bytes: 8388608   # bytes of a JSON body (parsed JSON is many times its size)
    torch_threads: 1              # torch intra-op threads per worker (0: torch's default)
    response_format: ctrserve     # or persia: a flat JSON list of scores, what PERSIA's clients parse
    # Secured embedding servers (see deploy/production/): TLS, client certificate, shared token.
    embedding_tls_ca_file: /etc/ctrserve/tls/ca.pem
    embedding_tls_cert_file: /etc/ctrserve/tls/client.pem
    embedding_tls_key_file: /etc/ctrserve/tls/client.key
    embedding_token_file: /etc/ctrserve/tls/token   # or CTRSERVE_EMBEDDING_TOKEN in the worker's environment

Example:
    >>> ServingConfig.from_dict({"embedding_servers": ["127.0.0.1:7001"]}).max_batch_size
    4096
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embedding_server.core.errors import ConfigError
from embedding_server.rpc.replicas import REPLICA_SEP, is_address, normalize_addresses
from embedding_server.rpc.security import TOKEN_ENV, ClientSecurity, resolve_token

SERVING_FILE = "serving.yml"
ENV_SERVERS = "CTRSERVE_EMBEDDING_SERVERS"
#: The same setting under the name ``persia.service`` reads (PERSIA users' environment); used
#: when ``CTRSERVE_EMBEDDING_SERVERS`` is not set.
ENV_PERSIA_SERVERS = "PERSIA_EMBEDDING_SERVERS"
#: ``response_format`` values: ctrserve's JSON object per request, or PERSIA's flat score list.
RESPONSE_FORMATS = ("ctrserve", "persia")


@dataclass(frozen=True)
class ServingConfig:
    """Validated handler settings (see the module docstring for the file form).

    Args:
        embedding_servers: per embedding shard 0, 1, ... (infer mode), ``host:port`` or its
            replicas as ``"h1:7001|h2:7001"`` (a list of replicas in the file is stored so).
        embedding_timeout_s: seconds allowed per lookup, retries on other replicas included;
            also the bound on the 503 answered when every replica of a shard is down.
        connect_timeout_s: seconds a starting worker waits for one replica of every shard.
        embedding_resolve_interval_s: seconds between re-resolutions of the embedding servers'
            DNS names (a name stands for every address it resolves to, each a replica: a
            Kubernetes headless Service per shard); replicas join and leave without restarting
            the workers. 0 resolves once, at start.
        embedding_local_lookups: look up over an embedding server's local Unix socket when it
            runs on this machine (found automatically; it skips gRPC's machinery, most of a small
            lookup's cost); false keeps every lookup on gRPC.
        max_batch_size: largest number of samples in one request (larger: HTTP 400).
        max_request_bytes: largest request body (larger: HTTP 400).
        watermark_refresh_s: seconds between reads of the embedding servers' watermark.
        metrics_interval_s: seconds over which the handler averages its timing metrics
            (EmbeddingLookupTime, DenseInferenceTime) before handing them to TorchServe; 0 hands
            over every request's values (each is a line the worker writes to the frontend).
        max_ids_per_request: most ids in one request, all features together (larger: HTTP 400).
        max_ids_per_sample: most ids of one feature in one sample (larger: HTTP 400).
        max_json_request_bytes: largest JSON body (larger: HTTP 400; batch bytes are not bound by it).
        torch_threads: torch intra-op threads of each worker. 1 (the default) keeps a worker on
            one core: small-batch serving gains nothing from more, and a worker whose threads
            wait on a busy core gets many times slower. Scale with TorchServe workers instead;
            0 keeps torch's default (one thread per core).
        embedding_tls_ca_file: PEM CA bundle of the embedding servers' certificates (enables TLS).
        embedding_tls_cert_file: client certificate for servers that demand mutual TLS.
        embedding_tls_key_file: private key of ``embedding_tls_cert_file``.
        embedding_tls_server_name: name to verify in the servers' certificates, when it is not
            the host part of their addresses.
        embedding_token_file: file with the embedding servers' shared token (else the
            environment variables ``CTRSERVE_EMBEDDING_TOKEN`` or ``CTRSERVE_EMBEDDING_TOKEN_FILE``).
        response_format: ``ctrserve`` (the default): per request a JSON object with the scores,
            the model version and the watermarks (see :mod:`handler.persia_handler`);
            ``persia``: per request the flat JSON list of its scores (every target of a sample
            in turn), which TorchServe writes with an indent of 2: what PERSIA's gRPC client
            (``serve_client.py``) parses. Errors keep ctrserve's form in both.

    Raises:
        ConfigError: a value of the wrong type or out of range.
    """

    embedding_servers: tuple[str, ...] = field(default_factory=tuple)
    embedding_timeout_s: float = 5.0
    connect_timeout_s: float = 30.0
    embedding_resolve_interval_s: float = 30.0
    embedding_local_lookups: bool = True
    max_batch_size: int = 4096
    max_request_bytes: int = 64 << 20
    watermark_refresh_s: float = 1.0
    metrics_interval_s: float = 1.0
    max_ids_per_request: int = 4_000_000
    max_ids_per_sample: int = 10_000
    max_json_request_bytes: int = 8 << 20
    torch_threads: int = 1
    embedding_tls_ca_file: str = ""
    embedding_tls_cert_file: str = ""
    embedding_tls_key_file: str = ""
    embedding_tls_server_name: str = ""
    embedding_token_file: str = ""
    response_format: str = "ctrserve"

    def __post_init__(self) -> None:
        servers = self.embedding_servers
        if not isinstance(servers, (list, tuple)) or not all(_is_shard(a) for a in servers):
            raise ConfigError(
                f"{SERVING_FILE}: 'embedding_servers' must be a list of 'host:port' strings (replicas of a shard "
                f"as a list or joined by '{REPLICA_SEP}'), got {servers!r}"
            )
        try:
            shards = normalize_addresses(servers) if servers else []
        except ConfigError as exc:
            raise ConfigError(f"{SERVING_FILE}: {exc}") from None
        object.__setattr__(self, "embedding_servers", tuple(REPLICA_SEP.join(replicas) for replicas in shards))
        for key in (
            "max_batch_size",
            "max_request_bytes",
            "max_ids_per_request",
            "max_ids_per_sample",
            "max_json_request_bytes",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{SERVING_FILE}: '{key}' must be a positive integer, got {value!r}")
        if not isinstance(self.torch_threads, int) or isinstance(self.torch_threads, bool) or self.torch_threads < 0:
            raise ConfigError(f"{SERVING_FILE}: 'torch_threads' must be an integer >= 0, got {self.torch_threads!r}")
        for key in (
            "embedding_tls_ca_file",
            "embedding_tls_cert_file",
            "embedding_tls_key_file",
            "embedding_tls_server_name",
            "embedding_token_file",
        ):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{SERVING_FILE}: '{key}' must be a string (a file path), got {getattr(self, key)!r}")
        for key in ("embedding_timeout_s", "connect_timeout_s", "watermark_refresh_s"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ConfigError(f"{SERVING_FILE}: '{key}' must be a positive number of seconds, got {value!r}")
        value = self.embedding_resolve_interval_s
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
            raise ConfigError(
                f"{SERVING_FILE}: 'embedding_resolve_interval_s' must be a number of seconds >= 0, got {value!r}"
            )
        if self.response_format not in RESPONSE_FORMATS:
            raise ConfigError(
                f"{SERVING_FILE}: 'response_format' must be one of {', '.join(RESPONSE_FORMATS)}, "
                f"got {self.response_format!r}"
            )
        if not isinstance(self.embedding_local_lookups, bool):
            raise ConfigError(
                f"{SERVING_FILE}: 'embedding_local_lookups' must be true or false, got {self.embedding_local_lookups!r}"
            )
        value = self.metrics_interval_s
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
            raise ConfigError(f"{SERVING_FILE}: 'metrics_interval_s' must be a number of seconds >= 0, got {value!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = SERVING_FILE) -> ServingConfig:
        """Build from parsed YAML; ``None`` (an empty file) gives the defaults.

        Raises:
            ConfigError: not a mapping, an unknown key, or a bad value.
        """
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**dict(data))
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(SERVING_FILE, source, 1)) from None

    @classmethod
    def load(cls, path: str | Path | None) -> ServingConfig:
        """Read ``path`` (``None`` or a missing file: the defaults).

        Raises:
            ConfigError: the file is not valid YAML or not a valid config.
        """
        if path is None or not Path(path).exists():
            return cls()
        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_dict(data, source=str(path))

    @property
    def embedding_replicas(self) -> list[list[str]]:
        """Per shard, its replicas' addresses."""
        return [shard.split(REPLICA_SEP) for shard in self.embedding_servers]

    def client_security(self, environ: Mapping[str, str] = os.environ) -> ClientSecurity | None:
        """How to reach the embedding servers: TLS from the ``embedding_tls_*`` keys, the token
        from ``embedding_token_file`` or the environment; None when neither is set.

        Raises:
            ConfigError: a key without its partner, or an unreadable or too short token.
        """
        token = resolve_token(self.embedding_token_file or None, TOKEN_ENV, environ)
        if not self.embedding_tls_ca_file and token is None and not self.embedding_tls_cert_file:
            return None
        return ClientSecurity(
            tls_ca_file=self.embedding_tls_ca_file or None,
            tls_cert_file=self.embedding_tls_cert_file or None,
            tls_key_file=self.embedding_tls_key_file or None,
            tls_server_name=self.embedding_tls_server_name or None,
            token=token,
        )

    def with_environment(self, environ: Mapping[str, str] = os.environ) -> ServingConfig:
        """A copy with ``CTRSERVE_EMBEDDING_SERVERS`` (else ``PERSIA_EMBEDDING_SERVERS``), when
        set, replacing the addresses.

        Raises:
            ConfigError: the variable holds something other than comma-separated addresses
                (replicas of a shard joined by ``|``).
        """
        name = next((n for n in (ENV_SERVERS, ENV_PERSIA_SERVERS) if environ.get(n, "").strip()), None)
        if name is None:
            return self
        value = environ[name].strip()
        try:
            shards = normalize_addresses(value)
        except ConfigError:
            raise ConfigError(
                f"{name} must be comma-separated 'host:port' addresses (replicas of a shard joined by "
                f"'{REPLICA_SEP}'), got {value!r}"
            ) from None
        return dataclasses.replace(self, embedding_servers=tuple(REPLICA_SEP.join(r) for r in shards))


def _is_shard(value: object) -> bool:
    """A shard entry: ``host:port``, ``host:port|host:port...`` or a list of ``host:port``."""
    replicas = value.split(REPLICA_SEP) if isinstance(value, str) else value
    if not isinstance(replicas, (list, tuple)) or not replicas:
        return False
    return all(is_address(a.strip() if isinstance(a, str) else a) for a in replicas)
