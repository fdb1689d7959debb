"""Chaos: N minutes of the real loop (trainer, model root, hot-loading replicas, TorchServe with the
publisher) while processes are SIGKILLed and outside tools write into the model root; then checks
that no published packet was lost and that every replica holds the same rows. Not part of the
test suite.

    python benchmarks/chaos.py [--minutes 5] [--seed 0] [--workdir DIR]
    python benchmarks/chaos.py --quick          # 1.5 minutes of chaos
    python benchmarks/chaos.py --skip kill_trainer   # every kind of event but one (to tell which fails)

``--minutes`` is the chaos itself; starting (TorchServe, the first checkpoint and version) and the
end (the trainer's clean finish, catching up, the fresh replica, the dumps) add a minute or two,
each wait bounded.

What runs, on 127.0.0.1 only, each process in its own process group (all stopped at the end, also
on Ctrl-C, SIGTERM or an exception), in a work directory (default: a new temporary one):

* the **trainer**: ``ctrserve train`` (the demo's job: DLRM on generated data) with 2 in-process
  training shards, so the model root gets 2 packet streams; packets every second, a training
  checkpoint every ``--checkpoint-every`` steps (``output.dir/checkpoint``), a dense version every
  ``--export-every`` steps and a full sparse checkpoint every ``--sparse-checkpoint-every`` steps,
  ``keep_checkpoints`` ``--keep-checkpoints``;
* 2 **infer-mode embedding-server replicas** of 1 serving shard following the model root
  (``ServerGroup.start(..., replicas=2)``);
* **TorchServe** (local config), started once, and ``ctrserve publish --watch`` rolling each dense
  version in; the archives' serving.yml lists both replicas (the PersiaHandler reads from them).

Chaos, at times drawn from ``--seed`` (at least one event of each kind):

* ``kill_trainer``: SIGKILL to the trainer's process group; restarted after a short delay with
  ``resume_from`` its newest training checkpoint (from scratch only when none exists yet);
* ``kill_replica``: SIGKILL to one replica; restarted on its port after a short delay;
* ``kill_publisher``: SIGKILL to ``ctrserve publish --watch``; restarted after a short delay;
* ``rewrite_packet``: an existing packet (mostly the newest, or one above the newest checkpoint,
  which a starting replica replays) rewritten in place in two halves with a pause, as an outside
  tool's slow copy does (only ever with the packet's own bytes, never creating a file); also, half
  of the time, just before a killed replica starts again, with a pause (3-8 s) that lasts into its
  start-up replay;
* ``odd_names``: names readers must ignore in a listed folder (the model root, ``incremental/``,
  each ``shard-*`` folder, ``checkpoints/``, ``dense/``): digits of other scripts
  (``0000000000000000000².arrow``, ``shard-²-of-00002``, ``v0000000٣``), other lengths and
  temporary-looking names;
* ``special_files``: FIFOs and symbolic links to ``/dev/zero`` and to files and folders outside the
  model root, under names that are not valid packet, shard, checkpoint or version names;
* ``retain``: ``retain(model_root, keep=1 or 2)`` at random moments, racing the trainer's own
  checkpoints and retention.

Nothing is ever written under a valid packet, checkpoint or version name: that would be an attack
needing an operator's skip, not the data loss this script looks for. Every folder listed gets odd
names and special files once when the chaos starts.

Then the chaos stops, the trainer is asked to finish (SIGTERM: last packets, checkpoint and dense
version published), every replica must reach the last seq of every training shard, and a fresh
replica is started (newest checkpoint, then packets). Reported per training shard: packets
published (``last-seq.json``; seqs are contiguous from 0), which seqs were observed (inotify on the
model root plus a listing every 0.25 s, every packet's run id read from its metadata), the trainer
runs and where each started; per replica: watermarks, skipped seqs, quarantined and held packets
(Stats RPC) and a SHA-256 over its rows sorted by (table, id) (admin Dump RPC into its admin root);
the same for the fresh replica and for the trainer's final checkpoint; and whether TorchServe's
default version is the newest dense version exported. ``lost`` (published seqs a replica did not
apply, skipped ones included) and ``divergent`` (replicas whose rows differ from the fresh
replica's) must be 0.

Progress lines say what was killed or written when; the last line is one JSON object with every
figure and ``"ok"``. Exit status 0 when ok, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import heapq
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctrserve import demo  # noqa: E402
from embedding_server.core.config import EmbeddingConfig, JobType  # noqa: E402
from embedding_server.core.model_spec import SPEC_FILE, list_versions, version_dir  # noqa: E402
from embedding_server.modelroot.incremental import complete_checkpoints, retain  # noqa: E402
from embedding_server.modelroot.packets import (  # noqa: E402
    CHECKPOINTS_DIR,
    INCREMENTAL_DIR,
    LAST_SEQ_FILE,
    PacketError,
    decode_last_seq,
    packet_dir,
    packet_name,
    parse_checkpoint_name,
    parse_packet_name,
    parse_shard_dir,
    read_packet_origin,
)
from embedding_server.rpc.launcher import ServerGroup, ctrserve_command  # noqa: E402
from embedding_server.storage.urls import open_storage  # noqa: E402

log = logging.getLogger("chaos")

TRAINING_SHARDS = 2
REPLICAS = 2
MODEL_NAME = demo.MODEL_NAME
DENSE_DIR = "dense"

#: kind -> (mean seconds between events, least seconds between two of them)
RATES: dict[str, tuple[float, float]] = {
    "kill_trainer": (40.0, 20.0),
    "kill_replica": (15.0, 6.0),
    "kill_publisher": (20.0, 8.0),
    "rewrite_packet": (6.0, 1.0),
    "odd_names": (8.0, 1.0),
    "special_files": (12.0, 1.0),
    "retain": (4.0, 0.5),
}
#: kind -> (least, most) seconds before the killed process is started again
RESTART_DELAY_S = {"kill_trainer": (0.5, 3.0), "kill_replica": (0.5, 5.0), "kill_publisher": (0.5, 3.0)}

#: what the logs of the replicas, the publisher and the trainer runs are searched for (counts per log)
LOG_PATTERNS = {
    "packet_unreadable_retried": "cannot be read: ",
    "packet_declared_bad": "still cannot be read after",
    "caught_up_from_checkpoint": "caught up from checkpoint",
    "gap_alarm": "still missing after",
    "foreign_run_packet": "appeared at or below the watermark",
    "checkpoint_not_loadable": "cannot be loaded",
    "odd_name_ignored": "ignoring '",
    "publishing_failed": "publishing failed",
    "traceback": "Traceback (most recent call last)",
}

WHAT_CANNOT_BE_OBSERVED = [
    "a packet is seen when its name appears (inotify on the model root, plus a listing every 0.25 s); a seq "
    "published and deleted by retention unseen by both (an inotify queue overflow, or a shard folder whose "
    "watch was not yet added, together with a deletion between two listings) shows as never observed; such "
    "a seq at or below a checkpoint watermark that was observed is reported as 'unverifiable', above every "
    "observed watermark it counts as a skip",
    "the run id of a packet that retention deleted before it was read is unknown ('run_id_unknown'); such a "
    "packet is counted as observed but not attributed to a trainer run",
    "the trainer holds no seq in memory that is not on storage: a seq is published when its file appears; a "
    "SIGKILL between a packet's rename and its last-seq.json marker leaves the marker one behind, which the "
    "next run's start (max of listed packets, marker, checkpoint watermark) covers",
    "content: packets rewritten in place get their own bytes back, so the digests check the replicas' rows; "
    "rows are compared by a full Dump of each replica, not by sampling",
]


# --------------------------------------------------------------------------- the schedule


@dataclass(order=True)
class Event:
    """Something to do ``t`` seconds after the chaos began."""

    t: float
    order: int
    kind: str = field(compare=False)
    delay: float = field(default=0.0, compare=False)  # kills: seconds until the restart
    target: int = field(default=-1, compare=False)  # restarts: which replica


def schedule(seed: int, duration: float, skip: tuple[str, ...] = ()) -> list[Event]:
    """The chaos events of a run: for each kind, exponential gaps (at least the kind's least gap)
    from a few seconds in until a few seconds before the end; at least one of each kind but those
    in ``skip``."""
    rng = random.Random(seed)
    start, end = min(5.0, duration / 10), duration - min(8.0, duration / 8)
    events: list[Event] = []
    for kind, (mean, least) in RATES.items():
        times, t = [], start
        while True:
            t += max(least, rng.expovariate(1.0 / mean))
            if t >= end:
                break
            times.append(t)
        if not times:
            times = [rng.uniform(start, end)]
        low, high = RESTART_DELAY_S.get(kind, (0.0, 0.0))
        drawn = [Event(t, 0, kind, rng.uniform(low, high) if high else 0.0) for t in times]
        if kind not in skip:  # drawn all the same: the other kinds' times do not depend on it
            events += drawn
    events.sort()
    for i, event in enumerate(events):
        event.order = i
    return events


# --------------------------------------------------------------------------- observing the model root


@dataclass
class SeenPacket:
    run_id: str | None = None  # from its metadata; None until read (or when deleted before that)
    tries: int = 0


class RootObserver:
    """Records every packet name and every complete checkpoint that appears under the model root:
    inotify events (watchdog, recursive) plus a listing of every packet folder every ``interval``
    seconds. Each packet's run id is read from its metadata once (retried while it is rewritten)."""

    def __init__(self, root: Path, busy: set[str], busy_lock: threading.Lock, interval: float = 0.25):
        self.root = root
        self.interval = interval
        self.busy, self.busy_lock = busy, busy_lock
        self.packets: dict[int, dict[int, SeenPacket]] = {s: {} for s in range(TRAINING_SHARDS)}
        self.checkpoints: dict[str, dict[int, int]] = {}  # name -> watermark
        self.events_seen = 0
        self.listings = 0
        self._lock = threading.Lock()
        self._queue: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-observer", daemon=True)
        self._observer: Any = None

    def start(self) -> RootObserver:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        queue, lock, observer_self = self._queue, self._lock, self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type == "moved":
                    path = os.fsdecode(event.dest_path)
                elif event.event_type in ("created", "closed"):
                    path = os.fsdecode(event.src_path)
                else:
                    return
                with lock:
                    queue.append(path)
                    observer_self.events_seen += 1

        import warnings

        warnings.filterwarnings("ignore", "Callback with id", RuntimeWarning, "watchdog.observers.inotify")
        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.root), recursive=True)
        self._observer.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5.0)

    def _run(self) -> None:
        next_listing = 0.0
        while not self._stop.wait(0.05):
            try:
                with self._lock:
                    paths, self._queue[:] = list(self._queue), []
                for path in paths:
                    self._note(Path(path))
                if time.monotonic() >= next_listing:
                    self._listing()
                    next_listing = time.monotonic() + self.interval
                self._read_origins()
            except Exception as exc:  # the observer must keep observing; what it missed shows in the report
                log.warning("observer: %s", exc)

    def _note(self, path: Path) -> None:
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            return
        if len(parts) == 3 and parts[0] == INCREMENTAL_DIR:
            layout, seq = parse_shard_dir(parts[1]), parse_packet_name(parts[2])
            if layout is not None and layout[1] == TRAINING_SHARDS and seq is not None:
                self._packet(layout[0], seq)
        elif len(parts) == 3 and parts[0] == CHECKPOINTS_DIR and parts[2] == "manifest.json":
            if parse_checkpoint_name(parts[1]) is not None:
                self._checkpoint(parts[1])

    def _packet(self, shard: int, seq: int) -> None:
        with self._lock:
            if seq not in self.packets[shard]:
                self.packets[shard][seq] = SeenPacket()

    def _checkpoint(self, name: str) -> None:
        if name in self.checkpoints:
            return
        try:
            manifest = json.loads((self.root / CHECKPOINTS_DIR / name / "manifest.json").read_bytes())
            watermark = {int(k): int(v) for k, v in (manifest.get("watermark") or {}).items()}
        except (OSError, ValueError, AttributeError):
            return  # gone again (retention) or being written: the listing tries again
        with self._lock:
            self.checkpoints[name] = watermark

    def _listing(self) -> None:
        self.listings += 1
        for shard in range(TRAINING_SHARDS):
            folder = self.root / packet_dir(shard, TRAINING_SHARDS)
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(folder):
                    seq = parse_packet_name(name)
                    if seq is not None:
                        self._packet(shard, seq)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.root / CHECKPOINTS_DIR):
                if (
                    parse_checkpoint_name(name) is not None
                    and (self.root / CHECKPOINTS_DIR / name / "manifest.json").exists()
                ):
                    self._checkpoint(name)

    def _read_origins(self) -> None:
        with self._lock:
            todo = [(s, q, p) for s, seen in self.packets.items() for q, p in seen.items() if p.run_id is None]
        for shard, seq, seen in todo:
            if seen.tries >= 20:
                continue
            path = self.root / packet_dir(shard, TRAINING_SHARDS) / packet_name(seq)
            with self.busy_lock:
                if str(path) in self.busy:
                    continue  # being rewritten by this script: read it afterwards
            seen.tries += 1
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as fh:
                    data = fh.read()
                origin = read_packet_origin(data, str(path))
            except FileNotFoundError:
                seen.tries = 99  # deleted by retention before it was read
                continue
            except (OSError, PacketError):
                continue
            if origin[0] != shard or origin[2] != seq:
                seen.run_id = f"MISPLACED(shard {origin[0]}, seq {origin[2]})"
            else:
                seen.run_id = origin[3]

    def snapshot(self) -> tuple[dict[int, dict[int, SeenPacket]], dict[str, dict[int, int]]]:
        with self._lock:
            return {s: dict(p) for s, p in self.packets.items()}, dict(self.checkpoints)


