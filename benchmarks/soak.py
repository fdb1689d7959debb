"""Soak: N minutes of concurrent gRPC predictions through TorchServe while a trainer streams
incremental packets that infer-mode embedding servers hot-load. Not part of the test suite.

    python benchmarks/soak.py --minutes 10 [--shards 2] [--clients 4] [--workdir DIR]
    python benchmarks/soak.py --quick            # 1 minute

The whole loop is ``ctrserve demo``'s (:class:`ctrserve.demo.Demo`: trainer process with
incremental updates every second, infer servers following the model root, TorchServe with the
publisher rolling dense versions in, gRPC client threads); this script changes what is watched:

* **tables full first**: the trainer's and the servers' capacity is small (``--capacity`` rows per
  server), so LRU eviction is running before the memory baseline is taken at the end of the
  warm-up (``--warmup`` seconds of load, default 20% of the run, at least 30 s);
* **resident memory** (VmRSS) of every process (this one, the trainer, each embedding server,
  TorchServe's Java frontend and each Python worker) at the baseline and at the end; the bound
  is growth <= max(``--rss-bound-mb`` MiB, ``--rss-bound-pct`` %) per process present at both
  ends, this one (the load driver with the publisher thread and the freshness probe) included.
  Workers of dense versions retired meanwhile are gone by the end: with ``--export-every``
  large enough for one version per run (the steps a run holds depend on the machine;
  benchmarks/README.md gives the value used there) one worker lives from the baseline to the
  end and is bound too;
* **updates published vs applied**: after the load, the trainer is stopped (its last packets go
  out), every server must reach the last sequence number of every training shard, and each
  server's ``packets_applied`` must equal the packets published after the checkpoint it started
  from (nothing lost, nothing applied twice), with none quarantined;
* **requests served and failures** (must be 0).

Prints progress lines, then the last line: JSON with every figure and ``"ok"``. Exit 0 when ok.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctrserve import demo  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- memory


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` (None when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def group_members(pgid: int) -> dict[int, str]:
    """``{pid: command name}`` of the live processes in process group ``pgid`` and of all their
    descendants (TorchServe's Java starts its Python workers in other groups)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if rest[0] != "Z":
            table[int(entry.name)] = (name, int(rest[1]), int(rest[2]))  # name, parent, group
    members = {pid: name for pid, (name, _, group) in table.items() if group == pgid}
    grew = True
    while grew:
        children = {pid: name for pid, (name, parent, _) in table.items() if parent in members and pid not in members}
        members.update(children)
        grew = bool(children)
    return members


def snapshot(started: demo.Started) -> dict[str, int]:
    """``{"role pid name": rss bytes}`` of every process the run started, and of this one."""
    out = {f"soak {os.getpid()} python": rss_bytes(os.getpid()) or 0}
    pids = dict(started.pids)
    for role, pgid in started.groups.items():
        for pid, name in group_members(pgid).items():
            if pid != pids.get(role):
                pids[f"{role}/{name}-{pid}"] = pid
    for role, pid in pids.items():
        rss = rss_bytes(pid)
        if rss is not None:
            out[f"{role} {pid}"] = rss
    return out


def rss_growth(start: dict[str, int], end: dict[str, int], bound_mb: float, bound_pct: float) -> dict[str, Any]:
    """Per process present at both ends: start/end MiB, growth, and whether it is within the bound."""
    rows = {}
    for key in sorted(start.keys() & end.keys()):
        growth = end[key] - start[key]
        limit = max(bound_mb * 2**20, start[key] * bound_pct / 100)
        rows[key] = {
            "start_mib": round(start[key] / 2**20, 1),
            "end_mib": round(end[key] / 2**20, 1),
            "growth_mib": round(growth / 2**20, 1),
            "within_bound": growth <= limit,
        }
    return rows


# --------------------------------------------------------------------------- packets


def published_seqs(model_root: str) -> dict[int, int]:
    """``{training shard: last packet seq}`` under the model root (seqs are contiguous from 0)."""
    from embedding_server.modelroot.packets import INCREMENTAL_DIR, parse_packet_name, parse_shard_dir
    from embedding_server.storage.urls import open_storage

    storage = open_storage(model_root)
    last = {}
    for folder in storage.list_dir(INCREMENTAL_DIR):
        layout = parse_shard_dir(folder)
        seqs = [s for s in map(parse_packet_name, storage.list_dir(f"{INCREMENTAL_DIR}/{folder}")) if s is not None]
        if layout is not None and seqs:
            last[layout[0]] = max(seqs)
    return last


def checkpoint_watermark(model_root: str, name: str) -> dict[int, int]:
    """The watermark ``{training shard: seq}`` recorded by checkpoint ``name`` ({} for none)."""
    from embedding_server.modelroot import checkpoint
    from embedding_server.modelroot.packets import CHECKPOINTS_DIR
    from embedding_server.storage.urls import open_storage

    if not name:
        return {}
    manifest = checkpoint.read_manifest(open_storage(model_root).child(f"{CHECKPOINTS_DIR}/{name}"))
    return {int(k): int(v) for k, v in (manifest.get("watermark") or {}).items()}


def updates_check(model_root: str, stats: list[dict]) -> dict[str, Any]:
    """Published packets after each server's starting checkpoint vs the packets it applied."""
    last = published_seqs(model_root)
    servers = []
    for s in stats:
        hot = s.get("hotload") or {}
        start = checkpoint_watermark(model_root, hot.get("checkpoint", ""))
        expected = sum(seq - start.get(shard, -1) for shard, seq in last.items())
        watermarks = {int(st["shard"]): st["watermark"] for st in hot.get("streams", [])}
        servers.append(
            {
                "address": s["address"],
                "checkpoint": hot.get("checkpoint"),
                "published_after_checkpoint": expected,
                "packets_applied": hot.get("packets_applied"),
                "packets_quarantined": hot.get("packets_quarantined"),
                "watermarks": watermarks,
                "equal": expected == hot.get("packets_applied")
                and watermarks == last
                and not hot.get("packets_quarantined"),
            }
        )
    return {
        "published_last_seq": last,
        "packets_published": sum(seq + 1 for seq in last.values()),
        "servers": servers,
        "equal": bool(servers) and all(s["equal"] for s in servers),
    }


# --------------------------------------------------------------------------- the run


class Soak(demo.Demo):
    """The demo's loop with the soak's watch: warm-up, memory baseline, load, drain, checks."""

    def __init__(self, options: demo.DemoOptions, args: argparse.Namespace):
        super().__init__(options)
        self.args = args
        self.result: dict[str, Any] = {}

    def _start_trainer(self, stack, files):
        _set_capacity(files.trainer_global, self.args.capacity)
        return super()._start_trainer(stack, files)

    def _start_servers(self, stack, files, trainer):
        _set_capacity(files.serving_global, self.args.capacity)
        return super()._start_servers(stack, files, trainer)

    def _show(self, tick: demo.Tick) -> None:
        if int(tick.t) % 15 == 0:
            super()._show(tick)

    def _watch(self, stream, probe, group, trainer) -> None:
        from embedding_server.core.config import EmbeddingConfig
        from embedding_server.rpc.remote import RemoteEmbeddingClient

        duration, warmup = self.options.duration, self.args.warmup
        with RemoteEmbeddingClient(EmbeddingConfig.load(self.files.embedding_config), group.addresses) as admin:
            self._run_until(stream, probe, admin, trainer, warmup)
            baseline, baseline_requests = snapshot(self.started), len(stream.samples)
            self.say(
                f"warm-up over ({warmup:.0f} s, {_rows(admin)} rows held): memory baseline of "
                f"{len(baseline)} processes; load for {duration - warmup:.0f} s more ..."
            )
            self._run_until(stream, probe, admin, trainer, duration)
            end = snapshot(self.started)
            stream.stop()
            self.say("load over; stopping the trainer (its last packets go out) and draining the servers ...")
            trainer.request_stop()
            demo.wait_for("the trainer's exit", lambda: trainer.process.poll() is not None, 180.0)
            last = published_seqs(self.model_root)
            demo.wait_for(
                "every server at the last published packet",
                lambda: _caught_up(admin.stats(), last),
                120.0,
                interval=0.5,
            )
            self.server_stats = stats = admin.stats()
        samples = stream.samples
        self.result = {
            "requests": len(samples),
            "failures": sum(not s.ok for s in samples),
            "failure_examples": sorted({s.error for s in samples if not s.ok})[:5],
            "requests_after_baseline": len(samples) - baseline_requests,
            "rows_held": [s["rows"] for s in stats],
            "capacity": [s["capacity"] for s in stats],
            "updates": updates_check(self.model_root, stats),
            "rss": rss_growth(baseline, end, self.args.rss_bound_mb, self.args.rss_bound_pct),
            "rss_bound": f"growth <= max({self.args.rss_bound_mb:g} MiB, {self.args.rss_bound_pct:g}%) per process after "
            f"{warmup:.0f} s of warm-up",
            "model_versions_served": sorted({s.version for s in samples if s.ok}),
        }

    def _run_until(self, stream, probe, admin, trainer, until: float) -> None:
        """The demo's one-line-a-second watch until ``until`` seconds of streaming."""
        while True:
            time.sleep(1.0)
            now = time.monotonic() - stream.start_time
            trainer.check_alive()
            stats = self.server_stats = admin.stats()
            seen = getattr(self, "_seen", 0)  # samples already in earlier ticks
            window = stream.samples[seen:]
            self._seen = seen + len(window)
            tick = self._tick(now, window, stream.samples, probe, stats)
            self.ticks.append(tick)
            self._show(tick)
            if now >= until:
                return


def _rows(admin) -> int:
    return sum(s["rows"] for s in admin.stats())


def _caught_up(stats: list[dict], last: dict[int, int]) -> bool:
    for s in stats:
        streams = {int(st["shard"]): st["watermark"] for st in (s.get("hotload") or {}).get("streams", [])}
        if any(streams.get(shard, -1) < seq for shard, seq in last.items()):
            return False
    return True


def _set_capacity(path: Path, capacity: int) -> None:
    import yaml

    data = yaml.safe_load(path.read_text())
    data["embedding_parameter_server_config"]["capacity"] = capacity
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of prediction load (default 10)")
    parser.add_argument("--quick", action="store_true", help="1 minute")
    parser.add_argument(
        "--warmup", type=float, help="seconds of load before the memory baseline (default 20%%, >= 30 s)"
    )
    parser.add_argument("--shards", type=int, default=2, help="embedding server shards (default 2)")
    parser.add_argument("--clients", type=int, default=4, help="gRPC client threads (default 4)")
    parser.add_argument("--request-rows", type=int, default=64, help="samples per request (default 64)")
    parser.add_argument("--capacity", type=int, default=50_000, help="rows per embedding server (default 50000)")
    parser.add_argument(
        "--export-every",
        type=int,
        default=200,
        help="trainer steps between dense versions, the first one included (default 200); a value "
        "that gives one version per run (see benchmarks/README.md) keeps one set of TorchServe workers alive "
        "from the baseline to the end, so their memory is measured too",
    )
    parser.add_argument(
        "--rss-bound-mb", type=float, default=64.0, help="allowed RSS growth per process, MiB (default 64)"
    )
    parser.add_argument("--rss-bound-pct", type=float, default=10.0, help="or this %% of its baseline (default 10)")
    parser.add_argument("--workdir", help="default: a new temporary directory")
    args = parser.parse_args(argv)
    minutes = 1.0 if args.quick else args.minutes
    duration = minutes * 60
    args.warmup = args.warmup if args.warmup is not None else max(30.0, 0.2 * duration)
    if args.warmup >= duration:
        parser.error(f"--warmup ({args.warmup:g} s) must be shorter than the run ({duration:g} s)")
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="ctrserve-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    options = demo.DemoOptions(
        workdir,
        duration=duration,
        shards=args.shards,
        live=False,
        clients=args.clients,
        request_rows=args.request_rows,
        export_every=args.export_every,
    )
    options.validate()
    demo._quiet_libraries()
    print(f"soak work directory: {workdir}", flush=True)
    soak = Soak(options, args)
    report = soak.run()
    result = {
        "minutes": minutes,
        **soak.result,
        "left_running": report.get("left_running"),
        "error": report.get("error") or None,
        "interrupted": report.get("interrupted") or None,
    }
    # Every process is bound, this driver (load generator, publisher thread, freshness probe) too.
    rss = result.get("rss", {})
    result["ok"] = (
        bool(soak.result)
        and result["failures"] == 0
        and result["requests"] > 0
        and result["updates"]["equal"]
        and all(r["within_bound"] for r in rss.values())
        and not result["left_running"]
        and not result["error"]
    )
    (workdir / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
