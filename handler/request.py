"""Decoding and validating prediction requests, and merging a TorchServe batch of them.

A request body is either the batch bytes clients build (``PyPersiaBatchData.to_bytes()``, see
:mod:`embedding_server.core.batch_codec`) or JSON::

    {"dense": [[0.1, 0.2, ...], ...],            # one row of dense_width numbers per sample
     "sparse": {"C1": [[12, 7], [], ...], ...}}  # per feature, one id list per sample

and either form may carry named raw inputs instead of (some) features, which the served
version's feature ops turn into features (``"inputs": {"age": [31, 45], "tags": [["a"], []]}``;
see :mod:`handler.raw_inputs`).

Every feature the model takes must be present (a sample may have no ids); features the model
does not take, a dense width other than the model's, non-finite dense values, an empty body or
batch, malformed bytes or JSON, and a request over a limit are :class:`RequestError` (HTTP 400,
gRPC INVALID_ARGUMENT). The limits (``serving.yml``, see :class:`Limits`) are checked in the
cheapest order: body bytes before anything is parsed, then samples, ids per request and ids
per sample; each message names the limit's key and the request's value. 413 would fit "too large" better, but
TorchServe 0.12's REST frontend rewrites a handler's 413 into 507 "Insufficient Storage", which
reads as a server fault. Nothing here imports TorchServe, so it is unit-testable on its own.

Every limit holds for every content type. TorchServe's Python worker parses an
``application/json`` body (and decodes ``text/*``) before the handler sees it, which would put
the JSON size check after the very parse it guards against; the handler therefore turns that off
(:data:`DECODE_ENV` = ``false`` in the worker, set by ``PersiaHandler.initialize``) and gets every
body as the bytes that came. A body that arrives parsed anyway (another worker, a direct caller)
is measured re-encoded as compact JSON and held to the same limits.

Example:
    >>> decoder = RequestDecoder(spec, max_batch_size=1024, max_request_bytes=1 << 20)
    >>> request = decoder.decode({"body": batch.to_bytes()})
    >>> dense, keyed_ids, sizes = merge_requests([request], decoder.feature_names)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from embedding_server.core.batch import KeyedIds, SparseFeature
from embedding_server.core.batch_codec import MAGIC, BatchData, check_parts, decode_batch
from embedding_server.core.dense_layout import BatchLayout, non_id_arrays
from embedding_server.core.errors import InvalidRequestError
from embedding_server.core.model_spec import DenseModelSpec
from handler.raw_inputs import RAW_INPUTS_KEY, RawFeatures, json_inputs, split_raw_inputs

if TYPE_CHECKING:
    import torch  # only for annotations: decoding needs no torch

#: Keys of a TorchServe request item that may hold the body, in the order they are tried:
#: ``batch`` (gRPC ``input`` map key clients use), ``body`` (REST raw body), ``data`` (form field).
BODY_KEYS = ("batch", "body", "data")
#: TorchServe worker's environment variable: "false" hands request bodies to the handler
#: undecoded, whatever their content type (read by the worker for every request).
DECODE_ENV = "TS_DECODE_INPUT_REQUEST"
_JSON_KEYS = {"dense", "sparse", "inputs"}


@dataclass(frozen=True)
class Limits:
    """What one request may hold (``serving.yml`` keys of the same names).

    Args:
        max_batch_size: samples.
        max_request_bytes: bytes of the body (characters for a text body).
        max_ids_per_request: ids of all features together.
        max_ids_per_sample: ids of one feature in one sample.
        max_json_request_bytes: bytes of a JSON body. Parsed JSON takes 10-20 times its size in
            Python objects, so JSON has its own, smaller cap (batch bytes are read in place).
    """

    max_batch_size: int = 4096
    max_request_bytes: int = 64 << 20
    max_ids_per_request: int = 4_000_000
    max_ids_per_sample: int = 10_000
    max_json_request_bytes: int = 8 << 20

    @classmethod
    def from_config(cls, config: Any) -> Limits:
        """The limits of a :class:`~handler.serving_config.ServingConfig` (or anything with the keys)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


