"""End to end: ``ctrserve demo`` as a user runs it (a child process, shortened), checked as a user would.

One demo run (about 60 s on 2 cores: trainer, an infer-mode embedding server, TorchServe with
the publisher, 25 s of streaming gRPC clients) is shared by the checks of its report; a second
run is interrupted with SIGINT during start-up, and must still stop everything and exit 130.

Freshness goal checked here: every probed row the trainer changed is served with its new value
within 10 s (the demo's default ``--freshness-goal``), and the probe's p99 is within it too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FRESHNESS_GOAL_S = 10.0

pytestmark = [pytest.mark.process, pytest.mark.timeout(300)]


def start_demo(workdir: Path, *args: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "ctrserve",
        "demo",
        "--workdir",
        str(workdir),
        "--no-live",
        "--freshness-goal",
        str(FRESHNESS_GOAL_S),
        *args,
    ]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def assert_nothing_left(report: dict) -> None:
    processes = report["processes"]
    assert processes["pids"], "the report lists no process"
    assert {"trainer", "embedding-shard-0"} <= set(processes["pids"])
    assert not [role for role, pid in processes["pids"].items() if alive(pid)]
    assert not {role: group_members(pgid) for role, pgid in processes["process_groups"].items() if group_members(pgid)}
    assert report["left_running"] == []


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[int, str, dict, Path]:
    workdir = tmp_path_factory.mktemp("demo")
    proc = start_demo(workdir, "--duration", "25")
    output, _ = proc.communicate(timeout=280)
    report = json.loads((workdir / "report.json").read_text())
    return proc.returncode, output, report, workdir


def test_demo_exits_0_and_prints_summary(demo_run):
    code, output, report, workdir = demo_run
    assert code == 0, output[-4000:]
    assert report["ok"] and not report["error"] and not report["interrupted"]
    assert "| predictions" in output and f"report: {workdir / 'report.json'}" in output
    assert "demo OK" in output


def test_predictions_flow_the_whole_time_without_failures(demo_run):
    _, output, report, _ = demo_run
    f = report["figures"]
    assert f["failures"] == 0 and f["requests"] > 0, f["failure_examples"]
    assert f["duration_s"] >= 25
    assert f["first_answer_s"] < 5 and f["last_answer_s"] > f["duration_s"] - 5
    # A version switch on a busy 2-core machine can hold answers back for a second or two.
    assert f["largest_gap_between_answers_s"] < 10, "predictions stalled"
    assert f["latency_p50_ms"] > 0 and f["latency_p99_ms"] >= f["latency_p50_ms"]


def test_served_model_version_advances(demo_run):
    _, _, report, _ = demo_run
    versions = report["figures"]["model_versions_served"]
    assert len(versions) >= 2, versions
    served = [tick["model_version"] for tick in report["timeline"]]
    assert served == sorted(served), "the served version went backwards"


def test_changed_rows_are_served_with_their_new_value_within_the_goal(demo_run):
    _, _, report, _ = demo_run
    f = report["figures"]
    assert f["probe_rows_served"] >= 5 and f["probe_rows_missed"] == 0
    assert f["probe_rows_changed"] >= 1, "no probed row had a known previous value"
    assert f["probe_freshness_p99_s"] <= FRESHNESS_GOAL_S
    example = f["changed_row_example"]
    assert example["old_value_head"] != example["new_value_head"] and example["delay_s"] <= FRESHNESS_GOAL_S
    assert f["server_freshness_p50_s"] is not None and f["packets_quarantined"] == 0
    assert report["checks"]["freshness_within_goal"] and report["checks"]["changed_row_served"]
    assert all(tick["watermark"] for tick in report["timeline"]), "the servers reported no watermark"


def test_plot_training_figures_and_nothing_left_running(demo_run):
    _, _, report, workdir = demo_run
    png = Path(report["plot"])
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["training"]["auc"] > 0.6 and report["training"]["exit_code"] == 0
    assert len(report["training"]["exported_versions"]) >= 2
    assert_nothing_left(report)


def test_sigint_during_start_up_stops_everything(tmp_path):
    """Ctrl-C once the trainer and the embedding server run, while TorchServe is still starting
    in its thread (the hardest moment to clean up after)."""
    proc = start_demo(tmp_path, "--duration", "120")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "shard 0: 127.0.0.1:" in line:
            break
    assert "shard 0: 127.0.0.1:" in lines[-1], "".join(lines)[-3000:]
    os.kill(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["interrupted"] == "SIGINT" and not report["ok"]
    assert "torchserve" in report["processes"]["process_groups"], "TorchServe's start was not waited for"
    assert_nothing_left(report)
