"""The Grafana dashboard deploy/grafana/laneswitch.json: every query parses, and names only
metrics that laneswitch exports or documents in docs/metrics.md's metrics table.

No Grafana runs here. Grafana's variables are replaced by values it would send (`$service` by a
service name, `$__rate_interval` by a duration), then every expression is parsed by Prometheus'
own parser: `promtool` has no "parse this expression" command, so the expressions become the
`expr` of recording rules in a generated rules file, which `promtool check rules` parses (it
rejects the file on the first expression that does not parse, naming it). The integration test in
tests/e2e/test_prometheus.py also runs every query against a live Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.helpers import ROOT, RecordingUpstream, running_proxy, two_version_config

DASHBOARD = ROOT / "deploy" / "grafana" / "laneswitch.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

# The metric families laneswitch documents in docs/metrics.md (checked against it when it is
# next to the repository, as it is on the developers' machines and in CI).
SPEC_METRICS = {
    "laneswitch_requests_total": "counter",
    "laneswitch_request_duration_seconds": "histogram",
    "laneswitch_upstream_errors_total": "counter",
    "laneswitch_in_flight_requests": "gauge",
    "laneswitch_weight": "gauge",
    "laneswitch_endpoint_healthy": "gauge",
    "laneswitch_rollout_phase": "gauge",
    "laneswitch_rollbacks_total": "counter",
    "laneswitch_analysis_value": "gauge",
    "laneswitch_config_reloads_total": "counter",
    "laneswitch_client_aborts_total": "counter",
    "laneswitch_drain_cut_requests_total": "counter",
    # SPEC §6: the state file.
    "laneswitch_state_entries_skipped_total": "counter",
    "laneswitch_state_write_failures_total": "counter",
}
# SPEC §9: exported only by a member of a fleet (a `fleet` block), with no labels of their own.
FLEET_METRICS = {
    "laneswitch_fleet_members": "gauge",
    "laneswitch_fleet_leader": "gauge",
    "laneswitch_fleet_store_up": "gauge",
    "laneswitch_fleet_apply_seconds": "histogram",
}
RULES = ROOT / "deploy" / "prometheus" / "laneswitch-rules.yml"
# What Grafana puts in place of its variables when it sends a query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "${service}": "shop",
    "$service": "shop",
}
METRIC_NAME = re.compile(r"\blaneswitch_[a-z0-9_]+\b")
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<metric>[^,()]+),\s*)?(?P<label>\w+)\)$")


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL as Grafana sends it) for every panel target and annotation."""
    dashboard = load_dashboard()
    found: list[tuple[str, str]] = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            found.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    return [(where, substitute(expr)) for where, expr in found]


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def variable_metrics() -> list[str]:
    """Metric names the dashboard's query variables read (Grafana's label_values, not PromQL)."""
    names = []
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = LABEL_VALUES.match(text.strip())
        assert match is not None, f"variable {variable['name']}: {text}"
        if match["metric"]:
            names.append(match["metric"].strip())
    return names


def base_name(sample: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in SPEC_METRICS | FLEET_METRICS:
            return sample[: -len(suffix)]
    return sample


def samples_of(metrics: dict[str, str]) -> set[str]:
    """The sample names of the families (a histogram's _bucket, _sum and _count)."""
    found = set(metrics)
    for name, kind in metrics.items():
        if kind == "histogram":
            found |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return found


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def check_rules(tmp_path: Path, exprs: list[tuple[str, str]]) -> subprocess.CompletedProcess[str]:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "laneswitch" and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    names = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "service"} <= names
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    titles = " / ".join(panel["title"].lower() for panel in dashboard["panels"])
    for wanted in (
        "traffic share",
        "success rate",
        "p99",
        "rollout phase",
        "weight",
        "rollbacks",
        "upstream errors",
        "in-flight",
    ):
        assert wanted in titles, wanted


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    queries = dashboard_queries()
    result = check_rules(tmp_path, queries)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_a_query_that_does_not_parse_is_caught(tmp_path: Path) -> None:
    """The check above is not vacuous."""
    result = check_rules(tmp_path, [("broken", "sum by (version (rate(laneswitch_weight[1m]))")])
    assert result.returncode != 0
    assert "parse error" in result.stdout + result.stderr


