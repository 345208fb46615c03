"""The Grafana dashboards and provisioning, checked against what the gateway really exports and logs.

Every Prometheus expression may name only metrics (and labels) that a running gateway serves on
its metrics port; every ClickHouse query must run, Grafana's macros filled in, against the real
request table (embedded chDB and a ClickHouse HTTP server), over rows written by real requests.
"""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy.app import LOG_STORE, METRICS
from tests.admin_traffic import CONFIG, LOG_ENV, now_ms, send_traffic, wait_for_rows

from .conftest import GatewayFactory

GRAFANA = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
METRIC = re.compile(r"\bedgeproxy_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(edgeproxy_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}


def load(path: Path) -> dict[str, Any]:
    return dict(orjson.loads(path.read_bytes()))


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those nested in collapsed rows too."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def targets(kind: str) -> list[tuple[str, dict[str, Any]]]:
    """(dashboard/panel title, target) for every query of one datasource type."""
    found = []
    for path in DASHBOARDS:
        for panel in panels(load(path)):
            for target in panel.get("targets", []):
                if target["datasource"]["type"] == kind:
                    found.append((f"{path.stem}/{panel['title']}", target))
    return found


def provisioned_datasources() -> dict[str, str]:
    """uid → type of every provisioned datasource."""
    found = {}
    for path in (GRAFANA / "provisioning" / "datasources").glob("*.yaml"):
        for source in yaml.safe_load(path.read_text())["datasources"]:
            found[source["uid"]] = source["type"]
    return found


def test_dashboards_are_valid_and_use_provisioned_datasources() -> None:
    assert {p.name for p in DASHBOARDS} >= {"edgeproxy-gateway.json", "edgeproxy-usage.json"}
    sources = provisioned_datasources()
    assert set(sources.values()) == {"prometheus", "grafana-clickhouse-datasource"}
    uids = set()
    for path in DASHBOARDS:
        board = load(path)
        assert board["uid"] not in uids and len(board["uid"]) <= 40
        uids.add(board["uid"])
        ids = [panel["id"] for panel in panels(board)]
        assert len(ids) == len(set(ids)), path.name
        for panel in panels(board):
            assert {"x", "y", "w", "h"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            if panel["type"] == "row":
                continue
            assert panel["targets"], f"{path.name}/{panel['title']} has no query"
            assert sources.get(panel["datasource"]["uid"]) == panel["datasource"]["type"], panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
            for target in panel["targets"]:
                assert sources.get(target["datasource"]["uid"]) == target["datasource"]["type"], panel["title"]
    assert len(targets("prometheus")) >= 20 and len(targets("grafana-clickhouse-datasource")) >= 10


def test_dashboard_provider_reads_where_compose_mounts_the_dashboards() -> None:
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "edgeproxy.yaml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    compose = yaml.safe_load((GRAFANA.parent / "docker-compose.yml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in volumes
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in volumes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_prometheus_expressions_name_only_exported_metrics(start_gateway: GatewayFactory) -> None:
    port = free_port()
    gateway = await start_gateway(CONFIG, {"EDGEPROXY_METRICS_PORT": str(port)})
    await send_traffic(gateway.url)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            text = await response.text()
        # With a port of its own, /metrics is not served to the API's clients.
        async with session.get(f"{gateway.url}/metrics") as response:
            assert response.status == 404
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    assert "edgeproxy_requests_total" in names and labels["edgeproxy_requests_total"] >= {"model", "cache", "outcome"}
    # Metrics without samples yet (no breaker opened, nothing refused) still have declared labels;
    # prometheus-client keeps them in `_labelnames` only.
    for metric in vars(gateway.app[METRICS]).values():
        if isinstance(metric, Counter | Gauge | Histogram):
            kind = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}[type(metric)]
            base = metric._name
            for suffix in SUFFIXES[kind]:
                labels.setdefault(base + suffix, set()).update(metric._labelnames)
    for name in [n for n in names if n.endswith("_bucket")]:
        labels.setdefault(name, set()).add("le")

    checked = 0
    for where, target in targets("prometheus"):
        expr = target["expr"].replace("$__rate_interval", "1m").replace("$target", ".*")
        assert "$" not in expr, f"{where}: unknown variable in {expr}"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), where
        used = set(METRIC.findall(expr))
        assert used, f"{where}: names no edgeproxy metric"
        assert used <= names, f"{where}: not exported: {sorted(used - names)}"
        for metric, matchers in SELECTOR.findall(expr):
            assert set(MATCHER.findall(matchers)) <= labels[metric], f"{where}: {metric} has no such label"
        grouped = {label.strip() for group in GROUPING.findall(expr) for label in group.split(",") if label.strip()}
        for metric in used:
            assert grouped <= labels[metric], f"{where}: {metric} lacks {sorted(grouped - labels[metric])}"
        assert set(LEGEND.findall(target.get("legendFormat", ""))) <= grouped, f"{where}: legend names an ungrouped label"
        checked += 1
    for path in DASHBOARDS:
        for variable in load(path)["templating"]["list"]:
            if variable.get("datasource", {}).get("type") == "prometheus":
                metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
                assert metric in names and label in labels[metric]
    assert checked == len(targets("prometheus"))


