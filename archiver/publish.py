"""Roll exported dense versions into TorchServe without failing a request.

:class:`Publisher` watches a model root (any URL :func:`embedding_server.storage.urls.open_storage`
reads) for complete dense versions (``dense/vN/model.json`` is written last, so its presence
marks a version complete). For the newest version not yet registered it:

1. copies model.pt and model.json to a temporary folder and builds
   ``<model store>/<name>-v0000000N.mar`` (:func:`archiver.build.archive_model`);
2. registers it synchronously with its initial workers, then waits until every worker is READY;
3. makes it the default version: new requests to ``/predictions/<name>`` go to it, requests
   already queued on the previous version finish there;
4. retires versions beyond the ``keep`` newest: it waits ``drain_s`` seconds and until the
   version has no pending request, then unregisters it and deletes its archive.

Versions older than the default are never re-registered. TorchServe is the source of truth for
what is registered, so a restarted publisher picks up where it stopped.

Example:
    >>> with ManagementClient("http://127.0.0.1:8081") as mgmt:
    ...     Publisher(mgmt, PublishSettings("s3://models/ctr", "model_store", keep=2)).watch()
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from archiver.build import DEFAULT_NAME, archive_model
from archiver.management import ManagementClient, ManagementError
from embedding_server.core.errors import ConfigError
from embedding_server.core.model_spec import MODEL_FILE, SPEC_FILE, list_versions, version_dir
from embedding_server.storage.urls import open_storage

log = logging.getLogger("ctrserve.publish")


@dataclass(frozen=True)
class PublishSettings:
    """What :class:`Publisher` publishes and how.

    Args:
        model_root: storage URL or path of the model root (``dense/vN`` below it).
        model_store: the folder TorchServe was started with as ``--model-store``.
        name: model name clients call.
        serving_config: ``serving.yml`` shipped in every archive (None: none).
        keep: registered versions to keep (the newest, default included); >= 1.
        initial_workers: workers each new version starts with.
        batch_size: TorchServe server-side batch size of each version.
        max_batch_delay_ms: TorchServe's wait for a batch to fill.
        ready_timeout_s: seconds to wait for a new version's workers.
        drain_s: seconds between set-default and retiring older versions.
        poll_s: seconds between scans of the model root in :meth:`Publisher.watch`.

    Raises:
        ConfigError: a value out of range.
    """

    model_root: str
    model_store: str
    name: str = DEFAULT_NAME
    serving_config: str | None = None
    keep: int = 2
    initial_workers: int = 1
    batch_size: int = 1
    max_batch_delay_ms: int = 5
    ready_timeout_s: float = 120.0
    drain_s: float = 2.0
    poll_s: float = 5.0

    def __post_init__(self) -> None:
        for key in ("keep", "initial_workers", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"publish: --{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        for key in ("ready_timeout_s", "drain_s", "poll_s", "max_batch_delay_ms"):
            if getattr(self, key) < 0:
                raise ConfigError(f"publish: {key} must be >= 0, got {getattr(self, key)}")


class PublisherMetrics:
    """The publisher's Prometheus metrics, in a registry of their own (``ctrserve publish
    --metrics-port P``; off by default):

    * ``ctrserve_publisher_versions_published_total`` (counter): versions made the default;
    * ``ctrserve_publisher_failures_total`` (counter): polls that failed (retried at the next);
    * ``ctrserve_publisher_last_publish_timestamp_seconds`` (gauge): Unix time of the last publish;
    * ``ctrserve_publisher_published_version`` (gauge): the version last made the default;
    * ``ctrserve_publisher_newest_version`` (gauge): the newest complete version in the model root.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.published = Counter("ctrserve_publisher_versions_published", "versions made the default", registry=r)
        self.failures = Counter("ctrserve_publisher_failures", "polls that failed (retried)", registry=r)
        self.last_publish = Gauge(
            "ctrserve_publisher_last_publish_timestamp_seconds", "Unix time of the last publish", registry=r
        )
        self.published_version = Gauge(
            "ctrserve_publisher_published_version", "the version last made the default", registry=r
        )
        self.newest_version = Gauge(
            "ctrserve_publisher_newest_version", "the newest complete version in the model root", registry=r
        )

    def serve_http(self, port: int, address: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on a daemon thread; returns the bound port (0 picks one)."""
        httpd, _ = start_http_server(port, addr=address, registry=self.registry)
        return httpd.server_port


class Publisher:
    """Publishes new dense versions from a model root into a running TorchServe.

    Args:
        management: management client of that TorchServe.
        settings: see :class:`PublishSettings`.
        metrics: where to count publishes and failures (None: not counted).
    """

    def __init__(
        self, management: ManagementClient, settings: PublishSettings, metrics: PublisherMetrics | None = None
    ):
        self.management = management
        self.settings = settings
        self.metrics = metrics
        self.storage = open_storage(settings.model_root)

    def complete_versions(self) -> list[int]:
        """Versions under ``dense/`` whose model.json exists, ascending (other folder names are
        ignored, one WARNING each: :func:`~embedding_server.core.model_spec.list_versions`)."""
        return [v for v in list_versions(self.storage, log) if self.storage.exists(f"{version_dir(v)}/{SPEC_FILE}")]

    def poll_once(self) -> int | None:
        """Publish the newest complete version if it is newer than every registered one.

        Returns:
            The version published, or None when there was nothing new.
        """
        try:
            return self._poll_once()
        except Exception:
            if self.metrics is not None:
                self.metrics.failures.inc()
            raise

    def _poll_once(self) -> int | None:
        versions = self.complete_versions()
        if versions and self.metrics is not None:
            self.metrics.newest_version.set(versions[-1])
        registered = [int(v) for v in self.management.versions(self.settings.name)]
        if not versions or (registered and versions[-1] <= max(registered)):
            self._ensure_default(registered)
            return None
        self.publish(versions[-1])
        return versions[-1]

    def publish(self, version: int) -> None:
        """Archive, register, wait for READY, set default, retire old versions.

        Raises:
            ManagementError: TorchServe refused a step (the new version is unregistered again
                when it never became ready).
            TimeoutError: its workers were not READY within ``ready_timeout_s``.
        """
        s = self.settings
        mar = self._archive(version)
        started = time.monotonic()
        self.management.register(
            mar.name,
            initial_workers=s.initial_workers,
            batch_size=s.batch_size,
            max_batch_delay_ms=s.max_batch_delay_ms,
            synchronous=True,
        )
        try:
            self.management.wait_ready(s.name, str(version), s.ready_timeout_s)
        except (TimeoutError, ManagementError):
            self._retire(str(version), drain=False)
            raise
        self.management.set_default(s.name, str(version))
        if self.metrics is not None:
            self.metrics.published.inc()
            self.metrics.last_publish.set(time.time())
            self.metrics.published_version.set(version)
        log.info(
            "%s version %d is the default (registered and ready in %.1f s)", s.name, version, time.monotonic() - started
        )
        self.retire_old()

    def retire_old(self) -> list[str]:
        """Unregister registered versions beyond the ``keep`` newest (never the default)."""
        default = self.management.default_version(self.settings.name)
        registered = sorted(self.management.versions(self.settings.name), key=int, reverse=True)
        retired = [v for v in registered[self.settings.keep :] if v != default]
        if retired:
            time.sleep(self.settings.drain_s)
        for version in retired:
            self._retire(version, drain=True)
        return retired

    def watch(self, stop: threading.Event | None = None) -> None:
        """Poll every ``poll_s`` seconds until ``stop`` is set (or forever); errors are logged
        and retried on the next poll."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.poll_once()
            except (ManagementError, TimeoutError, ConfigError, RuntimeError, OSError) as exc:
                log.error("publishing failed, retrying in %.0f s: %s", self.settings.poll_s, exc)
            stop.wait(self.settings.poll_s)

    # ------------------------------------------------------------------ steps

    def _archive(self, version: int) -> Path:
        with tempfile.TemporaryDirectory(prefix="ctrserve-publish-") as tmp:
            for name in (MODEL_FILE, SPEC_FILE):
                (Path(tmp) / name).write_bytes(self.storage.read_bytes(f"{version_dir(version)}/{name}"))
            return archive_model(
                tmp,
                self.settings.model_store,
                name=self.settings.name,
                serving_config=self.settings.serving_config,
                file_name=self.mar_stem(version),
            )

    def mar_stem(self, version: int) -> str:
        """``deepctr-v00000003``: the archive file name of a version, without ``.mar``."""
        return f"{self.settings.name}-{Path(version_dir(version)).name}"

    def _ensure_default(self, registered: list[int]) -> None:
        """After a restart mid-publish: make the newest registered, ready version the default."""
        if not registered:
            return
        newest = str(max(registered))
        if self.management.default_version(self.settings.name) != newest:
            self.management.wait_ready(self.settings.name, newest, self.settings.ready_timeout_s)
            self.management.set_default(self.settings.name, newest)
            self.retire_old()

    def _retire(self, version: str, drain: bool) -> None:
        if drain:
            self._wait_drained(version)
        try:
            self.management.unregister(self.settings.name, version)
        except ManagementError as exc:
            if exc.code != 404:
                raise
        (Path(self.settings.model_store) / f"{self.mar_stem(int(version))}.mar").unlink(missing_ok=True)
        log.info("%s version %s retired", self.settings.name, version)

    def _wait_drained(self, version: str, timeout: float = 60.0) -> None:
        """Wait until TorchServe reports no pending request for ``version``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = self.management.describe(self.settings.name, version)[0].get("jobQueueStatus", {})
            except ManagementError:
                return
            if not status.get("pendingRequests"):
                return
            time.sleep(0.1)
        log.warning(
            "%s version %s still has pending requests after %.0f s; unregistering", self.settings.name, version, timeout
        )
