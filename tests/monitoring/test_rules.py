"""The alert rules, the scrape job and the Grafana dashboard, checked with promtool (no Prometheus running)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from .conftest import ALERT_TESTS, DASHBOARD, RULES, objectives_rule_file, tool

COMPARISON = re.compile(r"\s(>|<|==|!=|>=|<=)\s")


def promtool(*args: str) -> str:
    proc = subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_promtool_checks_the_chart_rules_and_the_rendered_objectives(tmp_path: Path) -> None:
    assert "SUCCESS: 6 rules found" in promtool("check", "rules", str(RULES))
    objectives = tmp_path / "objectives.yaml"
    objectives.write_text(yaml.safe_dump(objectives_rule_file()))
    assert "SUCCESS: 2 rules found" in promtool("check", "rules", str(objectives))


def test_alerts_fire_and_stay_quiet_as_the_unit_tests_say() -> None:
    out = promtool("test", "rules", str(ALERT_TESTS))
    assert "SUCCESS" in out
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    assert tested == alerts  # every alert has firing and quiet cases


def test_each_alert_is_one_query_against_one_threshold() -> None:
    """What lets the live test turn each alert into a `bool` comparison that always returns its series."""
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert len(COMPARISON.findall(rule["expr"])) == 1, rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert {"summary", "description"} <= set(rule["annotations"])


def test_dashboard_covers_what_operators_watch() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in ("aqueduct_http_requests_total", "aqueduct_http_request_duration_seconds_bucket",
                   "aqueduct_batch_size_sum", "aqueduct_queue_depth", "aqueduct_http_requests_in_flight",
                   "aqueduct_workers_alive", "aqueduct_worker_restarts_total"):
        assert metric in exprs, metric
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables == ["datasource", "namespace", "pipeline", "pod"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
