"""PERSIA's ``persia.helper``: the services of a PERSIA job on this machine, for one program.

:func:`ensure_persia_service` (a :class:`PersiaServiceCtx`) starts, for the duration of a
``with`` block, what a PERSIA job needs around its nn worker: the service registry (``persia-launcher
embedding-worker``), the embedding parameter servers (``persia-launcher
embedding-parameter-server``, one per replica) and, when given, the data-loader and nn-worker
functions in processes of their own; it sets the environment so that :mod:`persia.service` and
child programs find them, and stops everything when the block ends.

Differences from PERSIA, and why:

* Functions run in forked children (PERSIA pickled them with cloudpickle, which ctrserve does
  not depend on), so closures work as they did there. Enter the context before the program
  starts gRPC channels or threads of its own: forking a process with running gRPC threads is
  unsafe.
* Ports: None (the default) lets the system pick a free port; a number keeps PERSIA's meaning,
  the first free port from there. No NATS server is started (``nats_server_port`` is accepted
  and unused): the registry plays its part.
* A service that dies while the block runs is reported when the block ends: RuntimeError with
  the end of its log (unless the block raised already).

Example:
    >>> with ensure_persia_service(embedding_config={"slots_config": {"age": {"dim": 8}}},
    ...                            data_loader_func=send_batches):
    ...     with TrainCtx(...) as ctx:
    ...         for batch in DataLoader(StreamingDataset(buffer_size=10)):
    ...             ...
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from persia import service
from persia.launcher import with_parent_death_signal
from persia.registry import RegistryClient
from persia.utils import find_free_port

_logger = logging.getLogger("persia.helper")

#: seconds a child gets to exit after SIGTERM before it is killed
STOP_GRACE_S = 15.0


class _Child:
    """One started process of the context (a command or a forked function) and its log."""

    def __init__(self, name: str, log: Path | None = None):
        self.name = name
        self.log = log
        self.popen: subprocess.Popen | None = None
        self.forked: Any = None  # multiprocessing.Process

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen is not None else self.forked.pid

    def exit_code(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        return self.forked.exitcode

    def signal(self, signum: int) -> None:
        if self.exit_code() is not None:
            return
        try:
            os.killpg(self.pid, signum)  # the child leads its own process group
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.exit_code() is None:
            if time.monotonic() > deadline:
                return False
            if self.popen is not None:
                try:
                    self.popen.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            else:
                self.forked.join(0.1)
        return True

    def tail(self, lines: int = 20) -> str:
        if self.log is None:
            return "(its output went to this program's)"
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) or "(empty log)"
        except OSError:
            return "(no log)"


def _run_function(func: Callable[[], object], env: Mapping[str, str]) -> None:
    """The body of a forked child: its own process group, SIGTERM if the parent dies, the
    environment of its role, then ``func``."""
    os.setsid()
    _set_parent_death_signal(signal.SIGTERM)
    os.environ.update(env)
    from persia import env as persia_env

    persia_env._env.is_init = False  # read this child's RANK / REPLICA_INDEX on first use
    func()


def _set_parent_death_signal(signum: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signum), 0, 0, 0)


class PersiaServiceCtx:
    """The services of a PERSIA job as child processes for the duration of a ``with`` block.

    Args:
        data_loader_func: run in ``data_loader_replica_num`` processes, with ``REPLICA_INDEX`` and
            ``REPLICA_SIZE`` set.
        nn_worker_func: run in ``nproc_per_node`` processes, with ``RANK``, ``LOCAL_RANK``,
            ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.
        embedding_config: the embedding config as a dict (written to a temporary file) ...
        embedding_config_path: ... or its file; one of the two is required.
        global_config: the global config as a dict ...
        global_config_path: ... or its file; neither: an empty one (every default).
        data_loader_replica_num: data-loader processes.
        nproc_per_node: nn-worker processes.
        embedding_worker_replica_num: registries (only the first is used; PERSIA ran several
            embedding workers to share routing work, which the nn workers' client does here).
        embedding_parameter_replica_num: embedding parameter servers (shards).
        embedding_worker_port: the registry's port (None: any free one; a number: the first free
            one from there).
        embedding_parameter_server_port: the first server's port (None: any free ones; a number:
            server ``i`` gets the first free one from ``port + i``).
        nats_server_port: accepted for PERSIA's programs, unused (no NATS server is needed).
        timeout: seconds to wait for the services to be up.

    Raises:
        ValueError: neither ``embedding_config`` nor ``embedding_config_path``, or a count below 1.
        RuntimeError: (on entry) a service did not start; (on exit) a service or a function's
            process failed while the block ran.
        TimeoutError: (on entry) the services were not all up within ``timeout``.

    Example:
        >>> with PersiaServiceCtx(embedding_config={"slots_config": {"age": {"dim": 8}}}):
        ...     print(persia.service.embedding_server_addresses())
        ['127.0.0.1:41231']
    """

    def __init__(
        self,
        data_loader_func: Callable[[], object] | None = None,
        nn_worker_func: Callable[[], object] | None = None,
        embedding_config: dict | None = None,
        embedding_config_path: str | None = None,
        global_config: dict | None = None,
        global_config_path: str | None = None,
        data_loader_replica_num: int = 1,
        nproc_per_node: int = 1,
        embedding_worker_replica_num: int = 1,
        embedding_parameter_replica_num: int = 1,
        embedding_worker_port: int | None = None,
        embedding_parameter_server_port: int | None = None,
        nats_server_port: int | None = None,
        timeout: float = 60.0,
    ):
        if embedding_config is None and not embedding_config_path:
            raise ValueError("ensure_persia_service needs embedding_config (a dict) or embedding_config_path")
        counts = {
            "data_loader_replica_num": data_loader_replica_num,
            "nproc_per_node": nproc_per_node,
            "embedding_worker_replica_num": embedding_worker_replica_num,
            "embedding_parameter_replica_num": embedding_parameter_replica_num,
        }
        for name, value in counts.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
        if nats_server_port is not None:
            _logger.info("nats_server_port=%s is not used: the service registry replaces NATS", nats_server_port)
        self.data_loader_func = data_loader_func
        self.nn_worker_func = nn_worker_func
        self.embedding_config = embedding_config
        self.embedding_config_path = embedding_config_path
        self.global_config = global_config if global_config is not None else {}
        self.global_config_path = global_config_path
        self.data_loader_replica_num = data_loader_replica_num
        self.nproc_per_node = nproc_per_node
        self.embedding_worker_replica_num = embedding_worker_replica_num
        self.embedding_parameter_replica_num = embedding_parameter_replica_num
        self.embedding_worker_port = embedding_worker_port
        self.embedding_parameter_server_port = embedding_parameter_server_port
        self.timeout = timeout
        self.registries: list[_Child] = []
        self.servers: list[_Child] = []
        self.workers: list[_Child] = []
        self.registry_address: str | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._saved_env: dict[str, str | None] = {}
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------------------------- starting

    def __enter__(self) -> PersiaServiceCtx:
        self._tmp = tempfile.TemporaryDirectory(prefix="persia-service-")
        try:
            self._start()
        except BaseException:
            self._stop()
            self._cleanup()
            raise
        return self

    def _start(self) -> None:
        assert self._tmp is not None
        tmp = Path(self._tmp.name)
        emb = self._config_file(self.embedding_config_path, self.embedding_config, tmp / "embedding_config.yml")
        glob = self._config_file(self.global_config_path, self.global_config, tmp / "global_config.yml")
        self._set_env("PERSIA_EMBEDDING_CONFIG", str(emb))
        self._set_env("PERSIA_GLOBAL_CONFIG", str(glob))
        launcher = [sys.executable, "-m", "persia.launcher"]
        configs = ["--embedding-config", str(emb), "--global-config", str(glob)]

        registries = []
        for i in range(self.embedding_worker_replica_num):
            port = 0 if self.embedding_worker_port is None else find_free_port(self.embedding_worker_port + i)
            ready = tmp / f"embedding-worker-{i}.ready.json"
            cmd = [*launcher, "embedding-worker", "--port", str(port), "--ready-file", str(ready), *configs]
            cmd += ["--replica-index", str(i), "--replica-size", str(self.embedding_worker_replica_num)]
            registries.append((self._spawn(f"embedding-worker {i}", cmd, tmp, self.registries), ready))
        deadline = time.monotonic() + self.timeout
        child, ready = registries[0]
        while not ready.exists():
            self._check_alive(child, "before serving")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} not serving after {self.timeout:g} s:\n{child.tail()}")
            time.sleep(0.02)
        self.registry_address = json.loads(ready.read_text())["address"]
        self._set_env("EMBEDDING_WORKER_SERVICE", self.registry_address)

        size = self.embedding_parameter_replica_num
        for i in range(size):
            base = self.embedding_parameter_server_port
            port = 0 if base is None else find_free_port(base + i)
            cmd = [*launcher, "embedding-parameter-server", "--port", str(port), *configs]
            cmd += ["--replica-index", str(i), "--replica-size", str(size)]
            self._spawn(f"embedding-parameter-server {i}", cmd, tmp, self.servers)
        client = RegistryClient(self.registry_address)
        while True:
            for child in self.registries + self.servers:
                self._check_alive(child, "while starting")
            left = deadline - time.monotonic()
            try:
                addresses = client.wait_for(service.EMBEDDING_PARAMETER_SERVER, size, timeout=min(1.0, max(left, 0.0)))
                break
            except TimeoutError:
                if left <= 0:
                    raise TimeoutError(
                        f"the embedding parameter servers did not all register within {self.timeout:g} s"
                    ) from None
        _logger.info(
            "PERSIA services up: registry %s, embedding parameter servers %s", self.registry_address, addresses
        )

        if self.data_loader_func is not None:
            for i in range(self.data_loader_replica_num):
                env = {"REPLICA_INDEX": str(i), "REPLICA_SIZE": str(self.data_loader_replica_num)}
                self._fork(f"data loader {i}", self.data_loader_func, env)
        if self.nn_worker_func is not None:
            master_port = str(find_free_port(29500))
            for rank in range(self.nproc_per_node):
                env = {
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(self.nproc_per_node),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": master_port,
                }
                self._fork(f"nn worker {rank}", self.nn_worker_func, env)
        self._watcher = threading.Thread(target=self._watch, name="persia-service-watch", daemon=True)
        self._watcher.start()

    @staticmethod
    def _config_file(path: str | None, config: dict | None, target: Path) -> Path:
        if path:
            return Path(path)
        target.write_text(yaml.safe_dump(config or {}))
        return target

    def _set_env(self, name: str, value: str) -> None:
        self._saved_env.setdefault(name, os.environ.get(name))
        os.environ[name] = value

    def _spawn(self, name: str, cmd: list[str], tmp: Path, into: list[_Child]) -> _Child:
        child = _Child(name, tmp / f"{name.replace(' ', '-')}.log")
        assert child.log is not None
        with open(child.log, "wb") as log:
            child.popen = subprocess.Popen(
                with_parent_death_signal(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        into.append(child)
        return child

    def _fork(self, name: str, func: Callable[[], object], env: dict[str, str]) -> None:
        child = _Child(name)
        child.forked = multiprocessing.get_context("fork").Process(
            target=_run_function, args=(func, env), name=name, daemon=False
        )
        child.forked.start()
        self.workers.append(child)

    @staticmethod
    def _check_alive(child: _Child, when: str) -> None:
        code = child.exit_code()
        if code is not None:
            raise RuntimeError(f"{child.name} exited with code {code} {when}:\n{child.tail()}")

    def _watch(self) -> None:
        reported: set[str] = set()
        while not self._stopping.wait(0.5):
            for child in self.registries + self.servers:
                code = child.exit_code()
                if code is not None and child.name not in reported:
                    reported.add(child.name)
                    _logger.error("%s exited with code %d:\n%s", child.name, code, child.tail())

    # -------------------------------------------------------------------------------- stopping

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # a service must still be running; a function's process may have finished, successfully
        failures = [
            f"{child.name} exited with code {child.exit_code()}:\n{child.tail()}"
            for child in self.registries + self.servers + self.workers
            if child.exit_code() is not None and (child not in self.workers or child.exit_code() != 0)
        ]
        self._stop()
        self._cleanup()
        if failures and exc_type is None:
            raise RuntimeError("PERSIA services failed while the block ran:\n" + "\n".join(failures))

    def _stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        # the programs first, then the servers, the registry last (servers keep registering)
        for group in (self.workers, self.servers, self.registries):
            for child in group:
                child.signal(signal.SIGTERM)
            for child in group:
                if not child.join(STOP_GRACE_S):
                    _logger.warning("%s did not stop within %.0f s of SIGTERM: killing it", child.name, STOP_GRACE_S)
                    child.signal(signal.SIGKILL)
                    child.join(STOP_GRACE_S)

    def _cleanup(self) -> None:
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def ensure_persia_service(*args: Any, **kwargs: Any) -> PersiaServiceCtx:
    """PERSIA's name for :class:`PersiaServiceCtx` (same arguments)."""
    return PersiaServiceCtx(*args, **kwargs)
