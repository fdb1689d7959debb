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

The spec records the ``embedding_config.yml`` the version was trained with, its slots' feature
``ops`` included (:mod:`embedding_server.core.feature_ops`): the handler applies those ops to raw
request inputs (:meth:`DenseModelSpec.feature_pipeline`), so a served version always transforms
raw features as its training did.

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

import inspect
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.errors import ConfigError
from embedding_server.core.feature_ops import FeaturePipeline
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


class ModelSignature(str, Enum):
    """How a dense model takes its inputs.

    ``CTRSERVE``: ``forward(dense: Tensor, sparse: List[Tensor])``, the dense parts concatenated
    as one float32 ``[batch, dense_width]`` tensor. ``PERSIA``: PERSIA's
    ``forward(non_id_type_tensors: List[Tensor], id_type_tensors: List[Tensor])``, one tensor per
    non-ID feature as the client built it (dtype and shape). Both take the embeddings alike.
    """

    CTRSERVE = "ctrserve"
    PERSIA = "persia"

    def __str__(self) -> str:
        return self.value


_LIST_TYPE = re.compile(r"^(typing\.)?(List|list|Sequence|collections\.abc\.Sequence)\[")
_PERSIA_FIRST_NAMES = ("non_id_type_tensors", "non_id_type_features", "non_id_tensors")


def model_signature(module: Any) -> ModelSignature:
    """Which signature ``module`` (an ``nn.Module``, ``DistributedDataParallel`` or TorchScript
    module) has, from its ``forward``'s first parameter: a list of tensors is PERSIA's, a tensor
    is ctrserve's. An unannotated first parameter named like PERSIA's (``non_id_type_tensors``)
    counts as PERSIA's; anything else as ctrserve's.

    Example:
        >>> class Persia(torch.nn.Module):
        ...     def forward(self, non_id_type_tensors: List[Tensor], id_type_tensors: List[Tensor]): ...
        >>> model_signature(Persia())
        <ModelSignature.PERSIA: 'persia'>
    """
    module = getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module
    schema = getattr(getattr(module, "forward", None), "schema", None)
    if schema is not None:  # TorchScript: arguments[0] is self
        arguments = list(schema.arguments)[1:]
        if not arguments:
            return ModelSignature.CTRSERVE
        first_type, first_name = str(arguments[0].type), arguments[0].name
    else:
        try:
            parameters = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError, AttributeError):
            return ModelSignature.CTRSERVE
        if not parameters:
            return ModelSignature.CTRSERVE
        annotation = parameters[0].annotation
        first_name = parameters[0].name
        if annotation is inspect.Parameter.empty:
            first_type = ""
        elif isinstance(annotation, str):
            first_type = annotation
        else:
            first_type = getattr(annotation, "__name__", "") if isinstance(annotation, type) else str(annotation)
    if _LIST_TYPE.match(first_type.replace(" ", "")):
        return ModelSignature.PERSIA
    if not first_type and first_name in _PERSIA_FIRST_NAMES:
        return ModelSignature.PERSIA
    return ModelSignature.CTRSERVE


@dataclass(frozen=True)
class FeatureSpec:
    """One sparse input of the dense model.

    Args:
        name: feature name from ``embedding_config.yml``.
        dim: embedding width (``tile_len * dim`` for a slot with ``combiner: tile``).
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
        signature: how the model takes its inputs (a :class:`ModelSignature` value; specs
            written before signatures were recorded read as ``"ctrserve"``).
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
    signature: str = ModelSignature.CTRSERVE.value

    @classmethod
    def for_config(cls, config: EmbeddingConfig, **kwargs: Any) -> DenseModelSpec:
        """A spec whose features are every slot of ``config`` in file order."""
        features = [
            FeatureSpec(
                name, slot.output_dim, slot.pooling.pooled, 0 if slot.pooling.pooled else slot.sample_fixed_size
            )
            for name, slot in config.slots_config.items()
        ]
        return cls(features=features, embedding_config=config.to_dict(), **kwargs)

    def feature_pipeline(self) -> FeaturePipeline:
        """The feature ops this version was trained with: its ``embedding_config``'s slots'
        ``ops`` (the export records the config, ops included), empty when no slot has any.

        Raises:
            ConfigError: the recorded embedding_config (or its ops) is invalid.
        """
        if not self.embedding_config:
            return FeaturePipeline({})
        config = EmbeddingConfig.from_dict(self.embedding_config, source=f"{SPEC_FILE} embedding_config")
        return FeaturePipeline.from_config(config)

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
        if self.signature not in {s.value for s in ModelSignature}:
            raise ConfigError(
                f"{source}: 'signature' must be one of {[s.value for s in ModelSignature]}, got {self.signature!r}"
            )
        for f in self.features:
            if not isinstance(f.name, str) or not isinstance(f.dim, int) or f.dim <= 0:
                raise ConfigError(f"{source}: feature {f!r} needs a name and a dim > 0")
            if not f.pooled and f.sample_fixed_size <= 0:
                raise ConfigError(f"{source}: raw feature '{f.name}' needs sample_fixed_size > 0")
        if not isinstance(self.sparse_watermark, dict) or not all(
            isinstance(v, int) for v in self.sparse_watermark.values()
        ):
            raise ConfigError(f"{source}: 'sparse_watermark' must map shard names to integers")
