"""Start and stop embedding servers as child processes (demo, tests, benchmarks, local runs).

Each child runs ``python -m ctrserve embedding-server ... --ready-file F``; readiness is the
ready file appearing and the gRPC health check answering SERVING, never a sleep.

With ``replicas=n`` every shard runs as ``n`` servers (give them ``--mode infer --model-root
URL`` in ``extra_args`` so they follow one model root and hold the same rows);
:attr:`ServerGroup.replica_addresses` groups them per shard for the client, and
:meth:`ServerGroup.kill` / :meth:`ServerGroup.restart` take one replica down and bring it back
on the same port (failover tests and demos).

Admin calls: the servers bind loopback and, unless told otherwise, start with
``--allow-unauthenticated-admin`` (so the trainer loops of tests, demos and benchmarks push
gradients, set optimizers, dump and load without an admin token) and with the group's
``workdir`` as their only admin root; ``admin_roots=[...]`` names others,
``allow_unauthenticated_admin=False`` keeps admin calls to an admin token in the global config.

Example:
    >>> with ServerGroup.start("emb.yml", "global.yml", num_shards=2, workdir=tmp) as group:
    ...     client = RemoteEmbeddingClient(emb_config, group.addresses)
    >>> with ServerGroup.start("emb.yml", "global.yml", 2, tmp, mode="infer", replicas=2,
    ...                        extra_args=["--model-root", root]) as group:
    ...     client = RemoteEmbeddingClient(emb_config, group.replica_addresses)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_server.core.config import JobType


@dataclass
class ServerProcess:
    """One started server: its process, where it listens, its log, and how to start it again."""

    process: subprocess.Popen
    address: str
    metrics_port: int | None
    log_path: Path
    shard: int = 0
    replica: int = 0
    command: list[str] = field(default_factory=list)
    ready_file: Path | None = None


@dataclass
class ServerGroup:
    """A set of running embedding-server processes, in shard order (replicas of a shard together)."""

    servers: list[ServerProcess] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        """Every server's ``host:port``; with one replica per shard, shard ``i`` is ``addresses[i]``."""
        return [s.address for s in self.servers]

    @property
    def replica_addresses(self) -> list[list[str]]:
        """Per shard, its replicas' addresses (what :class:`RemoteEmbeddingClient` takes)."""
        shards: list[list[str]] = []
        for s in self.servers:
            if s.shard == len(shards):
                shards.append([])
            shards[s.shard].append(s.address)
        return shards

    def server(self, shard: int, replica: int = 0) -> ServerProcess:
        """The server of ``replica`` of ``shard``.

        Raises:
            KeyError: no such server in this group.
        """
        for s in self.servers:
            if (s.shard, s.replica) == (shard, replica):
                return s
        raise KeyError(f"no replica {replica} of shard {shard} in this group")

    def kill(self, shard: int, replica: int = 0) -> None:
        """SIGKILL one server (no drain, as a crash) and wait for it to be gone."""
        process = self.server(shard, replica).process
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def restart(self, shard: int, replica: int = 0, timeout: float = 60.0) -> ServerProcess:
        """Start a stopped or killed server again on its old port and wait until it serves.

        Raises:
            RuntimeError: it is still running, exited, or did not become ready in ``timeout``.
        """
        return self.restart_many([(shard, replica)], timeout)[0]

    def restart_many(self, which: list[tuple[int, int]], timeout: float = 60.0) -> list[ServerProcess]:
        """Start several stopped or killed ``(shard, replica)`` servers again at once, each on its
        old port; wait until all serve.

        Raises:
            RuntimeError: one is still running, exited, or did not become ready in ``timeout``.
        """
        old = [self.server(shard, replica) for shard, replica in which]
        running = [s.address for s in old if s.process.poll() is None]
        if running:
            raise RuntimeError(f"cannot restart {', '.join(running)}: still running")
        ready_files = []
        for server in old:
            if server.ready_file is None:
                raise RuntimeError(f"cannot restart {server.address}: it was not started by ServerGroup.start")
            ready_files.append(server.ready_file)
        started = []
        try:
            for server, ready in zip(old, ready_files):
                port = server.address.rpartition(":")[2]
                command = [
                    port if i and server.command[i - 1] == "--port" else arg for i, arg in enumerate(server.command)
                ]
                ready.unlink(missing_ok=True)
                started.append((_spawn(command, server.log_path, append=True), command))
            new = []
            for server, ready, (proc, command) in zip(old, ready_files, started):
                info = _wait_ready(proc, ready, server.log_path, timeout)
                new.append(
                    ServerProcess(
                        proc,
                        info["address"],
                        info["metrics_port"],
                        server.log_path,
                        server.shard,
                        server.replica,
                        command,
                        ready,
                    )
                )
        except BaseException:
            for proc, _ in started:
                _terminate(proc)
            raise
        for server, replacement in zip(old, new):
            self.servers[self.servers.index(server)] = replacement
        return new

    @classmethod
    def start(
        cls,
        embedding_config: str | Path,
        global_config: str | Path,
        num_shards: int,
        workdir: str | Path,
        mode: JobType | str | None = None,
        metrics: bool = False,
        extra_args: list[str] | None = None,
        timeout: float = 60.0,
        replicas: int = 1,
        admin_roots: Sequence[str | Path] | None = None,
        allow_unauthenticated_admin: bool = True,
    ) -> ServerGroup:
        """Start ``replicas`` servers of each of ``num_shards`` shards; wait until every one serves.

        Args:
            mode: overrides the global config's job type (``--mode``).
            replicas: servers per shard; more than one only makes sense for infer-mode servers
                following one model root (``extra_args=["--model-root", URL]``).
            admin_roots: where Dump and Load may go (``--admin-root``, each); None: ``workdir``.
            allow_unauthenticated_admin: pass ``--allow-unauthenticated-admin`` (the servers bind
                loopback; without an admin token any local process may then make admin calls).

        Raises:
            RuntimeError: a server exited or did not become ready in ``timeout`` seconds (its
                log is quoted in the message).
        """
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        group = cls()
        pending = []
        try:
            for i, r in [(i, r) for i in range(num_shards) for r in range(replicas)]:
                name = f"shard-{i}" if replicas == 1 else f"shard-{i}-replica-{r}"
                ready = workdir / f"{name}.ready.json"
                ready.unlink(missing_ok=True)
                log_path = workdir / f"{name}.log"
                cmd = server_command(
                    embedding_config,
                    global_config,
                    "--shard-index",
                    str(i),
                    "--num-shards",
                    str(num_shards),
                    "--port",
                    "0",
                    "--ready-file",
                    ready,
                )
                for root in [workdir] if admin_roots is None else admin_roots:
                    cmd += ["--admin-root", str(root)]
                if allow_unauthenticated_admin:
                    cmd.append("--allow-unauthenticated-admin")
                if mode:
                    cmd += ["--mode", JobType(mode).value]
                if metrics:
                    cmd += ["--metrics-port", "0"]
                cmd += extra_args or []
                pending.append((_spawn(cmd, log_path), ready, log_path, i, r, cmd))
            for proc, ready, log_path, i, r, cmd in pending:
                info = _wait_ready(proc, ready, log_path, timeout)
                group.servers.append(
                    ServerProcess(proc, info["address"], info["metrics_port"], log_path, i, r, cmd, ready)
                )
        except BaseException:
            for proc, *_ in pending:
                _terminate(proc)
            raise
        return group

    def stop(self, timeout: float = 15.0) -> list[int]:
        """SIGTERM every server, wait for a graceful exit (SIGKILL after ``timeout``); exit codes."""
        for s in self.servers:
            if s.process.poll() is None:
                s.process.send_signal(signal.SIGTERM)
        return [_terminate(s.process, timeout, signalled=True) for s in self.servers]

    def __enter__(self) -> ServerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def ctrserve_command(*args: str | Path) -> list[str]:
    """The command line that runs ``ctrserve ARGS`` with this interpreter (``python -m ctrserve``)."""
    return [sys.executable, "-m", "ctrserve", *map(str, args)]


