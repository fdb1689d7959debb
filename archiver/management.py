"""Client of TorchServe's management API over REST or gRPC: register, set-default, unregister.

Both transports give the same Python results (the JSON TorchServe returns, parsed), and every
failure is a :class:`ManagementError` with an HTTP-style code and TorchServe's message. One
difference is TorchServe's own: registering a version that is already registered answers 409
over REST but gRPC ``UNKNOWN`` with no details (code 500 here) over gRPC in 0.12.

Example:
    >>> mgmt = ManagementClient("http://127.0.0.1:8081")     # or "grpc://127.0.0.1:7071"
    >>> mgmt.register("deepctr-v00000002.mar", initial_workers=1)
    >>> mgmt.wait_ready("deepctr", "2", timeout=60)
    >>> mgmt.set_default("deepctr", "2")
    >>> mgmt.unregister("deepctr", "1")
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import grpc
import requests

from handler.client import KEY_REFUSED, TorchServeConnection, grpc_error_message, http_code
from handler.torchserve_keys import TorchServeKey, key_refused


class ManagementError(RuntimeError):
    """TorchServe refused a management call or could not be reached.

    Args:
        code: HTTP status (gRPC statuses mapped: NOT_FOUND 404, INVALID_ARGUMENT 400, ...;
            503 when the server cannot be reached).
        message: TorchServe's message.
    """

    def __init__(self, code: int, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ManagementClient(TorchServeConnection):
    """TorchServe management calls.

    Args:
        address: ``http(s)://host:port`` (REST management address) or ``grpc://host:port``
            (gRPC management port).
        timeout: seconds per call (a synchronous registration waits for its workers, so
            :meth:`register` allows ``timeout`` plus the startup time).
        token: TorchServe's management key when token authorization is on: a
            :class:`~handler.torchserve_keys.TorchServeKey` or a fixed key. When TorchServe
            refuses it the call is retried once with the key read again from its source; over
            REST a key from TorchServe's key file that expired is first renewed through this
            address's token API (``/token?type=management``, with the file's API key).

    Raises:
        ValueError: an address with another scheme.
    """

    def __init__(self, address: str, timeout: float = 30.0, token: str | TorchServeKey | None = None):
        super().__init__(address, token=token, kind="management")
        self.timeout = timeout
        if self.protocol == "rest" and self.token is not None:
            self.token = self.token.renewing_through(self._base)
        if self.protocol == "grpc":
            from protos.torchserve import management_pb2, management_pb2_grpc

            self._pb = management_pb2
            self._stub = management_pb2_grpc.ManagementAPIsServiceStub(self._channel)

    # ------------------------------------------------------------------ calls

    def register(
        self,
        url: str,
        model_name: str | None = None,
        initial_workers: int = 1,
        batch_size: int = 1,
        max_batch_delay_ms: int = 100,
        synchronous: bool = True,
        response_timeout_s: int = 120,
        startup_timeout_s: int = 120,
    ) -> str:
        """Register a ``.mar`` (a file name in the model store, or a URL TorchServe accepts).

        Returns:
            TorchServe's status message.

        Raises:
            ManagementError: e.g. 409 when that version is already registered, 404 when the
                archive is not found.
        """
        params: dict[str, Any] = {
            "url": url,
            "initial_workers": initial_workers,
            "batch_size": batch_size,
            "max_batch_delay": max_batch_delay_ms,
            "synchronous": synchronous,
            "response_timeout": response_timeout_s,
            "startup_timeout": startup_timeout_s,
        }
        if model_name:
            params["model_name"] = model_name
        timeout = self.timeout + startup_timeout_s
        if self.protocol == "grpc":
            return self._grpc("RegisterModel", self._pb.RegisterModelRequest(**params), timeout).get("status", "")
        return self._rest("POST", "/models", params=_rest_params(params), timeout=timeout).get("status", "")

    def set_default(self, model_name: str, version: str) -> str:
        """Make ``version`` the one ``/predictions/<model_name>`` serves."""
        if self.protocol == "grpc":
            request = self._pb.SetDefaultRequest(model_name=model_name, model_version=str(version))
            return self._grpc("SetDefault", request).get("status", "")
        return self._rest("PUT", f"/models/{model_name}/{version}/set-default").get("status", "")

    def unregister(self, model_name: str, version: str | None = None) -> str:
        """Unregister one version (or the default one when ``version`` is None)."""
        if self.protocol == "grpc":
            request = self._pb.UnregisterModelRequest(model_name=model_name, model_version=str(version or ""))
            return self._grpc("UnregisterModel", request).get("status", "")
        path = f"/models/{model_name}" + (f"/{version}" if version else "")
        return self._rest("DELETE", path).get("status", "")

    def list_models(self, limit: int = 1000) -> list[dict]:
        """``[{"modelName", "modelUrl"}, ...]`` of every registered model (default versions)."""
        if self.protocol == "grpc":
            # ListModels with the default limit=0 returns nothing: always pass one.
            data = self._grpc("ListModels", self._pb.ListModelsRequest(limit=limit))
        else:
            data = self._rest("GET", "/models", params={"limit": limit})
        return list(data.get("models", []))

    def describe(self, model_name: str, version: str | None = None) -> list[dict]:
        """TorchServe's description of a model: the default version, one version, or ``"all"``."""
        if self.protocol == "grpc":
            request = self._pb.DescribeModelRequest(model_name=model_name, model_version=str(version or ""))
            return self._grpc("DescribeModel", request)
        return self._rest("GET", f"/models/{model_name}" + (f"/{version}" if version else ""))

    # ------------------------------------------------------------------ derived

    def versions(self, model_name: str) -> list[str]:
        """Registered versions of ``model_name`` (empty when it is not registered)."""
        try:
            return [d["modelVersion"] for d in self.describe(model_name, "all")]
        except ManagementError as exc:
            if exc.code == 404:
                return []
            raise

    def default_version(self, model_name: str) -> str | None:
        """The version ``/predictions/<model_name>`` serves, or None when not registered."""
        try:
            return self.describe(model_name)[0]["modelVersion"]
        except ManagementError as exc:
            if exc.code == 404:
                return None
            raise

    def wait_ready(
        self, model_name: str, version: str | None, timeout: float, alive: Callable[[], None] | None = None
    ) -> dict:
        """Block until the version has its minimum number of workers, all READY.

        Args:
            alive: called on every poll; raise from it to stop waiting (e.g. server exited).

        Returns:
            The version's description.

        Raises:
            TimeoutError: not ready within ``timeout`` seconds (worker states quoted).
        """
        deadline = time.monotonic() + timeout
        description: Any = None
        while True:
            if alive is not None:
                alive()
            try:
                description = self.describe(model_name, version)[0]
                workers = description.get("workers", [])
                if len(workers) >= max(1, description.get("minWorkers", 1)) and all(
                    w.get("status") == "READY" for w in workers
                ):
                    return description
            except ManagementError as exc:
                if exc.code not in (404, 503):
                    raise
            if time.monotonic() > deadline:
                states = [w.get("status") for w in (description or {}).get("workers", [])]
                raise TimeoutError(
                    f"{model_name} version {version or 'default'} not ready after {timeout:.0f} s (workers: {states})"
                )
            time.sleep(0.1)

    # ------------------------------------------------------------------ transports

    def _rest(self, method: str, path: str, params: dict | None = None, timeout: float | None = None) -> Any:
        for attempt in range(2):
            key = self._authorization()
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            try:
                response = self._session.request(
                    method, self._base + path, params=params, headers=headers, timeout=timeout or self.timeout
                )
            except requests.RequestException as exc:
                raise ManagementError(503, f"{self._base}: {exc}") from None
            # A refused key did nothing on the server: the call is safe to send again.
            if attempt == 0 and key_refused(response.status_code, response.content) and self._retry_with_new_key(key):
                continue
            break
        data = _json_or_text(response.content)
        if response.status_code >= 300:
            message = data.get("message", data) if isinstance(data, dict) else data
            raise ManagementError(response.status_code, str(message))
        return data

    def _grpc(self, method: str, request: Any, timeout: float | None = None) -> Any:
        for attempt in range(2):
            key = self._authorization()
            metadata = [("authorization", f"Bearer {key}")] if key else None
            try:
                response = getattr(self._stub, method)(request, timeout=timeout or self.timeout, metadata=metadata)
            except grpc.RpcError as exc:
                if attempt == 0 and exc.code() in KEY_REFUSED and self._retry_with_new_key(key):
                    continue
                raise ManagementError(http_code(exc.code()), grpc_error_message(exc)) from None
            return _json_or_text(response.msg.encode())
        raise AssertionError("unreachable")


def _rest_params(params: dict) -> dict:
    return {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items()}


def _json_or_text(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return {"status": content.decode("utf-8", "replace")}
