"""What a server needs to feed an exported dense model: the ``model.json`` beside ``model.pt``.

The trainer writes one per exported dense version; the TorchServe handler reads it to decode
requests and build the model's inputs. The dense model's contract is
``forward(dense: Tensor[batch, dense_width] float32, sparse: List[Tensor])`` where ``sparse``
holds one tensor per entry of :attr:`DenseModelSpec.features`, in that order: ``[batch, dim]``
for pooled features, ``[batch, sample_fixed_size, dim]`` (zeros where no id) for raw ones.

Model root layout for dense versions::

    <model root>/dense/v00000042/model.pt     TorchScript (torch.jit.script)
    <model root>/dense/v00000042/model.json   this spec; written last, so its presence marks
                                              the version complete

Readers of ``dense/`` (:func:`list_versions`: the archiver's publisher, the next export number)
accept only folder names :func:`version_dir` makes (``v`` and ASCII digits); any other name is
ignored with one WARNING per name.

Example:
    >>> spec = DenseModelSpec(version=3, step=1200, dense_width=13,
    ...                       features=[FeatureSpec("C1", 16)])
    >>> DenseModelSpec.from_json(spec.to_json()).features[0].name
    'C1'
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.errors import ConfigError
from embedding_server.core.names import ascii_pattern, parse_listing
from embedding_server.storage.base import Storage

SPEC_FORMAT_VERSION = 1
DENSE_DIR = "dense"
MODEL_FILE = "model.pt"
SPEC_FILE = "model.json"
_VERSION_NAME = ascii_pattern(r"v[0-9]{8}")

log = logging.getLogger("ctrserve.embedding_server.core.model_spec")


def version_dir(version: int) -> str:
    """``dense/v00000042``: zero-padded so names sort in version order."""
    return f"{DENSE_DIR}/v{version:08d}"


def parse_version_dir(name: str) -> int | None:
    """The version of a ``v00000042`` directory name (exactly ``v`` and 8 ASCII digits, as
    :func:`version_dir` makes them), or None for any other name."""
    return int(name[1:]) if _VERSION_NAME.fullmatch(name) else None


def list_versions(storage: Storage, logger: logging.Logger | None = None) -> list[int]:
    """Versions of the ``dense/vNNNNNNNN`` folders under a model root, ascending (complete or
    not); other names are ignored, with one WARNING per name on ``logger`` (the reader's; default
    this module's; see :mod:`~embedding_server.core.names`).

    Raises:
        StorageError: the listing failed.
    """
    versions = parse_listing(
        storage.list_dir(DENSE_DIR),
        parse_version_dir,
        logger or log,
        storage.url,
        DENSE_DIR,
        "dense version folder vNNNNNNNN",
    )
    return sorted(versions)


@dataclass(frozen=True)
class FeatureSpec:
    """One sparse input of the dense model.

    Args:
        name: feature name from ``embedding_config.yml``.
        dim: embedding width.
        pooled: True for ``[batch, dim]`` inputs, False for ``[batch, sample_fixed_size, dim]``.
        sample_fixed_size: ids kept per sample when not pooled.
    """

    name: str
    dim: int
    pooled: bool = True
    sample_fixed_size: int = 0


@dataclass
class DenseModelSpec:
    """The ``model.json`` of an exported dense version.

    Args:
        version: dense version number (increases with every export).
        step: training step the version was exported at.
        dense_width: columns of the dense input (all dense parts concatenated).
        features: the sparse inputs, in the order ``forward`` takes them.
        targets: number of output columns (tasks).
        sparse_watermark: per shard, the last incremental packet sequence number whose rows the
            dense version was trained against (empty when incremental updates are off).
        created_at: UNIX time of the export.
        model_class: the Python class the TorchScript was made from (informative).
        embedding_config: the ``embedding_config.yml`` content the model was trained with.
    """

    version: int
    step: int
    dense_width: int
    features: list[FeatureSpec]
    targets: int = 1
    sparse_watermark: dict[str, int] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    model_class: str = ""
    embedding_config: dict[str, Any] = field(default_factory=dict)
    format_version: int = SPEC_FORMAT_VERSION

    @classmethod
    def for_config(cls, config: EmbeddingConfig, **kwargs: Any) -> DenseModelSpec:
        """A spec whose features are every slot of ``config`` in file order."""
        features = [
            FeatureSpec(name, slot.dim, slot.pooling.pooled, 0 if slot.pooling.pooled else slot.sample_fixed_size)
            for name, slot in config.slots_config.items()
        ]
        return cls(features=features, embedding_config=config.to_dict(), **kwargs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = SPEC_FILE) -> DenseModelSpec:
        """Parse and validate a ``model.json``.

        Raises:
            ConfigError: not JSON, an unknown format version, or a missing or mistyped field.
        """
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{source}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        if data.get("format_version") != SPEC_FORMAT_VERSION:
            raise ConfigError(f"{source}: format_version {data.get('format_version')!r} is not {SPEC_FORMAT_VERSION}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{source}: unknown keys {sorted(unknown)}")
        try:
            features = [FeatureSpec(**f) for f in data.pop("features")]
            spec = cls(features=features, **data)
        except (TypeError, KeyError) as e:
            raise ConfigError(f"{source}: {e}") from None
        spec._validate(source)
        return spec

    def _validate(self, source: str) -> None:
        ints = {"version": self.version, "step": self.step, "dense_width": self.dense_width, "targets": self.targets}
        for key, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{source}: '{key}' must be a non-negative integer, got {value!r}")
        for f in self.features:
            if not isinstance(f.name, str) or not isinstance(f.dim, int) or f.dim <= 0:
                raise ConfigError(f"{source}: feature {f!r} needs a name and a dim > 0")
            if not f.pooled and f.sample_fixed_size <= 0:
                raise ConfigError(f"{source}: raw feature '{f.name}' needs sample_fixed_size > 0")
        if not isinstance(self.sparse_watermark, dict) or not all(
            isinstance(v, int) for v in self.sparse_watermark.values()
        ):
            raise ConfigError(f"{source}: 'sparse_watermark' must map shard names to integers")
