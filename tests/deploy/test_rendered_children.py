"""What the operator renders for each example Pipeline, validated offline as an API server would: built-in
kinds (Deployment, HorizontalPodAutoscaler, PodDisruptionBudget, ...) against Kubernetes' schemas, the
KEDA ScaledObject and the prometheus-operator PodMonitor and PrometheusRule against their vendored CRDs. The
chart's policy lists the Secret resnet.yaml reads, and turns every example's NetworkPolicy on."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from aqueduct_operator.policy import NetworkAccess
from aqueduct_operator.render import desired_objects

from tests.operator import crd

from .conftest import ROOT, validate_manifests

KUBE_VERSIONS = ["1.28.0", "1.30.0", "1.37.0"]
POLICY = dataclasses.replace(crd.EXAMPLES_POLICY, network_policy=NetworkAccess(True, ("gateway",), ("monitoring",)))
EXAMPLES = [crd.EXAMPLES / "pipeline.yaml", *sorted(
    p for p in (crd.EXAMPLES / "pipelines").glob("*.yaml") if not p.name.startswith("invalid-")
)]


def rendered() -> str:
    objs = []
    for path in EXAMPLES:
        body = crd.load_yaml(path)
        body["metadata"].update(namespace="default", uid="6f1a2b3c-0000-4000-8000-000000000001", generation=1)
        objs += desired_objects(body, default_image="aqueduct:dev", policy=POLICY)  # resnet.yaml has no spec.image
    return yaml.safe_dump_all(objs, sort_keys=False)


def test_examples_exercise_every_optional_kind() -> None:
    kinds = {doc["kind"] for doc in yaml.safe_load_all(rendered())}
    assert {"HorizontalPodAutoscaler", "ScaledObject", "PodDisruptionBudget", "PodMonitor", "PrometheusRule",
            "NetworkPolicy"} <= kinds


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_rendered_children_are_valid(kube_version: str) -> None:
    proc = validate_manifests(
        "--kube-version", kube_version, "--crd", str(ROOT / "deploy" / "vendor-crds"), "-", stdin=rendered()
    )
    assert " 0 invalid" in proc.stdout and "ScaledObject/noop-keda" in proc.stdout


def test_a_broken_scaled_object_is_caught() -> None:
    docs = list(yaml.safe_load_all(rendered()))
    scaled = next(doc for doc in docs if doc["kind"] == "ScaledObject")
    scaled["spec"]["minReplicaCount"] = -1
    scaled["spec"]["triggers"][0].pop("type")
    proc = validate_manifests("--crd", str(ROOT / "deploy" / "vendor-crds"), "-",
                              stdin=yaml.safe_dump(scaled), check=False)
    assert proc.returncode == 1 and "minReplicaCount" in proc.stdout and "'type' is a required" in proc.stdout
