"""Start and stop an isolated TorchServe instance (tests, benchmarks, local runs).

Each instance gets its own working directory holding its ``TEMP``/``TMPDIR`` (TorchServe keeps
its pid file, worker sockets and unpacked models there, and ``--stop`` only finds a server
started with the same temp dir), ``LOG_LOCATION``, ``METRICS_LOCATION``, a ``config.properties``
derived from ``deploy/torchserve/config.local.properties`` with free loopback ports, and its
log. It runs in the foreground in a new process session; :meth:`TorchServeProcess.stop`
signals the whole process group (launcher, Java frontend, Python workers), because a SIGTERM
to the launcher alone leaves Java and the workers running.

Readiness is the management API answering from a live process group and, for every model
given, every worker ``READY`` (``/ping`` says Healthy while a worker crash-loops).

Example:
    >>> with TorchServeProcess.start(model_store, workdir, models={"deepctr": "deepctr.mar"}) as ts:
    ...     PredictionClient(ts.grpc_inference_url).predict(batch)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from archiver.management import ManagementClient, ManagementError
from archiver.templates import template
from handler.torchserve_keys import KEY_FILE, TorchServeKey

LOCAL_CONFIG = template("torchserve/config.local.properties")
LOG_CONFIG = template("torchserve/log4j2.xml")
_PORT_KEYS = ("inference", "management", "metrics", "grpc_inference", "grpc_management", "worker")


@dataclass
class TorchServeProcess:
    """A running TorchServe started by :meth:`start`."""

    process: subprocess.Popen
    workdir: Path
    ports: dict[str, int]
    log_path: Path

    def url(self, api: str) -> str:
        """``http://127.0.0.1:<port>`` of ``inference``, ``management`` or ``metrics``;
        ``grpc://127.0.0.1:<port>`` of ``grpc_inference`` or ``grpc_management``."""
        scheme = "grpc" if api.startswith("grpc_") else "http"
        return f"{scheme}://127.0.0.1:{self.ports[api]}"

    inference_url = property(lambda self: self.url("inference"), doc="REST inference address")
    management_url = property(lambda self: self.url("management"), doc="REST management address")
    metrics_url = property(lambda self: self.url("metrics"), doc="Prometheus metrics address")
    grpc_inference_url = property(lambda self: self.url("grpc_inference"), doc="gRPC inference address")
    grpc_management_url = property(lambda self: self.url("grpc_management"), doc="gRPC management address")

    @classmethod
    def start(
        cls,
        model_store: str | Path,
        workdir: str | Path,
        models: Mapping[str, str] | None = None,
        base_config: str | Path = LOCAL_CONFIG,
        properties: Mapping[str, str] | None = None,
        environment: Mapping[str, str] | None = None,
        timeout: float = 120.0,
    ) -> TorchServeProcess:
        """Start TorchServe and wait until it (and every worker of ``models``) is ready.

        Args:
            model_store: folder of ``.mar`` files.
            workdir: this instance's own folder (created).
            models: ``{name: mar file}`` to load at start (``--models``).
            base_config: ``config.properties`` whose addresses and ports are replaced.
            properties: more ``config.properties`` entries (override the base).
            environment: extra environment variables (e.g. ``CTRSERVE_EMBEDDING_SERVERS``).
            timeout: seconds to wait for readiness.

        Raises:
            RuntimeError: TorchServe exited or was not ready in time (its log is quoted).
        """
        workdir = Path(workdir).resolve()
        for sub in ("tmp", "logs", "metrics"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        ports = dict(zip(_PORT_KEYS, _free_ports(len(_PORT_KEYS))))
        config_path = workdir / "config.properties"
        config_path.write_text(_render_config(Path(base_config), ports, properties or {}))
        env = dict(os.environ)
        env.update(
            {
                "TEMP": str(workdir / "tmp"),
                "TMPDIR": str(workdir / "tmp"),
                "LOG_LOCATION": str(workdir / "logs"),
                "METRICS_LOCATION": str(workdir / "metrics"),
            }
        )
        env.update(environment or {})
        cmd = [
            str(Path(sys.executable).parent / "torchserve"),
            "--start",
            "--foreground",
            "--ncs",
            "--model-store",
            str(Path(model_store).resolve()),
            "--ts-config",
            str(config_path),
            "--log-config",
            str(LOG_CONFIG),
        ]
        if models:
            cmd += ["--models", *(f"{name}={mar}" for name, mar in models.items())]
        log_path = workdir / "torchserve.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = cls(process, workdir, ports, log_path)
        try:
            server.wait_ready(list(models or ()), timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def management(self, grpc: bool = False) -> ManagementClient:
        """A management client of this instance (REST, or gRPC when ``grpc``), with the
        management key of its key file when token authorization is on (read again when
        TorchServe refuses it; renewed over REST when expired)."""
        return ManagementClient(
            self.grpc_management_url if grpc else self.management_url, token=self.token("management")
        )

    def token(self, kind: str) -> TorchServeKey | None:
        """The ``management`` or ``inference`` key of this instance's key file, as clients take it
        (None when token authorization is off: no key file)."""
        path = self.workdir / KEY_FILE
        return TorchServeKey(kind, key_file=path) if path.exists() else None

    def key(self, kind: str) -> str | None:
        """The ``management`` or ``inference`` key TorchServe wrote to ``key_file.json`` in its
        working directory (None when token authorization is off)."""
        path = self.workdir / "key_file.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())[kind]["key"]
        except (ValueError, KeyError, TypeError):
            return None  # being written

    def wait_ready(self, models: list[str], timeout: float) -> None:
        """Block until the management API answers and every worker of ``models`` is READY.

        Raises:
            RuntimeError: the process exited, failed to bind a port, or timed out.
        """
        deadline = time.monotonic() + timeout
        # The REST API answers before the gRPC servers are up: wait for both. Clients are made
        # per attempt because with token authorization the key file appears only after start.
        for grpc in (False, True):
            self._wait_answering(grpc, deadline, timeout)
        with self.management() as rest:
            for name in models:
                rest.wait_ready(name, None, max(1.0, deadline - time.monotonic()), alive=self._check_alive)

    def _wait_answering(self, grpc: bool, deadline: float, timeout: float) -> None:
        while True:
            self._check_alive()
            with self.management(grpc) as client:
                try:
                    client.list_models()
                    return
                except ManagementError:
                    pass
            if time.monotonic() > deadline:
                api = "gRPC" if grpc else "REST"
                raise RuntimeError(
                    f"TorchServe {api} management API not answering after {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"TorchServe exited with code {self.process.returncode}:\n{self.log_tail()}")
        if "Failed to bind" in self.log_path.read_text(errors="replace"):
            raise RuntimeError(f"TorchServe could not bind a port:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the whole process group, SIGKILL what is left after ``timeout``; the exit code."""
        pgid = self.process.pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            self.process.wait()
        deadline = time.monotonic() + timeout
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        return self.process.returncode

    def __enter__(self) -> TorchServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _render_config(base: Path, ports: dict[str, int], extra: Mapping[str, str]) -> str:
    values = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": str(ports["grpc_management"]),
        "initial_worker_port": str(ports["worker"]),
        **extra,
    }
    lines = [line for line in base.read_text().splitlines() if line.split("=", 1)[0].strip() not in values]
    return "\n".join(lines + [f"{k}={v}" for k, v in values.items()]) + "\n"


def _free_ports(count: int) -> list[int]:
    """Distinct loopback ports free right now; worker ports (+1, +2, ... of the last) are left
    to TorchServe, so the last port is picked with room above it."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            port = s.getsockname()[1]
            if port < 65000:
                ports.append(port)
    finally:
        for s in sockets:
            s.close()
    return ports


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
