"""``persia-launcher``: PERSIA's command that starts each part of a job, on ctrserve.

Sub-commands, flags, defaults and environment variables are PERSIA's, so a PERSIA Procfile,
docker-compose file, Kubernetes spec or shell script runs unchanged::

    persia-launcher nn-worker train.py --nproc-per-node 1 --nnodes 1 --node-rank 0
    persia-launcher data-loader data_loader.py --replica-index 0 --replica-size 1
    persia-launcher embedding-worker --embedding-config emb.yml --global-config global.yml
    persia-launcher embedding-parameter-server --embedding-config emb.yml --global-config global.yml \\
        --replica-index 0 --replica-size 1

* ``nn-worker FILE`` runs FILE under ``torch.distributed.run`` (torchrun), which gives each
  process ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; FILE defaults to
  ``$PERSIA_NN_WORKER_ENTRY``. With ``--nnodes 1`` torchrun runs standalone (a free rendezvous
  port); with more, ``MASTER_ADDR``/``MASTER_PORT`` name node 0.
* ``data-loader FILE`` runs FILE with ``REPLICA_INDEX``/``REPLICA_SIZE`` set; FILE defaults to
  ``$PERSIA_DATALOADER_ENTRY``.
* ``embedding-parameter-server`` runs ctrserve's embedding server (``ctrserve
  embedding-server``) as shard ``--replica-index`` of ``--replica-size``, waits until it is
  healthy and registers it with the service registry (role ``embedding-parameter-server``),
  again every few seconds so a restarted registry learns it too. When the server stops (a
  stop signal, or the server exiting) it deregisters it before exiting, so nobody is handed
  its address afterwards; a registry it cannot reach then is logged, not an error. Each
  registration carries a ttl (``--registration-ttl``, :data:`REGISTRATION_TTL_S`), so a
  launcher killed without deregistering (SIGKILL) has its entry dropped once the ttl passes.
* ``embedding-worker`` runs the service registry (:mod:`persia.registry`) on ``--port``: ctrserve
  needs no embedding worker process, since the nn workers' client routes ids to the parameter
  servers itself; the registry is how the processes find each other.

``--embedding-config``/``--global-config`` default to ``$PERSIA_EMBEDDING_CONFIG`` /
``$PERSIA_GLOBAL_CONFIG``. A missing or invalid config or entry file is one line on stderr and
exit code 2. ``PERSIA_LAUNCHER_VERBOSE=1`` logs each command run; ``LOG_LEVEL`` sets the log level
(default info). The launcher forwards SIGTERM, SIGINT and SIGHUP to its child's process group,
kills the group if it has not exited :data:`GRACE_S` seconds after the first, and exits with the
child's exit code (128 + N for a child killed by signal N); the child gets SIGTERM when the
launcher dies (parent-death signal, set by util-linux's ``setpriv`` where installed), so none is
left behind.

Example:
    >>> main(["data-loader", "data_loader.py", "--replica-index", "1", "--replica-size", "2"])
    0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from persia import service
from persia.env import PERSIA_LAUNCHER_VERBOSE

if TYPE_CHECKING:
    from embedding_server.core.config import GlobalConfig

_logger = logging.getLogger("persia.launcher")

#: seconds between a forwarded signal and SIGKILL of the child's process group
GRACE_S = 30.0
#: seconds between registrations of a running parameter server (keeps a restarted registry current)
REGISTER_EVERY_S = 5.0
#: the default ttl of those registrations: a killed launcher's entry is dropped this long after
#: its last registration; several periods, so a slow registration or two does not drop a live one
REGISTRATION_TTL_S = 30.0
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class UsageError(Exception):
    """A bad flag, file or config: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------- children


