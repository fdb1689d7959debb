"""Operations: the Grafana dashboards (``deploy/grafana/``) and Prometheus alert rules
(``deploy/prometheus/``) query only metrics the code exports; counters are counters; the rules
pass ``promtool check rules`` and their unit tests (``promtool test rules``); the trainer's
metrics (``--metrics-port``) move as it works (the publisher's are scraped as it publishes into
a real TorchServe in tests/test_torchserve.py).

promtool comes with Debian's ``prometheus`` package: ``deploy/prometheus/install.sh`` installs
it (CI runs it from ``.ci/run``); the promtool tests fail with that hint where it is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from archiver.publish import PublisherMetrics
from ctrserve import monitoring
from embedding_server.core.config import EmbeddingConfig, GlobalConfig
from embedding_server.rpc.metrics import ServerMetrics
from embedding_server.store.store import EmbeddingStore
from trainer.job import JobConfig, run_job
from trainer.telemetry import TrainerMetrics

REPO = Path(__file__).resolve().parents[1]
#: TorchServe's own series the dashboards and rules use (tests/test_torchserve.py scrapes a real
#: TorchServe for them).
TORCHSERVE = monitoring.TORCHSERVE_SERIES


def scrape(port: int) -> dict[str, float]:
    """``{series line without value: value}`` of ``http://127.0.0.1:port/metrics``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


@pytest.mark.unit
def test_metric_names_of_promql_expressions():
    assert monitoring.metric_names(
        'histogram_quantile(0.99, sum by (le, shard) (rate(a_bucket{method="Lookup", x=~"$shard"}[$__rate_interval])))'
    ) == {"a_bucket"}
    assert monitoring.metric_names("sum(rate(b_total[5m])) / on (job) group_left sum(c) > 1e9") == {"b_total", "c"}
    assert monitoring.metric_names("time() - max(d_seconds) offset 5m") == {"d_seconds"}
    assert monitoring.metric_names('up{job=~".*embedding.*"} == 0 and e unless f') == {"up", "e", "f"}


@pytest.mark.unit
def test_dashboards_and_rules_query_only_metrics_the_code_exports():
    exported = monitoring.exported_metric_names()
    queries = list(monitoring.queries())
    files = {where.split(":")[0] for where, _ in queries}
    assert {
        "ctrserve-serving.json",
        "ctrserve-embedding-servers.json",
        "ctrserve-freshness.json",
        "ctrserve-training.json",
        "ctrserve-rules.yml",
    } <= files
    unknown = {}
    for where, expr in queries:
        names = monitoring.metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        missing = names - exported - monitoring.PROMETHEUS_SERIES - TORCHSERVE
        if missing:
            unknown[where] = sorted(missing)
    assert not unknown, f"queries of metrics nothing exports: {unknown}"
    used = set().union(*(monitoring.metric_names(e) for _, e in queries))
    assert TORCHSERVE <= used  # the list names only what the dashboards use


@pytest.mark.unit
def test_dashboards_are_grafana_json_with_unique_uids_and_a_datasource_variable():
    uids = []
    for path in sorted(monitoring.GRAFANA.glob("*.json")):
        dashboard = json.loads(path.read_text())
        uids.append(dashboard["uid"])
        assert dashboard["title"].startswith("ctrserve / ") and dashboard["panels"]
        assert dashboard["templating"]["list"][0]["type"] == "datasource"
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], (path.name, panel["title"])
    assert len(uids) == len(set(uids)) == 4


@pytest.mark.unit
def test_counts_are_exported_as_counters_and_levels_as_gauges():
    config = EmbeddingConfig.from_dict({"slots_config": {"a": {"dim": 4}}})
    store = EmbeddingStore(config, GlobalConfig.from_dict({}))
    families = {f.name: f.type for f in ServerMetrics({"shard": "0"}, store.counters).registry.collect()}
    for key in ("hits", "misses", "evictions", "inserts"):
        assert families[f"ctrserve_embedding_store_{key}"] == "counter"  # exported as ..._total
    assert families["ctrserve_embedding_store_rows"] == families["ctrserve_embedding_store_capacity"] == "gauge"
    for registry in (TrainerMetrics().registry, PublisherMetrics().registry):
        for family in registry.collect():
            counts = family.name.endswith(("_published", "_exported", "_failures", "_steps", "_samples"))
            assert (family.type == "counter") == counts, family.name


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run deploy/prometheus/install.sh (Debian's prometheus package)", pytrace=False)
    return path


@pytest.mark.process
def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    promtool = _promtool()
    rules = sorted(monitoring.PROMETHEUS.glob("*-rules.yml"))
    assert rules
    check = subprocess.run([promtool, "check", "rules", *map(str, rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = sorted(monitoring.PROMETHEUS.glob("*-rules.test.yml"))
    assert [t.name.replace(".test", "") for t in tests] == [r.name for r in rules]  # every rule file is tested
    run = subprocess.run(
        [promtool, "test", "rules", *[t.name for t in tests]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=monitoring.PROMETHEUS,
    )
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr
    # Each alert of the rule files has at least one expected firing in the tests.
    alerts = {r["alert"] for f in rules for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]}
    fired = {
        case["alertname"]
        for t in tests
        for test in yaml.safe_load(t.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert alerts - fired <= {"CtrservePacketUnreadable", "CtrserveServingErrorRate"}


@pytest.mark.unit
def test_trainer_metrics_follow_a_training_job(tmp_path):
    (tmp_path / "emb.yml").write_text(yaml.safe_dump({"slots_config": {f"C{i}": {"dim": 4} for i in range(1, 27)}}))
    job = {
        "embedding_config": str(tmp_path / "emb.yml"),
        "data": {"batch_size": 64, "synthetic": {"seed": 3}},
        "model": {"type": "dlrm", "bottom_mlp": [8], "top_mlp": [8]},
        "sparse_optimizer": {"type": "adagrad", "lr": 0.1},
        "train": {"steps": 6, "eval_every": 3, "eval_batches": 2, "log_every": 3},
        "output": {"dir": str(tmp_path / "run"), "model_root": str(tmp_path / "root"), "export_every": 3},
    }
    (tmp_path / "job.yml").write_text(yaml.safe_dump(job))
    telemetry = TrainerMetrics()
    port = telemetry.serve_http(0)
    result = run_job(JobConfig.load(tmp_path / "job.yml"), progress=False, telemetry=telemetry)
    got = scrape(port)
    assert got["ctrserve_trainer_steps_total"] == 6 and got["ctrserve_trainer_step"] == 6
    assert got["ctrserve_trainer_samples_total"] == result.samples == 6 * 64
    assert got["ctrserve_trainer_samples_per_second"] > 0 and got["ctrserve_trainer_loss"] > 0
    assert got["ctrserve_trainer_eval_auc"] == pytest.approx(result.eval_auc)
    assert got["ctrserve_trainer_versions_exported_total"] == len(result.exported_versions) == 2
    assert got["ctrserve_trainer_last_export_timestamp_seconds"] > 0
    assert "ctrserve_trainer_packets_published_total" in got
