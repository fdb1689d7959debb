"""A throw-away single-node Ceph cluster with its S3 gateway (RADOS Gateway) on loopback.

For tests, CI and the demo: one monitor, one OSD on ``memstore`` (data in RAM) and one
``radosgw``, every file (config, data, logs, sockets, pid files) inside one directory, ports
picked free on 127.0.0.1. It starts in seconds (data in RAM) and needs no manager daemon, no
systemd and no authentication set-up (``auth ... required = none``); S3 requests are still
signed and checked against the S3 user it creates.

Library use (the pytest fixture in ``tests/conftest.py`` does this)::

    cluster = CephCluster.start("/tmp/ceph-xyz")
    cluster.create_bucket("models")
    print(cluster.endpoint, cluster.access_key, cluster.secret_key)
    cluster.stop()

Command line (the demo and manual runs; daemons outlive the command until ``stop``)::

    python -m ctrserve.ceph_cluster start --dir /tmp/ceph --bucket models   # prints export lines
    python -m ctrserve.ceph_cluster stop --dir /tmp/ceph

``start`` prints ``export CTRSERVE_S3_ENDPOINT=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...``
(the variables :mod:`embedding_server.storage.base` reads) and writes them to ``<dir>/s3.env`` too.

Requires the Debian/Ubuntu packages ``ceph-mon ceph-osd radosgw ceph-common`` (see
:data:`INSTALL_HINT`); only the standard library, except :meth:`CephCluster.create_bucket`,
which uses pyarrow.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

REQUIRED_BINARIES = ("monmaptool", "ceph-mon", "ceph-osd", "ceph", "radosgw", "radosgw-admin")
INSTALL_HINT = (
    "install Ceph's daemons: `sudo apt-get install -y ceph-mon ceph-osd radosgw ceph-common uuid-runtime` "
    "(Debian/Ubuntu; or run deploy/ceph/install.sh, which .ci/run does)"
)
STATE_FILE = "cluster.json"
ENV_FILE = "s3.env"
DEFAULT_ACCESS_KEY = "CTRSERVETESTKEY00001"
DEFAULT_SECRET_KEY = "ctrserve-test-secret-key-0000000000000001"


class CephError(RuntimeError):
    """The cluster could not be started (the message says which step and where its log is)."""


def missing_binaries() -> list[str]:
    """The Ceph programs this module needs that are not on ``PATH``."""
    return [name for name in REQUIRED_BINARIES if shutil.which(name) is None]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:  # all bound at once, so the kernel cannot hand out one port twice
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _ceph_conf(root: Path, fsid: str, mon_port: int, rgw_port: int, memstore_bytes: int) -> str:
    """ceph.conf for one mon, one memstore OSD and one gateway, all state under ``root``.

    Each setting is explained in ../../shared/notes/ceph.md (why it is needed on one node).
    """
    return f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
public addr = 127.0.0.1
ms bind msgr1 = false
ms mon client mode = crc
auth cluster required = none
auth service required = none
auth client required = none
keyring = {root}/keyring
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
paxos propose interval = 0.1
mon data avail crit = 1
mon data avail warn = 2
run dir = {root}/run
admin socket = {root}/run/$cluster-$name.asok
pid file = {root}/run/$cluster-$name.pid
log file = {root}/log/$cluster-$name.log
mon cluster log file = {root}/log/cluster.log
mon data = {root}/mon/$cluster-$id
osd data = {root}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
rgw data = {root}/rgw
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
rgw gc obj min wait = 10
rgw gc processor period = 10
"""


