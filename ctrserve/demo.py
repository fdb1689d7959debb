"""``ctrserve demo``: the whole loop on this machine: train, publish, hot-load, serve fresh predictions.

What runs (every process on 127.0.0.1, all stopped at the end, also on Ctrl-C or SIGTERM):

* a **trainer** (``ctrserve train``, a child process) that keeps training a DLRM on generated
  Criteo-like data, publishes the rows it changes as incremental packets every second and
  exports a dense version every ``--export-every`` steps to the model root (with a full sparse
  checkpoint at its first export);
* ``--shards`` **embedding servers** in infer mode that load the model root's newest checkpoint,
  replay the packets after it and keep following new ones;
* **TorchServe** with the **publisher** (a thread of this process) rolling each new dense version
  in: archive, register, wait READY, set default, retire old versions;
* **clients** streaming gRPC predictions on held-out synthetic rows for ``--duration`` seconds;
* a **freshness probe**: it reads the packets the trainer publishes, picks a few changed rows of
  each and polls the embedding servers until they serve the new value, so "a row the trainer
  changed is served with its new value within N s" is measured end to end.

A live line per second shows requests/s, latency p50/p99, freshness p50/p99 (servers' packet
created→applied, and the probe's created→served), the served model version, the embedding
watermark and the training AUC. At the end: a summary table, ``report.json`` and ``report.png``
(latency and freshness over time) in the work directory. The exit code is 0 only when every
prediction succeeded (and at least one was made).

With ``--storage s3`` the model root is ``s3://ctrserve-demo/demo`` on a throw-away single-node
Ceph cluster (:mod:`ctrserve.ceph_cluster`) that the demo starts and stops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from embedding_server.storage.kinds import StorageKind

log = logging.getLogger("ctrserve.demo")

REPO = Path(__file__).resolve().parent.parent
FEATURES = [f"C{i}" for i in range(1, 27)]
EMBEDDING_DIM = 16
MODEL_NAME = "deepctr"
S3_BUCKET = "ctrserve-demo"
REQUEST_ROWS_START = (1 << 40) + (1 << 30)  # held-out synthetic rows, never trained on
FRESHNESS_GOAL_S = 10.0


# --------------------------------------------------------------------------- command line


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train, publish, hot-load and serve fresh predictions, end to end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of streaming predictions (default 60)")
    p.add_argument("--shards", type=int, default=1, help="embedding server shards in infer mode (default 1)")
    p.add_argument(
        "--storage",
        type=StorageKind,
        choices=[StorageKind.LOCAL, StorageKind.S3],
        default=StorageKind.LOCAL,
        help="model root on the local disk (default) or on a Ceph S3 gateway started for the demo",
    )
    p.add_argument("--workdir", help="configs, logs, model root and the report go here (default: a new temp dir)")
    p.add_argument("--no-live", action="store_true", help="no live view: log lines only")
    p.add_argument("--clients", type=int, default=2, help="client threads streaming predictions (default 2)")
    p.add_argument("--request-rows", type=int, default=64, help="samples per prediction request (default 64)")
    p.add_argument("--batch-size", type=int, default=256, help="training samples per step (default 256)")
    p.add_argument(
        "--export-every",
        type=int,
        default=100,
        help="export a dense version every N training steps (default 100: every few seconds)",
    )
    p.add_argument(
        "--freshness-goal",
        type=float,
        default=FRESHNESS_GOAL_S,
        help=f"seconds within which a changed row must be served (default {FRESHNESS_GOAL_S:g})",
    )
    p.set_defaults(func=run)


@dataclass(frozen=True)
class DemoOptions:
    """The demo's settings (see ``ctrserve demo --help``)."""

    workdir: Path
    duration: float = 60.0
    shards: int = 1
    storage: StorageKind = StorageKind.LOCAL
    live: bool = True
    clients: int = 2
    request_rows: int = 64
    batch_size: int = 256
    export_every: int = 100
    freshness_goal: float = FRESHNESS_GOAL_S

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoOptions:
        workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="ctrserve-demo-"))
        options = cls(
            workdir,
            args.duration,
            args.shards,
            args.storage,
            not args.no_live,
            args.clients,
            args.request_rows,
            args.batch_size,
            args.export_every,
            args.freshness_goal,
        )
        options.validate()
        return options

    def validate(self) -> None:
        from embedding_server.core.errors import ConfigError

        for name in ("shards", "clients", "request_rows", "batch_size", "export_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.duration > 0 or not self.freshness_goal > 0:
            raise ConfigError("demo: --duration and --freshness-goal must be > 0")


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: stop early, clean up, report."""


def run(args: argparse.Namespace) -> int:
    """``ctrserve demo``: run everything, report, stop everything; 0 when no prediction failed."""
    options = DemoOptions.from_args(args)
    options.workdir.mkdir(parents=True, exist_ok=True)
    _quiet_libraries()
    print(f"demo work directory: {options.workdir}", flush=True)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        report = Demo(options).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if report["interrupted"]:
        return 130
    return 0 if report["ok"] else 1


def _raise_interrupted(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
    raise Interrupted(signal.Signals(signum).name)


def _quiet_libraries() -> None:
    for name in ("urllib3", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class DemoFiles:
    """The files the demo writes before starting anything."""

    embedding_config: Path
    trainer_global: Path
    serving_global: Path
    job: Path
    serving_yml: Path
    train_dir: Path


def write_configs(workdir: Path, model_root: str, options: DemoOptions, max_seconds: float) -> DemoFiles:
    """``embedding_config.yml``, the trainer's and the servers' ``global_config.yml`` and ``job.yml``.

    The trainer's store publishes changed rows to ``<model_root>/incremental`` every second; the
    trainer exports every ``export_every`` steps and stops by itself after ``max_seconds`` (a
    safety net should the demo be killed without cleaning up).
    """
    cfg = workdir / "config"
    cfg.mkdir(parents=True, exist_ok=True)
    files = DemoFiles(
        cfg / "embedding_config.yml",
        cfg / "global_config.train.yml",
        cfg / "global_config.infer.yml",
        cfg / "job.yml",
        cfg / "serving.yml",
        workdir / "train",
    )
    _dump(files.embedding_config, {"slots_config": {name: {"dim": EMBEDDING_DIM} for name in FEATURES}})
    capacity = 4_000_000
    _dump(
        files.trainer_global,
        {
            "common_config": {"job_type": "train"},
            "embedding_parameter_server_config": {
                "capacity": capacity,
                "enable_incremental_update": True,
                "incremental_dir": f"{model_root}/incremental",
                "incremental_flush_interval": 1.0,
            },
        },
    )
    _dump(
        files.serving_global,
        {"common_config": {"job_type": "infer"}, "embedding_parameter_server_config": {"capacity": capacity}},
    )
    _dump(
        files.job,
        {
            "embedding_config": str(files.embedding_config),
            "global_config": str(files.trainer_global),
            "data": {"batch_size": options.batch_size, "synthetic": {"seed": 0}},
            "train": {
                "steps": 10_000_000,
                "eval_every": 20,
                "eval_batches": 4,
                "log_every": 10,
                "max_seconds": max_seconds,
            },
            "output": {"dir": str(files.train_dir), "model_root": model_root, "export_every": options.export_every},
        },
    )
    return files


def _dump(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# --------------------------------------------------------------------------- processes


@dataclass
class Started:
    """Every process (group) the demo started, by role: the report lists them and the end
    checks that none is left."""

    pids: dict[str, int] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)

    def alive(self) -> list[str]:
        """Roles whose process or process group still exists (zombies count as gone)."""
        left = [role for role, pid in self.pids.items() if _pid_alive(pid)]
        return left + [f"{role} (group)" for role, pgid in self.groups.items() if _group_alive(pgid)]


def _pid_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group ``pgid``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


class TrainerProcess:
    """``ctrserve train`` as a child in its own session; SIGTERM makes it checkpoint, export and exit."""

    def __init__(self, job: Path, log_path: Path):
        self.log_path = log_path
        cmd = [sys.executable, "-m", "ctrserve", "--log-level", "INFO", "train", "--config", str(job), "--no-progress"]
        # One compute thread: on a small machine serving keeps a core for itself.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self._signalled = False
        with open(log_path, "wb") as out:
            self.process = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        """Raise when the trainer exited (with the end of its log)."""
        if self.process.poll() is not None:
            raise RuntimeError(f"the trainer exited with code {self.process.returncode}:\n{_tail(self.log_path)}")

    def request_stop(self) -> None:
        """SIGTERM, once: a second one could arrive while Python shuts down (default handlers
        restored) and kill it after its clean exit."""
        if not self._signalled and self.process.poll() is None:
            self._signalled = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for its final checkpoint and export, SIGKILL its group after ``timeout``."""
        self.request_stop()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the trainer did not stop within %.0f s; killing it", timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        return self.process.returncode


def _final_json(log_path: Path) -> dict:
    """The JSON result line ``ctrserve train`` prints last ({} when it printed none)."""
    for line in reversed(_tail(log_path, 50).splitlines()):
        if line.startswith('{"steps"'):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return {}


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for(
    what: str,
    condition: Callable[[], bool],
    timeout: float,
    alive: Callable[[], None] = lambda: None,
    interval: float = 0.2,
) -> None:
    """Poll ``condition`` until true; ``alive`` raises when something died meanwhile.

    Raises:
        TimeoutError: not true within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:.0f} s")
        time.sleep(interval)


# --------------------------------------------------------------------------- prediction stream


@dataclass
class Sample:
    """One prediction request: when it ended (seconds since streaming began) and how it went."""

    t: float
    latency_s: float
    ok: bool
    version: int = -1
    watermark: dict = field(default_factory=dict)
    error: str = ""


class PredictionStream:
    """``clients`` threads sending held-out batches over gRPC, back to back, until stopped."""

    def __init__(self, address: str, clients: int, rows: int, seed: int = 0):
        self.address = address
        self.samples: list[Sample] = []
        self.start_time = time.monotonic()
        self._stop = threading.Event()
        self._bodies = request_bodies(rows, seed)
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"demo-client-{i}", daemon=True) for i in range(clients)
        ]

    def start(self) -> PredictionStream:
        self.start_time = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30.0)

    def _loop(self, index: int) -> None:
        from handler.client import PredictionClient, PredictionError

        with PredictionClient(self.address, model_name=MODEL_NAME, timeout=10.0) as client:
            i = index
            while not self._stop.is_set():
                body = self._bodies[i % len(self._bodies)]
                i += len(self._threads)
                began = time.monotonic()
                try:
                    answer = client.predict_full(body)
                    sample = Sample(0.0, 0.0, True, answer.model_version, answer.embedding_watermark)
                except PredictionError as exc:
                    sample = Sample(0.0, 0.0, False, error=str(exc)[:300])
                ended = time.monotonic()
                sample.t, sample.latency_s = ended - self.start_time, ended - began
                self.samples.append(sample)  # list.append is atomic: the monitor reads concurrently


def request_bodies(rows: int, seed: int, count: int = 16) -> list[bytes]:
    """``count`` request batches of ``rows`` held-out synthetic rows each, as batch bytes."""
    from trainer.data import to_batch
    from trainer.synthetic import SyntheticCriteo

    generator = SyntheticCriteo(seed=seed)
    return [to_batch(generator.chunk(rows, start=REQUEST_ROWS_START + i * rows)).to_bytes() for i in range(count)]


# --------------------------------------------------------------------------- freshness probe


@dataclass
class Probe:
    """A row the trainer changed in packet ``seq`` and when the servers were seen serving it."""

    table: str
    table_index: int
    id: int
    shard: str
    seq: int
    created_at: float
    values: list[np.ndarray]  # the packet's value, then newer packets' values of the row
    old_value: np.ndarray | None = None  # the row's value in the shard's previous packet (None: not in it)
    served_at: float | None = None

    @property
    def delay_s(self) -> float | None:
        return None if self.served_at is None else max(0.0, self.served_at - self.created_at)

    @property
    def changed(self) -> bool:
        """The row had another value in the previous packet: the trainer changed it."""
        return self.old_value is not None and not np.array_equal(self.old_value, self.values[0])


def _same(value: np.ndarray, candidates: list[np.ndarray]) -> bool:
    return any(np.array_equal(value, c) for c in candidates)


class FreshnessProbe:
    """Reads every packet the trainer publishes, picks ``rows_per_packet`` of its rows and polls the
    embedding servers until each is served with that value (or a newer packet's value of it).
    Rows that were also in the shard's previous packet, with another value, are preferred: the
    trainer demonstrably changed them, and serving must switch from the old value to the new.

    Args:
        model_root: the model root URL (its ``incremental/`` folder is listed).
        embedding_config: the tables.
        servers: infer-mode embedding server addresses, shard order.
        timeout_s: a probe not served within this many seconds counts as missed.
    """

    def __init__(
        self,
        model_root: str,
        embedding_config: Any,
        servers: list[str],
        rows_per_packet: int = 2,
        timeout_s: float = 30.0,
        seed: int = 0,
    ):
        from embedding_server.rpc.remote import RemoteEmbeddingClient
        from embedding_server.storage.urls import open_storage

        self.storage = open_storage(model_root)
        self.config = embedding_config
        self.client = RemoteEmbeddingClient(embedding_config, servers, timeout=5.0)
        self.rows_per_packet = rows_per_packet
        self.timeout_s = timeout_s
        self.probes: list[Probe] = []
        self.errors = 0
        self._pending: list[Probe] = []
        self._last_seq: dict[str, int] = {}
        self._previous: dict[str, dict[tuple[int, int], np.ndarray]] = {}  # per shard folder: (table, id) -> value
        self._rng = np.random.default_rng(seed)
        self._stopped_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-freshness-probe", daemon=True)

    def start(self) -> FreshnessProbe:
        self._skip_existing()
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._stopped_at is None:
            self._stopped_at = time.time()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30.0)
        self.client.close()

    def served(self) -> list[Probe]:
        return [p for p in self.probes if p.served_at is not None]

    def missed(self) -> list[Probe]:
        """Probes not served within ``timeout_s`` (younger ones still waiting at the end are not counted)."""
        end = self._stopped_at or time.time()
        return [p for p in self.probes if p.served_at is None and end - p.created_at > self.timeout_s]

    def _run(self) -> None:
        next_scan = 0.0
        while not self._stop.wait(0.05):
            try:
                if time.monotonic() >= next_scan:
                    self._scan_packets()
                    next_scan = time.monotonic() + 0.25
                self._check_pending()
            except Exception as exc:  # the probe must never stop the demo; it reports what it missed
                self.errors += 1
                log.debug("freshness probe: %s", exc)

    def _shard_dirs(self) -> list[str]:
        from embedding_server.modelroot.packets import INCREMENTAL_DIR

        if not self.storage.exists(INCREMENTAL_DIR):
            return []
        return [
            f"{INCREMENTAL_DIR}/{name}" for name in self.storage.list_dir(INCREMENTAL_DIR) if name.startswith("shard-")
        ]

    def _new_packets(self, folder: str) -> list[int]:
        from embedding_server.modelroot.packets import parse_packet_name

        seqs = sorted(s for s in map(parse_packet_name, self.storage.list_dir(folder)) if s is not None)
        return [s for s in seqs if s > self._last_seq.get(folder, -1)]

    def _skip_existing(self) -> None:
        """Probe only packets made from now on (older ones are already served)."""
        for folder in self._shard_dirs():
            seqs = self._new_packets(folder)
            if seqs:
                self._last_seq[folder] = seqs[-1]

    def _scan_packets(self) -> None:
        from embedding_server.modelroot.packets import decode_packet, packet_name

        for folder in self._shard_dirs():
            for seq in self._new_packets(folder):
                self._last_seq[folder] = seq
                packet = decode_packet(self.storage.read_bytes(f"{folder}/{packet_name(seq)}"), self.config, folder)
                self._extend_pending(packet)
                self._add_probes(packet, folder)

    def _extend_pending(self, packet: Any) -> None:
        """A newer packet that changed a probed row again: its value counts as served too."""
        for probe in self._pending:
            for rows in packet.tables:
                if rows.table.index == probe.table_index:
                    hit = np.flatnonzero(rows.ids == np.uint64(probe.id))
                    if hit.size:
                        probe.values.append(rows.weights[hit[0]].copy())

    def _add_probes(self, packet: Any, folder: str) -> None:
        previous = self._previous.get(folder, {})
        candidates = [(rows, int(i)) for rows in packet.tables for i in self._rng.permutation(rows.ids.shape[0])[:200]]
        self._rng.shuffle(candidates)

        def was_different(rows: Any, i: int) -> bool:
            old = previous.get((rows.table.index, int(rows.ids[i])))
            return old is not None and not np.array_equal(old, rows.weights[i])

        changed = [(rows, i) for rows, i in candidates if was_different(rows, i)]
        for rows, i in (changed or candidates)[: self.rows_per_packet]:
            old = previous.get((rows.table.index, int(rows.ids[i])))
            # A copy: the value is a view into the previous packet, which it would keep alive.
            old = None if old is None else old.copy()
            probe = Probe(
                rows.table.name,
                rows.table.index,
                int(rows.ids[i]),
                folder.rsplit("/", 1)[-1],
                packet.seq,
                packet.created_at,
                [rows.weights[i].copy()],
                old,
            )
            self.probes.append(probe)
            self._pending.append(probe)
        self._previous[folder] = {
            (rows.table.index, int(key)): value
            for rows in packet.tables
            for key, value in zip(rows.ids.tolist(), rows.weights)
        }

    def _check_pending(self) -> None:
        if not self._pending:
            return
        ids = np.array([p.id for p in self._pending], np.uint64)
        tables = np.array([p.table_index for p in self._pending], np.uint16)
        values = self.client.lookup_rows(ids, tables, EMBEDDING_DIM)
        now = time.time()
        still = []
        for probe, value in zip(self._pending, values):
            if _same(value, probe.values):
                probe.served_at = now
            elif now - probe.created_at < self.timeout_s:
                still.append(probe)
        self._pending = still


# --------------------------------------------------------------------------- live view and report


@dataclass
class Tick:
    """One line of the live view (also a point of the plot)."""

    t: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    failures: int
    model_version: int  # the newest version that answered in this second
    watermark: dict
    server_freshness_p50_s: float
    server_freshness_p99_s: float
    probe_p50_s: float | None  # changed row -> served with its new value, over the run so far
    probe_p99_s: float | None
    train_step: int | None
    train_auc: float | None


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(latencies, q) * 1000) if latencies else float("nan")


def read_training(metrics_path: Path) -> tuple[int | None, float | None]:
    """The trainer's last logged step and held-out AUC from ``metrics.jsonl``."""
    try:
        lines = metrics_path.read_text().splitlines()
    except OSError:
        return None, None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written
        return row.get("step") or row.get("steps"), row.get("eval_auc")
    return None, None


def format_tick(tick: Tick) -> str:
    auc = "-" if tick.train_auc is None else f"{tick.train_auc:.3f}"
    fresh = "-" if tick.probe_p50_s is None else f"p50 {tick.probe_p50_s:.2f}s p99 {tick.probe_p99_s:.2f}s"
    mark = ",".join(f"{k}:{v}" for k, v in sorted(tick.watermark.items())) or "-"
    return (
        f"[{tick.t:4.0f}s] {tick.requests_per_s:5.1f} req/s  p50 {tick.p50_ms:5.1f} ms  p99 {tick.p99_ms:6.1f} ms  "
        f"failed {tick.failures} | model v{tick.model_version}  watermark {mark} | fresh {fresh} "
        f"(servers p99 {tick.server_freshness_p99_s:.2f}s incl. start-up) | step {tick.train_step or '-'} AUC {auc}"
    )


def summarize(
    samples: list[Sample], probe: FreshnessProbe, server_stats: list[dict], duration: float, goal_s: float
) -> dict[str, Any]:
    """Every figure of the run: predictions, versions, freshness (servers' and probe's)."""
    ok = [s for s in samples if s.ok]
    latencies = [s.latency_s for s in ok]
    versions = sorted({s.version for s in ok})
    served, missed = probe.served(), probe.missed()
    delays = [d for p in served if (d := p.delay_s) is not None]  # served probes all have one
    hot = [s.get("hotload") or {} for s in server_stats]
    gaps = _largest_gap(samples)
    return {
        "duration_s": duration,
        "requests": len(samples),
        "failures": len(samples) - len(ok),
        "failure_examples": sorted({s.error for s in samples if not s.ok})[:5],
        "requests_per_s": len(samples) / duration if duration else 0.0,
        "latency_p50_ms": percentile_ms(latencies, 50),
        "latency_p99_ms": percentile_ms(latencies, 99),
        "largest_gap_between_answers_s": gaps,
        "first_answer_s": ok[0].t if ok else None,
        "last_answer_s": ok[-1].t if ok else None,
        "model_versions_served": versions,
        "last_watermark": ok[-1].watermark if ok else {},
        "server_freshness_p50_s": max((h.get("freshness_p50_s", 0.0) for h in hot), default=None),
        "server_freshness_p99_s": max((h.get("freshness_p99_s", 0.0) for h in hot), default=None),
        "packets_applied": [h.get("packets_applied", 0) for h in hot],
        "packets_quarantined": sum(h.get("packets_quarantined", 0) for h in hot),
        "freshness_goal_s": goal_s,
        "probe_rows": len(probe.probes),
        "probe_rows_served": len(served),
        "probe_rows_missed": len(missed),
        "probe_rows_changed": sum(p.changed for p in served),
        "probe_freshness_p50_s": float(np.percentile(delays, 50)) if delays else None,
        "probe_freshness_p99_s": float(np.percentile(delays, 99)) if delays else None,
        "probe_freshness_max_s": max(delays) if delays else None,
        "probe_errors": probe.errors,
        "changed_row_example": _example(served),
    }


def _largest_gap(samples: list[Sample]) -> float | None:
    times = sorted(s.t for s in samples if s.ok)
    return max(np.diff([0.0, *times]).tolist()) if times else None


def _example(served: list[Probe]) -> dict | None:
    changing = [p for p in served if p.changed] or served
    if not changing:
        return None
    p = changing[-1]
    return {
        "table": p.table,
        "id": p.id,
        "packet": f"{p.shard}/{p.seq}",
        "delay_s": p.delay_s,
        "old_value_head": [round(float(x), 5) for x in (p.old_value[:4] if p.old_value is not None else [])],
        "new_value_head": [round(float(x), 5) for x in p.values[0][:4]],
    }


def summary_table(report: dict) -> str:
    """The end-of-run table (Markdown, readable in a terminal too)."""
    f, checks, training = report["figures"], report["checks"], report["training"]

    def num(value: Any, unit: str = "", fmt: str = ".2f") -> str:
        return "-" if value is None else f"{value:{fmt}}{unit}"

    rows = [
        (
            "predictions",
            f"{f['requests']} in {f['duration_s']:.0f} s ({f['requests_per_s']:.1f} req/s), {f['failures']} failed",
        ),
        ("latency p50 / p99", f"{num(f['latency_p50_ms'], ' ms', '.1f')} / {num(f['latency_p99_ms'], ' ms', '.1f')}"),
        ("longest wait between answers", num(f["largest_gap_between_answers_s"], " s")),
        ("model versions served", ", ".join(f"v{v}" for v in f["model_versions_served"]) or "-"),
        ("embedding watermark (last answer)", json.dumps(f["last_watermark"])),
        (
            "freshness, servers (packet made -> applied, incl. start-up replay) p50 / p99",
            f"{num(f['server_freshness_p50_s'], ' s')} / {num(f['server_freshness_p99_s'], ' s')}",
        ),
        (
            "freshness, probe (row changed -> served) p50 / p99 / max",
            " / ".join(num(f[f"probe_freshness_{q}_s"], " s") for q in ("p50", "p99", "max")),
        ),
        (
            "changed rows probed / served / missed",
            f"{f['probe_rows']} / {f['probe_rows_served']} / {f['probe_rows_missed']} "
            f"(with a known previous value: {f['probe_rows_changed']})",
        ),
        ("freshness goal", f"{f['freshness_goal_s']:g} s: {'met' if checks['freshness_within_goal'] else 'MISSED'}"),
        ("training", f"step {training.get('step') or '-'}, held-out AUC {num(training.get('auc'), '', '.4f')}"),
        ("processes left running", ", ".join(report["left_running"]) or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'figure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    return "\n".join(lines + [f"| {k.ljust(width)} | {v} |" for k, v in rows])


def plot(ticks: list[Tick], probes: list[Probe], stream_start_unix: float, path: Path) -> None:
    """Latency (p50/p99 per second) and freshness (servers' p99 and each probed row) over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_fresh) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    t = [k.t for k in ticks]
    ax_lat.plot(t, [k.p50_ms for k in ticks], label="p50")
    ax_lat.plot(t, [k.p99_ms for k in ticks], label="p99")
    for prev, cur in zip(ticks, ticks[1:]):
        if cur.model_version != prev.model_version:
            ax_lat.axvline(cur.t, color="grey", alpha=0.4, linestyle="--")
            ax_lat.annotate(f"v{cur.model_version}", (cur.t, 0), xycoords=("data", "axes fraction"), fontsize=8)
    ax_lat.set(title="gRPC prediction latency (dashed: new model version served)", ylabel="ms")
    served = [
        (p.served_at - stream_start_unix, d) for p in probes if p.served_at is not None and (d := p.delay_s) is not None
    ]
    ax_fresh.scatter(
        [x for x, _ in served],
        [y for _, y in served],
        s=12,
        color="tab:green",
        label="a changed row -> served with its new value",
    )
    for q, style in ((50, "-"), (99, "--")):
        ax_fresh.plot(
            t,
            [_window_percentile(served, k.t, q) for k in ticks],
            style,
            color="tab:blue",
            label=f"p{q} over the last {FRESHNESS_WINDOW_S:.0f} s",
        )
    ax_fresh.set(
        title="freshness of the served embeddings: trainer's packet made -> row served",
        xlabel="seconds since predictions began",
        ylabel="s",
    )
    ax_fresh.set_ylim(bottom=0)
    for ax in (ax_lat, ax_fresh):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


FRESHNESS_WINDOW_S = 10.0


def _window_percentile(points: list[tuple[float, float]], t: float, q: float) -> float:
    """Percentile ``q`` of the values of ``(time, value)`` points in the window ending at ``t``."""
    values = [v for x, v in points if t - FRESHNESS_WINDOW_S < x <= t]
    return float(np.percentile(values, q)) if values else float("nan")


# --------------------------------------------------------------------------- the demo


class Demo:
    """One run of the demo: start everything, stream and watch, report, stop everything."""

    def __init__(self, options: DemoOptions):
        self.options = options
        self.workdir = options.workdir
        self.started = Started()
        self.ticks: list[Tick] = []
        self.model_root = str(self.workdir / "model_root")
        self.interrupted = ""
        self.error = ""
        self.began = time.monotonic()
        self.stream: PredictionStream | None = None
        self.probe: FreshnessProbe | None = None
        self.server_stats: list[dict] = []
        self.stream_start_unix = time.time()

    def say(self, message: str) -> None:
        """A progress line, with the seconds since the demo began."""
        print(f"demo [{time.monotonic() - self.began:5.1f}s] {message}", flush=True)

    def run(self) -> dict[str, Any]:
        """Everything; the report (also written as ``report.json``)."""
        began = self.began = time.monotonic()
        try:
            with contextlib.ExitStack() as stack:
                try:
                    self._run_stack(stack)
                except Interrupted as exc:
                    self.interrupted = str(exc)
                    self.say(f"{exc}: stopping everything")
                except Exception as exc:  # reported (and the exit code says so) after everything is stopped
                    self.error = f"{type(exc).__name__}: {exc}"
                    log.error("demo failed: %s", self.error, exc_info=log.isEnabledFor(logging.DEBUG))
                self.say("stopping every process the demo started ...")
            self.say("stopped")
        except Interrupted as exc:  # a signal during the clean-up: it still ran to the end
            self.interrupted = self.interrupted or str(exc)
        return self._report(self.stream, self.probe, self.server_stats, time.monotonic() - began)

    # -- start-up -----------------------------------------------------------------------------

    def _run_stack(self, stack: contextlib.ExitStack) -> None:
        """Start everything (each stop registered on ``stack`` as soon as it started), stream
        for ``duration`` seconds, then ask the trainer to finish."""
        opts = self.options
        if opts.storage is StorageKind.S3:
            self._start_ceph(stack)
        files = write_configs(self.workdir, self.model_root, opts, max_seconds=opts.duration + 600)
        self.files = files
        trainer = self._start_trainer(stack, files)
        torchserve = self._start_torchserve_async(stack)
        group = self._start_servers(stack, files, trainer)
        files.serving_yml.write_text(yaml.safe_dump({"embedding_servers": group.addresses, "embedding_timeout_s": 5.0}))
        ts = torchserve()
        self._start_publisher(stack, ts, files)
        self._wait_first_version(ts, trainer)
        from embedding_server.core.config import EmbeddingConfig

        emb = EmbeddingConfig.load(files.embedding_config)
        self.probe = probe = FreshnessProbe(
            self.model_root, emb, group.addresses, timeout_s=opts.freshness_goal
        ).start()
        stack.callback(probe.stop)
        self.stream = stream = PredictionStream(ts.grpc_inference_url, opts.clients, opts.request_rows).start()
        stack.callback(stream.stop)
        self.stream_start_unix = time.time()
        self.say(
            f"streaming predictions for {opts.duration:.0f} s ({opts.clients} gRPC clients, "
            f"{opts.request_rows} rows per request) ..."
        )
        self._watch(stream, probe, group, trainer)
        stream.stop()
        trainer.request_stop()  # it checkpoints and exports while the rest is stopped

    def _start_ceph(self, stack: contextlib.ExitStack) -> None:
        from ctrserve import ceph_cluster as cluster_module

        self.say("starting a single-node Ceph cluster with its S3 gateway ...")
        cluster = cluster_module.CephCluster.start(self.workdir / "ceph", die_with_parent=True)
        stack.callback(cluster.stop)
        self.started.pids.update({f"ceph-{name}": pid for name, pid in cluster.pids.items()})
        cluster.create_bucket(S3_BUCKET)
        os.environ.update(cluster.env())  # this process (publisher, probe) and every child started later
        self.model_root = f"s3://{S3_BUCKET}/demo"
        self.say(f"  S3 gateway {cluster.endpoint}; model root {self.model_root}")

    def _start_trainer(self, stack: contextlib.ExitStack, files: DemoFiles) -> TrainerProcess:
        self.say(f"starting the trainer (model root {self.model_root}; log {self.workdir / 'trainer.log'}) ...")
        trainer = TrainerProcess(files.job, self.workdir / "trainer.log")
        stack.callback(self._stop_trainer, trainer)
        self.started.pids["trainer"] = trainer.pid
        self.started.groups["trainer"] = trainer.pid
        return trainer

    def _stop_trainer(self, trainer: TrainerProcess) -> None:
        code = trainer.stop()
        self.trainer_exit = code
        self.trainer_result = _final_json(trainer.log_path)

    def _start_torchserve_async(self, stack: contextlib.ExitStack) -> Callable[[], Any]:
        """Start TorchServe in a thread (it takes several seconds) while the rest starts; the
        returned function waits for it."""
        from archiver.torchserve import TorchServeProcess

        store = self.workdir / "model_store"
        store.mkdir(exist_ok=True)
        box: dict[str, Any] = {}

        def start() -> None:
            try:
                box["ts"] = TorchServeProcess.start(store, self.workdir / "torchserve", timeout=180.0)
                self.started.groups["torchserve"] = box["ts"].process.pid
            except BaseException as exc:  # handed to the main thread
                box["error"] = exc

        thread = threading.Thread(target=start, name="demo-torchserve-start", daemon=True)
        thread.start()
        self.say("starting TorchServe ...")

        def stop() -> None:
            thread.join()
            if "ts" in box:
                box["ts"].stop()

        stack.callback(stop)

        def wait() -> Any:
            wait_for("TorchServe start", lambda: not thread.is_alive(), 200.0, interval=0.1)
            if "error" in box:
                raise RuntimeError(f"TorchServe did not start: {box['error']}")
            ts = box["ts"]
            self.say(f"  TorchServe ready: gRPC {ts.grpc_inference_url}, management {ts.management_url}")
            return ts

        return wait

    def _start_servers(self, stack: contextlib.ExitStack, files: DemoFiles, trainer: TrainerProcess) -> Any:
        from embedding_server.core.config import JobType
        from embedding_server.modelroot.incremental import complete_checkpoints
        from embedding_server.rpc.launcher import ServerGroup

        self.say("waiting for the trainer's first export (dense version + full sparse checkpoint) ...")
        wait_for(
            "the first sparse checkpoint",
            lambda: bool(complete_checkpoints(self.model_root)),
            300.0,
            alive=trainer.check_alive,
            interval=0.25,
        )
        n = self.options.shards
        self.say(f"starting {n} embedding server shard(s) in infer mode on the model root ...")
        extra = ["--model-root", self.model_root, "--poll-interval", "0.25"]
        group = ServerGroup.start(
            files.embedding_config,
            files.serving_global,
            n,
            self.workdir / "embedding",
            mode=JobType.INFER,
            metrics=True,
            extra_args=extra,
            timeout=180.0,
        )
        stack.callback(group.stop)
        for i, server in enumerate(group.servers):
            self.started.pids[f"embedding-shard-{i}"] = server.process.pid
            self.started.groups[f"embedding-shard-{i}"] = server.process.pid
            self.say(f"  shard {i}: {server.address}  metrics http://127.0.0.1:{server.metrics_port}/metrics")
        return group

    def _start_publisher(self, stack: contextlib.ExitStack, ts: Any, files: DemoFiles) -> None:
        from archiver.publish import Publisher, PublishSettings

        settings = PublishSettings(
            self.model_root,
            str(self.workdir / "model_store"),
            name=MODEL_NAME,
            serving_config=str(files.serving_yml),
            keep=2,
            drain_s=1.0,
            poll_s=0.5,
        )
        management = ts.management()
        stop = threading.Event()
        thread = threading.Thread(
            target=Publisher(management, settings).watch, args=(stop,), name="demo-publisher", daemon=True
        )
        thread.start()

        def halt() -> None:
            stop.set()
            thread.join(5.0)
            if thread.is_alive():  # mid-publish (waiting for a new worker): TorchServe stops under it
                log.info("the publisher is busy publishing a version; stopping TorchServe under it")
                logging.getLogger("ctrserve.publish").setLevel(logging.CRITICAL)

        stack.callback(halt)
        self.management = ts.management()
        stack.callback(self.management.close)
        self.say("publisher watching the model root: each new dense version is archived, registered and made default")

    def _wait_first_version(self, ts: Any, trainer: TrainerProcess) -> None:
        """Until the first version is registered, READY and has answered one (warm-up) request."""
        from handler.client import PredictionClient, PredictionError

        def alive() -> None:
            trainer.check_alive()
            if ts.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited with code {ts.process.returncode}:\n{ts.log_tail()}")

        wait_for(
            "the first model version registered",
            lambda: bool(self.management.versions(MODEL_NAME)),
            300.0,
            alive=alive,
            interval=0.25,
        )
        self.management.wait_ready(MODEL_NAME, None, 120.0, alive=alive)
        body = request_bodies(self.options.request_rows, seed=1, count=1)[0]
        with PredictionClient(ts.grpc_inference_url, model_name=MODEL_NAME, timeout=30.0) as client:

            def answers() -> bool:
                try:
                    client.predict(body)
                    return True
                except PredictionError as exc:
                    log.info("warm-up request: %s", exc)
                    return False

            wait_for("the first prediction", answers, 120.0, alive=alive, interval=0.5)
        self.say(f"  model {MODEL_NAME} v{self.management.default_version(MODEL_NAME)} answers predictions")

    # -- watching -----------------------------------------------------------------------------

    def _watch(self, stream: PredictionStream, probe: FreshnessProbe, group: Any, trainer: TrainerProcess) -> None:
        """The live view, one line a second until ``duration`` is over (keeps the servers' last stats)."""
        from embedding_server.core.config import EmbeddingConfig
        from embedding_server.rpc.remote import RemoteEmbeddingClient

        seen = 0
        with RemoteEmbeddingClient(EmbeddingConfig.load(self.files.embedding_config), group.addresses) as admin:
            next_tick = time.monotonic() + 1.0
            while True:
                time.sleep(max(0.0, next_tick - time.monotonic()))
                now = time.monotonic() - stream.start_time
                trainer.check_alive()
                stats = self.server_stats = admin.stats()
                window = stream.samples[seen:]
                seen += len(window)
                tick = self._tick(now, window, stream.samples, probe, stats)
                self.ticks.append(tick)
                self._show(tick)
                if now >= self.options.duration:
                    return
                next_tick += 1.0

    def _tick(
        self, now: float, window: list[Sample], samples: list[Sample], probe: FreshnessProbe, stats: list[dict]
    ) -> Tick:
        """The figures of the second that ended at ``now`` (``window``: its samples)."""
        previous = self.ticks[-1] if self.ticks else None
        span = now - (previous.t if previous else 0.0)
        latencies = [s.latency_s for s in window if s.ok]
        hot = [s.get("hotload") or {} for s in stats]
        delays = [d for p in probe.served() if (d := p.delay_s) is not None]
        step, auc = read_training(self.files.train_dir / "metrics.jsonl")
        return Tick(
            t=now,
            requests_per_s=len(window) / span if span > 0 else 0.0,
            p50_ms=percentile_ms(latencies, 50),
            p99_ms=percentile_ms(latencies, 99),
            failures=sum(not s.ok for s in samples),
            model_version=max((s.version for s in window if s.ok), default=previous.model_version if previous else -1),
            watermark={k: v for s in stats for k, v in (s.get("watermark") or {}).items()},
            server_freshness_p50_s=max((h.get("freshness_p50_s", 0.0) for h in hot), default=0.0),
            server_freshness_p99_s=max((h.get("freshness_p99_s", 0.0) for h in hot), default=0.0),
            probe_p50_s=float(np.percentile(delays, 50)) if delays else None,
            probe_p99_s=float(np.percentile(delays, 99)) if delays else None,
            train_step=step,
            train_auc=auc,
        )

    def _show(self, tick: Tick) -> None:
        line = format_tick(tick)
        if self.options.live and sys.stdout.isatty():
            from tqdm import tqdm

            tqdm.write(line)
        else:
            print(line, flush=True)

    # -- the end ------------------------------------------------------------------------------

    def _report(
        self, stream: PredictionStream | None, probe: FreshnessProbe | None, stats: list[dict], elapsed: float
    ) -> dict[str, Any]:
        samples = stream.samples if stream else []
        duration = self.ticks[-1].t if self.ticks else 0.0
        figures = summarize(samples, probe, stats, duration, self.options.freshness_goal) if probe else {}
        left = self._left_running()
        result = getattr(self, "trainer_result", {})
        step, auc = read_training(self.workdir / "train" / "metrics.jsonl")
        checks = self._checks(figures, left)
        essential = ("ran_to_the_end", "no_failed_prediction", "nothing_left_running")
        report = {
            "ok": all(checks[name] for name in essential),  # the exit code; the other checks are shown
            "checks": checks,
            "interrupted": self.interrupted,
            "error": self.error,
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.options).items()},
            "model_root": self.model_root,
            "elapsed_s": elapsed,
            "figures": figures,
            "training": {
                "step": result.get("steps", step),
                "auc": result.get("eval_auc", auc),
                "exported_versions": result.get("exported_versions"),
                "exit_code": getattr(self, "trainer_exit", None),
            },
            "processes": {"pids": self.started.pids, "process_groups": self.started.groups},
            "left_running": left,
            "timeline": [asdict(t) for t in self.ticks],
        }
        report_path, png_path = self.workdir / "report.json", self.workdir / "report.png"
        report["plot"] = str(png_path)
        if self.ticks and probe is not None:
            plot(self.ticks, probe.probes, self.stream_start_unix, png_path)
        report_path.write_text(json.dumps(report, indent=2, default=_json_default))
        if figures:
            print("\n" + summary_table(report), flush=True)
        print(f"\nreport: {report_path}\nplot:   {png_path if png_path.exists() else '(none)'}", flush=True)
        verdict = "OK" if report["ok"] else f"FAILED checks: {', '.join(k for k, v in checks.items() if not v)}"
        print(f"demo {verdict}", flush=True)
        return report

    def _left_running(self) -> list[str]:
        """Roles still alive after the clean-up, after a short grace for exits in progress."""
        deadline = time.monotonic() + 5.0
        while self.started.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.started.alive()

    def _checks(self, figures: dict, left: list[str]) -> dict[str, bool]:
        f = figures
        p99 = f.get("probe_freshness_p99_s")
        fresh = p99 is not None and p99 <= self.options.freshness_goal and f.get("probe_rows_missed", 1) == 0
        return {
            "ran_to_the_end": not self.interrupted and not self.error,
            "predictions_made": f.get("requests", 0) > 0,
            "no_failed_prediction": f.get("requests", 0) > 0 and f.get("failures", 1) == 0,
            "model_version_advanced": len(f.get("model_versions_served", [])) >= 2,
            "changed_row_served": f.get("probe_rows_served", 0) > 0,
            "freshness_within_goal": fresh,
            "nothing_left_running": not left,
        }


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