def with_parent_death_signal(cmd: Sequence[str], sig: str = "TERM") -> list[str]:
    """``cmd`` run through ``setpriv --pdeathsig SIG`` where setpriv (util-linux) is installed, so
    the child gets ``sig`` if this process dies without stopping it. setpriv sets the signal and
    execs ``cmd``: no Python runs between fork and exec (a ``preexec_fn`` would, which is unsafe
    in a process with gRPC threads)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", sig, *cmd] if setpriv else list(cmd)


def exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it (128 + N when killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Runs one child in its own process group, forwarding this process's stop signals to it.

    Install it (:meth:`__enter__`) before starting the child, so that a signal arriving in
    between is forwarded once the child exists.

    Example:
        >>> with Supervisor("data-loader") as supervisor:
        ...     supervisor.start([sys.executable, "loader.py"], env)
        ...     code = supervisor.wait()
    """

    def __init__(self, name: str):
        self.name = name
        self.process: subprocess.Popen | None = None
        self.stop_requested = threading.Event()
        self._first_signal_at: float | None = None
        self._pending: list[int] = []
        self._previous: dict[int, Callable | int | None] = {}

    def __enter__(self) -> Supervisor:
        for sig in FORWARDED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(GRACE_S)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._first_signal_at is None:
            self._first_signal_at = time.monotonic()
        self.stop_requested.set()
        if self.process is None:
            self._pending.append(signum)
        else:
            self._signal_group(signum)

    def _signal_group(self, signum: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def start(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``cmd`` (with the parent-death signal) in a new process group."""
        cmd = [str(part) for part in cmd]
        if PERSIA_LAUNCHER_VERBOSE:
            _logger.info("execute command: %s", " ".join(cmd))
        self.process = subprocess.Popen(with_parent_death_signal(cmd), env=env, start_new_session=True)
        for signum in self._pending:
            self._signal_group(signum)
        return self.process

    def poll(self) -> int | None:
        """The child's exit code once it exited (see :func:`exit_code`), else None; kills its group
        when it outlives :data:`GRACE_S` after a forwarded signal."""
        assert self.process is not None
        if self.process.poll() is not None:
            return exit_code(self.process.returncode)
        if self._first_signal_at is not None and time.monotonic() - self._first_signal_at > GRACE_S:
            _logger.warning("%s still running %.0f s after the stop signal: killing it", self.name, GRACE_S)
            self._signal_group(signal.SIGKILL)
        return None

    def wait(self) -> int:
        """Block until the child exits; its exit code (see :func:`exit_code`)."""
        while True:
            code = self.poll()
            if code is not None:
                return code
            try:
                self.process.wait(timeout=0.5)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                pass


# ------------------------------------------------------------------------------------- arguments


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1, got 0")
    return value


def _ttl(text: str) -> float:
    from persia.registry import check_ttl

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    try:
        check_ttl(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"ttl {value!r}: ")) from None
    return value


def _port(text: str) -> int:
    value = _non_negative(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, got {value}")
    return value


def _existing_file(value: str | None, flag: str, env: str) -> Path:
    """The file named by ``flag`` or, without it, by ``$env``.

    Raises:
        UsageError: neither is given, or the file does not exist.
    """
    text = (value or os.environ.get(env, "")).strip()
    if not text:
        raise UsageError(f"{flag} not given and {env} not set")
    path = Path(text)
    if not path.is_file():
        source = flag if value else f"{env}={text}"
        raise UsageError(f"{source}: no such file: {path}")
    return path


def _check_replica(index: int, size: int) -> None:
    if index >= size:
        raise UsageError(f"--replica-index {index} must be less than --replica-size {size}")


def _add_config_flags(p: argparse.ArgumentParser, required_by: str) -> None:
    p.add_argument(
        "--embedding-config",
        metavar="FILE",
        help=f"embedding_config.yml (default: $PERSIA_EMBEDDING_CONFIG); {required_by}",
    )
    p.add_argument(
        "--global-config",
        metavar="FILE",
        help=f"global_config.yml (default: $PERSIA_GLOBAL_CONFIG); {required_by}",
    )


def _add_replica_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--replica-index", type=_non_negative, default=0, help=f"index of this {what} (default 0)")
    p.add_argument("--replica-size", type=_positive, default=1, help=f"number of {what}s (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persia-launcher",
        description="Start one part of a PERSIA job on ctrserve (PERSIA's sub-commands, flags and "
        "environment variables).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    nn = sub.add_parser(
        "nn-worker",
        help="run a training program under torchrun",
        description="Run FILE under torch.distributed.run (torchrun): --nproc-per-node processes on this node, "
        "each with RANK, LOCAL_RANK and WORLD_SIZE set. With --nnodes 1 torchrun runs standalone; with more, "
        "MASTER_ADDR and MASTER_PORT name node 0. The nn workers find the embedding parameter servers through "
        "the service registry (EMBEDDING_WORKER_SERVICE, see 'persia-launcher embedding-worker --help').",
    )
    nn.add_argument("file", nargs="?", metavar="FILE", help="the training program (default: $PERSIA_NN_WORKER_ENTRY)")
    nn.add_argument("--nproc-per-node", type=_positive, default=1, help="processes on this node (default 1)")
    nn.add_argument("--node-rank", type=_non_negative, default=0, help="index of this node (default 0)")
    nn.add_argument("--nnodes", type=_positive, default=1, help="number of nodes (default 1)")
    nn.set_defaults(run=run_nn_worker)

    dl = sub.add_parser(
        "data-loader",
        help="run a data-loader program",
        description="Run FILE with REPLICA_INDEX and REPLICA_SIZE set (persia.env.get_replica_index / "
        "get_replica_size read them); its DataCtx sends batches to the nn workers it finds in the service registry.",
    )
    dl.add_argument(
        "file", nargs="?", metavar="FILE", help="the data-loader program (default: $PERSIA_DATALOADER_ENTRY)"
    )
    _add_replica_flags(dl, "data loader")
    dl.set_defaults(run=run_data_loader)

    ew = sub.add_parser(
        "embedding-worker",
        help="run the service registry (ctrserve's counterpart of PERSIA's embedding worker)",
        description="How this maps: PERSIA's embedding worker routed ids between nn workers and parameter "
        "servers, and the processes met through NATS. In ctrserve the nn workers' embedding client routes ids "
        "to the parameter servers itself, so no embedding worker process is needed; this command runs what "
        "the others need from it instead: the service registry, on --port, where parameter servers and nn "
        "workers register and are found. Every other process reaches it at $EMBEDDING_WORKER_SERVICE "
        "(host:port), else at embedding_worker:8887 where that name resolves (docker-compose, Kubernetes), else "
        "at 127.0.0.1:8887. The configs are checked (a bad one is an error) but not otherwise used; replicas "
        "other than the one EMBEDDING_WORKER_SERVICE names stay idle. PERSIA_NATS_URL is not used: no NATS "
        "server is needed.",
    )
    ew.add_argument("--port", type=_port, default=8887, help="registry port (default 8887; 0: pick a free one)")
    ew.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0: every interface)")
    _add_config_flags(ew, "checked, not needed")
    _add_replica_flags(ew, "embedding worker")
    ew.add_argument("--ready-file", metavar="FILE", help="write {address, port, pid} as JSON here once serving")
    ew.set_defaults(run=run_embedding_worker)

    ps = sub.add_parser(
        "embedding-parameter-server",
        help="run one shard of ctrserve's embedding server and register it",
        description="Run ctrserve's embedding server (ctrserve embedding-server) as shard --replica-index of "
        "--replica-size with these configs, wait until it answers health checks, then register it with the "
        "service registry ($EMBEDDING_WORKER_SERVICE) as role embedding-parameter-server, index --replica-index. "
        "Bound to loopback it serves admin calls (gradient pushes, checkpoint dumps) without a token, as PERSIA "
        "does; on other addresses give it an admin token (global config 'security'). Dumps and loads may go "
        "under the --admin-root directories only.",
    )
    ps.add_argument("--port", type=_port, default=8888, help="gRPC port (default 8888; 0: pick a free one)")
    ps.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0: every interface)")
    ps.add_argument(
        "--advertise-host",
        metavar="HOST",
        help="host name to register (default: --host, or this machine's name when --host is 0.0.0.0 or ::)",
    )
    ps.add_argument(
        "--admin-root",
        action="append",
        metavar="DIR|URL",
        help="where checkpoint dumps and loads may go (repeatable; default: the global config's "
        "security.admin_roots, else the working directory, $PERSIA_CKPT_DIR and the temporary directory)",
    )
    ps.add_argument(
        "--registration-ttl",
        type=_ttl,
        default=REGISTRATION_TTL_S,
        metavar="SECONDS",
        help=f"the registry drops this server's entry when not registered again for this long (default "
        f"{REGISTRATION_TTL_S:g}; it is registered again every {REGISTER_EVERY_S:g} s or a third of this, whichever "
        "is shorter); a clean stop deregisters it at once",
    )
    _add_config_flags(ps, "required")
    _add_replica_flags(ps, "embedding parameter server")
    ps.set_defaults(run=run_embedding_parameter_server)
    return parser


# ------------------------------------------------------------------------------------ sub-commands


def run_nn_worker(args: argparse.Namespace) -> int:
    entry = _existing_file(args.file, "FILE", "PERSIA_NN_WORKER_ENTRY")
    if args.node_rank >= args.nnodes:
        raise UsageError(f"--node-rank {args.node_rank} must be less than --nnodes {args.nnodes}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc_per_node)]
    if args.nnodes == 1:
        cmd += ["--standalone", "--nnodes", "1"]
    else:
        cmd += ["--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank)]
        for flag, env in (("--master_addr", "MASTER_ADDR"), ("--master_port", "MASTER_PORT")):
            if os.environ.get(env):
                cmd += [flag, os.environ[env]]
    cmd.append(str(entry))
    service.note_unused_nats_url()
    with Supervisor("nn-worker") as supervisor:
        supervisor.start(cmd)
        return supervisor.wait()


def run_data_loader(args: argparse.Namespace) -> int:
    entry = _existing_file(args.file, "FILE", "PERSIA_DATALOADER_ENTRY")
    _check_replica(args.replica_index, args.replica_size)
    env = {**os.environ, "REPLICA_INDEX": str(args.replica_index), "REPLICA_SIZE": str(args.replica_size)}
    service.note_unused_nats_url()
    with Supervisor("data-loader") as supervisor:
        supervisor.start([sys.executable, str(entry)], env)
        return supervisor.wait()


def _configs_given(args: argparse.Namespace) -> bool:
    return bool(
        args.embedding_config
        or args.global_config
        or os.environ.get("PERSIA_EMBEDDING_CONFIG", "").strip()
        or os.environ.get("PERSIA_GLOBAL_CONFIG", "").strip()
    )


def _load_configs(args: argparse.Namespace) -> tuple[Path, Path, GlobalConfig]:
    """Both config paths, checked as the embedding server will read them, and the global config.

    Raises:
        UsageError: a missing file or an invalid config (the message says which and why).
    """
    from embedding_server.core.config import EmbeddingConfig, GlobalConfig
    from embedding_server.core.errors import ConfigError

    emb = _existing_file(args.embedding_config, "--embedding-config", "PERSIA_EMBEDDING_CONFIG")
    glob = _existing_file(args.global_config, "--global-config", "PERSIA_GLOBAL_CONFIG")
    try:
        EmbeddingConfig.load(emb)
        return emb, glob, GlobalConfig.load(glob)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _registry_address() -> str:
    try:
        return service.get_embedding_worker_services()[0]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run_embedding_worker(args: argparse.Namespace) -> int:
    from persia.registry import RegistryServer

    if _configs_given(args):
        _load_configs(args)
    _check_replica(args.replica_index, args.replica_size)
    service.note_unused_nats_url()
    try:
        server = RegistryServer((args.host, args.port))
    except OSError as exc:
        raise UsageError(f"cannot serve the registry on {args.host}:{args.port}: {exc.strerror or exc}") from None
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _logger.info("received %s, stopping the registry", signal.Signals(signum).name)
        stopping.set()

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, on_signal)
    server.start()
    _logger.info(
        "service registry (embedding worker %d of %d) serving on %s",
        args.replica_index,
        args.replica_size,
        server.address,
    )
    if args.ready_file:
        _write_json(Path(args.ready_file), {"address": server.address, "port": server.port, "pid": os.getpid()})
    stopping.wait()
    server.stop()
    return 0


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _admin_roots(args: argparse.Namespace, global_config: GlobalConfig) -> list[str]:
    if args.admin_root:
        return list(args.admin_root)
    configured = global_config.security.admin_roots
    if configured:
        return list(configured)
    roots = [os.getcwd(), tempfile.gettempdir()]
    checkpoint_dir = os.environ.get("PERSIA_CKPT_DIR", "").strip()
    if checkpoint_dir:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        roots.append(checkpoint_dir)
    return roots


def _advertised(args: argparse.Namespace, port: int) -> str:
    host = args.advertise_host or args.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return _join(host, port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_embedding_parameter_server(args: argparse.Namespace) -> int:
    from embedding_server.rpc.launcher import server_command, wait_serving

    emb, glob, global_config = _load_configs(args)
    _check_replica(args.replica_index, args.replica_size)
    registry = _registry_address()
    service.note_unused_nats_url()
    with tempfile.TemporaryDirectory(prefix="persia-ps-") as tmp, Supervisor("embedding-parameter-server") as sup:
        ready = Path(tmp, "ready.json")
        cmd = server_command(
            emb,
            glob,
            "--shard-index",
            str(args.replica_index),
            "--num-shards",
            str(args.replica_size),
            "--port",
            str(args.port),
            "--host",
            args.host,
            "--ready-file",
            ready,
        )
        for root in _admin_roots(args, global_config):
            cmd += ["--admin-root", root]
        if args.host in _LOOPBACK:
            cmd.append("--allow-unauthenticated-admin")
        sup.start(cmd)
        while not ready.exists():
            code = sup.poll()
            if code is not None:
                _logger.error("the embedding server exited with code %d before serving", code)
                return code
            time.sleep(0.05)
        port = json.loads(ready.read_text())["port"]
        local = _join("127.0.0.1" if args.host in ("0.0.0.0", "::", "localhost") else args.host, port)
        while not sup.stop_requested.is_set():
            try:
                wait_serving(local, timeout=1.0)
                break
            except TimeoutError:
                code = sup.poll()
                if code is not None:
                    return code
        address = _advertised(args, port)
        registering = threading.Thread(
            target=_keep_registered,
            args=(registry, args.replica_index, args.replica_size, address, args.registration_ttl, sup.stop_requested),
            name="persia-register",
            daemon=True,
        )
        if not sup.stop_requested.is_set():
            registering.start()
        code = sup.wait()
        sup.stop_requested.set()
        if registering.is_alive():
            # it deregisters on its way out: wait for that before exiting
            registering.join(timeout=REGISTER_EVERY_S + service.DEREGISTER_TIMEOUT_S + 5.0)
        return code


def _keep_registered(registry: str, index: int, size: int, address: str, ttl: float, stop: threading.Event) -> None:
    """Register the server now and again every :data:`REGISTER_EVERY_S` (or a third of ``ttl``,
    if shorter) until ``stop``, then deregister it (at once when a stop signal sets ``stop``,
    while the server still drains). A registry that is not reachable is retried (logged once per
    outage); on the way out it is logged, not raised."""
    from persia.registry import RegistryClient, RegistryError

    client = RegistryClient(registry)
    every = min(REGISTER_EVERY_S, ttl / 3)
    role = service.EMBEDDING_PARAMETER_SERVER
    reachable: bool | None = None
    while not stop.is_set():
        try:
            client.register(role, index, address, size=size, timeout=REGISTER_EVERY_S, ttl=ttl)
            if not reachable:
                _logger.info(
                    "registered as %s %d of %d at %s with the registry %s", role, index, size, address, registry
                )
            reachable = True
        except (TimeoutError, RegistryError) as exc:
            if reachable is not False:
                _logger.warning("cannot register with the service registry (will keep trying): %s", exc)
            reachable = False
            continue
        stop.wait(every)
    # a registration that failed on its way may still have reached the registry: deregister
    # whenever one was tried (removing only this server's address, never a replacement's)
    if reachable is not None:
        if service.deregister_service(role, index, address, registry=registry):
            _logger.info("deregistered %s %d at %s from the registry %s", role, index, address, registry)


# ------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``persia-launcher`` with ``argv`` (default: the command line); the exit code."""
    level = os.environ.get("LOG_LEVEL", "").strip().upper()
    logging.basicConfig(
        level=level if isinstance(logging.getLevelName(level), int) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"persia-launcher {args.command}: error: {exc}", file=sys.stderr)
        return 2


#: PERSIA's entry point name (its ``persia-launcher`` script calls ``persia.launcher:cli``)
cli = main


if __name__ == "__main__":
    sys.exit(main())