class RequestError(Exception):
    """A request the handler refuses; ``code`` is the HTTP status (4xx) it is answered with.

    Args:
        message: what is wrong, in words a client can act on.
        code: HTTP status code (400 for every refusal the decoder makes).
    """

    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class DecodedRequest:
    """One validated request.

    Args:
        dense: float32 ``[batch, dense_width]``.
        sparse: the model's features in the model's order, each of ``batch`` samples.
        non_id: the non-ID parts as the client built them (PERSIA's dtypes and shapes, from the
            batch's layout, see :mod:`~embedding_server.core.dense_layout`); kept only by a
            decoder made with ``keep_non_id`` (a model with PERSIA's signature takes them).
    """

    dense: np.ndarray
    sparse: KeyedIds
    non_id: tuple[np.ndarray, ...] = ()

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])


class RequestDecoder:
    """Turns TorchServe request items into :class:`DecodedRequest` for one dense model.

    Args:
        spec: the served model's ``model.json``.
        max_batch_size: most samples per request.
        max_request_bytes: most bytes per request body.
        max_ids_per_request: most ids per request, all features together.
        max_ids_per_sample: most ids of one feature in one sample.
        check_dense_width: refuse a dense width other than ``spec.dense_width``; False for a
            model whose width nobody recorded (a bare TorchScript archive without model.json).
        keep_non_id: also keep each request's non-ID parts as the client built them
            (:attr:`DecodedRequest.non_id`).
    """

    def __init__(
        self,
        spec: DenseModelSpec,
        max_batch_size: int,
        max_request_bytes: int,
        max_ids_per_request: int = Limits.max_ids_per_request,
        max_ids_per_sample: int = Limits.max_ids_per_sample,
        max_json_request_bytes: int = Limits.max_json_request_bytes,
        check_dense_width: bool = True,
        keep_non_id: bool = False,
    ):
        self.spec = spec
        self.check_dense_width = check_dense_width
        self.keep_non_id = keep_non_id
        self.feature_names = [f.name for f in spec.features]
        self._feature_order = tuple(self.feature_names)
        self._feature_set = frozenset(self.feature_names)
        self.raw_features = RawFeatures(spec.feature_pipeline(), self.feature_names)  # the version's feature ops
        self.limits = Limits(
            max_batch_size, max_request_bytes, max_ids_per_request, max_ids_per_sample, max_json_request_bytes
        )
        self.max_batch_size = max_batch_size
        self.max_request_bytes = max_request_bytes

    @classmethod
    def from_serving(
        cls, spec: DenseModelSpec, serving: Any, check_dense_width: bool = True, keep_non_id: bool = False
    ) -> RequestDecoder:
        """A decoder with the limits of a :class:`~handler.serving_config.ServingConfig`."""
        limits = Limits.from_config(serving)
        return cls(
            spec,
            limits.max_batch_size,
            limits.max_request_bytes,
            limits.max_ids_per_request,
            limits.max_ids_per_sample,
            limits.max_json_request_bytes,
            check_dense_width=check_dense_width,
            keep_non_id=keep_non_id,
        )

    def decode(self, item: Mapping[str, Any] | None) -> DecodedRequest:
        """Decode one item of TorchServe's ``data`` list.

        Raises:
            RequestError: the request is empty, malformed, too large or does not fit the model.
        """
        body = request_body(item)
        if isinstance(body, (bytes, bytearray, memoryview)):
            if len(body) > self.max_request_bytes:
                raise RequestError(
                    f"request of {len(body)} bytes exceeds the limit of {self.max_request_bytes} bytes (max_request_bytes)"
                )
            if bytes(body[: len(MAGIC)]) == MAGIC:
                data = _decode_bytes(body)  # parts already checked to agree (check_parts)
                return self._from_batch(data, _checked_batch_size(data))
            self._check_json_size(len(body), "bytes")
            body = _json_from_bytes(body)
        elif isinstance(body, str):
            if len(body) > self.max_request_bytes:
                raise RequestError(
                    f"request of {len(body)} characters exceeds the limit of {self.max_request_bytes} bytes (max_request_bytes)"
                )
            self._check_json_size(len(body), "characters")
            body = _json_from_bytes(body.encode("utf-8", errors="replace"))
        else:  # parsed before it got here: sized as compact JSON, no smaller than what came
            size = _json_size(body)
            if size > self.max_request_bytes:
                raise RequestError(
                    f"request of {size} bytes (as JSON) exceeds the limit of {self.max_request_bytes} bytes "
                    "(max_request_bytes)"
                )
            self._check_json_size(size, "bytes (re-encoded)")
        return self._from_batch(_batch_from_json(body, self.raw_features.known))

    def _from_batch(self, data: BatchData, batch_size: int | None = None) -> DecodedRequest:
        """Validate a decoded batch against the model; ``batch_size`` when its parts are already checked."""
        if batch_size is None:
            try:
                batch_size = check_parts(data)
            except InvalidRequestError as exc:
                raise RequestError(str(exc)) from None
        if batch_size == 0:
            raise RequestError("empty batch: the request holds 0 samples")
        if batch_size > self.max_batch_size:
            raise RequestError(
                f"batch of {batch_size} samples exceeds the limit of {self.max_batch_size} samples per request (max_batch_size)"
            )
        try:
            features: Sequence[SparseFeature] = data.sparse  # decoded batch bytes already are one KeyedIds
            if RAW_INPUTS_KEY in data.meta:  # raw inputs: the version's feature ops make its features
                raw = split_raw_inputs(data)
                features = self.raw_features.features(raw, data.sparse, self.limits.max_ids_per_request)
            sparse = KeyedIds.from_features(features)
        except InvalidRequestError as exc:
            raise RequestError(str(exc)) from None
        self._check_ids(sparse)
        dense = self._dense(data, batch_size)
        return DecodedRequest(dense, self._features(sparse), self._non_id(data, dense) if self.keep_non_id else ())

    @staticmethod
    def _non_id(data: BatchData, dense: np.ndarray) -> tuple[np.ndarray, ...]:
        """The non-ID parts as the client built them: through the batch's layout when it has one
        (a PersiaBatch), else its dense parts (one part for a JSON request)."""
        if not data.dense:
            return (dense,)
        try:
            layout = BatchLayout.from_meta(
                data.meta, [int(d.shape[1]) for d in data.dense], [int(t.shape[1]) for t in data.targets]
            )
        except InvalidRequestError as exc:
            raise RequestError(str(exc)) from None
        return tuple(non_id_arrays(data.dense, layout))

    def _check_json_size(self, size: int, unit: str) -> None:
        if size > self.limits.max_json_request_bytes:
            raise RequestError(
                f"JSON request of {size} {unit} exceeds the limit of {self.limits.max_json_request_bytes} bytes "
                "(max_json_request_bytes); send batch bytes for large requests"
            )

    def _check_ids(self, sparse: KeyedIds) -> None:
        """Refuse more ids per request or per sample than the limits allow.

        Raises:
            RequestError: naming the limit, its key and the request's value.
        """
        total = int(sparse.ids.shape[0])
        if total > self.limits.max_ids_per_request:
            raise RequestError(
                f"request carries {total} ids; the limit is {self.limits.max_ids_per_request} ids per request "
                "(max_ids_per_request)"
            )
        if not sparse.lengths.size or int(sparse.lengths.max()) <= self.limits.max_ids_per_sample:
            return
        k, worst = np.unravel_index(int(sparse.lengths.argmax()), sparse.lengths.shape)
        raise RequestError(
            f"feature '{sparse.names[k]}' has {int(sparse.lengths[k, worst])} ids in sample {worst}; the limit is "
            f"{self.limits.max_ids_per_sample} ids per sample (max_ids_per_sample)"
        )

    def _dense(self, data: BatchData, batch_size: int) -> np.ndarray:
        parts = [d.astype(np.float32, copy=False) for d in data.dense]
        dense = (
            parts[0]
            if len(parts) == 1
            else (np.concatenate(parts, axis=1) if parts else np.zeros((batch_size, 0), np.float32))
        )
        if self.check_dense_width and dense.shape[1] != self.spec.dense_width:
            raise RequestError(
                f"dense width {dense.shape[1]} does not match the model's dense_width {self.spec.dense_width} "
                f"(model version {self.spec.version})"
            )
        if dense.size and not np.isfinite(dense).all():
            raise RequestError("dense values must be finite: the request holds NaN or infinity")
        return dense

    def _features(self, sparse: KeyedIds) -> KeyedIds:
        """The request's features in the model's order.

        Raises:
            RequestError: a feature the model does not take, or one it takes is missing.
        """
        if sparse.names == self._feature_order:
            return sparse  # the usual case: clients send the model's features in its order
        unknown = [name for name in sparse.names if name not in self._feature_set]
        if unknown:
            raise RequestError(
                f"unknown feature{'s' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)}; "
                f"the model takes: {', '.join(self.feature_names)}"
            )
        missing = [name for name in self.feature_names if name not in sparse.names]
        if missing:
            raise RequestError(
                f"missing feature{'s' if len(missing) > 1 else ''} {', '.join(repr(n) for n in missing)}: every feature "
                "the model takes must be sent (a sample may have an empty id list)"
            )
        return sparse.select(self.feature_names)


