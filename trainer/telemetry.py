"""Prometheus metrics of a training job (``ctrserve train --metrics-port P``; off by default).

Exported on ``http://<address>:P/metrics`` by rank 0 (other ranks export nothing: their figures
are the same job's):

==============================================  =========  ==========================================
metric                                          type       meaning
==============================================  =========  ==========================================
``ctrserve_trainer_steps_total``                counter    optimizer steps taken (since this process started)
``ctrserve_trainer_step``                       gauge      the job's current step (continues a resumed job)
``ctrserve_trainer_samples_total``              counter    training samples consumed
``ctrserve_trainer_samples_per_second``         gauge      samples/s over the last ``log_every`` steps
``ctrserve_trainer_loss``                       gauge      mean training loss over the last ``log_every`` steps
``ctrserve_trainer_eval_auc``                   gauge      held-out AUC of the last evaluation
``ctrserve_trainer_eval_loss``                  gauge      held-out log loss of the last evaluation
``ctrserve_trainer_versions_exported_total``    counter    dense versions exported to the model root
``ctrserve_trainer_last_export_timestamp_seconds``  gauge  when the last dense version was exported (Unix time)
``ctrserve_trainer_packets_published_total``    counter    incremental packets written by the in-process tables
``ctrserve_trainer_packet_rows_published_total``  counter  rows in those packets
``ctrserve_trainer_packet_publish_failures_total``  counter  packet writes that failed (retried)
``ctrserve_trainer_packet_pending_rows``        gauge      changed rows not yet in a packet
==============================================  =========  ==========================================

With remote train-mode embedding servers the packets are written, and counted, by the servers
(``ctrserve_embedding_*``); the packet metrics here are then 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class TrainerMetrics:
    """The job's figures as Prometheus metrics in a registry of their own.

    Args:
        publishers: returns the in-process tables' packet publishers (each with ``stats()``), read
            at scrape time; an empty list without them.
    """

    def __init__(self, publishers: Callable[[], Sequence[Any]] = lambda: ()):
        self.registry = CollectorRegistry()
        self.publishers = publishers  # replaceable once the tables exist (run_job does)
        r = self.registry
        self.steps = Counter("ctrserve_trainer_steps", "optimizer steps taken", registry=r)
        self.step = Gauge("ctrserve_trainer_step", "the job's current step", registry=r)
        self.samples = Counter("ctrserve_trainer_samples", "training samples consumed", registry=r)
        self.samples_per_second = Gauge(
            "ctrserve_trainer_samples_per_second", "samples/s over the last log_every steps", registry=r
        )
        self.loss = Gauge("ctrserve_trainer_loss", "mean training loss over the last log_every steps", registry=r)
        self.eval_auc = Gauge("ctrserve_trainer_eval_auc", "held-out AUC of the last evaluation", registry=r)
        self.eval_loss = Gauge("ctrserve_trainer_eval_loss", "held-out log loss of the last evaluation", registry=r)
        self.versions = Counter("ctrserve_trainer_versions_exported", "dense versions exported", registry=r)
        self.last_export = Gauge(
            "ctrserve_trainer_last_export_timestamp_seconds", "Unix time of the last dense export", registry=r
        )
        for gauge in (self.loss, self.eval_auc, self.eval_loss):
            gauge.set(float("nan"))
        r.register(_PacketCollector(self))

    def stepped(self, step: int, samples: int) -> None:
        """One optimizer step of ``samples`` samples is done."""
        self.steps.inc()
        self.step.set(step)
        self.samples.inc(samples)

    def logged(self, loss: float, samples_per_second: float) -> None:
        self.loss.set(loss)
        self.samples_per_second.set(samples_per_second)

    def evaluated(self, auc: float, loss: float) -> None:
        self.eval_auc.set(auc)
        self.eval_loss.set(loss)

    def exported(self) -> None:
        self.versions.inc()
        self.last_export.set(time.time())

    def serve_http(self, port: int, address: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on a background thread; returns the bound port (0 picks one)."""
        return serve_registry(self.registry, port, address)


class _PacketCollector:
    def __init__(self, owner: TrainerMetrics):
        self._owner = owner

    def collect(self):
        stats = [p.stats() for p in self._owner.publishers()]
        for key, name, help_text in (
            ("packets_published", "packets_published", "incremental packets written by the in-process tables"),
            ("rows_published", "packet_rows_published", "rows in the packets written"),
            ("publish_failures", "packet_publish_failures", "packet writes that failed (retried)"),
        ):
            counter = CounterMetricFamily(f"ctrserve_trainer_{name}", help_text)
            counter.add_metric([], sum(s[key] for s in stats))
            yield counter
        pending = GaugeMetricFamily("ctrserve_trainer_packet_pending_rows", "changed rows not yet in a packet")
        pending.add_metric([], sum(s["pending_rows"] for s in stats))
        yield pending


def serve_registry(registry: CollectorRegistry, port: int, address: str = "127.0.0.1") -> int:
    """Serve ``registry`` as ``/metrics`` on a daemon thread; returns the bound port."""
    httpd, _ = start_http_server(port, addr=address, registry=registry)
    return httpd.server_port
