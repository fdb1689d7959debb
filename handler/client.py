"""Python client of a served ctrserve model: send batches over gRPC or REST, get scores as arrays.

It imports neither TorchServe nor torch: only the generated gRPC stubs (:mod:`protos.torchserve`)
and ``requests``. Responses are parsed as the JSON the handler returns (see
:mod:`handler.persia_handler`); every refusal becomes a :class:`PredictionError` carrying the
HTTP-style code and the handler's message, whichever transport carried it.

Example:
    >>> client = PredictionClient("grpc://127.0.0.1:7070")        # or "http://127.0.0.1:8080"
    >>> scores = client.predict(batch)           # PyPersiaBatchData, batch bytes, or a JSON dict
    >>> scores.shape
    (64,)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import grpc
import numpy as np
import requests

from handler.torchserve_keys import TorchServeKey, as_key, key_refused

DEFAULT_MODEL = "deepctr"
BATCH_KEY = "batch"
_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
#: What TorchServe answers a missing, wrong or expired key with over gRPC.
KEY_REFUSED = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})


class PredictionError(RuntimeError):
    """The server refused or failed a prediction.

    Args:
        code: HTTP status (gRPC statuses are mapped: INVALID_ARGUMENT 400, RESOURCE_EXHAUSTED
            413, NOT_FOUND 404, UNAVAILABLE 503, anything else 500).
        message: the server's message (the handler's for bad requests).
    """

    def __init__(self, code: int, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Prediction:
    """A parsed handler response.

    Args:
        scores: float32 ``[batch]`` (one target) or ``[batch, targets]``.
        model_version: the dense version that answered.
        embedding_watermark: what the embedding servers reported (may be empty).
        raw: the whole JSON object.
    """

    scores: np.ndarray
    model_version: int
    embedding_watermark: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)


class TorchServeConnection:
    """A REST session or a gRPC channel to one TorchServe API address (base of the clients).

    Args:
        address: ``grpc://host:port`` or ``http(s)://host:port``.
        default_scheme: scheme assumed for a bare ``host:port`` (None: a scheme is required).
        token: TorchServe's key for this API when token authorization is on: a
            :class:`~handler.torchserve_keys.TorchServeKey` (read again, and retried once with,
            when TorchServe refuses it) or a fixed key.
        kind: ``inference`` or ``management``: which key a fixed ``token`` is.

    Raises:
        ValueError: an address with another scheme.
    """

    def __init__(
        self,
        address: str,
        default_scheme: str | None = None,
        token: str | TorchServeKey | None = None,
        kind: str = "inference",
    ):
        self.address = address
        self.token = as_key(token, kind)
        parsed = urlparse(address if "://" in address or default_scheme is None else f"{default_scheme}://{address}")
        if parsed.scheme == "grpc":
            self.protocol = "grpc"
            self._channel = grpc.insecure_channel(parsed.netloc)
        elif parsed.scheme in ("http", "https"):
            self.protocol = "rest"
            self._base = address.rstrip("/")
            self._session = requests.Session()
        else:
            raise ValueError(f"address must be grpc://host:port or http(s)://host:port, got {address!r}")

    def _authorization(self) -> str | None:
        """The key to send now (None: none), read from its source on first use."""
        return self.token.current() if self.token is not None else None

    def _retry_with_new_key(self, refused: str | None) -> bool:
        """After TorchServe refused the key ``refused``: True when its source gave another one
        (read again, or renewed) to retry the call with once."""
        return self.token is not None and refused is not None and self.token.refresh(refused) is not None

    def close(self) -> None:
        if self.protocol == "grpc":
            self._channel.close()
        else:
            self._session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PredictionClient(TorchServeConnection):
    """Sends batches to ``/predictions/<model>`` over REST or gRPC ``Predictions``.

    Args:
        address: ``grpc://host:port`` (or bare ``host:port``) for TorchServe's gRPC inference
            port, ``http(s)://host:port`` for its REST inference address.
        model_name: registered model name.
        model_version: a specific version; None for the default one.
        timeout: seconds per request.
        token: TorchServe's inference key when token authorization is on: a
            :class:`~handler.torchserve_keys.TorchServeKey` (e.g. from TorchServe's key file; read
            again when TorchServe refuses it, and the request retried once) or a fixed key.

    Raises:
        ValueError: an address with another scheme.
    """

    def __init__(
        self,
        address: str,
        model_name: str = DEFAULT_MODEL,
        model_version: str | int | None = None,
        timeout: float = 30.0,
        token: str | TorchServeKey | None = None,
    ):
        super().__init__(address, default_scheme="grpc", token=token, kind="inference")
        self.model_name = model_name
        self.model_version = "" if model_version is None else str(model_version)
        self.timeout = timeout
        if self.protocol == "grpc":
            from protos.torchserve import inference_pb2, inference_pb2_grpc

            self._pb = inference_pb2
            self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)

    def predict(self, batch: Any) -> np.ndarray:
        """Scores of ``batch`` (a PyPersiaBatchData-like object with ``to_bytes()``, batch bytes,
        or a JSON-able dict ``{"dense": ..., "sparse": ...}``).

        Raises:
            PredictionError: the server refused the batch or failed.
        """
        return self.predict_full(batch).scores

    def predict_full(self, batch: Any) -> Prediction:
        """Like :meth:`predict`, with the model version and watermark the answer came with."""
        body, is_json = _encode(batch)
        text = self._send_grpc(body) if self.protocol == "grpc" else self._send_rest(body, is_json)
        return parse_response(text)

    def _send_grpc(self, body: bytes) -> bytes:
        request = self._pb.PredictionsRequest(
            model_name=self.model_name, model_version=self.model_version, input={BATCH_KEY: body}
        )
        for attempt in range(2):
            key = self._authorization()
            metadata = [("authorization", f"Bearer {key}")] if key else None
            try:
                return self._stub.Predictions(request, timeout=self.timeout, metadata=metadata).prediction
            except grpc.RpcError as exc:
                if attempt == 0 and exc.code() in KEY_REFUSED and self._retry_with_new_key(key):
                    continue
                raise PredictionError(http_code(exc.code()), grpc_error_message(exc)) from None
        raise AssertionError("unreachable")

    def _send_rest(self, body: bytes, is_json: bool) -> bytes:
        url = f"{self._base}/predictions/{self.model_name}" + (f"/{self.model_version}" if self.model_version else "")
        headers = {"Content-Type": "application/json" if is_json else "application/octet-stream"}
        for attempt in range(2):
            key = self._authorization()
            if key:
                headers["Authorization"] = f"Bearer {key}"
            try:
                response = self._session.post(url, data=body, headers=headers, timeout=self.timeout)
            except requests.RequestException as exc:
                raise PredictionError(503, f"{url}: {exc}") from None
            if attempt == 0 and key_refused(response.status_code, response.content) and self._retry_with_new_key(key):
                continue
            break
        if response.status_code != 200:
            raise PredictionError(response.status_code, _error_message(response.content) or response.reason)
        return response.content


def parse_response(text: bytes | str) -> Prediction:
    """Parse the handler's JSON result.

    Raises:
        PredictionError: the result is a per-request error (``{"error", "code"}``) or not the
            handler's JSON.
    """
    try:
        data = json.loads(text)
    except ValueError:
        raise PredictionError(502, f"the server answered something other than JSON: {text[:80]!r}") from None
    if not isinstance(data, dict):
        raise PredictionError(502, f"the server answered a JSON {type(data).__name__}, expected an object")
    if "error" in data:
        raise PredictionError(int(data.get("code", 400)), str(data["error"]))
    if "scores" not in data:
        raise PredictionError(502, f"the server's answer has no 'scores' (keys: {sorted(data)})")
    return Prediction(
        scores=np.asarray(data["scores"], np.float32),
        model_version=int(data.get("model_version", -1)),
        embedding_watermark=data.get("embedding_watermark") or {},
        raw=data,
    )


def http_code(status: grpc.StatusCode) -> int:
    """The HTTP status TorchServe maps to ``status`` (TorchServe's own mapping, reversed); 500 else."""
    return _GRPC_TO_HTTP.get(status, 500)


def grpc_error_message(exc: grpc.RpcError) -> str:
    """The details of a TorchServe gRPC error without the Java exception class TorchServe appends
    on its own line (``...\norg.pytorch.serve.http.InternalServerException``)."""
    details = exc.details() or exc.code().name
    head, _, last = details.rpartition("\n")
    return head if head and last.startswith(("org.pytorch.", "java.")) else details


def _error_message(content: bytes) -> str | None:
    """The message of TorchServe's error JSON ``{"code", "type", "message"}`` or the handler's."""
    try:
        data = json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")[:500] or None
    if isinstance(data, Mapping):
        return str(data.get("message") or data.get("error") or data)
    return str(data)


def _encode(batch: Any) -> tuple[bytes, bool]:
    if isinstance(batch, (bytes, bytearray, memoryview)):
        return bytes(batch), False
    if isinstance(batch, Mapping):
        return json.dumps(batch).encode(), True
    if hasattr(batch, "to_bytes"):
        return batch.to_bytes(), False
    raise TypeError(
        f"predict() takes batch bytes, an object with to_bytes(), or a JSON dict; got {type(batch).__name__}"
    )
