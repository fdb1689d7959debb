"""``benchmarks/gpu_check.py`` (the one-run check of the GPU path, docs/serving.md) runs as written,
with the CPU standing in for the GPU (``--device cpu``), so the script cannot rot on machines
without one: a real embedding server, two handlers answering the same requests with equal
scores, the stage timings at batch 64 and 512, and the training step of ``mixed_precision=True``
(float32 on the CPU, TrainCtx's AMP being CUDA-only: the JSON says so)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process
REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_with_the_cpu_standing_in_for_the_gpu():
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--repeats", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert "GPU path NOT checked (--device cpu): the CPU stands in for the GPU" in lines
    summary = json.loads(lines[-1])
    assert summary["ok"] is True and summary["gpu_checked"] is False
    assert summary["handler_devices"] == {"cpu": "cpu", "gpu": "cpu"}
    assert set(summary["scores_max_abs_diff"]) == {"b64", "b512"}
    assert all(diff <= 1e-5 for diff in summary["scores_max_abs_diff"].values())
    assert set(summary["timings_ms"]) == {
        f"{device}_b{batch}_{stage}"
        for device in ("cpu", "gpu")
        for batch in (64, 512)
        for stage in ("decode", "lookup", "dense", "post")
    }
    assert all(ms > 0 for ms in summary["timings_ms"].values())
    train = summary["train"]
    assert train["device"] == "cpu" and train["amp"] is False and "only on CUDA" in train["reason"]
    assert 0 < train["loss"] < 10
