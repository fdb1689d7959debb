"""Defences of the gRPC servers against broken or hostile callers that cost nothing per good call.

* **Undecodable requests.** gRPC's Python server decodes a request with the method's
  ``request_deserializer`` before any handler runs; when that raises, gRPC logs a traceback and
  answers ``INTERNAL``, for every such request (a log flood that any caller who can connect
  can cause). :func:`guard_handler` gives a method handler a deserializer that turns a decode
  failure into a marker, and a behaviour that answers the marker with ``INVALID_ARGUMENT``
  and notes it in a :class:`RateLimitedLog`. :class:`GuardingServer` applies it to every method a
  generated ``add_..._to_server`` function registers (the health service's, for example).
* **Rate-limited log lines.** :class:`RateLimitedLog` writes at most one WARNING per interval
  (one minute by default) and counts the lines it held back in between, so a caller repeating
  a refused request cannot fill the disk.

Example:
    >>> bad_requests = RateLimitedLog(logging.getLogger("ctrserve.embedding_server"), "undecodable requests")
    >>> handler = guard_handler(grpc.unary_unary_rpc_method_handler(fn, request_deserializer=Msg.FromString),
    ...                         "/pkg.Service/Method", bad_requests)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc

#: Seconds between two WARNING lines of one :class:`RateLimitedLog`.
LOG_INTERVAL_S = 60.0


class RateLimitedLog:
    """At most one WARNING line per ``interval`` seconds about one kind of event; the events held
    back meanwhile are counted and reported with the next line.

    Args:
        logger: where the lines go.
        what: what the events are, e.g. ``"undecodable requests"`` (used in the lines).
        interval: seconds between two lines.
        clock: a monotonic clock (tests pass a fake one).
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        interval: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger = logger
        self.what = what
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._next = float("-inf")
        self._held = 0
        self.total = 0  # every event noted, logged or not

    def note(self, message: str, *args: Any) -> bool:
        """Log ``message % args`` now if the last line is ``interval`` seconds old, else count it;
        returns whether it was logged."""
        now = self._clock()
        with self._lock:
            self.total += 1
            if now < self._next:
                self._held += 1
                return False
            held, self._held = self._held, 0
            self._next = now + self.interval
        suffix = (
            f" ({held} more {self.what} in the last {self.interval:.0f} s were not logged)"
            if held
            else f" (further {self.what} are logged at most once per {self.interval:.0f} s)"
        )
        self.logger.warning(message + suffix, *args)
        return True


class _Undecodable:
    """What a guarded deserializer returns for bytes that are not the method's request message."""

    __slots__ = ("problem",)

    def __init__(self, problem: str):
        self.problem = problem


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a custom decoder raises
            return _Undecodable(f"{type(exc).__name__}: {exc}")

    return decode


def guard_handler(handler: grpc.RpcMethodHandler, method: str, log: RateLimitedLog) -> grpc.RpcMethodHandler:
    """``handler`` answering requests its deserializer cannot decode with ``INVALID_ARGUMENT`` (and
    one rate-limited log line) instead of gRPC's ``INTERNAL`` and a traceback per request.

    Handlers without a deserializer (raw bytes) and client-streaming handlers are returned as they are.
    """
    deserialize = handler.request_deserializer
    if deserialize is None or handler.request_streaming:
        return handler
    name = method.rpartition("/")[2] or method

    def refuse(request: _Undecodable, context: grpc.ServicerContext) -> None:
        peer = context.peer()
        log.note("refused an undecodable %s request from %s: %s", method, peer, request.problem)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: the request is not a valid {name} request message")

    def wrap(behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            if type(request) is _Undecodable:
                return refuse(request, context)
            return behaviour(request, context)

        return guarded

    changes: dict[str, Any] = {"request_deserializer": _safe_deserializer(deserialize)}
    if handler.unary_unary is not None:
        changes["unary_unary"] = wrap(handler.unary_unary)
    if handler.unary_stream is not None:
        changes["unary_stream"] = wrap(handler.unary_stream)
    return handler._replace(**changes)  # type: ignore[attr-defined]  # grpc's handlers are named tuples


def guard_handlers(
    service: str, handlers: Mapping[str, grpc.RpcMethodHandler], log: RateLimitedLog
) -> dict[str, grpc.RpcMethodHandler]:
    """:func:`guard_handler` applied to each of a service's ``{method name: handler}``."""
    return {name: guard_handler(h, f"/{service}/{name}", log) for name, h in handlers.items()}


class _GuardedGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, log: RateLimitedLog):
        self._inner = inner
        self._log = log
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, guard_handler(handler, method, self._log))
            self._guarded[method] = cached
        return cached[1]


class GuardingServer:
    """Stands in for a ``grpc.Server`` when a generated ``add_..._to_server`` function registers a
    service: every handler it adds is guarded (see :func:`guard_handler`).

    Example:
        >>> health_pb2_grpc.add_HealthServicer_to_server(servicer, GuardingServer(server, log))
    """

    def __init__(self, server: grpc.Server, log: RateLimitedLog):
        self._server = server
        self._log = log

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGeneric(h, self._log) for h in generic_rpc_handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: Mapping[str, Any]) -> None:
        self._server.add_registered_method_handlers(
            service_name, guard_handlers(service_name, method_handlers, self._log)
        )