def request_body(item: Mapping[str, Any] | None) -> bytes | bytearray | str | dict:
    """The body of one TorchServe request item (see :data:`BODY_KEYS`).

    Raises:
        RequestError: no body, or an empty one.
    """
    body = None
    if isinstance(item, Mapping):
        body = next((item[k] for k in BODY_KEYS if item.get(k) is not None), None)
    if body is None or (isinstance(body, (bytes, bytearray, str)) and len(body) == 0):
        raise RequestError(
            "empty request body: send ctrserve batch bytes (PyPersiaBatchData.to_bytes()) "
            f'or JSON {{"dense": [[...]], "sparse": {{"<feature>": [[ids], ...]}}}} under one of {list(BODY_KEYS)}'
        )
    if not isinstance(body, (bytes, bytearray, str, dict)):
        raise RequestError(f"request body must be bytes or a JSON object, got {type(body).__name__}")
    return body


def merge_requests(
    requests: Sequence[DecodedRequest], feature_names: Sequence[str]
) -> tuple[np.ndarray, KeyedIds, list[int]]:
    """Concatenate requests into one batch for one lookup and one model call.

    Args:
        requests: decoded requests (at least one).
        feature_names: the model's feature order (as in every request's ``sparse``).

    Returns:
        ``(dense [N, w], features, sizes)``: ``sizes[i]`` samples of the result belong to
        request ``i``, in order.
    """
    sizes = [r.batch_size for r in requests]
    if len(requests) == 1:
        return requests[0].dense, requests[0].sparse, sizes
    dense = np.concatenate([r.dense for r in requests], axis=0)
    parts = [r.sparse for r in requests]
    # Feature k's ids: request 0's, then request 1's, ...; each request's offsets shifted by
    # the ids of feature k in the requests before it.
    ids = np.concatenate([p.ids[p.bounds[k] : p.bounds[k + 1]] for k in range(len(feature_names)) for p in parts])
    base = np.cumsum([np.zeros(len(feature_names), np.int64)] + [p.counts for p in parts], axis=0)
    offsets = np.concatenate(
        [p.offsets[:, :-1] + base[i][:, None] for i, p in enumerate(parts)] + [base[-1][:, None]], axis=1
    )
    return dense, KeyedIds(feature_names, ids, offsets), sizes


