"""deploy/grafana/microserve.json queries only metrics the engines and the router export, and the
scrape configs in deploy/README.md parse. In process: the real metric registries, no servers."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from microserve.router.app import build_router_app
from microserve.router.cluster import Cluster
from microserve.router.metrics import RouterMetrics
from microserve.router.router import Router
from microserve.server.metrics import EngineMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "microserve.json"

# The series prometheus_client writes for each kind of metric family.
SERIES_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
                   "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                   "unless", "inf", "nan", "atan2"}
IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")


@dataclass
class _Pool:
    num_blocks: int = 8
    num_free_blocks: int = 8

    def stats(self) -> dict:
        return {"prefix_hit_rate": 0.0}


@dataclass
class _Scheduler:
    running: list = field(default_factory=list)
    waiting: list = field(default_factory=list)
    num_preemptions: int = 0


@dataclass
class _Engine:
    """What EngineMetrics reads of an engine."""

    pool: _Pool = field(default_factory=_Pool)
    scheduler: _Scheduler = field(default_factory=_Scheduler)


def exported_series() -> set[str]:
    """Every series name an engine's and a router's /metrics can show."""
    registries = [EngineMetrics(_Engine()).registry, RouterMetrics(Cluster([])).registry]
    return {f.name + s for r in registries for f in r.collect() for s in SERIES_SUFFIXES[f.type]}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords or label names)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # dashboard variables
    names = set()
    for m in IDENTIFIER.finditer(expr):
        is_call = expr[m.end():].lstrip().startswith("(")
        if not is_call and m.group() not in PROMQL_KEYWORDS:
            names.add(m.group())
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every panel target's `expr` (rows' nested panels too) and the selector of each label_values variable."""
    exprs = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
            assert m, f"variable {var['name']}: expected label_values(selector, label), got {query!r}"
            exprs.append(m.group(1))
    return exprs


def unknown_metrics(dashboard: dict, exported: set[str]) -> dict[str, set[str]]:
    """Queries that name a metric nobody exports, with those names."""
    out = {}
    for expr in dashboard_queries(dashboard):
        missing = metric_names(expr) - exported
        if missing:
            out[expr] = missing
    return out


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_extractor_finds_metric_names_and_nothing_else():
    expr = ('histogram_quantile(0.99, sum by (le, $by) (rate(microserve:made_up_seconds_bucket'
            '{role=~"$role", engine=~"a|b"}[$__rate_interval]))) / on (instance) group_left '
            'sum without (job) (other_metric offset 5m) > bool 1e3')
    assert metric_names(expr) == {"microserve:made_up_seconds_bucket", "other_metric"}
    assert metric_names("microserve_router:engines_up") == {"microserve_router:engines_up"}


def test_exported_series_follow_prometheus_client_naming():
    exported = exported_series()
    assert {"microserve:generation_tokens_total", "microserve:time_to_first_token_seconds_bucket",
            "microserve:num_requests_running", "microserve:kv_transfer_sent_bytes_total",
            "microserve_router:failovers_total", "microserve_router:time_to_first_token_seconds_count"} <= exported
    assert "microserve:generation_tokens" not in exported  # a counter is only scraped with _total


def test_every_dashboard_query_names_an_exported_metric():
    dashboard, exported = _dashboard(), exported_series()
    queries = dashboard_queries(dashboard)
    assert len(queries) > 20
    assert all(metric_names(q) for q in queries), "a query that names no metric"
    assert unknown_metrics(dashboard, exported) == {}


def test_a_panel_on_a_metric_nobody_exports_is_caught():
    dashboard = _dashboard()
    dashboard["panels"].append({"type": "timeseries", "title": "bogus",
                                "targets": [{"expr": 'sum(rate(microserve:made_up_total{role=~"$role"}[5m]))'}]})
    assert unknown_metrics(dashboard, exported_series()) == {
        'sum(rate(microserve:made_up_total{role=~"$role"}[5m]))': {"microserve:made_up_total"}}


def test_the_dashboard_is_grafana_json_over_a_prometheus_variable():
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"role", "engine"} <= set(variables)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert p["targets"] and {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]


def _readme_yaml() -> list[dict]:
    blocks = re.findall(r"```yaml\n(.*?)```", (DEPLOY / "README.md").read_text(), flags=re.S)
    return [yaml.safe_load(b) for b in blocks]


def test_the_readme_scrape_configs_parse_and_discover_through_a_router_route():
    router = Router(Cluster([]))
    routes = {r.path for r in build_router_app(router, None, "m").routes}
    configs = [c for c in _readme_yaml() if "scrape_configs" in c]
    assert len(configs) >= 3
    for config in configs:
        for job in config["scrape_configs"]:
            assert job["job_name"].startswith("microserve-")
            assert job.get("static_configs") or job.get("http_sd_configs")
            for sd in job.get("http_sd_configs", []):
                assert sd["url"].split("/", 3)[3] and "/" + sd["url"].split("/", 3)[3] in routes
                assert sd["authorization"]["type"] == "Bearer"  # /admin/ needs the cluster token
