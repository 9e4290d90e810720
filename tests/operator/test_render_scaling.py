"""Unit layer: autoscaling, disruption budget, rollout and monitoring children of a Pipeline."""

from __future__ import annotations

from typing import Any

import pytest
from aqueduct_operator import render
from aqueduct_operator.render import desired_objects
from aqueduct_operator.spec import InvalidSpec, parse

from tests.operator import crd
from tests.operator.test_render import by_kind, example


def test_autoscaled_pipeline_gets_an_hpa_on_pods_metrics_and_leaves_replicas_to_it() -> None:
    objs = by_kind(desired_objects(example("pipelines/autoscaled.yaml")))
    hpa, dep = objs["HorizontalPodAutoscaler"], objs["Deployment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert hpa["spec"]["scaleTargetRef"] == target
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "aqueduct_queue_depth"}, "target": {"type": "AverageValue", "averageValue": "20"}}}]
    assert hpa["spec"]["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 300}}
    assert dep["metadata"]["annotations"] == {render.REPLICAS_ANNOTATION: render.AUTOSCALER}
    assert dep["spec"]["replicas"] == 2  # created at the minimum
    assert "ScaledObject" not in objs


def test_in_flight_and_cpu_targets() -> None:
    body = example("pipelines/autoscaled.yaml")
    body["spec"]["autoscaling"].update(metric="inFlight", target=2.5)
    (metric,) = by_kind(desired_objects(body))["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["pods"] == {"metric": {"name": "aqueduct_http_requests_in_flight"},
                              "target": {"type": "AverageValue", "averageValue": "2500m"}}
    body["spec"]["autoscaling"].update(metric="cpu", target=70)
    (metric,) = by_kind(desired_objects(body))["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric == {"type": "Resource",
                      "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}


def target_of(body: dict[str, Any]) -> float:
    auto = parse(body).autoscaling
    assert auto is not None
    return auto.target


def test_replica_bounds_alone_autoscale_on_a_target_from_the_first_steps_batches() -> None:
    body = example()  # one step: batchSize 20, nprocs 1
    body["spec"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 8}
    assert crd.errors(body) == []
    hpa = by_kind(desired_objects(body))["HorizontalPodAutoscaler"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 8)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"] == {"metric": {"name": "aqueduct_queue_depth"},
                              "target": {"type": "AverageValue", "averageValue": "20"}}

    # One full batch waiting per worker of the first step: batchSize x nprocs; later steps do not count.
    body["spec"]["steps"][0]["nprocs"] = 3
    body["spec"]["steps"].append({"name": "post", "handler": "pkg.mod:Post", "batchSize": 500})
    assert target_of(body) == 60
    body["spec"]["autoscaling"]["metric"] = "inFlight"  # one batch in the handler, one waiting
    assert target_of(body) == 120
    body["spec"]["autoscaling"]["metric"] = "cpu"
    body["spec"]["resources"] = {"requests": {"cpu": "1"}}
    (metric,) = by_kind(desired_objects(body))["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 80}
    body["spec"]["autoscaling"] = {"engine": "keda", "maxReplicas": 4, "prometheus": "http://prometheus:9090"}
    assert crd.errors(body) == []
    (trigger,) = by_kind(desired_objects(body))["ScaledObject"]["spec"]["triggers"]
    assert trigger["metadata"]["threshold"] == "60"
    # A target given is kept.
    body["spec"]["autoscaling"]["target"] = 7
    assert target_of(body) == 7


def test_keda_scaled_object_with_a_prometheus_trigger_may_scale_to_zero() -> None:
    objs = by_kind(desired_objects(example("pipelines/keda.yaml")))
    scaled = objs["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and "HorizontalPodAutoscaler" not in objs
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 8)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["threshold"] == "32"
    assert trigger["metadata"]["query"].startswith("sum(rate(nginx_ingress_controller_requests")
    assert objs["Deployment"]["spec"]["replicas"] == 1

    body = example("pipelines/keda.yaml")
    del body["spec"]["autoscaling"]["query"]
    (trigger,) = by_kind(desired_objects(body))["ScaledObject"]["spec"]["triggers"]
    query = 'sum(aqueduct_http_requests_in_flight{namespace="default",pipeline="noop-keda"})'
    assert trigger["metadata"]["query"] == query


@pytest.mark.parametrize(("change", "field"), [
    ({"engine": "hpa"}, "spec.autoscaling.minReplicas"),  # 0 replicas needs KEDA
    ({"metric": "cpu", "minReplicas": 1}, "spec.resources.requests.cpu"),  # the noop example requests no CPU
    ({"prometheus": None}, "spec.autoscaling.prometheus"),
    ({"minReplicas": 9}, "spec.autoscaling.minReplicas"),  # over maxReplicas
    ({"target": 0}, "spec.autoscaling.target"),
    ({"metric": "gpu"}, "spec.autoscaling.metric"),
])
def test_autoscaling_mistakes_name_the_field(change: dict[str, Any], field: str) -> None:
    body = example("pipelines/keda.yaml")
    body["spec"]["autoscaling"].update(change)
    body["spec"]["autoscaling"] = {k: v for k, v in body["spec"]["autoscaling"].items() if v is not None}
    with pytest.raises(InvalidSpec) as err:
        parse(body)
    assert err.value.field == field


def test_disruption_budget_default_and_explicit() -> None:
    assert "PodDisruptionBudget" not in by_kind(desired_objects(example()))  # one replica: nothing to budget
    pdb = by_kind(desired_objects(example("pipelines/noop.yaml")))["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": {"aqueduct.dev/pipeline": "noop"}},
                           "unhealthyPodEvictionPolicy": "AlwaysAllow"}
    pdb = by_kind(desired_objects(example("pipelines/autoscaled.yaml")))["PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 2 and "maxUnavailable" not in pdb["spec"]
    body = example()
    body["spec"]["disruption"] = {"minAvailable": "150%"}
    with pytest.raises(InvalidSpec, match="spec.disruption.minAvailable"):
        parse(body)


def test_rollouts_surge_first_and_pause_before_sigterm() -> None:
    dep = by_kind(desired_objects(example("pipelines/autoscaled.yaml")))["Deployment"]
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    assert pod["terminationGracePeriodSeconds"] == 5 + 30 + render.GRACE_MARGIN
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["labelSelector"] == {"matchLabels": {"aqueduct.dev/pipeline": "catdetector-autoscaled"}}
    body = example()
    body["spec"]["server"] = {"drainDelay": 0}
    (container,) = by_kind(desired_objects(body))["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "lifecycle" not in container


def test_pods_carry_scrape_annotations() -> None:
    body = example()
    body["spec"]["podAnnotations"] = {"prometheus.io/scrape": "false", "team": "vision"}
    annotations = by_kind(desired_objects(body))["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8080" and annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/scrape"] == "false" and annotations["team"] == "vision"  # the user's win


def test_prometheus_operator_objects() -> None:
    objs = by_kind(desired_objects(example("pipelines/autoscaled.yaml")))
    monitor, rule = objs["PodMonitor"], objs["PrometheusRule"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"] == {"matchLabels": {"aqueduct.dev/pipeline": "catdetector-autoscaled"}}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "http" and endpoint["relabelings"][0]["targetLabel"] == "pipeline"
    (group,) = rule["spec"]["groups"]
    labels = {"namespace": "default", "pipeline": "catdetector-autoscaled"}
    assert group["rules"] == [
        {"record": render.QUEUE_CAPACITY_RECORD, "expr": "vector(1000)", "labels": labels},
        {"record": render.LATENCY_TARGET_RECORD, "expr": "vector(0.25)", "labels": labels},
    ]
    assert not {"PodMonitor", "PrometheusRule"} & set(by_kind(desired_objects(example())))
