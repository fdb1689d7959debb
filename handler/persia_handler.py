"""TorchServe handler of a sparse CTR model: embedding lookups in preprocess, the dense model after.

The ``.mar`` built by ``ctrserve archive`` holds this file as its handler, ``model.pt`` (the
TorchScript dense model), ``model.json`` (:class:`~embedding_server.core.model_spec.DenseModelSpec`)
and optionally ``serving.yml`` (:class:`~handler.serving_config.ServingConfig`). The worker's
Python must have ctrserve installed (this module imports ``handler`` and ``embedding_server``).

Per TorchServe batch (every request in ``data``): each request is decoded and validated on its
own; the valid ones are concatenated, their embeddings looked up in ONE call to the embedding
servers, the dense model runs once under ``torch.inference_mode`` on the GPU TorchServe assigned
(else the CPU), and the scores are split back into one JSON result per request::

    {"scores": [0.12, 0.87, ...],          # one per sample ([[...], ...] for several targets)
     "model_version": 3, "model_step": 1200,
     "sparse_watermark": {...},            # what the dense version was exported at
     "embedding_watermark": {...},         # what the embedding servers report now
     "embedding_skipped": {...},           # packets they skipped (operator), {} when none
     "batch_requests": 1}                  # requests TorchServe batched together with this one

Bad requests: when the TorchServe batch holds one request (the usual case, and always without
server-side batching) the handler raises ``PredictionException`` with a 4xx code: REST answers
that status with ``{"code", "type", "message"}`` and gRPC answers ``INVALID_ARGUMENT`` with the
message as details (every refusal is a 400; see :mod:`handler.request` for why not 413). When TorchServe batched several
requests together, one bad request must not fail the others, so it gets a per-request status
(``context.set_response_status``) and the body ``{"error": message, "code": code}``: REST
answers it with that 4xx status, but TorchServe 0.12's gRPC frontend ignores per-request
statuses and answers OK with that body, which :class:`handler.client.PredictionClient` turns
into the same :class:`~handler.client.PredictionError`. The worker stays up in every case.

The handler follows TorchServe's template: :class:`~ts.torch_handler.base_handler.BaseHandler`'s
``handle`` runs :meth:`~PersiaHandler.preprocess` (decode, the lone-bad-request check, the lookup),
:meth:`~PersiaHandler.inference` (the dense model; the batch comes back with its scores) and
:meth:`~PersiaHandler.postprocess` (one JSON string per request), and records ``HandlerTime``.

Example (what TorchServe does with it)::

    handler = PersiaHandler()
    handler.initialize(context)            # context.system_properties["model_dir"], ["gpu_id"]
    results = handler.handle([{"body": batch_bytes}], context)   # one JSON string per request
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from ts.handler_utils.timer import timed
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from embedding_server.core.config import EmbeddingConfig
from embedding_server.core.errors import ConfigError, InvalidRequestError, ShardUnavailableError
from embedding_server.core.model_spec import MODEL_FILE, SPEC_FILE, DenseModelSpec, ModelSignature, model_signature
from embedding_server.rpc.client import EmbeddingClient, RawEmbedding
from embedding_server.rpc.remote import RemoteEmbeddingClient
from embedding_server.rpc.served_config import read_embedding_config
from handler.request import DECODE_ENV, DecodedRequest, PreparedBatch, RequestDecoder, RequestError, merge_requests
from handler.serving_config import ENV_PERSIA_SERVERS, ENV_SERVERS, SERVING_FILE, ServingConfig
from handler.timing import TimingMetrics  # not defined here: TorchServe takes a handler module's only class

logger = logging.getLogger(__name__)
JSON_CONTENT_TYPE = "application/json"
_Method = TypeVar("_Method", bound=Callable[..., Any])


def _timed(method: _Method) -> _Method:
    """TorchServe's ``@timed`` (a ``ts_handler_<name>`` metric when the model's config sets
    ``handler: {profile: true}``), keeping the method's name, docstring and signature."""
    return cast(_Method, functools.wraps(method)(timed(method)))