def grafana_sql(sql: str, table: str, start_s: int, end_s: int, app: str | None) -> str:
    """The SQL Grafana's ClickHouse plugin would send, for one time range and app selection."""
    sql = sql.replace("${table}", table)
    sql = re.sub(r"\$__timeFilter\((\w+)\)", rf"\1 >= toDateTime({start_s}) AND \1 <= toDateTime({end_s})", sql)
    sql = re.sub(r"\$__timeInterval\((\w+)\)", r"toStartOfInterval(toDateTime(\1), INTERVAL 60 second)", sql)
    sql = sql.replace("$__fromTime", f"toDateTime({start_s})").replace("$__toTime", f"toDateTime({end_s})")
    # All apps selected: the plugin drops the condition; one app: it keeps it, the value quoted.
    sql = re.sub(
        r"\$__conditionalAll\((.*), \$app\)",
        (lambda m: m.group(1).replace("${app:singlequote}", f"'{app}'")) if app else "1 = 1",
        sql,
    )
    assert "$" not in sql, f"a macro was left unexpanded: {sql}"
    return sql


@pytest.mark.parametrize("logs", ["embedded", "server"])
async def test_clickhouse_queries_run_on_the_real_schema(start_gateway: GatewayFactory, logs: str) -> None:
    env = {**LOG_ENV}
    if logs == "server":
        env["EDGEPROXY_LOGS_DATABASE"] = f"t_{uuid.uuid4().hex[:12]}"
    gateway = await start_gateway(CONFIG, env, logs=logs)
    sent = await send_traffic(gateway.url)
    await wait_for_rows(gateway.url, len(sent))
    store = gateway.app[LOG_STORE]
    end_s = now_ms() // 1000 + 60
    start_s = end_s - 3600
    queries = targets("grafana-clickhouse-datasource")
    for where, target in queries:
        for app in (None, "billing"):
            sql = grafana_sql(target["rawSql"], store.qualified, start_s, end_s, app)
            rows = await store.query(sql)
            assert rows, f"{where} (app={app}) returned nothing over the test's traffic"
            if target["queryType"] == "timeSeries":
                assert isinstance(next(iter(rows[0].values())), datetime), f"{where}: first column must be the time"
    for path in DASHBOARDS:
        for variable in load(path)["templating"]["list"]:
            if variable.get("datasource", {}).get("type") == "grafana-clickhouse-datasource":
                rows = await store.query(variable["query"].replace("${table}", store.qualified))
                assert {next(iter(r.values())) for r in rows} == {"billing", "search"}
    # The time filter really filters: an hour long ago holds nothing.
    slowest = next(t for w, t in queries if w.endswith("/Slowest requests"))
    assert await store.query(grafana_sql(slowest["rawSql"], store.qualified, 0, 3600, None)) == []
