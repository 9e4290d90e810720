"""scripts/ci/validate-manifests rejects what an API server would (so a green chart check means something)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from .conftest import CHART, validate_manifests

DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web"},
    "spec": {
        "replicas": 1,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 8080}]}]},
        },
    },
}
PIPELINE: dict[str, Any] = {
    "apiVersion": "aqueduct.dev/v1alpha1",
    "kind": "Pipeline",
    "metadata": {"name": "cats"},
    "spec": {
        "image": "aqueduct:dev",
        "steps": [{"name": "detect", "handler": "examples.catdetector.model:CatDetectorHandler", "batchSize": 8}],
        "resources": {"limits": {"cpu": 1, "memory": "1Gi"}},
    },
}


def check(*docs: dict[str, Any], crd: bool = False) -> tuple[int, str]:
    args = ["--crd", str(CHART / "crds")] if crd else []
    proc = validate_manifests(*args, "-", stdin=yaml.safe_dump_all(docs), check=False)
    return proc.returncode, proc.stdout + proc.stderr


def broken(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return doc


DELETE = object()


def test_accepts_valid_objects() -> None:
    code, out = check(DEPLOYMENT, PIPELINE, crd=True)
    assert code == 0, out
    assert "2 resources valid, 0 invalid" in out


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.replica", 1),  # misspelt field
        ("spec.template.spec.containers.0.ports.0.containerPort", "8080"),  # wrong type
        ("spec.selector", DELETE),  # missing required field
    ],
)
def test_rejects_bad_deployment(path: str, value: Any) -> None:
    code, out = check(broken(DEPLOYMENT, path, value))
    assert code == 1, out
    assert "0 resources valid, 1 invalid" in out


def test_lists_every_error_not_just_the_first() -> None:
    doc = broken(broken(DEPLOYMENT, "spec.replica", 1), "spec.template.spec.containers.0.ports.0.containerPort", "x")
    code, out = check(doc)
    assert code == 1
    assert "replica" in out and "containerPort" in out


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.steps", DELETE),  # missing required field
        ("spec.stepz", []),  # misspelt field
        ("spec.replicas", "two"),  # wrong type
        ("spec.steps.0.batchSize", 0),  # below minimum
        ("spec.steps.0.handler", "not a handler"),  # pattern
        ("spec.resources.limits.memory", "lots"),  # int-or-string quantity pattern
        ("metadata.name", "Not_A_Name"),
    ],
)
def test_rejects_bad_pipeline(path: str, value: Any) -> None:
    code, out = check(broken(PIPELINE, path, value), crd=True)
    assert code == 1, out


RUNTIME_PIPELINE: dict[str, Any] = {
    "apiVersion": "aqueduct.dev/v1alpha1",
    "kind": "Pipeline",
    "metadata": {"name": "iris"},
    "spec": {
        "steps": [{"name": "model", "runtime": "sklearn", "batchSize": 64, "options": {"method": "predict_proba"}}],
        "model": {"storageUri": "pvc://models/iris.skops"},
        "batchDim": True,
        "autoscaling": {"minReplicas": 1, "maxReplicas": 8},
    },
}


def test_accepts_a_runtime_pipeline_without_image_tensors_or_autoscaling_target() -> None:
    code, out = check(RUNTIME_PIPELINE, crd=True)
    assert code == 0, out


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.steps.0.runtime", "tensorflow"),  # not a built-in runtime
        ("spec.steps.0.model", ""),
        ("spec.batchDim", "yes"),
        ("spec.autoscaling.maxReplicas", DELETE),  # the one bound autoscaling needs
    ],
)
def test_rejects_bad_runtime_pipeline(path: str, value: Any) -> None:
    code, out = check(broken(RUNTIME_PIPELINE, path, value), crd=True)
    assert code == 1, out


def test_custom_resource_without_its_crd_is_an_error() -> None:
    code, out = check(PIPELINE)
    assert code == 1
    assert "no schema" in out


def test_crd_structural_checks() -> None:
    crd = yaml.safe_load((CHART / "crds" / "pipelines.yaml").read_text())
    code, out = check(crd)
    assert code == 0, out
    code, out = check(broken(crd, "metadata.name", "pipes.aqueduct.dev"))
    assert code == 1 and "plural" in out
    code, out = check(broken(crd, "spec.versions.0.storage", False))
    assert code == 1 and "storage" in out