def metrics_table_section() -> str:
    """docs/metrics.md's "## Metrics" section: the table of every metric family."""
    text = METRICS_DOC.read_text()
    start = text.index("\n## Metrics\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_the_metric_list_matches_the_documented_table() -> None:
    """SPEC_METRICS is docs/metrics.md's metrics table (the documented contract), minus workers
    and the fleet (exported only with `workers` > 1, only with a `fleet` block)."""
    section = metrics_table_section()
    rows = dict(re.findall(r"^\| `(laneswitch_\w+)` \| (\w+) \|", section, re.MULTILINE))
    documented = {
        name: kind
        for name, kind in rows.items()
        if "_worker_" not in name and "_fleet_" not in name
    }
    assert documented == SPEC_METRICS


async def exported_metrics() -> dict[str, str]:
    """Sample name -> family type, from a live proxy's GET /metrics after one request."""
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    try:
        async with running_proxy(two_version_config(blue.endpoint, green.endpoint)) as proxy:
            client = await proxy.client()
            await client.request(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            await client.close()
            url = f"http://127.0.0.1:{proxy.server.admin_port}/metrics"
            async with aiohttp.ClientSession() as session, session.get(url) as answer:
                assert answer.status == 200
                text = await answer.text()
    finally:
        await blue.stop()
        await green.stop()
    types: dict[str, str] = {}
    exported: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
    for line in text.splitlines():
        if line and not line.startswith("#"):
            sample = re.split(r"[{ ]", line, maxsplit=1)[0]
            family = next((t for t in types if sample.startswith(t)), sample)
            exported[sample] = types.get(family, "untyped")
    for name, kind in types.items():
        exported.setdefault(name, kind)
    return exported


async def test_dashboard_names_only_exported_or_spec_metrics() -> None:
    exported = await exported_metrics()
    spec_samples = samples_of(SPEC_METRICS) | samples_of(FLEET_METRICS)
    used: dict[str, list[str]] = {}
    for where, expr in dashboard_queries():
        for name in METRIC_NAME.findall(expr):
            used.setdefault(name, []).append(where)
    for name in variable_metrics():
        used.setdefault(name, []).append("variables")
    unknown = {
        name: where for name, where in used.items() if name not in exported.keys() | spec_samples
    }
    assert not unknown, f"metrics neither exported nor documented: {unknown}"
    # The families the dashboard shows that laneswitch does not export yet (their panels stay
    # empty until it does): reported, not failed.
    missing = sorted({base_name(name) for name in used if name not in exported})
    if missing:
        print(f"dashboard metrics documented but not exported yet: {missing}")
    # Every exported family the dashboard uses has its documented type.
    for name in used:
        if name in exported and base_name(name) in SPEC_METRICS:
            assert exported[name] == SPEC_METRICS[base_name(name)], name


def test_the_fleet_panels_and_alerts_use_the_fleet_metrics_as_named() -> None:
    """Leader changes, members pending and the store down: on the dashboard and as alerts,
    with the fleet metrics exactly as SPEC §9 and docs/metrics.md's metrics table name them."""
    section = metrics_table_section()
    rows = dict(re.findall(r"^\| `(laneswitch_fleet_\w+)` \| (\w+) \|", section, re.MULTILINE))
    assert rows == FLEET_METRICS
    fleet_samples = samples_of(FLEET_METRICS)
    panels = {panel["title"]: panel for panel in load_dashboard()["panels"]}
    wanted = {
        "Fleet leader": "laneswitch_fleet_leader",
        "Leader changes": "laneswitch_fleet_leader",
        "Fleet members: scraped vs live": "laneswitch_fleet_members",
        "Fleet store up per member": "laneswitch_fleet_store_up",
        "Change applied (p99, p50)": "laneswitch_fleet_apply_seconds_bucket",
    }
    for title, metric in wanted.items():
        exprs = [target["expr"] for target in panels[title]["targets"]]
        assert all(metric in expr for expr in exprs), (title, exprs)
    alerts = {
        rule["alert"]: rule["expr"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }
    for alert, metric in {
        "LaneswitchFleetStoreDown": "laneswitch_fleet_store_up",
        "LaneswitchFleetNoLeader": "laneswitch_fleet_leader",
        "LaneswitchFleetLeaderChanges": "laneswitch_fleet_leader",
        "LaneswitchFleetMembersPending": "laneswitch_fleet_members",
        "LaneswitchFleetApplySlow": "laneswitch_fleet_apply_seconds_bucket",
    }.items():
        assert metric in alerts[alert], alert
    # No other fleet name anywhere: a typo would be a panel or an alert that never shows.
    used = {
        name
        for expr in [*alerts.values(), *(expr for _, expr in dashboard_queries())]
        for name in METRIC_NAME.findall(expr)
        if name.startswith("laneswitch_fleet_")
    }
    assert used <= fleet_samples, used - fleet_samples
    assert {base_name(name) for name in used} == set(FLEET_METRICS)
    # docs/metrics.md's alert table lists them.
    text = METRICS_DOC.read_text()
    for alert in alerts:
        assert f"| `{alert}` |" in text, alert
