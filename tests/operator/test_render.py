"""Unit layer: Pipeline -> ConfigMap/Deployment/Service, pure and deterministic."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml
from aqueduct_operator import render
from aqueduct_operator.policy import Policy
from aqueduct_operator.render import desired_objects
from hypothesis import HealthCheck, given, settings

from tests.operator import crd
from tests.operator.strategies import pipelines

K8S_VERSION = "1.34.0"


def example(name: str = "pipeline.yaml") -> dict[str, Any]:
    body = crd.load_yaml(crd.EXAMPLES / name)
    body["metadata"].update(namespace="default", uid="6f1a2b3c-0000-4000-8000-000000000001", generation=1)
    return body


def by_kind(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {obj["kind"]: obj for obj in objs}


def config_of(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(by_kind(objs)["ConfigMap"]["data"]["config.yaml"])


def test_example_renders_three_owned_labelled_children() -> None:
    objs = desired_objects(example())
    assert [o["kind"] for o in objs] == ["ConfigMap", "Deployment", "Service"]
    for obj in objs:
        assert obj["metadata"]["namespace"] == "default"
        assert obj["metadata"]["labels"]["aqueduct.dev/pipeline"] == "catdetector"
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "aqueduct-operator"
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "aqueduct.dev/v1alpha1", "kind": "Pipeline", "name": "catdetector",
            "uid": "6f1a2b3c-0000-4000-8000-000000000001", "controller": True, "blockOwnerDeletion": True,
        }


def test_batch_settings_are_injected_into_the_config_file() -> None:
    config = config_of(desired_objects(example()))
    assert config["version"] == 1 and config["name"] == "catdetector"
    assert config["steps"] == [{
        "name": "detect", "handler": "examples.catdetector.model:CatDetectorHandler", "nprocs": 1,
        "batch_size": 20, "batch_timeout": 0.002, "latency_target": None, "handle_condition": None,
    }]
    assert config["queue_size"] == 1000 and config["timeout"] == 10
    assert config["server"]["port"] == 8080


def test_handler_options_are_injected_into_the_config_file() -> None:
    pipeline = example()
    options = {"weights": "/mnt/models/resnet50.pt", "topk": 3, "labels": {"0": "cat"}}
    pipeline["spec"]["steps"][0]["options"] = options
    (step,) = config_of(desired_objects(pipeline))["steps"]
    assert step["options"] == options


def test_latency_target_is_injected_into_the_config_file() -> None:
    pipeline = example()
    pipeline["spec"]["steps"][0]["latencyTarget"] = 0.15
    (step,) = config_of(desired_objects(pipeline))["steps"]
    assert step["latency_target"] == 0.15


def test_deployment_pod_contract() -> None:
    dep = by_kind(desired_objects(example()))["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "serve" and container["image"] == "aqueduct:dev"
    assert container["args"] == ["aqueduct-serve", "--config", "/etc/aqueduct/config.yaml"]
    assert container["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 8081, "protocol": "TCP"},
    ]
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsUser"] == 10001
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/aqueduct" and mounts["dshm"] == "/dev/shm"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "catdetector-config"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert pod["terminationGracePeriodSeconds"] >= 30 + 10
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}


def test_service_selects_the_pods() -> None:
    objs = by_kind(desired_objects(example()))
    svc, dep = objs["Service"], objs["Deployment"]
    assert svc["metadata"]["name"] == "catdetector"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"},
        {"name": "grpc", "port": 8081, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"},
    ]


def test_grpc_port_readiness_probe_and_off() -> None:
    body = example()
    body["spec"]["server"] = {"grpcPort": 9000, "grpcReadinessProbe": True}
    objs = by_kind(desired_objects(body))
    (container,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert {"name": "grpc", "containerPort": 9000, "protocol": "TCP"} in container["ports"]
    assert container["readinessProbe"]["grpc"] == {"port": 9000} and "httpGet" not in container["readinessProbe"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert objs["Service"]["spec"]["ports"][1]["port"] == 9000
    assert config_of(list(objs.values()))["server"]["grpc_port"] == 9000
    for kind in ("Deployment", "Service"):
        kubernetes_validate.validate(objs[kind], K8S_VERSION, strict=True)
    body["spec"]["server"] = {"grpcPort": 0}
    objs = by_kind(desired_objects(body))
    (container,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert [p["name"] for p in container["ports"]] == ["http"]
    assert [p["name"] for p in objs["Service"]["spec"]["ports"]] == ["http"]
    assert config_of(list(objs.values()))["server"]["grpc_port"] == 0


def test_checksum_annotation_follows_the_config() -> None:
    body = example()
    before = by_kind(desired_objects(body))
    annotation = before["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert annotation == render.config_checksum(before["ConfigMap"]["data"]["config.yaml"])
    body["spec"]["steps"][0]["batchSize"] = 32
    after = by_kind(desired_objects(body))
    assert after["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != annotation
    assert config_of(list(after.values()))["steps"][0]["batch_size"] == 32


def test_rendering_is_deterministic_and_does_not_mutate_input() -> None:
    body = example("pipelines/gpu.yaml")
    frozen = copy.deepcopy(body)
    assert desired_objects(body) == desired_objects(body)
    assert body == frozen


def test_gpu_pod_knobs() -> None:
    pod = by_kind(desired_objects(example("pipelines/gpu.yaml")))["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["env"] == [{"name": "OMP_NUM_THREADS", "value": "2"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["terminationGracePeriodSeconds"] == 5 + 60 + render.GRACE_MARGIN  # preStop pause + graceful


@pytest.mark.parametrize("name", ["pipeline.yaml", "pipelines/gpu.yaml", "pipelines/noop.yaml",
                                  "pipelines/two-steps.yaml"])
def test_examples_render_valid_kubernetes_objects(name: str) -> None:
    for obj in desired_objects(example(name)):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipelines())
def test_any_valid_pipeline_renders_valid_objects(body: dict[str, Any]) -> None:
    assert crd.errors(body) == []
    objs = desired_objects(body, policy=Policy(secrets=frozenset({"*"})))
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert len(obj["metadata"]["name"]) <= 253
    config = config_of(objs)
    assert [s["name"] for s in config["steps"]] == [s["name"] for s in body["spec"]["steps"]]
    for step, raw in zip(config["steps"], body["spec"]["steps"], strict=True):
        assert step["batch_size"] == raw.get("batchSize", 1)
        assert step["batch_timeout"] == raw.get("batchTimeout", 0)
    dep = by_kind(objs)["Deployment"]
    auto = body["spec"].get("autoscaling")
    if auto is None:
        assert dep["spec"]["replicas"] == body["spec"].get("replicas", 1)
    else:  # created at the minimum, then the autoscaler's
        assert dep["spec"]["replicas"] == auto["minReplicas"]
        assert by_kind(objs)["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == auto["maxReplicas"]
