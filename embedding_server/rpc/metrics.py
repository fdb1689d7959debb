"""Request statistics of an embedding server, for its Stats RPC and for Prometheus.

Counts are counters (their names end in ``_total``: ``ctrserve_embedding_requests_total``,
``ctrserve_embedding_store_hits_total``, ...); levels are gauges (``ctrserve_embedding_store_rows``).

Each server owns a :class:`ServerMetrics` with its own Prometheus registry (several servers may
share a process in tests), exported over HTTP by :meth:`ServerMetrics.serve_http`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, push_to_gateway, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_RECENT = 2048  # latencies kept per method for the p50/p99 in Stats


class ServerMetrics:
    """Counts requests, errors and latencies per RPC method; exports store counters.

    Args:
        labels: constant labels (e.g. shard index) added to every exported series.
        store_counters: returns the store's counters (rows, capacity, hits, ...).
    """

    def __init__(self, labels: dict[str, str], store_counters: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        names = list(labels)
        self._labels = labels
        self._requests = Counter(
            "ctrserve_embedding_requests", "RPCs served", names + ["method"], registry=self.registry
        )
        self._errors = Counter(
            "ctrserve_embedding_errors", "RPCs that failed", names + ["method", "code"], registry=self.registry
        )
        self._latency = Histogram(
            "ctrserve_embedding_request_seconds",
            "RPC latency",
            names + ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._keys = Counter(
            "ctrserve_embedding_keys", "keys looked up or updated", names + ["method"], registry=self.registry
        )
        self._recent: dict[str, deque] = {}
        self._method_children: dict[str, tuple] = {}
        self._counts: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self.registry.register(_StoreCollector(labels, store_counters))

    @contextmanager
    def track(self, method: str, keys: int = 0) -> Iterator[None]:
        """Time one request; an exception counts as an error (and is re-raised)."""
        start = time.perf_counter()
        code = "OK"
        try:
            yield
        except BaseException as exc:
            code = type(exc).__name__
            raise
        finally:
            elapsed = time.perf_counter() - start
            requests, latency, keyed = self._children(method)
            requests.inc()
            latency.observe(elapsed)
            if keys:
                keyed.inc(keys)
            with self._lock:
                self._recent.setdefault(method, deque(maxlen=_RECENT)).append(elapsed)
                counts = self._counts.setdefault(method, [0, 0])
                counts[0] += 1
                if code != "OK":
                    counts[1] += 1
            if code != "OK":
                self._errors.labels(**self._labels, method=method, code=code).inc()

    def _children(self, method: str) -> tuple:
        """The labelled request, latency and key series of ``method``, made once: resolving
        labels takes prometheus_client's locks and validation, a third of a small lookup's
        time on the server."""
        children = self._method_children.get(method)
        if children is None:
            labels = {**self._labels, "method": method}
            children = (self._requests.labels(**labels), self._latency.labels(**labels), self._keys.labels(**labels))
            self._method_children[method] = children  # a race makes the same children twice: harmless
        return children

    def method_stats(self) -> list[dict]:
        """Per method: requests, errors, and p50/p99 latency (ms) of the recent requests."""
        with self._lock:
            out = []
            for method, recent in sorted(self._recent.items()):
                lat = np.array(recent) * 1000.0
                requests, errors = self._counts[method]
                out.append(
                    {
                        "method": method,
                        "requests": requests,
                        "errors": errors,
                        "latency_p50_ms": float(np.percentile(lat, 50)),
                        "latency_p99_ms": float(np.percentile(lat, 99)),
                    }
                )
            return out

    def serve_http(self, port: int, address: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` in Prometheus text format on a background thread; returns the
        bound port (``port=0`` picks a free one)."""
        httpd, _ = start_http_server(port, addr=address, registry=self.registry)
        return httpd.server_port


class MetricsPusher:
    """Pushes a registry to a Prometheus Pushgateway at a fixed interval, and once more on
    :meth:`stop` (what PERSIA's ``metrics_config`` asks of its servers).

    Args:
        registry: what to push (a server's :attr:`ServerMetrics.registry`).
        gateway: the Pushgateway's ``host:port`` (or URL).
        job: the job the metrics are grouped under.
        interval_s: seconds between pushes.
        grouping_key: further grouping labels (e.g. ``{"instance": "rep_0"}``).

    Example:
        >>> pusher = MetricsPusher(metrics.registry, "127.0.0.1:9091", "ctr", 10, {"instance": "rep_0"})
        >>> pusher.start()  # doctest: +SKIP
    """

    def __init__(
        self, registry: CollectorRegistry, gateway: str, job: str, interval_s: float, grouping_key: dict[str, str]
    ):
        self.registry = registry
        self.gateway = gateway
        self.job = job
        self.interval_s = interval_s
        self.grouping_key = grouping_key
        self.pushes = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-push", daemon=True)
        self._failing = False

    def start(self) -> MetricsPusher:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop pushing, after a last push of the final counts."""
        if self._thread.is_alive():
            self._stopping.set()
            self._thread.join()
            self.push()

    def push(self) -> bool:
        """One push; a failure is logged (once until a push succeeds again), never raised."""
        try:
            push_to_gateway(self.gateway, job=self.job, registry=self.registry, grouping_key=self.grouping_key)
        except Exception as exc:  # the gateway may be down: serving goes on, the next push retries
            if not self._failing:
                _log.warning("pushing metrics to the Pushgateway at %s failed: %s; retrying", self.gateway, exc)
            self._failing = True
            return False
        self._failing = False
        self.pushes += 1
        return True

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self.push()


_log = logging.getLogger("ctrserve.embedding_server.metrics")


class _StoreCollector:
    def __init__(self, labels: dict[str, str], counters: Callable[[], dict[str, int]]):
        self._labels = labels
        self._counters = counters

    def collect(self):
        values = self._counters()
        names, label_values = list(self._labels), list(self._labels.values())
        for key, help_text in (("rows", "rows held"), ("capacity", "row capacity")):
            gauge = GaugeMetricFamily(f"ctrserve_embedding_store_{key}", help_text, labels=names)
            gauge.add_metric(label_values, values[key])
            yield gauge
        # Counts since the server started: counters, exported as ``ctrserve_embedding_store_<key>_total``.
        for key, help_text in (
            ("hits", "lookups that found their row"),
            ("misses", "lookups of ids not held"),
            ("evictions", "rows evicted to make room"),
            ("inserts", "rows inserted"),
        ):
            counter = CounterMetricFamily(f"ctrserve_embedding_store_{key}", help_text, labels=names)
            counter.add_metric(label_values, values[key])
            yield counter