def server_command(embedding_config: str | Path, global_config: str | Path, *args: str | Path) -> list[str]:
    """The command line of ``ctrserve embedding-server`` with its two config files, then ``args``."""
    return ctrserve_command(
        "embedding-server", "--embedding-config", embedding_config, "--global-config", global_config, *args
    )


def wait_serving(address: str, timeout: float) -> None:
    """Block until the gRPC health service at ``address`` answers SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not serving after {timeout:.0f} s")
            time.sleep(0.05)


def _spawn(cmd: list[str], log_path: Path, append: bool = False) -> subprocess.Popen:
    """Start one server in its own process session, its output going to ``log_path``."""
    with open(log_path, "ab" if append else "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(proc: subprocess.Popen, ready: Path, log_path: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"embedding server exited with code {proc.returncode}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"embedding server not ready after {timeout:.0f} s:\n{_tail(log_path)}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    wait_serving(info["address"], max(1.0, deadline - time.monotonic()))
    return info


def _terminate(proc: subprocess.Popen, timeout: float = 15.0, signalled: bool = False) -> int:
    """SIGTERM (unless ``signalled`` already: a second one could reach the process while it shuts
    down), wait up to ``timeout``, then SIGKILL its group; returns the exit code."""
    if proc.poll() is None and not signalled:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
