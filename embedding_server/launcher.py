"""Start and stop embedding servers as child processes (demo, tests, benchmarks, local runs).

Each child runs ``python -m ctrserve embedding-server ... --ready-file F``; readiness is the
ready file appearing and the gRPC health check answering SERVING, never a sleep.

Example:
    >>> with ServerGroup.start("emb.yml", "global.yml", num_shards=2, workdir=tmp) as group:
    ...     client = RemoteEmbeddingClient(emb_config, group.addresses)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass
class ServerProcess:
    process: subprocess.Popen
    address: str
    metrics_port: int | None
    log_path: Path


@dataclass
class ServerGroup:
    """A set of running embedding-server processes, shard ``i`` at ``addresses[i]``."""

    servers: list[ServerProcess] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    @classmethod
    def start(
        cls,
        embedding_config: str | Path,
        global_config: str | Path,
        num_shards: int,
        workdir: str | Path,
        mode: str | None = None,
        metrics: bool = False,
        extra_args: list[str] | None = None,
        timeout: float = 60.0,
    ) -> "ServerGroup":
        """Start ``num_shards`` servers and wait until every one is serving.

        Raises:
            RuntimeError: a server exited or did not become ready in ``timeout`` seconds (its
                log is quoted in the message).
        """
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        group = cls()
        pending = []
        try:
            for i in range(num_shards):
                ready = workdir / f"shard-{i}.ready.json"
                ready.unlink(missing_ok=True)
                log_path = workdir / f"shard-{i}.log"
                cmd = [
                    sys.executable, "-m", "ctrserve", "embedding-server",
                    "--embedding-config", str(embedding_config), "--global-config", str(global_config),
                    "--shard-index", str(i), "--num-shards", str(num_shards), "--port", "0",
                    "--ready-file", str(ready),
                ]
                if mode:
                    cmd += ["--mode", mode]
                if metrics:
                    cmd += ["--metrics-port", "0"]
                cmd += extra_args or []
                with open(log_path, "wb") as log:
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                pending.append((proc, ready, log_path))
            for proc, ready, log_path in pending:
                info = _wait_ready(proc, ready, log_path, timeout)
                group.servers.append(ServerProcess(proc, info["address"], info["metrics_port"], log_path))
        except BaseException:
            for proc, _, _ in pending:
                _terminate(proc)
            raise
        return group

    def stop(self, timeout: float = 15.0) -> list[int]:
        """SIGTERM every server, wait for a graceful exit (SIGKILL after ``timeout``); exit codes."""
        for s in self.servers:
            if s.process.poll() is None:
                s.process.send_signal(signal.SIGTERM)
        return [_terminate(s.process, timeout) for s in self.servers]

    def __enter__(self) -> "ServerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


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


def _terminate(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    if proc.poll() is None:
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
