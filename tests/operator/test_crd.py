"""Unit layer: the CRD itself, and example Pipelines against its openAPIV3Schema (jsonschema)."""

from __future__ import annotations

import pathlib

import pytest
from aqueduct_operator import GROUP, KIND, PLURAL, VERSION
from aqueduct_operator.spec import InvalidSpec, parse

from tests.operator import crd

VALID = sorted(p for p in (crd.EXAMPLES / "pipelines").glob("*.yaml") if not p.name.startswith("invalid-"))
INVALID = sorted((crd.EXAMPLES / "pipelines").glob("invalid-*.yaml"))


def test_crd_identity_matches_the_operator() -> None:
    doc = crd.crd()
    assert doc["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    names = doc["spec"]["names"]
    assert (doc["spec"]["group"], names["kind"], names["plural"]) == (GROUP, KIND, PLURAL)
    assert doc["spec"]["scope"] == "Namespaced" and "pl" in names["shortNames"]
    version = crd.version()
    assert version["name"] == VERSION and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Ready", "Desired", "Current", "URL", "Age"} <= set(columns)


def test_schema_is_structural() -> None:
    """Every node has a type (or int-or-string / preserve-unknown-fields), as the API server requires."""
    def walk(node: dict, path: str) -> None:
        assert "type" in node or node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields"), path
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*")
    walk(crd.openapi_schema(), "")


def test_schema_has_cel_rules_for_unique_names() -> None:
    spec = crd.openapi_schema()["properties"]["spec"]
    rules = [v["rule"] for v in spec["x-kubernetes-validations"]]
    assert any("exists_one" in rule and "steps" in rule for rule in rules)


@pytest.mark.parametrize("path", [crd.EXAMPLES / "pipeline.yaml", *VALID], ids=lambda p: p.name)
def test_valid_examples_pass_schema_and_operator(path: pathlib.Path) -> None:
    body = crd.load_yaml(path)
    assert crd.errors(body) == []
    # The chart gives the operator its image (AQUEDUCT_OPERATOR_IMAGE) and its policy (AQUEDUCT_PIPELINE_POLICY).
    parse(body, default_image="aqueduct:dev", policy=crd.EXAMPLES_POLICY)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_examples_are_rejected(path: pathlib.Path) -> None:
    """Each invalid example is rejected by the schema at apply time, or by the operator (InvalidSpec)."""
    body = crd.load_yaml(path)
    schema_errors = crd.errors(body)
    try:
        parse(body)
        operator_error = None
    except InvalidSpec as e:
        operator_error = e
    assert schema_errors or operator_error
    if "only the operator can tell" in path.read_text():
        assert not schema_errors and operator_error is not None


def test_runtime_pipelines_pass_the_schema() -> None:
    body = crd.load_yaml(crd.EXAMPLES / "pipeline.yaml")
    del body["spec"]["image"]
    body["spec"].update(
        steps=[{"name": "pre", "handler": "pkg.pre:Normalize"},
               {"name": "model", "runtime": "sklearn", "batchSize": 64, "options": {"method": "predict_proba"}}],
        model={"storageUri": "pvc://models/iris.skops"}, batchDim=True,
        autoscaling={"minReplicas": 1, "maxReplicas": 8},  # no target: the operator's default
    )
    assert crd.errors(body) == []
    assert parse(body, default_image="aqueduct:dev").steps[1].model == "/mnt/models/iris.skops"


def test_grpc_server_fields_pass_the_schema_and_have_cel_rules() -> None:
    body = crd.load_yaml(crd.EXAMPLES / "pipeline.yaml")
    body["spec"]["server"] = {"grpcPort": 9000, "grpcReadinessProbe": True}
    assert crd.errors(body) == []
    spec = parse(body, default_image="aqueduct:dev")
    assert (spec.grpc_port, spec.grpc_readiness_probe) == (9000, True)
    server = crd.load_yaml(crd.CRD_PATH)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["server"]
    assert server["properties"]["grpcPort"]["default"] == 8081
    rules = " ".join(r["rule"] for r in server["x-kubernetes-validations"])
    assert "self.grpcPort != 8080" in rules and "self.grpcReadinessProbe" in rules


def test_step_cel_rules_say_handler_or_runtime() -> None:
    """Exactly one of handler / runtime, model only with runtime: CEL rules the API server evaluates (checked on a
    cluster by test_cluster.py; the operator's InvalidSpec by test_runtimes.py)."""
    step = crd.openapi_schema()["properties"]["spec"]["properties"]["steps"]["items"]
    assert step["required"] == ["name"]
    rules = {rule["rule"]: rule["message"] for rule in step["x-kubernetes-validations"]}
    assert rules == {"has(self.handler) != has(self.runtime)": "a step needs exactly one of handler and runtime",
                     "!has(self.model) || has(self.runtime)": "model is only used with runtime"}


@pytest.mark.parametrize(("patch", "where"), [
    ({"replicas": -1}, "spec.replicas"),
    ({"replicas": "two"}, "spec.replicas"),
    ({"timeout": 0}, "spec.timeout"),
    ({"queue": {"priorities": 17}}, "spec.queue.priorities"),
    ({"server": {"logLevel": "loud"}}, "spec.server.logLevel"),
    ({"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy"),
    ({"bogus": 1}, "spec"),
    ({"model": {"storageUri": "ftp://host/m.pt"}}, "spec.model.storageUri"),
    ({"model": {"storageUri": "s3://b/m.pt", "sha256": "ABC"}}, "spec.model.sha256"),
    ({"model": {}}, "spec.model"),
    ({"volumes": [{"emptyDir": {}}]}, "spec.volumes.0"),
    ({"volumeMounts": [{"name": "cache"}]}, "spec.volumeMounts.0"),
    ({"steps": [{"name": "a", "handler": "m:C", "options": [1]}]}, "spec.steps.0.options"),
    ({"resources": {"limits": {"memory": "lots"}}}, "spec.resources.limits.memory"),
    ({"steps": [{"name": "a", "handler": "m:C", "batchTimeout": 61}]}, "spec.steps.0.batchTimeout"),
    ({"steps": [{"name": "a", "runtime": "tensorflow", "model": "/m.pb"}]}, "spec.steps.0.runtime"),
    ({"steps": [{"name": "a", "runtime": "onnx", "model": ""}]}, "spec.steps.0.model"),
    ({"steps": [{"name": "a", "runtime": "onnx", "model": 3}]}, "spec.steps.0.model"),
    ({"batchDim": "yes"}, "spec.batchDim"),
    ({"autoscaling": {"minReplicas": 1}}, "spec.autoscaling"),  # maxReplicas is still required
    ({"server": {"grpcPort": 70000}}, "spec.server.grpcPort"),
])
def test_schema_rejections(patch: dict, where: str) -> None:
    body = crd.load_yaml(crd.EXAMPLES / "pipeline.yaml")
    body["spec"].update(patch)
    assert any(e.startswith(where) for e in crd.errors(body)), crd.errors(body)
