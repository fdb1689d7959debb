"""The dashboards and alert rules under ``deploy/`` and the metrics they query.

``deploy/grafana/*.json`` (Grafana dashboards) and ``deploy/prometheus/*-rules.yml`` (alert
rules) query metrics by name; :func:`queries` reads every PromQL expression in them and
:func:`metric_names` the metric names of one. :func:`exported_metric_names` builds every ctrserve
exporter in this process (an embedding server's metrics with a model-root follower's, the
trainer's and the publisher's) and lists the series names they export, so a test can check that
no dashboard or rule queries a metric nothing exports (``tests/test_operations.py``). TorchServe's
own metrics (``ts_*``, ``Requests5XX``, the handler's ``EmbeddingLookupTime``) are checked by
scraping a real TorchServe (``tests/test_torchserve.py``).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "deploy" / "grafana"
PROMETHEUS = REPO / "deploy" / "prometheus"
#: TorchServe's own series the dashboards and rules use: its frontend's request counters and
#: latency sums, and the handler's timings (``handler/timing.py``), auto-detected by TorchServe.
TORCHSERVE_SERIES = frozenset(
    {
        "ts_inference_requests_total",
        "ts_inference_latency_microseconds",
        "ts_queue_latency_microseconds",
        "Requests2XX",
        "Requests4XX",
        "Requests5XX",
        "EmbeddingLookupTime",
        "DenseInferenceTime",
    }
)
#: Series Prometheus makes itself for every scrape target.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
    }
)
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def queries() -> Iterator[tuple[str, str]]:
    """``(where, expr)`` of every PromQL expression in the dashboards and the alert rules."""
    for path in sorted(GRAFANA.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in _panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield f"{path.name}: {panel.get('title')}", target["expr"]
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            if variable.get("type") == "query" and isinstance(query, dict) and query.get("query"):
                yield f"{path.name}: variable {variable['name']}", _variable_expr(query["query"])
    for path in sorted(PROMETHEUS.glob("*-rules.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                yield f"{path.name}: {rule.get('alert') or rule.get('record')}", rule["expr"]


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _variable_expr(query: str) -> str:
    """``label_values(metric, label)`` -> ``metric``."""
    match = re.fullmatch(r"\s*label_values\(\s*([^,]+?)\s*(?:,\s*\w+\s*)?\)\s*", query)
    return match.group(1) if match else query


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, label names, durations,
    numbers and Grafana's ``$variables`` left out)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings
    e = re.sub(r"\$\{?\w+(?::\w+)?\}?", " ", e)  # Grafana variables
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        token, before = match.group(), e[: match.start()]
        if e[match.end() :].lstrip().startswith("("):
            continue  # a function or aggregation
        if token.lower() in _KEYWORDS or (before and (before[-1].isdigit() or before[-1] == ".")):
            continue  # a keyword, or the exponent/unit of a number (1e9)
        names.add(token)
    return names


def exported_metric_names() -> set[str]:
    """Every series name ctrserve's own exporters can export, from the exporters themselves."""
    from archiver.publish import PublisherMetrics
    from embedding_server.core.config import EmbeddingConfig, GlobalConfig
    from embedding_server.modelroot.hotload import ModelRootFollower
    from embedding_server.rpc.metrics import ServerMetrics
    from embedding_server.store.store import EmbeddingStore
    from trainer.telemetry import TrainerMetrics

    config = EmbeddingConfig.from_dict({"slots_config": {"a": {"dim": 4}}})
    store = EmbeddingStore(config, GlobalConfig.from_dict({"common_config": {"job_type": "infer"}}))
    server = ServerMetrics({"shard": "0"}, store.counters)
    with tempfile.TemporaryDirectory() as root:
        ModelRootFollower(store, root, registry=server.registry, labels={"shard": "0"})  # not started
    names: set[str] = set()
    for registry in (server.registry, TrainerMetrics().registry, PublisherMetrics().registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
            names.update(sample.name for sample in family.samples)
    return names
