"""Cluster layer (marker ``kind``): the CRD and an example Pipeline on a real API server.

Skips with a reason when no cluster is reachable; fails instead with E2E_CLUSTER=1 (tests/cluster.py).
The operator deployment itself (image, chart) is the deploy issue's kind script; here the API server
checks what kmock cannot: schema validation, CEL rules, defaulting and the printer columns.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
import yaml

from tests.cluster import require_cluster
from tests.operator import crd

pytestmark = pytest.mark.kind


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_cluster(), *args], input=stdin, capture_output=True, text=True, timeout=60,
                          check=check)


@pytest.fixture
def namespace() -> str:
    require_cluster()
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd.CRD_PATH))
    kubectl("wait", "--for=condition=Established", "crd/pipelines.aqueduct.dev", "--timeout=60s")
    name = f"aqueduct-test-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_server_defaults_and_accepts_the_example(namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", str(crd.EXAMPLES / "pipeline.yaml"))
    body = json.loads(kubectl("get", "-n", namespace, "pipeline", "catdetector", "-o", "json").stdout)
    assert body["spec"]["queue"]["priorities"] == 1 and body["spec"]["server"]["logLevel"] == "info"
    table = kubectl("get", "-n", namespace, "pipelines").stdout
    assert table.split()[:7] == ["NAME", "READY", "DESIRED", "CURRENT", "AVAILABLE", "URL", "AGE"]


@pytest.mark.parametrize("path", sorted((crd.EXAMPLES / "pipelines").glob("invalid-*.yaml")), ids=lambda p: p.name)
def test_server_rejects_schema_invalid_examples(namespace: str, path) -> None:
    if "only the operator can tell" in path.read_text():
        pytest.skip("accepted by the schema by design; the operator reports InvalidSpec")
    result = kubectl("apply", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode != 0 and "Invalid value" in result.stderr + result.stdout


def test_cel_rejects_duplicate_step_names(namespace: str) -> None:
    body = crd.load_yaml(crd.EXAMPLES / "pipeline.yaml")
    body["spec"]["steps"].append(dict(body["spec"]["steps"][0]))
    result = kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(body), check=False)
    assert result.returncode != 0 and "step names must be unique" in result.stderr


@pytest.mark.parametrize(("step", "message"), [
    ({"name": "a", "handler": "m:C", "runtime": "onnx", "model": "/m.onnx"}, "exactly one of handler and runtime"),
    ({"name": "a"}, "exactly one of handler and runtime"),
    ({"name": "a", "handler": "m:C", "model": "/m.onnx"}, "model is only used with runtime"),
])
def test_cel_rejects_a_step_that_is_not_handler_or_runtime(namespace: str, step: dict, message: str) -> None:
    body = crd.load_yaml(crd.EXAMPLES / "pipeline.yaml")
    body["spec"]["steps"] = [step]
    result = kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(body), check=False)
    assert result.returncode != 0 and message in result.stderr


def test_server_accepts_a_runtime_pipeline_with_default_autoscaling(namespace: str) -> None:
    body = crd.load_yaml(crd.EXAMPLES / "pipeline.yaml")
    body["spec"].update(steps=[{"name": "model", "runtime": "onnx", "model": "/models/net.onnx"}], batchDim=True,
                        autoscaling={"minReplicas": 1, "maxReplicas": 8})
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(body))