class PersiaHandler(BaseHandler):
    """Serves one exported dense version with embeddings from remote embedding servers.

    Attributes set by :meth:`initialize`: ``spec`` (model.json), ``serving`` (serving config),
    ``model`` (TorchScript module on ``device``), ``embeddings`` (remote lookup client) and
    ``decoder`` (request validation).

    Raises:
        ConfigError: from :meth:`initialize` when model.json, serving.yml or the embedding
            server list is missing or invalid (the worker does not start; TorchServe logs it).
        PredictionException: from ``handle`` (by :meth:`preprocess`) with a 4xx code for a bad
            lone request, 503 when the embedding servers cannot answer.
    """

    # Set by configure() (which initialize() calls) before TorchServe sends any request.
    spec: DenseModelSpec
    serving: ServingConfig
    embeddings: EmbeddingClient
    decoder: RequestDecoder

    def __init__(self) -> None:
        super().__init__()
        self._embedding_state: tuple[dict[str, Any], dict[str, Any]] = ({}, {})  # see read_embedding_state
        self._tail_cache: tuple[object, str] | None = None  # see _result_tail
        self._stop = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def initialize(self, context: Any) -> None:
        """Load the TorchScript model, model.json (when the archive has one) and serving.yml from
        the model directory; connect to the shards.

        A bare archive (``torch-model-archiver --serialized-file model.pth --handler <this file>``,
        no model.json) is served with the features the embedding servers report (their Info:
        every slot of their embedding_config.yml, in file order) and the signature of the
        TorchScript's ``forward``; its dense width is not checked (nobody recorded it).
        """
        # Every body as the bytes that came: otherwise the worker parses application/json before
        # preprocess, past the JSON size limit meant to stop that parse (see handler.request).
        os.environ[DECODE_ENV] = "false"
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        self.context = context
        self.manifest = context.manifest
        self.device = select_device(properties.get("gpu_id"))
        self.serving = ServingConfig.load(model_dir / SERVING_FILE).with_environment()
        if not self.serving.embedding_servers:
            raise ConfigError(
                f"no embedding servers: set embedding_servers in {SERVING_FILE} (ctrserve archive --serving-config) "
                f"or the environment variable {ENV_SERVERS} (or {ENV_PERSIA_SERVERS}) of TorchServe, e.g. "
                f"{ENV_SERVERS}=127.0.0.1:7001,127.0.0.1:7002 (shard order)"
            )
        security = self.serving.client_security()  # TLS and token from serving.yml or the environment
        model_file = model_dir / serialized_file(self.manifest)
        model = torch.jit.load(str(model_file), map_location=self.device).eval()
        recorded = (model_dir / SPEC_FILE).is_file()
        if recorded:
            self.spec = DenseModelSpec.from_json((model_dir / SPEC_FILE).read_text(), source=str(model_dir / SPEC_FILE))
            if not self.spec.embedding_config:
                raise ConfigError(f"{model_dir / SPEC_FILE} has no embedding_config: re-export the model")
            emb_config = EmbeddingConfig.from_dict(self.spec.embedding_config, source=f"{SPEC_FILE} embedding_config")
        else:
            emb_config = read_embedding_config(
                self.serving.embedding_replicas, timeout=self.serving.connect_timeout_s, security=security
            )
            self.spec = discovered_spec(emb_config, model, self.manifest)
            logger.info(
                "%s has no %s: serving %s with the embedding servers' features %s and %s's signature",
                model_dir,
                SPEC_FILE,
                model_file.name,
                [f.name for f in self.spec.features],
                ModelSignature(self.spec.signature).value,
            )
        embeddings = RemoteEmbeddingClient(
            emb_config,
            self.serving.embedding_replicas,
            timeout=self.serving.embedding_timeout_s,
            connect_timeout=self.serving.connect_timeout_s,
            security=security,
            local_lookups=self.serving.embedding_local_lookups,  # the servers' Unix socket when they share the host
            resolve_interval=self.serving.embedding_resolve_interval_s,  # DNS names: replicas come and go
        )
        if self.serving.torch_threads:
            torch.set_num_threads(self.serving.torch_threads)
        self.configure(self.spec, model, embeddings, self.serving, self.device, check_dense_width=recorded)
        if recorded and not self.persia_inputs:  # otherwise the input widths are unknown until the first request
            self.warm_up()
        self._start_watermark_refresh()
        # torch, the model and the clients live as long as the worker: keep them out of the
        # garbage collector's full passes, each a pause of every request in flight.
        gc.freeze()
        logger.info(
            "serving dense version %d (step %d) on %s with %d embedding shards",
            self.spec.version,
            self.spec.step,
            self.device,
            len(self.serving.embedding_servers),
        )

    def configure(
        self,
        spec: DenseModelSpec,
        model: Any,
        embeddings: Any,
        serving: ServingConfig,
        device: torch.device,
        check_dense_width: bool = True,
    ) -> None:
        """Use these parts (what :meth:`initialize` loads); tests pass an in-process embedding client.

        Args:
            spec: the model's model.json (or what :func:`discovered_spec` made for a bare archive).
            model: TorchScript (or any) module with ``forward(dense, sparse)`` on ``device``, or
                PERSIA's ``forward(non_id_type_tensors, id_type_tensors)`` when ``spec.signature``
                says so.
            embeddings: an :class:`~embedding_server.rpc.client.EmbeddingClient` (lookup, stats).
            serving: limits, timeouts and the response format.
            device: where inputs are put.
            check_dense_width: refuse requests whose dense width is not ``spec.dense_width``.
        """
        self.spec, self.model, self.embeddings, self.serving, self.device = spec, model, embeddings, serving, device
        self.persia_inputs = ModelSignature(spec.signature) is ModelSignature.PERSIA
        self.decoder = RequestDecoder.from_serving(
            spec, serving, check_dense_width=check_dense_width, keep_non_id=self.persia_inputs
        )
        self._timings = TimingMetrics(serving.metrics_interval_s)
        self.initialized = True

    @torch.inference_mode()
    def warm_up(self, calls: int = 2) -> None:
        """Run the dense model on a zero sample before the worker reports READY: TorchScript
        optimises on its first calls, which would otherwise stall the first requests after a
        version switch."""
        dense = torch.zeros((1, self.spec.dense_width), dtype=torch.float32, device=self.device)
        sparse = [
            torch.zeros(
                (1, f.dim) if f.pooled else (1, f.sample_fixed_size, f.dim), dtype=torch.float32, device=self.device
            )
            for f in self.spec.features
        ]
        for _ in range(calls):
            self.run_model(dense, [dense], sparse)

    def run_model(self, dense: torch.Tensor, non_id: list[Any] | None, sparse: list[Any] | None) -> Any:
        """THE call of the dense model: ``model(dense, sparse)``, or PERSIA's
        ``model(non_id_type_tensors, id_type_tensors)`` for a model with PERSIA's signature."""
        if self.persia_inputs:
            return self.model(non_id, sparse)
        return self.model(dense, sparse)

    # ------------------------------------------------------------------ TorchServe's steps
    # BaseHandler.handle sets self.context and runs preprocess -> inference -> postprocess.

    @_timed
    def preprocess(self, data: list[dict]) -> PreparedBatch:
        """Decode every request, look up the embeddings of all valid ones at once, build tensors.

        Raises:
            PredictionException: the batch is one bad request (its 4xx code: TorchServe answers
                it as the request's status); 503 when the embedding servers cannot answer, 400
                when they refuse the merged lookup.
        """
        outcomes: list[DecodedRequest | RequestError] = []
        for item in data:
            try:
                outcomes.append(self.decoder.decode(item))
            except RequestError as error:
                outcomes.append(error)
        if len(outcomes) == 1 and isinstance(outcomes[0], RequestError):
            # Alone, it fails the whole batch; among others it gets its own status in postprocess.
            raise PredictionException(outcomes[0].message, outcomes[0].code)
        if self.persia_inputs:
            _refuse_other_non_id_layouts(outcomes)
        valid = [o for o in outcomes if isinstance(o, DecodedRequest)]
        prepared = PreparedBatch(outcomes)
        if not valid:
            return prepared
        dense, features, prepared.sizes = merge_requests(valid, self.decoder.feature_names)
        started = time.perf_counter()
        try:
            looked_up = self.embeddings.lookup(features)
        except ShardUnavailableError as exc:
            # Every replica of a shard failed within embedding_timeout_s; the worker stays up and
            # the client recovers by itself once the prober marks a replica up again.
            raise PredictionException(f"embedding servers unavailable, retry later: {exc}", 503) from None
        except InvalidRequestError as exc:
            raise PredictionException(f"embedding lookup refused: {exc}", 400) from None
        self._record_time("EmbeddingLookupTime", started)
        # A lone request's dense values may be a read-only view of its body; torch wants writable memory.
        prepared.dense = torch.from_numpy(dense if dense.flags.writeable else dense.copy()).to(self.device)
        if self.persia_inputs:
            prepared.non_id = [self._as_input(part) for part in _merged_non_id(valid)]
        embeddings = looked_up.embeddings
        prepared.sparse = [self._model_input(embeddings[name]) for name in self.decoder.feature_names]
        return prepared

    @_timed
    def inference(self, data: PreparedBatch, *args: Any, **kwargs: Any) -> PreparedBatch:
        """Run the dense model once on all valid requests of ``data`` and return ``data`` with
        its ``scores`` set: ``[samples, targets]``, CPU float32 (left None when no request is valid)."""
        if data.dense is None:
            return data
        started = time.perf_counter()
        with torch.inference_mode():
            scores = self.run_model(data.dense, data.non_id, data.sparse)
        scores = scores.detach().to("cpu", torch.float32)
        self._record_time("DenseInferenceTime", started)
        data.scores = scores.reshape(scores.shape[0], -1)
        return data

    @_timed
    def postprocess(self, data: PreparedBatch) -> list[str]:
        """One JSON string per request: its share of ``data.scores``, or its error."""
        per_request = iter(torch.split(data.scores, data.sizes) if data.scores is not None else ())
        tail = self._result_tail(len(data.outcomes))
        persia_format = self.serving.response_format == "persia"
        results = []
        for idx, outcome in enumerate(data.outcomes):
            self._set_content_type(idx)
            if isinstance(outcome, RequestError):
                self._set_status(idx, outcome)
                results.append(json.dumps({"error": outcome.message, "code": outcome.code}))
                continue
            chunk = next(per_request)
            if persia_format:
                # PERSIA's handler returns a flat list, which TorchServe writes with indent=2;
                # PERSIA's client parses exactly that (one score per line between the brackets).
                results.append(json.dumps(chunk.reshape(-1).tolist(), indent=2))
                continue
            results.append('{"scores": ' + json.dumps((chunk[:, 0] if chunk.shape[1] == 1 else chunk).tolist()) + tail)
        return results

    def _result_tail(self, batch_requests: int) -> str:
        """The JSON of a result after its scores (the same for every request of a batch): built
        once per watermark refresh, as the nested watermarks cost more to encode than the scores."""
        state = self._embedding_state  # replaced, never changed, by the refresh thread
        cached = self._tail_cache
        if cached is None or cached[0] is not state:
            body = json.dumps(
                {
                    "model_version": self.spec.version,
                    "model_step": self.spec.step,
                    "sparse_watermark": self.spec.sparse_watermark,
                    "embedding_watermark": state[0],
                    "embedding_skipped": state[1],
                }
            )
            cached = self._tail_cache = (state, ", " + body[1:-1])
        # batch_requests: how many requests TorchServe batched together with this one
        return f'{cached[1]}, "batch_requests": {batch_requests}}}'

    # ------------------------------------------------------------------ helpers

    def _as_input(self, array: Any) -> torch.Tensor:
        """A request's numpy array as a tensor on the model's device (copied when read-only:
        torch wants writable memory, and a lone request's arrays may be views of its body)."""
        return torch.from_numpy(array if array.flags.writeable else array.copy()).to(self.device)

    def _model_input(self, embedding: torch.Tensor | RawEmbedding) -> torch.Tensor:
        values = embedding.values if isinstance(embedding, RawEmbedding) else embedding
        return values if values.device == self.device else values.to(self.device)

    def _record_time(self, name: str, started: float) -> None:
        metrics = getattr(self.context, "metrics", None)
        if metrics is not None:
            self._timings.record(name, (time.perf_counter() - started) * 1000.0, metrics)

    def _set_content_type(self, idx: int) -> None:
        if getattr(self.context, "request_processor", None):
            self.context.set_response_content_type(idx, JSON_CONTENT_TYPE)

    def _set_status(self, idx: int, error: RequestError) -> None:
        if getattr(self.context, "request_processor", None):
            phrase = error.message.encode("ascii", "replace").decode()[:200].replace("\n", " ")
            self.context.set_response_status(error.code, phrase, idx)

    # ------------------------------------------------------------------ embedding watermark
    # THE ONE PLACE that reads the embedding servers' watermark: a server following a model root
    # reports one in its stats() (training shard -> last packet applied); servers that follow
    # none report nothing, and the result is then an empty dict. It is re-read in a background
    # thread every watermark_refresh_s so no request waits for the Stats RPCs. Beside it, the
    # packets an operator skipped (SkipPacket): replicas at one watermark serve the same values
    # unless one of them says it skipped a packet (embedding_server/modelroot/hotload.py).

    def read_embedding_watermark(self) -> dict[str, Any]:
        """``{shard index: watermark}`` for every shard whose stats carry a "watermark"."""
        return self.read_embedding_state()[0]

    def read_embedding_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``({shard index: watermark}, {shard index: {training shard: [skipped seqs]}})`` from
        one round of Stats: the first for every shard whose stats carry a "watermark", the second
        for every shard that skipped a packet."""
        stats = self.embeddings.stats()
        watermark = {str(i): shard["watermark"] for i, shard in enumerate(stats) if "watermark" in shard}
        skipped = {str(i): shard["skipped"] for i, shard in enumerate(stats) if shard.get("skipped")}
        return watermark, skipped

    def _start_watermark_refresh(self) -> None:
        def refresh() -> None:
            while True:
                try:
                    self._embedding_state = self.read_embedding_state()
                except (ShardUnavailableError, InvalidRequestError) as exc:
                    logger.warning("could not read the embedding watermark: %s", exc)
                if self._stop.wait(self.serving.watermark_refresh_s):
                    return

        threading.Thread(target=refresh, name="embedding-watermark", daemon=True).start()


def serialized_file(manifest: Any) -> str:
    """The TorchScript file of an archive: the manifest's ``serializedFile`` (whatever
    ``--serialized-file`` was called: ``model.pt``, PERSIA's ``jit_dense.pt``, ``model.pth``)."""
    model = manifest.get("model", {}) if isinstance(manifest, dict) else {}
    return str(model.get("serializedFile") or MODEL_FILE)