# --------------------------------------------------------------------------- digests


@dataclass
class Rows:
    """Every row of a checkpoint or dump: per table, ids (sorted) and float32 weights."""

    tables: dict[str, tuple[np.ndarray, np.ndarray]]
    digest: str
    rows: int


def read_rows(directory: Path) -> Rows:
    """The rows of a complete checkpoint folder (a dump or a model-root checkpoint; optimizer state
    is ignored) and the SHA-256 over them sorted by (table, id): table name, ids as little-endian
    uint64, weights as little-endian float32."""
    import pyarrow as pa

    manifest = json.loads((directory / "manifest.json").read_bytes())
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for rel in manifest["files"]:
        with pa.OSFile(str(directory / rel)) as source:
            table = pa.ipc.open_file(source).read_all()
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        ids = table.column("id").combine_chunks().to_numpy(zero_copy_only=False).astype(np.uint64)
        flat = table.column("weight").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        weights = np.asarray(flat, np.float32).reshape(ids.shape[0], int(meta.get("dim", 0)) or -1)
        parts.setdefault(meta["table"], []).append((ids, weights))
    digest = hashlib.sha256()
    tables, total = {}, 0
    for name in sorted(parts):
        ids = np.concatenate([p[0] for p in parts[name]])
        weights = np.concatenate([p[1] for p in parts[name]])
        order = np.argsort(ids, kind="stable")
        ids, weights = ids[order], weights[order]
        if ids.shape[0] > 1 and bool((ids[1:] == ids[:-1]).any()):
            raise RuntimeError(f"{directory}: table {name} holds an id twice")
        digest.update(name.encode() + b"\0")
        digest.update(ids.astype("<u8").tobytes())
        digest.update(np.ascontiguousarray(weights, "<f4").tobytes())
        tables[name] = (ids, weights)
        total += ids.shape[0]
    return Rows(tables, digest.hexdigest(), total)