def _decode_bytes(body: bytes | bytearray | memoryview) -> BatchData:
    try:
        return decode_batch(body)
    except InvalidRequestError as exc:
        raise RequestError(f"undecodable batch bytes: {exc}") from None


def _checked_batch_size(data: BatchData) -> int:
    """The batch size of a batch whose parts :func:`decode_batch` checked (they agree; one exists)."""
    if data.dense:
        return int(data.dense[0].shape[0])
    return data.sparse[0].batch_size if data.sparse else int(data.targets[0].shape[0])


def _json_size(body: Any) -> int:
    """Characters of ``body`` written as compact JSON (ASCII: as many bytes).

    Raises:
        RequestError: nested too deep to write.
    """
    try:
        return len(json.dumps(body, separators=(",", ":")))
    except (RecursionError, TypeError, ValueError) as exc:
        raise RequestError(f"undecodable request: the JSON cannot be measured: {exc}") from None


def _json_from_bytes(raw: bytes | bytearray | memoryview) -> Any:
    text = bytes(raw)
    if not text.lstrip()[:1] == b"{":
        raise RequestError(
            f"undecodable request: neither ctrserve batch bytes (magic {MAGIC!r}) nor a JSON object "
            f"(starts with {text[:8]!r})"
        )
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested ~1000 deep
        raise RequestError(f"undecodable request: invalid JSON: {exc}") from None


