"""infra/grafana/expertmesh-moe.json queries only metrics that exist: every metric name in every panel's
PromQL and in the template variables is one that our server's /metrics really exports (read from a real
app built in process, suffixes included) or one of a few Ray metrics that Ray's own metrics agent defines.
A doctored copy naming a metric that does not exist is caught."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from expertmesh.engine.llm_engine import EngineConfig, LLMEngine
from expertmesh.platform.server.app import build_app
from expertmesh.platform.server.async_engine import AsyncEngine
from expertmesh.platform.server.settings import ServerSettings

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "expertmesh-moe.json"
KEY = "grafana-test-key"
# Exported by Ray's metrics agent on every node (port 8080), namespace `ray_`.
RAY_METRICS = frozenset({"ray_node_gpus_utilization", "ray_node_gram_used", "ray_node_gram_available"})
BUILTIN_PANELS = {"row", "timeseries", "gauge", "stat", "table", "heatmap", "bargauge", "text"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_DURATION = re.compile(r"(?<![\w:])(?:\d+(?:ms|[smhdwy]))+(?![\w:])")  # 5m, 1h30m
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring",
             "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords, labels
    (inside `{...}` or a grouping), ranges, strings or Grafana variables."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)  # Grafana variables
    s = _NUMBER.sub(" ", _DURATION.sub(" ", s))
    names = set()
    for m in _IDENT.finditer(s):
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue  # a function call or an operator
        names.add(m.group(0))
    return names


def variable_metric_names(variable: dict) -> set[str]:
    """Metric names a query variable reads: the selector of `label_values(selector, label)` or the expression
    of `query_result(expr)`."""
    query = variable.get("query")
    query = query.get("query", "") if isinstance(query, dict) else query or ""
    if m := re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query):
        return metric_names(m.group(1))
    if m := re.fullmatch(r"\s*query_result\((.*)\)\s*", query):
        return metric_names(m.group(1))
    return set()


def unknown_metrics(dashboard: dict, known: set[str]) -> list[str]:
    """'where: name' for every metric the dashboard names that is not in `known`."""
    problems = []
    for panel in _all_panels(dashboard):
        for target in panel.get("targets", []):
            for name in sorted(metric_names(target.get("expr", "")) - known):
                problems.append(f"panel {panel.get('title')!r} {target.get('refId')}: {name}")
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            for name in sorted(variable_metric_names(variable) - known):
                problems.append(f"variable {variable['name']!r}: {name}")
    return problems


def _all_panels(dashboard: dict):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def exported_names(metrics_text: str) -> set[str]:
    """Every series name a /metrics text exports or will export once observed: the samples present, plus the
    names each family's type implies (a histogram's `_bucket`/`_sum`/`_count`, a counter's `_total`)."""
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        elif family.type == "summary":
            names.update((family.name, family.name + "_sum", family.name + "_count"))
        else:
            names.add(family.name)
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def server_metrics(tiny_model_dir) -> set[str]:
    """The names the real app's /metrics exports (scraped twice, so that the route counters of the first
    scrape show up in the second)."""
    settings = ServerSettings(model=str(tiny_model_dir), api_keys=(KEY,))
    engine = AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(tiny_model_dir))),
                         max_waiting=settings.max_waiting, retry_after_s=settings.retry_after_s)
    try:
        with TestClient(build_app(engine, settings)) as client:
            auth = {"Authorization": f"Bearer {KEY}"}
            assert client.get("/metrics", headers=auth).status_code == 200
            response = client.get("/metrics", headers=auth)
            assert response.status_code == 200
    finally:
        engine.shutdown()
    return exported_names(response.text)


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(expertmesh_request_latency_seconds_bucket'
            '{route=~"/v1/.*", job!="x"}[$__rate_interval]))) / on() group_left sum(up offset 5m) > bool 1e-3')
    assert metric_names(expr) == {"expertmesh_request_latency_seconds_bucket", "up"}
    assert metric_names("sum(a_total) / (b + c:recorded)") == {"a_total", "b", "c:recorded"}
    variable = {"type": "query", "query": {"query": "label_values(expertmesh_expert_tokens{layer!=\"\"}, layer)"}}
    assert variable_metric_names(variable) == {"expertmesh_expert_tokens"}


def test_server_exports_the_names_the_dashboard_relies_on(server_metrics):
    # the suffixes prometheus_client adds: a wrong guess here would make every panel below vacuous
    assert {"expertmesh_requests_total", "expertmesh_time_to_first_token_seconds_bucket",
            "expertmesh_expert_tokens", "expertmesh_routing_entropy"} <= server_metrics
    assert "expertmesh_requests" not in server_metrics


def test_ray_metric_names_are_rays_own():
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    for name in RAY_METRICS:
        assert name.removeprefix("ray_") in METRICS_GAUGES, name


def test_every_dashboard_metric_is_exported(dashboard, server_metrics):
    assert unknown_metrics(dashboard, server_metrics | RAY_METRICS) == []


def test_every_panel_queries_something(dashboard):
    for panel in _all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            assert metric_names(target["expr"]), f"{panel['title']}: {target['expr']}"


def test_a_dashboard_naming_a_missing_metric_is_caught(dashboard, server_metrics):
    known = server_metrics | RAY_METRICS
    doctored = copy.deepcopy(dashboard)
    panel = next(p for p in _all_panels(doctored) if "expertmesh_routing_entropy" in json.dumps(p.get("targets")))
    target = panel["targets"][0]
    target["expr"] = target["expr"].replace("expertmesh_routing_entropy", "expertmesh_routing_entropy_total")
    problems = unknown_metrics(doctored, known)
    assert problems == [f"panel {panel['title']!r} {target['refId']}: expertmesh_routing_entropy_total"]

    doctored = copy.deepcopy(dashboard)
    layer = next(v for v in doctored["templating"]["list"] if v["name"] == "layer")
    layer["query"]["query"] = "label_values(expertmesh_expert_load, layer)"
    assert unknown_metrics(doctored, known) == ["variable 'layer': expertmesh_expert_load"]


def test_dashboard_shape(dashboard):
    assert dashboard["uid"] == "expertmesh-moe"
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in _all_panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in _all_panels(dashboard):
        assert panel["type"] in BUILTIN_PANELS, f"{panel['title']}: {panel['type']} needs a plugin"
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_covers_the_moe_figures(dashboard):
    exprs = " ".join(t["expr"] for p in _all_panels(dashboard) for t in p.get("targets", []))
    used = set().union(*(metric_names(t["expr"]) for p in _all_panels(dashboard) for t in p.get("targets", [])))
    for name in ("expertmesh_expert_tokens", "expertmesh_expert_busiest_share", "expertmesh_routing_entropy",
                 "expertmesh_time_to_first_token_seconds_bucket", "expertmesh_inter_token_latency_seconds_bucket",
                 "expertmesh_requests_running", "expertmesh_requests_waiting", "expertmesh_requests_total",
                 "expertmesh_generation_tokens_per_second", "expertmesh_kv_cache_blocks_used",
                 "ray_node_gpus_utilization"):
        assert name in used, name
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs
