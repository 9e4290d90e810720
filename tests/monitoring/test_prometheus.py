"""A real Prometheus scrapes two real serving pods under load; every PromQL expression the project ships
(dashboard panels and variables, alert rules, the Prometheus adapter's rules, KEDA's queries) returns data."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from aqueduct_operator import render
from aqueduct_operator.spec import parse

from tests.service.conftest import Server, wait_for

from .conftest import ADAPTER_RULES, DASHBOARD, NAMESPACE, PIPELINE, PODS, RULES, Prometheus, load, pipeline
from .test_rules import COMPARISON

pytestmark = pytest.mark.timeout(240)
GRAFANA = {"$__rate_interval": "1m", "${datasource}": "", "$namespace": ".*", "$pipeline": ".*", "$pod": ".*"}
LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$")


def grafana(expr: str) -> str:
    for variable, value in GRAFANA.items():
        expr = expr.replace(variable, value)
    return expr


def expressions() -> dict[str, str]:
    """Every query shipped, by where it comes from."""
    found: dict[str, str] = {}
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            found[f"dashboard {panel['title']!r} {target['refId']}"] = grafana(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.match(variable["query"]["query"])
            assert match, variable
            found[f"dashboard variable {variable['name']}"] = f"count by ({match[2]}) ({grafana(match[1])})"
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            # `bool` keeps every series (0 or 1), so the query returns data whether or not the alert fires.
            found[f"alert {rule['alert']}"] = COMPARISON.sub(r" \1 bool ", rule["expr"], count=1)
    for rule in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]:
        name = rule["name"]["as"]
        found[f"adapter {name}"] = (
            rule["metricsQuery"].replace("<<.Series>>", name)
            .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{"|".join(PODS)}"')
            .replace("<<.GroupBy>>", "pod")
        )
    spec = parse(pipeline())
    for metric in render.METRIC_SERIES:
        found[f"keda {metric}"] = render.pods_query(spec, metric)
    return found


def test_every_shipped_query_returns_data(prometheus: Prometheus, pods: dict[str, Server]) -> None:
    queries = expressions()
    with load(pods):
        # Rates need two scrapes of a moving counter; histogram quantiles need observations in the window.
        wait_for(lambda: prometheus.query(
            f'sum by (pod) (rate(aqueduct_http_requests_total{{pipeline="{PIPELINE}",status="200"}}[1m])) > 0'
        ).__len__() == len(PODS), 90, "both pods' request rates in Prometheus")
        wait_for(lambda: prometheus.query("aqueduct:pipeline_latency_target_seconds"), 30, "the objectives rules")
        results = {where: prometheus.query(expr) for where, expr in queries.items()}
    empty = sorted(f"{where}: {queries[where]}" for where, result in results.items() if not result)
    assert empty == [], "queries without data:\n" + "\n".join(empty)
    assert len(queries) >= 25


def test_scrape_job_labels_every_series_by_namespace_pipeline_and_pod(prometheus: Prometheus) -> None:
    wait_for(lambda: len(prometheus.query("up == 1")) == len(PODS), 60, "both pods scraped")
    ups = prometheus.query("up")
    assert sorted(s["metric"]["pod"] for s in ups) == sorted(PODS)
    assert {(s["metric"]["namespace"], s["metric"]["pipeline"]) for s in ups} == {(NAMESPACE, PIPELINE)}


def test_autoscaling_metrics_are_one_series_per_pod(prometheus: Prometheus, pods: dict[str, Server]) -> None:
    """What a HorizontalPodAutoscaler's Pods metric gets from the adapter: one value per pod, for each metric."""
    queries = {k: v for k, v in expressions().items() if k.startswith("adapter ")}
    names = {rule["name"]["as"] for rule in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]}
    assert names == set(render.METRIC_SERIES.values())  # the HPA's metric names are the adapter's
    for rule in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]:
        assert prometheus.series(rule["seriesQuery"])
    for where, expr in queries.items():
        result: list[dict[str, Any]] = wait_for(lambda e=expr: prometheus.query(e), 60, where)
        assert sorted(s["metric"]["pod"] for s in result) == sorted(PODS), where