def discovered_spec(config: EmbeddingConfig, model: Any, manifest: Any) -> DenseModelSpec:
    """The spec of a bare archive: every slot of the embedding servers' ``config`` in file order
    (as the trainer feeds them), the signature of ``model``'s ``forward``, the archive's
    ``--version`` when it is a whole number (``1.0`` reads as 1; else 0), dense width unknown (0)."""
    raw = str((manifest.get("model", {}) if isinstance(manifest, dict) else {}).get("modelVersion", "0"))
    try:
        number = float(raw)
        version = int(number) if number.is_integer() and number >= 0 else 0
    except ValueError:
        version = 0
    spec = DenseModelSpec.for_config(config, version=version, step=0, dense_width=0, model_class="TorchScript")
    spec.signature = model_signature(model)
    return spec


def _merged_non_id(requests: list[DecodedRequest]) -> list[Any]:
    """Each non-ID part of ``requests`` concatenated over them (their layouts agree, see
    :func:`_refuse_other_non_id_layouts`)."""
    if len(requests) == 1:
        return list(requests[0].non_id)
    return [np.concatenate(parts, axis=0) for parts in zip(*(r.non_id for r in requests))]


def _refuse_other_non_id_layouts(outcomes: list[DecodedRequest | RequestError]) -> None:
    """Replace, in place, every request whose non-ID parts (count, dtypes, shapes past the batch
    dimension) differ from the first valid request's with a 400: a PERSIA-signature model gets
    each part as one tensor, so TorchServe-batched requests must agree on them."""
    first: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    for idx, outcome in enumerate(outcomes):
        if not isinstance(outcome, DecodedRequest):
            continue
        layout = tuple((a.dtype.str, tuple(a.shape[1:])) for a in outcome.non_id)
        if first is None:
            first = layout
        elif layout != first:
            outcomes[idx] = RequestError(
                f"non-ID features {_describe_layout(layout)} differ from those of the requests batched with this one "
                f"{_describe_layout(first)}; send them in separate requests or register the model without batch_size"
            )


def _describe_layout(layout: tuple[tuple[str, tuple[int, ...]], ...]) -> str:
    return "[" + ", ".join(f"{np.dtype(d).name}{list(shape)}" for d, shape in layout) + "]"


def select_device(gpu_id: Any) -> torch.device:
    """``cuda:<gpu_id>`` when CUDA is present and TorchServe assigned a GPU, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")