def row_diff(a: Rows, b: Rows) -> dict[str, int]:
    """Rows only in ``a``, only in ``b``, and in both with other bits."""
    only_a = only_b = differ = 0
    for name in set(a.tables) | set(b.tables):
        ids_a, w_a = a.tables.get(name, (np.zeros(0, np.uint64), np.zeros((0, 1), np.float32)))
        ids_b, w_b = b.tables.get(name, (np.zeros(0, np.uint64), np.zeros((0, 1), np.float32)))
        common, ia, ib = np.intersect1d(ids_a, ids_b, assume_unique=True, return_indices=True)
        only_a += ids_a.shape[0] - common.shape[0]
        only_b += ids_b.shape[0] - common.shape[0]
        if common.shape[0]:
            differ += int((w_a[ia].view(np.uint32) != w_b[ib].view(np.uint32)).any(axis=1).sum())
    return {"only_here": only_a, "only_in_reference": only_b, "different_values": differ}


# --------------------------------------------------------------------------- the run


class Chaos:
    """One chaos run: start everything, inject the schedule's events, finish, check, stop."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.duration = args.minutes * 60.0
        self.root = workdir / "model_root"
        self.began = time.monotonic()
        self.rng = random.Random(args.seed + 1)  # the choices (which replica, packet, folder, name)
        self.events = schedule(args.seed, self.duration, tuple(args.skip))
        self.done: Counter[str] = Counter()
        self.passed: Counter[str] = Counter()  # events that found nothing to act on
        self.notes: dict[str, list[str]] = {"unexpected_exits": [], "restart_failures": [], "retain_errors": []}
        self.retained = Counter[str]()
        self.started = demo.Started()
        self.busy: set[str] = set()
        self.busy_lock = threading.Lock()
        self.trainer: demo.TrainerProcess | None = None
        self.trainer_runs: list[dict[str, Any]] = []
        self.trainer_expected_exit = False
        self.group: ServerGroup | None = None
        self.fresh: ServerGroup | None = None
        self.replica_state = ["up"] * REPLICAS  # up | down | restarting
        self.publisher: subprocess.Popen | None = None
        self.publisher_expected_exit = False
        self.publisher_starts = 0
        self.ts: Any = None
        self.observer: RootObserver | None = None
        self.threads: list[threading.Thread] = []
        self.pending: list[Event] = []  # restarts due
        self.result: dict[str, Any] = {}
        self.logs: dict[str, dict[str, int]] = {}
        self._rows: dict[str, Rows | None] = {}
        self.error = ""
        self.interrupted = ""

    def say(self, message: str) -> None:
        print(f"chaos [{time.monotonic() - self.began:6.1f}s] {message}", flush=True)

    # ------------------------------------------------------------------ whole run

    def run(self) -> dict[str, Any]:
        try:
            with contextlib.ExitStack() as stack:
                try:
                    self._setup(stack)
                    self._chaos()
                    self._finish()
                except demo.Interrupted as exc:
                    self.interrupted = str(exc)
                    self.say(f"{exc}: stopping everything")
                except Exception as exc:  # reported after everything is stopped
                    self.error = f"{type(exc).__name__}: {exc}"
                    self.say(f"FAILED: {self.error}")
                    log.debug("chaos failed", exc_info=True)
                self.say("stopping every process this run started ...")
        except demo.Interrupted as exc:  # a signal during the clean-up: it still ran to the end
            self.interrupted = self.interrupted or str(exc)
        deadline = time.monotonic() + 10.0
        while self.started.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = self.started.alive()
        self.say(f"stopped ({'nothing left running' if not left else 'LEFT RUNNING: ' + ', '.join(left)})")
        return self._report(left)

    # ------------------------------------------------------------------ start-up

    def _setup(self, stack: contextlib.ExitStack) -> None:
        from archiver.torchserve import TorchServeProcess

        args = self.args
        self.root.mkdir(parents=True, exist_ok=True)
        options = demo.DemoOptions(self.workdir, batch_size=args.batch_size, export_every=args.export_every)
        files = self.files = demo.write_configs(self.workdir, str(self.root), options, max_seconds=self.duration + 1800)
        job = yaml.safe_load(files.job.read_text())
        job["num_shards"] = TRAINING_SHARDS
        job["output"].update(
            checkpoint_every=args.checkpoint_every,
            sparse_checkpoint_every=args.sparse_checkpoint_every,
            keep_checkpoints=args.keep_checkpoints,
        )
        files.job.write_text(yaml.safe_dump(job, sort_keys=False))
        self.emb = EmbeddingConfig.load(files.embedding_config)
        self.checkpoint_dir = files.train_dir / "checkpoint"
        self.resume_job = files.job.with_name("job.resume.yml")
        self.resume_job.write_text(yaml.safe_dump({**job, "resume_from": str(self.checkpoint_dir)}, sort_keys=False))
        (self.workdir / "outside").mkdir(exist_ok=True)

        self.observer = RootObserver(self.root, self.busy, self.busy_lock).start()
        stack.callback(self.observer.stop)
        stack.callback(self._stop_trainer_hard)
        self._start_trainer()
        self.say("starting TorchServe (local config) ...")
        store = self.workdir / "model_store"
        store.mkdir(exist_ok=True)
        self.ts = TorchServeProcess.start(store, self.workdir / "torchserve", timeout=240.0)
        stack.callback(self.ts.stop)
        self.started.groups["torchserve"] = self.ts.process.pid
        self.say(f"  TorchServe: gRPC {self.ts.grpc_inference_url}, management {self.ts.management_url}")
        self.say("waiting for the trainer's first full sparse checkpoint ...")
        demo.wait_for(
            "the first sparse checkpoint",
            lambda: bool(complete_checkpoints(str(self.root))),
            300.0,
            self._check_trainer,
        )
        self.say(f"starting {REPLICAS} infer-mode replicas of 1 serving shard on the model root ...")
        self.group = ServerGroup.start(
            files.embedding_config,
            files.serving_global,
            1,
            self.workdir / "embedding",
            mode=JobType.INFER,
            extra_args=self._server_args(),
            timeout=240.0,
            replicas=REPLICAS,
        )
        stack.callback(self.group.stop)
        stack.callback(self._join_threads)  # a restart in progress finishes first, so group.stop sees it
        for r in range(REPLICAS):
            self._note_replica(r)
            self.say(f"  replica {r}: {self.group.server(0, r).address}")
        files.serving_yml.write_text(
            yaml.safe_dump({"embedding_servers": self.group.replica_addresses, "embedding_timeout_s": 5.0})
        )
        stack.callback(self._stop_publisher)
        self._start_publisher()
        self.management = self.ts.management()
        stack.callback(self.management.close)
        self.say("waiting for the first dense version to be TorchServe's default ...")
        demo.wait_for(
            "the first dense version served",
            lambda: self.management.default_version(MODEL_NAME) is not None,
            300.0,
            self._check_trainer,
            interval=0.5,
        )
        self.say(f"  model {MODEL_NAME} v{self.management.default_version(MODEL_NAME)} is the default")

    def _server_args(self) -> list[str]:
        return ["--model-root", str(self.root), "--rescan-interval", "0.5", "--poll-interval", "0.25"]

    def _note_replica(self, r: int) -> None:
        assert self.group is not None
        pid = self.group.server(0, r).process.pid
        self.started.pids[f"replica-{r}"] = pid
        self.started.groups[f"replica-{r}"] = pid

    # ------------------------------------------------------------------ processes

    def _start_trainer(self) -> None:
        resume = (self.checkpoint_dir / "dense.pt").exists()
        n = len(self.trainer_runs) + 1
        log_path = self.workdir / f"trainer-{n}.log"
        self.trainer = demo.TrainerProcess(self.resume_job if resume else self.files.job, log_path)
        self.trainer_expected_exit = False
        self.trainer_runs.append({"run": n, "log": str(log_path), "resumed": resume, "pid": self.trainer.pid})
        self.started.pids["trainer"] = self.started.groups["trainer"] = self.trainer.pid
        how = f"resuming from {self.checkpoint_dir}" if resume else "from scratch (no training checkpoint yet)"
        self.say(f"trainer run {n} started (pid {self.trainer.pid}), {how}")

    def _check_trainer(self) -> None:
        if self.trainer is not None and self.trainer.process.poll() is not None and not self.trainer_expected_exit:
            raise RuntimeError(
                f"the trainer exited with code {self.trainer.process.returncode}:\n{demo._tail(self.trainer.log_path)}"
            )

    def _kill_group(self, process: subprocess.Popen) -> None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def _stop_trainer_hard(self) -> None:
        """Clean-up: the trainer (when still running) gets SIGTERM, then SIGKILL after 30 s."""
        if self.trainer is not None and self.trainer.process.poll() is None:
            self.trainer.stop(timeout=30.0)

    def _start_publisher(self) -> None:
        assert self.ts is not None
        self.publisher_starts += 1
        cmd = ctrserve_command(
            "--log-level",
            "INFO",
            "publish",
            "--watch",
            self.root,
            "--model-store",
            self.workdir / "model_store",
            "--management",
            self.ts.management_url,
            "--serving-config",
            self.files.serving_yml,
            "--keep",
            "2",
            "--poll-s",
            "0.5",
            "--drain-s",
            "0.5",
        )
        with open(self.workdir / "publisher.log", "ab") as out:
            self.publisher = subprocess.Popen(
                cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.publisher_expected_exit = False
        self.started.pids["publisher"] = self.started.groups["publisher"] = self.publisher.pid

    def _stop_publisher(self) -> None:
        if self.publisher is None or self.publisher.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.publisher.pid, signal.SIGTERM)
        try:
            self.publisher.wait(10.0)
        except subprocess.TimeoutExpired:
            self._kill_group(self.publisher)

    # ------------------------------------------------------------------ the chaos

    def _chaos(self) -> None:
        counts = Counter(e.kind for e in self.events)
        self.say(
            f"chaos for {self.duration:.0f} s (seed {self.args.seed}): " + ", ".join(f"{counts[k]} {k}" for k in RATES)
        )
        self._outside_copies()
        for folder in self._listed_folders():
            self._odd_names(folder, every=True)
            self._special_files(folder, every=True)
        self.done["odd_names"] += 1
        self.done["special_files"] += 1
        start = time.monotonic()
        queue = list(self.events)
        heapq.heapify(queue)
        next_line = 0.0
        while True:
            now = time.monotonic() - start
            self._watch_processes()
            if now >= next_line:
                self._progress(now)
                next_line = now + 10.0
            while self.pending and self.pending[0].t <= now:
                self._do(heapq.heappop(self.pending), now)
            if queue and queue[0].t <= now:
                self._do(heapq.heappop(queue), now)
                continue
            if now >= self.duration and not queue:
                break
            time.sleep(0.05)
        self.say("chaos over; restarting whatever is down and waiting for the event threads ...")
        while self.pending:
            self._do(heapq.heappop(self.pending), self.duration)
        for thread in self.threads:
            thread.join(300.0)
        self._watch_processes()

    def _later(self, kind: str, at: float, target: int = -1) -> None:
        heapq.heappush(self.pending, Event(at, len(self.pending) + 10**6, kind, target=target))

    def _do(self, event: Event, now: float) -> None:
        kind = event.kind
        try:
            acted = getattr(self, f"_ev_{kind}")(event, now)
        except demo.Interrupted:
            raise
        except Exception as exc:
            acted = False
            self.say(f"{kind}: {type(exc).__name__}: {exc}")
            self.notes.setdefault(f"{kind}_errors", []).append(f"{type(exc).__name__}: {exc}")
        if acted:
            self.done[kind] += 1
        else:
            self.passed[kind] += 1

    # kills and restarts

    def _ev_kill_trainer(self, event: Event, now: float) -> bool:
        trainer = self.trainer
        if trainer is None or trainer.process.poll() is not None:
            return False
        self.trainer_expected_exit = True
        step = demo.read_training(self.files.train_dir / "metrics.jsonl")[0]
        self._kill_group(trainer.process)
        self.trainer_runs[-1]["killed_at_s"] = round(time.monotonic() - self.began, 1)
        self.say(
            f"KILL trainer run {len(self.trainer_runs)} (SIGKILL, last logged step {step}); restart in {event.delay:.1f} s"
        )
        self._later("start_trainer", now + event.delay)
        return True

    def _ev_start_trainer(self, event: Event, now: float) -> bool:
        if self.trainer is not None and self.trainer.process.poll() is None:
            return False
        self._start_trainer()
        return True

    def _ev_kill_replica(self, event: Event, now: float) -> bool:
        assert self.group is not None
        up = [r for r in range(REPLICAS) if self.replica_state[r] == "up"]
        if not up:
            return False
        r = self.rng.choice(up)
        self.replica_state[r] = "down"
        self.group.kill(0, r)
        self.say(f"KILL replica {r} (SIGKILL); restart in {event.delay:.1f} s")
        self._later("restart_replica", now + event.delay, r)
        return True

    def _ev_restart_replica(self, event: Event, now: float) -> bool:
        r = event.target
        if self.replica_state[r] != "down":
            return False
        self.replica_state[r] = "restarting"
        if self.rng.random() < 0.5:  # a slow copy, long enough to last into the replica's start-up replay
            self._do(Event(now, -1, "rewrite_packet", delay=self.rng.uniform(3.0, 8.0)), now)
        self._thread(f"restart-replica-{r}", functools.partial(self._restart_replica, r))
        return True

    def _restart_replica(self, r: int) -> None:
        assert self.group is not None
        began = time.monotonic()
        for attempt in range(1, 4):
            try:
                self.group.restart(0, r, timeout=240.0)
                break
            except RuntimeError as exc:
                self.notes["restart_failures"].append(f"replica {r}, attempt {attempt}: {exc}")
                self.say(f"replica {r} did not start again (attempt {attempt}): {str(exc).splitlines()[0]}")
                time.sleep(1.0)
        else:
            self.replica_state[r] = "down"
            return
        self._note_replica(r)
        self.replica_state[r] = "up"
        self.say(f"replica {r} serves again ({time.monotonic() - began:.1f} s to start and catch up)")

    def _ev_kill_publisher(self, event: Event, now: float) -> bool:
        if self.publisher is None or self.publisher.poll() is not None:
            return False
        self.publisher_expected_exit = True
        self._kill_group(self.publisher)
        self.say(f"KILL publisher (SIGKILL); restart in {event.delay:.1f} s")
        self._later("start_publisher", now + event.delay)
        return True

    def _ev_start_publisher(self, event: Event, now: float) -> bool:
        if self.publisher is not None and self.publisher.poll() is None:
            return False
        self._start_publisher()
        self.say(f"publisher started again (start {self.publisher_starts})")
        return True

    def _watch_processes(self) -> None:
        """Processes that exited without being killed: noted (a finding), started again."""
        if self.ts is not None and self.ts.process.poll() is not None:
            raise RuntimeError(f"TorchServe exited with code {self.ts.process.returncode}:\n{self.ts.log_tail()}")
        trainer = self.trainer
        if trainer is not None and trainer.process.poll() is not None and not self.trainer_expected_exit:
            note = f"trainer run {len(self.trainer_runs)} exited by itself with code {trainer.process.returncode}"
            self.notes["unexpected_exits"].append(f"{note}:\n{demo._tail(trainer.log_path)}")
            self.say(f"UNEXPECTED: {note}; starting it again")
            self.trainer_expected_exit = True
            self._start_trainer()
        if self.group is not None:
            for r in range(REPLICAS):
                process = self.group.server(0, r).process
                if self.replica_state[r] == "up" and process.poll() is not None:
                    note = f"replica {r} exited by itself with code {process.returncode}"
                    self.notes["unexpected_exits"].append(f"{note}:\n{demo._tail(self.group.server(0, r).log_path)}")
                    self.say(f"UNEXPECTED: {note}; starting it again")
                    self.replica_state[r] = "restarting"
                    self._thread(f"restart-replica-{r}", functools.partial(self._restart_replica, r))
        if self.publisher is not None and self.publisher.poll() is not None and not self.publisher_expected_exit:
            note = f"the publisher exited by itself with code {self.publisher.returncode}"
            self.notes["unexpected_exits"].append(f"{note}:\n{demo._tail(self.workdir / 'publisher.log')}")
            self.say(f"UNEXPECTED: {note}; starting it again")
            self._start_publisher()

    def _thread(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads = [t for t in self.threads if t.is_alive()] + [thread]

    def _join_threads(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # writes into the model root

    def _packet_folders(self) -> list[Path]:
        return [self.root / packet_dir(s, TRAINING_SHARDS) for s in range(TRAINING_SHARDS)]

    def _listed_folders(self) -> list[Path]:
        """The folders readers of a model root list."""
        folders = [self.root, self.root / INCREMENTAL_DIR, *self._packet_folders()]
        folders += [self.root / CHECKPOINTS_DIR, self.root / DENSE_DIR]
        return [f for f in folders if f.is_dir()]

    def _near(self, folder: Path) -> int:
        """A number near the newest valid name of ``folder`` (names that look like the next one)."""
        names = _listdir(folder)
        if folder.parent.name == INCREMENTAL_DIR:
            numbers = [q for q in map(parse_packet_name, names) if q is not None]
        elif folder.name == CHECKPOINTS_DIR:
            numbers = [q for q in map(parse_checkpoint_name, names) if q is not None]
        elif folder.name == DENSE_DIR:
            numbers = list_versions(open_storage(str(self.root)))
        else:
            numbers = []
        return max(numbers, default=0) + self.rng.randint(-2, 3)

    def _odd_names(self, folder: Path, every: bool = False) -> int:
        """Odd names in ``folder``: regular files or (empty but for a junk file) folders."""
        n = max(0, self._near(folder))
        token = f"{self.rng.getrandbits(32):08x}"
        if folder == self.root:
            names = [
                ("checkpoints²", "dir"),
                ("incremental.tmp", "dir"),
                ("dense٣", "dir"),
                (f".model.{token}.tmp", "file"),
                ("０", "file"),
            ]
        elif folder.name == INCREMENTAL_DIR:
            names = [
                (f"shard-²-of-{TRAINING_SHARDS:05d}", "dir"),
                (f"shard-0000٣-of-{TRAINING_SHARDS:05d}", "dir"),
                ("shard-00000-of-0000２", "dir"),
                (f"shard-00000-of-{TRAINING_SHARDS:05d}.tmp", "dir"),
                (f"shard-0-of-{TRAINING_SHARDS}", "dir"),
                (f".shard-00001-of-{TRAINING_SHARDS:05d}.{token}.tmp", "file"),
            ]
        elif folder.parent.name == INCREMENTAL_DIR:
            names = [
                (f"{n:019d}².arrow", "file"),
                (f"{n:019d}٣.arrow", "file"),
                (f"{n:019d}０.arrow", "file"),
                (f"{n:021d}.arrow", "file"),
                (f"{n:020d}.arrow.tmp", "file"),
                (f"{n:020d}.arrow~", "file"),
                (f"{n:020d}.arrow.{token}.part", "file"),
                (f".{n:020d}.arrow.{token}.tmp", "file"),
                (f" {n:019d}.arrow", "file"),
                ("last-seq.json.tmp", "file"),
            ]
        elif folder.name == CHECKPOINTS_DIR:
            names = [
                (f"{n:019d}²", "dir"),
                (f"{n:019d}٣", "dir"),
                (f"{n:021d}", "dir"),
                (f"{n:020d}.tmp", "dir"),
                (f".{n:020d}.{token}.tmp", "dir"),
            ]
        else:  # dense/
            names = [
                (f"v{n:07d}٣", "dir"),
                (f"v{n:07d}²", "dir"),
                (f"v{n:09d}", "dir"),
                (f"v{n:08d}.tmp", "dir"),
                (f"V{n:08d}", "dir"),
                (f".v{n:08d}.{token}.tmp", "dir"),
            ]
        chosen = names if every else self.rng.sample(names, min(len(names), self.rng.randint(1, 3)))
        made = 0
        for name, kind in chosen:
            for path in (folder / name, folder / f"{name}~{token}"):  # the name again: another one
                try:
                    if kind == "dir":
                        path.mkdir()
                        junk = {CHECKPOINTS_DIR: "manifest.json", DENSE_DIR: SPEC_FILE}.get(folder.name, "README")
                        _create(path / junk, b'{"not": "what a reader takes"}\n')
                    else:
                        _create(path, b"not a packet, a checkpoint or a version\n")
                    made += 1
                    break
                except FileExistsError:
                    continue
        if made and not every:
            self.say(f"WRITE {made} odd name(s) in {folder.relative_to(self.workdir)}/")
        return made

    def _outside_copies(self) -> None:
        """What the links that lead out of the model root point at: copies of a real packet, a
        checkpoint manifest and a dense version, in ``<workdir>/outside``."""
        outside = self.workdir / "outside"
        for folder in self._packet_folders():
            seqs = sorted(q for q in map(parse_packet_name, _listdir(folder)) if q is not None)
            if seqs:
                with contextlib.suppress(OSError):
                    (outside / packet_name(seqs[-1])).write_bytes((folder / packet_name(seqs[-1])).read_bytes())
                break
        names = complete_checkpoints(str(self.root))
        if names:
            (outside / "checkpoint").mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                (outside / "checkpoint" / "manifest.json").write_bytes(
                    (self.root / CHECKPOINTS_DIR / names[-1] / "manifest.json").read_bytes()
                )
        versions = list_versions(open_storage(str(self.root)))
        if versions:
            (outside / "version").mkdir(exist_ok=True)
            for name in ("model.pt", SPEC_FILE):
                with contextlib.suppress(OSError):
                    (outside / "version" / name).write_bytes(
                        (self.root / version_dir(versions[-1]) / name).read_bytes()
                    )

    def _special_files(self, folder: Path, every: bool = False) -> int:
        """FIFOs and links to /dev/zero and out of the model root, under names no reader takes."""
        outside = self.workdir / "outside"
        packet = next(iter(sorted(outside.glob("*.arrow"))), outside)
        n = max(0, self._near(folder))
        if folder == self.root:
            entries = [
                ("incremental²", "link", outside),
                ("dense.fifo", "fifo", None),
                ("checkpoints.zero", "link", Path("/dev/zero")),
            ]
        elif folder.name == INCREMENTAL_DIR:
            entries = [
                (f"shard-00000-of-0000{'²'}", "link", outside),
                ("shard-fifo", "fifo", None),
                (f"shard-00001-of-{TRAINING_SHARDS:05d}.zero", "link", Path("/dev/zero")),
            ]
        elif folder.parent.name == INCREMENTAL_DIR:
            entries = [
                (f"{n:020d}.arrow.fifo", "fifo", None),
                (f"{n:019d}٣.arrow", "fifo", None),
                (f"{n:020d}.arrow.zero", "link", Path("/dev/zero")),
                (f"{n:019d}².arrow", "link", Path("/dev/zero")),
                (f"{n:020d}.arrow.out", "link", packet),
                (f"{n:019d}０.arrow", "link", packet),
            ]
        elif folder.name == CHECKPOINTS_DIR:
            entries = [
                (f"{n:019d}٣", "link", outside / "checkpoint"),
                (f"{n:020d}.fifo", "fifo", None),
                (f"{n:019d}²", "link", Path("/dev/zero")),
            ]
        else:  # dense/
            entries = [
                (f"v{n:07d}²", "link", outside / "version"),
                (f"v{n:07d}٣", "link", Path("/dev/zero")),
                (f"v{n:08d}.fifo", "fifo", None),
            ]
        chosen = entries if every else self.rng.sample(entries, min(len(entries), self.rng.randint(1, 2)))
        made = 0
        token = f"{self.rng.getrandbits(32):08x}"
        for name, kind, target in chosen:
            for path in (folder / name, folder / f"{name}~{token}"):  # the name again: another one
                try:
                    if kind == "fifo":
                        os.mkfifo(path)
                    else:
                        assert target is not None
                        os.symlink(target, path)
                    made += 1
                    break
                except FileExistsError:
                    continue
        if made and not every:
            self.say(f"WRITE {made} special file(s) (FIFOs, links) in {folder.relative_to(self.workdir)}/")
        return made

    def _ev_odd_names(self, event: Event, now: float) -> bool:
        folders = self._listed_folders()
        return bool(folders) and self._odd_names(self.rng.choice(folders)) > 0

    def _ev_special_files(self, event: Event, now: float) -> bool:
        folders = self._listed_folders()
        return bool(folders) and self._special_files(self.rng.choice(folders)) > 0

    def _ev_rewrite_packet(self, event: Event, now: float) -> bool:
        folder = self.rng.choice(self._packet_folders())
        seqs = sorted(q for q in map(parse_packet_name, _listdir(folder)) if q is not None)
        if not seqs:
            return False
        # mostly packets above the newest checkpoint: those a starting replica replays
        names = complete_checkpoints(str(self.root))
        shard = self._packet_folders().index(folder)
        covered = self.observer.checkpoints.get(names[-1], {}).get(shard, -1) if names and self.observer else -1
        replayed = [q for q in seqs if q > covered] or seqs
        seq = seqs[-1] if self.rng.random() < 0.5 else self.rng.choice(replayed)
        pause = event.delay or self.rng.uniform(0.2, 3.0)
        path = folder / packet_name(seq)
        self._thread(f"rewrite-{seq}", lambda: self._rewrite(path, pause))
        return True

    def _rewrite(self, path: Path, pause: float) -> None:
        """Rewrite the packet at ``path`` in place with its own bytes: first half, pause, second
        half (never creating it: a packet retention deleted meanwhile stays deleted)."""
        with self.busy_lock:
            self.busy.add(str(path))
        try:
            try:
                with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
                    data = fh.read()
                fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
            except FileNotFoundError:
                self.say(f"WRITE skipped: {path.relative_to(self.workdir)} was deleted (retention) before the rewrite")
                return
            try:
                half = len(data) // 2
                _write_all(fd, data[:half])
                self.say(
                    f"WRITE {path.relative_to(self.workdir)}: rewriting in place, {half} of {len(data)} bytes written, "
                    f"pausing {pause:.1f} s"
                )
                time.sleep(pause)
                _write_all(fd, data[half:])
            finally:
                os.close(fd)
        finally:
            with self.busy_lock:
                self.busy.discard(str(path))

    def _ev_retain(self, event: Event, now: float) -> bool:
        keep = self.rng.choice([1, 2])
        try:
            deleted = retain(str(self.root), keep=keep)
        except demo.Interrupted:
            raise
        except Exception as exc:  # a race with the trainer's own retention: noted
            self.notes["retain_errors"].append(f"keep={keep}: {type(exc).__name__}: {exc}")
            self.say(f"RETAIN keep={keep} failed: {type(exc).__name__}: {exc}")
            return True
        self.retained.update(deleted)
        if deleted["checkpoints"] or deleted["packets"]:
            self.say(
                f"RETAIN keep={keep}: deleted {deleted['checkpoints']} checkpoint(s), {deleted['packets']} packet(s)"
            )
        return True

    # ------------------------------------------------------------------ progress

    def _replica_stats(self, address: str, timeout: float = 5.0) -> dict[str, Any] | None:
        from embedding_server.rpc.remote import RemoteEmbeddingClient

        try:
            with RemoteEmbeddingClient(self.emb, [address], timeout=timeout, connect_timeout=timeout) as client:
                return client.stats()[0]
        except demo.Interrupted:
            raise
        except Exception:
            return None

    def _progress(self, now: float) -> None:
        assert self.group is not None and self.observer is not None
        step = demo.read_training(self.files.train_dir / "metrics.jsonl")[0]
        seen, _ = self.observer.snapshot()
        newest = {s: max(p, default=-1) for s, p in seen.items()}
        marks = []
        for r in range(REPLICAS):
            if self.replica_state[r] != "up":
                marks.append(f"r{r} {self.replica_state[r]}")
                continue
            stats = self._replica_stats(self.group.server(0, r).address, 2.0)
            marks.append(f"r{r} " + ("?" if stats is None else _watermarks_text(stats)))
        try:
            default = self.management.default_version(MODEL_NAME)
        except Exception:
            default = "?"
        done = ", ".join(f"{k} {self.done[k]}" for k in RATES if self.done[k])
        self.say(
            f"[{now:5.0f}s] step {step or '-'} | newest seq {newest} | {' | '.join(marks)} | default v{default} | {done or 'no events yet'}"
        )

    # ------------------------------------------------------------------ the end

    def _finish(self) -> None:
        assert self.group is not None and self.observer is not None
        if self.trainer is None or self.trainer.process.poll() is not None:
            self._start_trainer()
        trainer = self.trainer
        assert trainer is not None
        self.say("letting the trainer finish cleanly: waiting until it publishes, then SIGTERM ...")
        demo.wait_for(
            "the trainer's packet publishers",
            lambda: trainer.log_path.read_text(errors="replace").count("publishes packets from seq") >= TRAINING_SHARDS,
            300.0,
            self._check_trainer,
            interval=0.5,
        )
        time.sleep(2.0)  # a few steps: a packet of this run on both shards
        self.trainer_expected_exit = True
        trainer.request_stop()
        demo.wait_for("the trainer's clean exit", lambda: trainer.process.poll() is not None, 300.0, interval=0.5)
        code = trainer.process.returncode
        final = demo._final_json(trainer.log_path)
        self.trainer_runs[-1]["exit_code"] = code
        self.say(
            f"trainer exited with code {code} after step {final.get('steps')}; versions {final.get('exported_versions')}"
        )
        last = self._markers()
        listed = {
            s: max((q for q in map(parse_packet_name, _listdir(f)) if q is not None), default=-1)
            for s, f in enumerate(self._packet_folders())
        }
        self.say(f"last published seq per training shard (last-seq.json): {last}; newest listed: {listed}")

        newest_version = max(
            (
                v
                for v in list_versions(open_storage(str(self.root)))
                if (self.root / version_dir(v) / SPEC_FILE).exists()
            ),
            default=0,
        )
        self.say(f"waiting for TorchServe's default version to be the newest exported (v{newest_version}) ...")
        with contextlib.suppress(TimeoutError):
            demo.wait_for(
                "the newest version served",
                lambda: self.management.default_version(MODEL_NAME) == str(newest_version),
                240.0,
                interval=0.5,
            )
        default = self.management.default_version(MODEL_NAME)
        self._watch_processes()
        for thread in self.threads:
            thread.join(300.0)

        addresses = [self.group.server(0, r).address for r in range(REPLICAS)]
        self.say("waiting for every replica to reach the last seq of every training shard ...")
        with contextlib.suppress(TimeoutError):
            demo.wait_for(
                "every replica at the last seq",
                lambda: all(_caught_up(self._replica_stats(a), last) for a in addresses),
                240.0,
                interval=0.5,
            )
        self.say("starting a fresh replica (newest checkpoint, then packets) as the reference ...")
        self.fresh = ServerGroup.start(
            self.files.embedding_config,
            self.files.serving_global,
            1,
            self.workdir / "embedding-fresh",
            mode=JobType.INFER,
            extra_args=self._server_args(),
            timeout=300.0,
        )
        fresh = self.fresh
        self.started.pids["fresh-replica"] = self.started.groups["fresh-replica"] = fresh.servers[0].process.pid
        try:
            with contextlib.suppress(TimeoutError):
                demo.wait_for(
                    "the fresh replica at the last seq",
                    lambda: _caught_up(self._replica_stats(fresh.addresses[0]), last),
                    240.0,
                    interval=0.5,
                )
            replicas = [
                (f"replica-{r}", addresses[r], self.workdir / "embedding" / "dumps" / f"replica-{r}")
                for r in range(REPLICAS)
            ]
            replicas.append(("fresh", fresh.addresses[0], self.workdir / "embedding-fresh" / "dump"))
            checked = {name: self._check_replica(address, dump, last) for name, address, dump in replicas}
        finally:
            fresh.stop()
        prediction = self._final_prediction()
        self.observer.stop()
        self.logs = self._scan_logs()
        self.result = self._figures(last, listed, checked, default, newest_version, final, code, prediction)

    def _scan_logs(self) -> dict[str, dict[str, int]]:
        """Per log (replicas over all their restarts, the fresh one, the publisher, each trainer
        run): how many lines match each of :data:`LOG_PATTERNS` (those that do)."""
        paths = sorted((self.workdir / "embedding").glob("*.log")) + sorted(
            (self.workdir / "embedding-fresh").glob("*.log")
        )
        paths += [self.workdir / "publisher.log"] + [Path(run["log"]) for run in self.trainer_runs]
        out = {}
        for path in paths:
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            counts = {key: sum(text in line for line in lines) for key, text in LOG_PATTERNS.items()}
            out[str(path.relative_to(self.workdir))] = {k: v for k, v in counts.items() if v}
        return out

    def _markers(self) -> dict[int, int]:
        out = {}
        for s, folder in enumerate(self._packet_folders()):
            try:
                out[s] = decode_last_seq((folder / LAST_SEQ_FILE).read_bytes(), str(folder / LAST_SEQ_FILE))
            except (OSError, PacketError):
                out[s] = -1
        return out

    def _check_replica(self, address: str, dump: Path, last: dict[int, int]) -> dict[str, Any]:
        from embedding_server.rpc.remote import RemoteEmbeddingClient

        stats = self._replica_stats(address, 30.0) or {}
        hot = stats.get("hotload") or {}
        streams = {int(s["shard"]): s for s in hot.get("streams", []) if int(s["num_shards"]) == TRAINING_SHARDS}
        per_shard = {}
        lost = 0
        for shard, seq in last.items():
            st = streams.get(shard, {})
            watermark = int(st.get("watermark", -1))
            skipped = list(st.get("skipped", []))
            missing = max(0, seq - watermark) + len(skipped)
            lost += missing
            per_shard[shard] = {
                "watermark": watermark,
                "applied_all": watermark >= seq,
                "skipped": skipped,
                "held": bool(st.get("held")),
                "gap_alarm": bool(st.get("gap_alarm")),
                "lost": missing,
            }
        digest, rows = "", None
        try:
            with RemoteEmbeddingClient(self.emb, [address], timeout=120.0, connect_timeout=30.0) as client:
                client.dump(str(dump))
            rows = read_rows(dump)
            digest = rows.digest
        except Exception as exc:
            self.say(f"dump of {address} failed: {type(exc).__name__}: {exc}")
        self._rows[address] = rows
        return {
            "address": address,
            "checkpoint_loaded": hot.get("checkpoint"),
            "per_training_shard": per_shard,
            "packets_applied_since_start": hot.get("packets_applied"),
            "packets_quarantined": hot.get("packets_quarantined"),
            "quarantined": hot.get("quarantined", []),
            "packets_skipped": hot.get("packets_skipped"),
            "foreign_run_packets": hot.get("foreign_run_packets"),
            "stalled": hot.get("stalled"),
            "lost": lost,
            "rows": rows.rows if rows is not None else None,
            "digest": digest,
        }

    def _final_prediction(self) -> dict[str, Any]:
        from handler.client import PredictionClient, PredictionError

        body = demo.request_bodies(64, seed=1, count=1)[0]
        try:
            with PredictionClient(self.ts.grpc_inference_url, model_name=MODEL_NAME, timeout=30.0) as client:
                answer = client.predict_full(body)
            return {
                "ok": True,
                "model_version": answer.model_version,
                "embedding_watermark": answer.embedding_watermark,
            }
        except PredictionError as exc:
            return {"ok": False, "error": str(exc)[:300]}

    # ------------------------------------------------------------------ figures

    def _figures(
        self,
        last: dict[int, int],
        listed: dict[int, int],
        checked: dict[str, dict[str, Any]],
        default: str | None,
        newest_version: int,
        final: dict,
        code: int,
        prediction: dict[str, Any],
    ) -> dict[str, Any]:
        assert self.observer is not None
        seen, checkpoints = self.observer.snapshot()
        starts = self._run_starts()
        shards = {}
        for shard, seq in last.items():
            shards[shard] = self._contiguity(shard, seq, listed[shard], seen[shard], checkpoints, starts.get(shard, []))
            shards[shard]["applied"] = {name: c["per_training_shard"][shard] for name, c in checked.items()}
        reference = self._rows.get(checked["fresh"]["address"])
        divergent = 0
        for name, c in checked.items():
            rows = self._rows.get(c["address"])
            if name == "fresh":
                continue
            same = reference is not None and rows is not None and rows.digest == reference.digest
            c["same_as_fresh"] = same
            if rows is not None and reference is not None and not same:
                c["diff_vs_fresh"] = row_diff(rows, reference)
            divergent += not same
        trainer_final: dict[str, Any] = {}
        names = complete_checkpoints(str(self.root))
        if names and reference is not None:
            final_rows = read_rows(self.root / CHECKPOINTS_DIR / names[-1])
            trainer_final = {
                "checkpoint": names[-1],
                "rows": final_rows.rows,
                "digest": final_rows.digest,
                "same_as_fresh": final_rows.digest == reference.digest,
            }
        lost = sum(c["lost"] for c in checked.values())
        return {
            "training_shards": shards,
            "replicas": checked,
            "trainer_final_checkpoint": trainer_final,
            "lost": lost,
            "divergent": divergent,
            "torchserve": {
                "default_version": default,
                "newest_exported_version": newest_version,
                "default_is_newest": default == str(newest_version),
                "final_prediction": prediction,
            },
            "trainer": {
                "runs": self.trainer_runs,
                "final_exit_code": code,
                "final_step": final.get("steps"),
                "exported_versions_last_run": final.get("exported_versions"),
            },
        }

    def _run_starts(self) -> dict[int, list[dict[str, Any]]]:
        """Per training shard, where each trainer run's publisher started (from its log)."""
        pattern = re.compile(r"training shard (\d+)/(\d+) publishes packets from seq (\d+) on, run id (\w+)")
        out: dict[int, list[dict[str, Any]]] = {}
        for run in self.trainer_runs:
            text = Path(run["log"]).read_text(errors="replace")
            for m in pattern.finditer(text):
                out.setdefault(int(m.group(1)), []).append(
                    {"run": run["run"], "first_seq": int(m.group(3)), "run_id": m.group(4)}
                )
        return out

    def _contiguity(
        self,
        shard: int,
        last: int,
        listed: int,
        seen: dict[int, SeenPacket],
        checkpoints: dict[str, dict[int, int]],
        starts: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """What the observations say about training shard ``shard``'s seqs ``0..last``.

        Each trainer run owns the seqs from where its publisher started (its log) to just below
        where the next run's started: every seq seen there must carry that run's id (or an unknown
        one: deleted before it was read), and no seq of that run may lie elsewhere (a run that
        numbered again from a lower seq, or left a hole, shows here)."""
        covered = max((w.get(shard, -1) for w in checkpoints.values()), default=-1)
        never = [q for q in range(last + 1) if q not in seen]
        runs = []
        for k, start in enumerate(starts):
            end = starts[k + 1]["first_seq"] - 1 if k + 1 < len(starts) else last
            mine = sorted(q for q, p in seen.items() if p.run_id == start["run_id"])
            span = range(start["first_seq"], end + 1)
            runs.append(
                {
                    **start,
                    "seqs": f"{span.start}..{span.stop - 1}" if len(span) else "none",
                    "packets_seen": len(mine),
                    "outside_its_range": [q for q in mine if q not in span],
                    "of_another_run_in_range": [
                        q for q in span if q in seen and seen[q].run_id not in (None, start["run_id"])
                    ],
                }
            )
        first = starts[0]["first_seq"] if starts else 0
        bad_order = [
            {"run": b["run"], "first_seq": b["first_seq"], "previous_first_seq": a["first_seq"]}
            for a, b in zip(starts, starts[1:])
            if b["first_seq"] < a["first_seq"]
        ]
        return {
            "published": last + 1,
            "last_seq_marker": last,
            "newest_listed_at_end": listed,
            "marker_equals_listed": listed in (-1, last),
            "observed": len([q for q in seen if q <= last]),
            "never_observed": len(never),
            "never_observed_unverifiable": [q for q in never if q <= covered],
            "never_observed_skipped": [q for q in never if q > covered],
            "seen_above_marker": sorted(q for q in seen if q > last),
            "run_id_unknown": sum(p.run_id is None for p in seen.values()),
            "first_run_starts_at": first,
            "runs": runs,
            "runs_out_of_order": bad_order,
            "highest_checkpoint_watermark_observed": covered,
            "checkpoints_observed": len(checkpoints),
        }

    def _report(self, left: list[str]) -> dict[str, Any]:
        r = self.result
        shards = r.get("training_shards", {})
        contiguous = bool(shards) and all(
            not s["never_observed_skipped"]
            and not s["seen_above_marker"]
            and s["first_run_starts_at"] == 0
            and not s["runs_out_of_order"]
            and all(not run["outside_its_range"] and not run["of_another_run_in_range"] for run in s["runs"])
            and s["marker_equals_listed"]
            for s in shards.values()
        )
        replicas = r.get("replicas", {})
        quiet = all(not c["packets_quarantined"] and not c["packets_skipped"] for c in replicas.values()) and not any(
            counts.get("packet_declared_bad") or counts.get("foreign_run_packet") for counts in self.logs.values()
        )
        ts = r.get("torchserve", {})
        report = {
            "minutes": self.args.minutes,
            "seed": self.args.seed,
            "workdir": str(self.workdir),
            "events": {k: self.done[k] for k in RATES},
            "kinds_left_out": self.args.skip,
            "events_without_target": {k: v for k, v in self.passed.items() if v},
            "restarts": {
                "trainer": len(self.trainer_runs) - 1,
                "publisher": self.publisher_starts - 1,
            },
            "retained": dict(self.retained),
            **r,
            "observer": {
                "inotify_events": self.observer.events_seen if self.observer else 0,
                "listings": self.observer.listings if self.observer else 0,
            },
            "logs": self.logs,
            "what_cannot_be_observed": WHAT_CANNOT_BE_OBSERVED,
            "notes": {k: v for k, v in self.notes.items() if v},
            "left_running": left,
            "error": self.error or None,
            "interrupted": self.interrupted or None,
        }
        report["ok"] = (
            bool(r)
            and r["lost"] == 0
            and r["divergent"] == 0
            and contiguous
            and quiet
            and ts.get("default_is_newest", False)
            and ts.get("final_prediction", {}).get("ok", False)
            and r["trainer"]["final_exit_code"] == 0
            and not self.notes["unexpected_exits"]
            and not self.notes["restart_failures"]
            and not left
            and not self.error
            and not self.interrupted
        )
        report["checks"] = {
            "lost_is_0": bool(r) and r["lost"] == 0,
            "divergent_is_0": bool(r) and r["divergent"] == 0,
            "seqs_contiguous": contiguous,
            "nothing_quarantined_skipped_or_foreign": quiet,
            "default_is_newest_version": bool(ts.get("default_is_newest")),
            "final_prediction_answered": bool(ts.get("final_prediction", {}).get("ok")),
            "trainer_finished_cleanly": bool(r) and r["trainer"]["final_exit_code"] == 0,
            "no_unexpected_exit": not self.notes["unexpected_exits"] and not self.notes["restart_failures"],
            "nothing_left_running": not left,
        }
        return report


# --------------------------------------------------------------------------- helpers


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _create(path: Path, data: bytes) -> None:
    """A new regular file (never replacing anything; FileExistsError when the name is taken)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _stream_marks(stats: dict[str, Any] | None) -> dict[int, int]:
    streams = ((stats or {}).get("hotload") or {}).get("streams", [])
    return {int(s["shard"]): int(s["watermark"]) for s in streams if int(s["num_shards"]) == TRAINING_SHARDS}


def _watermarks_text(stats: dict[str, Any]) -> str:
    marks = _stream_marks(stats)
    return "wm " + ",".join(f"{s}:{w}" for s, w in sorted(marks.items())) if marks else "wm -"


def _caught_up(stats: dict[str, Any] | None, last: dict[int, int]) -> bool:
    if stats is None:
        return False
    marks = _stream_marks(stats)
    return all(marks.get(shard, -1) >= seq for shard, seq in last.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="minutes of chaos (default 5)")
    parser.add_argument("--quick", action="store_true", help="1.5 minutes of chaos")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random schedule (default 0)")
    parser.add_argument("--workdir", help="default: a new temporary directory (kept, with every log)")
    parser.add_argument("--batch-size", type=int, default=64, help="training samples per step (default 64)")
    parser.add_argument("--export-every", type=int, default=250, help="steps between dense versions (default 250)")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=200,
        help="steps between training checkpoints (resume_from) (default 200)",
    )
    parser.add_argument(
        "--sparse-checkpoint-every",
        type=int,
        default=500,
        help="steps between full sparse checkpoints in the model root (default 500)",
    )
    parser.add_argument("--keep-checkpoints", type=int, default=2, help="the trainer's keep_checkpoints (default 2)")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=sorted(RATES),
        help="leave out this kind of event (repeatable; to tell which kind a failure comes from)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes = 1.5
    if not args.minutes > 0:
        parser.error("--minutes must be > 0")
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="ctrserve-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("embedding_server", "ctrserve", "archiver"):  # this script's own reads of the odd names it wrote
        logging.getLogger(name).setLevel(logging.ERROR)
    demo._quiet_libraries()
    print(f"chaos work directory: {workdir}", flush=True)
    previous = {sig: signal.signal(sig, demo._raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        report = Chaos(args, workdir).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    (workdir / "chaos.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