def _batch_from_json(body: Any, input_kinds: Mapping[str, str]) -> BatchData:
    if not isinstance(body, dict):
        raise RequestError(f"a JSON request must be an object with 'dense' and 'sparse', got {type(body).__name__}")
    unknown = sorted(set(body) - _JSON_KEYS)
    if unknown:
        raise RequestError(
            f"unknown keys {unknown} in the JSON request; it may hold only 'dense', 'sparse' and 'inputs'"
        )
    sparse = body.get("sparse", {} if "inputs" in body else None)  # raw inputs may make every feature
    if not isinstance(sparse, dict):
        raise RequestError("a JSON request needs 'sparse': an object mapping each feature to one id list per sample")
    data = BatchData()
    if body.get("dense") is not None:
        data.dense.append(_json_dense(body["dense"]))
    features: list[SparseFeature] = []
    for name, samples in sparse.items():
        if not isinstance(samples, list) or not all(isinstance(s, list) for s in samples):
            raise RequestError(f"'sparse'.'{name}' must be a list with one list of ids per sample")
        try:
            features.append(SparseFeature.from_lists(name, samples))
        except InvalidRequestError as exc:
            raise RequestError(str(exc)) from None
    data.sparse = features
    if "inputs" in body:
        try:
            json_inputs(body["inputs"], data, input_kinds)
        except InvalidRequestError as exc:
            raise RequestError(str(exc)) from None
    return data


def _json_dense(rows: Any) -> np.ndarray:
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise RequestError("'dense' must be a list with one list of numbers per sample")
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise RequestError(f"'dense' rows have different lengths {sorted(widths)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in rows for v in r):
        raise RequestError("'dense' rows must hold only numbers")
    return np.array(rows, np.float32).reshape(len(rows), widths.pop() if widths else 0)


@dataclass
class PreparedBatch:
    """What the handler's ``preprocess`` hands to ``inference``, and ``inference`` (with the
    scores) to ``postprocess``: every request's outcome, the merged inputs and the scores.

    Args:
        outcomes: per TorchServe request, its :class:`DecodedRequest` or its :class:`RequestError`.
        dense: merged dense input on the model's device (None when no request is valid).
        sparse: merged embeddings, one tensor per model feature, on the model's device.
        non_id: merged non-ID parts as clients built them, on the model's device (a model with
            PERSIA's signature takes them instead of ``dense``; None otherwise).
        sizes: samples per valid request, in order (empty when no request is valid).
        scores: the model's ``[samples, targets]`` CPU float32 tensor of the valid requests, set
            by ``inference`` (None when no request is valid).
    """

    outcomes: list[DecodedRequest | RequestError]
    dense: Any = None
    sparse: list[Any] | None = None
    non_id: list[Any] | None = None
    sizes: list[int] = field(default_factory=list)
    scores: torch.Tensor | None = None