@dataclass
class CephCluster:
    """A running (or stopped) cluster started by :meth:`start`; its state lives in ``root``."""

    root: str
    endpoint: str
    access_key: str
    secret_key: str
    pids: dict[str, int] = field(default_factory=dict)
    die_with_parent: bool = False

    @classmethod
    def start(
        cls,
        root: str | os.PathLike,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        memstore_bytes: int = 2 << 30,
        timeout_s: float = 60.0,
        die_with_parent: bool = False,
    ) -> CephCluster:
        """Create and start a cluster in the (new or empty) directory ``root``.

        Args:
            root: directory for all state; created if missing, must be empty.
            access_key: S3 access key of the user created on the gateway.
            secret_key: its secret key.
            memstore_bytes: RAM the OSD may use for object data. Overwritten and deleted
                objects hold theirs until the gateway's garbage collection (10 s or more
                later); when the OSD is full, S3 requests stall until they time out.
            timeout_s: how long to wait for each daemon to become ready.
            die_with_parent: have the kernel SIGKILL the daemons if the calling process dies
                without stopping them (Linux; for test fixtures). Off for the command line,
                whose daemons must outlive it.

        Returns:
            The running cluster; call :meth:`stop` when done.

        Raises:
            CephError: the binaries are missing, ``root`` is not empty, or a step failed or
                timed out (everything started so far is stopped again).
        """
        missing = missing_binaries()
        if missing:
            raise CephError(f"Ceph programs not found on PATH: {', '.join(missing)}; {INSTALL_HINT}")
        path = Path(root).resolve()
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise CephError(f"{path}: not empty; a cluster needs a fresh directory")
        for sub in ("run", "log", "mon", "osd/ceph-0", "rgw"):
            (path / sub).mkdir(parents=True)
        mon_port, rgw_port = free_ports(2)
        (path / "keyring").touch()
        conf = path / "ceph.conf"
        conf.write_text(_ceph_conf(path, str(uuid.uuid4()), mon_port, rgw_port, memstore_bytes))
        cluster = cls(
            str(path), f"http://127.0.0.1:{rgw_port}", access_key, secret_key, die_with_parent=die_with_parent
        )
        try:
            cluster._bootstrap(mon_port, timeout_s)
        except BaseException:
            cluster.stop()
            raise
        cluster._save()
        return cluster

    @classmethod
    def attach(cls, root: str | os.PathLike) -> CephCluster:
        """The cluster a previous :meth:`start` left in ``root`` (to stop it from another process).

        Raises:
            CephError: ``root`` holds no started cluster.
        """
        state = Path(root).resolve() / STATE_FILE
        try:
            return cls(**json.loads(state.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise CephError(f"{state}: no cluster state to attach to ({exc})") from None

    @property
    def conf(self) -> str:
        return str(Path(self.root) / "ceph.conf")

    def env(self) -> dict[str, str]:
        """Environment variables that point ``embedding_server.storage.base`` at this gateway."""
        return {
            "CTRSERVE_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` on the gateway (uses pyarrow's S3 client)."""
        os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")
        os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "WHEN_REQUIRED")
        from pyarrow import fs

        s3 = fs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            endpoint_override=self.endpoint.split("://", 1)[1],
            scheme="http",
            allow_bucket_creation=True,
        )
        s3.create_dir(name)

    def stop(self, grace_s: float = 1.5) -> None:
        """Stop every daemon: SIGTERM, then SIGKILL for those still alive after ``grace_s``.

        Only processes this cluster started are signalled (each pid is checked to still be a
        Ceph program whose command line names this cluster's config). Idempotent.
        """
        alive = {name: pid for name, pid in self.pids.items() if self._is_ours(pid)}
        for pid in alive.values():
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = {name: pid for name, pid in alive.items() if self._is_ours(pid)}
        for pid in alive.values():
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while alive and time.monotonic() < deadline:
            time.sleep(0.02)
            alive = {name: pid for name, pid in alive.items() if self._is_ours(pid)}
        self.pids = {}
        self._save()

    # -- start-up steps ------------------------------------------------------------------------

    def _bootstrap(self, mon_port: int, timeout_s: float) -> None:
        root = Path(self.root)
        monmap = root / "monmap"
        self._run(
            ["monmaptool", "--create", "--fsid", self._fsid(), "--addv", "a", f"[v2:127.0.0.1:{mon_port}]", str(monmap)]
        )
        self._run(["ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap)])
        self._spawn("mon", ["ceph-mon", "-f", "-i", "a"])
        osd_uuid = str(uuid.uuid4())
        osd_id = self._run(["ceph", "osd", "new", osd_uuid], timeout_s=timeout_s).strip()
        if osd_id != "0":
            raise CephError(f"`ceph osd new` returned id {osd_id!r}, expected 0 on a fresh cluster")
        self._run(["ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid])
        self._spawn("osd", ["ceph-osd", "-f", "-i", "0"])
        self._spawn("rgw", ["radosgw", "-f", "-n", "client.rgw.gw"])
        self._run(
            [
                "radosgw-admin",
                "user",
                "create",
                "--uid=ctrserve",
                "--display-name=ctrserve tests",
                f"--access-key={self.access_key}",
                f"--secret-key={self.secret_key}",
            ],
            timeout_s=timeout_s,
        )
        self._wait_for_gateway(timeout_s)

    def _fsid(self) -> str:
        for line in Path(self.conf).read_text().splitlines():
            if line.startswith("fsid = "):
                return line.split("=", 1)[1].strip()
        raise CephError(f"{self.conf}: no fsid")

    def _run(self, argv: list[str], timeout_s: float = 30.0) -> str:
        """Run a Ceph tool to completion against this cluster's config; its stdout."""
        cmd = [argv[0], "-c", self.conf, *argv[1:]]
        try:
            done = subprocess.run(
                self._with_death_signal(cmd),
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise CephError(f"`{' '.join(cmd)}` did not finish in {timeout_s:.0f} s; logs in {self.root}/log") from None
        if done.returncode != 0:
            raise CephError(
                f"`{' '.join(cmd)}` failed with exit status {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-2000:]}; logs in {self.root}/log"
            )
        return done.stdout

    def _spawn(self, name: str, argv: list[str]) -> None:
        """Start a daemon in the foreground mode (-f) as a child in its own session."""
        log = open(Path(self.root) / "log" / f"{name}.stdout", "wb")
        with log:
            proc = subprocess.Popen(
                self._with_death_signal([argv[0], "-c", self.conf, *argv[1:]]),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pids[name] = proc.pid
        self._save()

    def _wait_for_gateway(self, timeout_s: float) -> None:
        """Poll the S3 endpoint until it answers HTTP (any status) or time runs out."""
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            for name, pid in self.pids.items():
                if not self._is_ours(pid):
                    raise CephError(f"{name} daemon (pid {pid}) exited during start-up; see {self.root}/log")
            try:
                with urllib.request.urlopen(self.endpoint, timeout=1.0) as answer:
                    headers = answer.headers
            except urllib.error.HTTPError as answer:  # e.g. 403 for an anonymous request
                headers = answer.headers
            except (OSError, http.client.HTTPException) as exc:  # not up yet (or not HTTP)
                last = str(exc)
                time.sleep(0.05)
                continue
            if "x-amz-request-id" not in headers:  # some other HTTP server holds the port
                raise CephError(f"{self.endpoint} answers HTTP, but not as an S3 gateway; logs in {self.root}/log")
            return
        raise CephError(
            f"S3 gateway at {self.endpoint} not ready after {timeout_s:.0f} s ({last}); logs in {self.root}/log"
        )

    def _is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is alive and still a daemon of this cluster (not a reused pid)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        if "\nState:\tZ" in status:
            try:
                os.waitpid(pid, os.WNOHANG)  # reap our own zombie child
            except ChildProcessError:
                pass
            return False
        return self.conf.encode() in cmdline

    def _with_death_signal(self, cmd: list[str]) -> list[str]:
        """``cmd`` run through ``setpriv --pdeathsig KILL`` when the daemons must die with this
        process. setpriv (util-linux) sets the signal and execs the tool, so the child runs no
        Python between fork and exec: a ``preexec_fn`` would, and in a process whose gRPC
        threads are running that child can abort in gRPC's fork handlers."""
        if not self.die_with_parent:
            return cmd
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise CephError("die_with_parent needs util-linux's setpriv on the PATH (apt-get install util-linux)")
        return [setpriv, "--pdeathsig", "KILL", *cmd]

    def _save(self) -> None:
        Path(self.root, STATE_FILE).write_text(json.dumps(asdict(self), indent=2))
        exports = "".join(f"export {k}={v}\n" for k, v in self.env().items())
        Path(self.root, ENV_FILE).write_text(exports)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a cluster in a fresh directory and print S3 export lines")
    start.add_argument("--dir", required=True, help="directory for all cluster state (must be empty)")
    start.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    stop = sub.add_parser("stop", help="stop the cluster started in --dir")
    stop.add_argument("--dir", required=True)
    stop.add_argument("--remove", action="store_true", help="delete the directory afterwards")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            began = time.monotonic()
            cluster = CephCluster.start(args.dir)
            for bucket in args.bucket:
                cluster.create_bucket(bucket)
            print(Path(cluster.root, ENV_FILE).read_text(), end="")
            print(
                f"# ceph S3 gateway ready in {time.monotonic() - began:.1f} s; stop with: "
                f"{sys.argv[0]} stop --dir {cluster.root}",
                file=sys.stderr,
            )
        else:
            CephCluster.attach(args.dir).stop()
            if args.remove:
                shutil.rmtree(args.dir, ignore_errors=True)
    except CephError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
