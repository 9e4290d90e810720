"""Contract layer: the CRD's step schema and the serving pod's config schema agree; rendered configs validate.

The serving pod (``aqueduct_service``) reads exactly the file the operator renders; the two sides
describe the same fields in camelCase (CRD) and snake_case (config.schema.json). This test keeps them in
lock-step without either side importing the other.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
import yaml
from aqueduct_operator.images import RUNTIMES
from aqueduct_operator.policy import Policy
from aqueduct_operator.render import desired_objects
from aqueduct_operator.spec import InvalidSpec, parse
from hypothesis import HealthCheck, given, settings

from tests.operator import crd
from tests.operator.strategies import pipelines

COMPARED = ("minimum", "exclusiveMinimum", "maximum", "pattern", "maxLength", "minLength", "default")


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def crd_step() -> dict[str, Any]:
    return crd.openapi_schema()["properties"]["spec"]["properties"]["steps"]["items"]


def config_step() -> dict[str, Any]:
    return crd.config_schema()["$defs"]["step"]


JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number"}


def types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type")
    if kind is None and "enum" in schema:  # an enum alone: the types of its values
        kind = sorted({JSON_TYPES[type(value)] for value in schema["enum"]})
    found = set(kind) if isinstance(kind, list) else {kind}
    if schema.get("nullable"):
        found.add("null")
    return found


def bounds(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema's keywords, with OpenAPI 3.0's boolean exclusiveMinimum written as JSON Schema's number."""
    schema = dict(schema)
    if schema.get("exclusiveMinimum") is True:
        schema["exclusiveMinimum"] = schema.pop("minimum")
    return schema


def test_same_fields_and_required() -> None:
    crd_fields = {snake(name) for name in crd_step()["properties"]}
    assert crd_fields == set(config_step()["properties"])
    assert {snake(name) for name in crd_step()["required"]} == set(config_step()["required"])


@pytest.mark.parametrize("field", sorted(crd_step()["properties"]))
def test_field_constraints_agree(field: str) -> None:
    ours, theirs = bounds(crd_step()["properties"][field]), config_step()["properties"][snake(field)]
    assert types(ours) == types(theirs), field
    for key in COMPARED:
        if key == "maxLength" and key not in theirs:
            continue  # the CRD bounds strings for CEL cost estimation; the pod need not
        assert ours.get(key) == theirs.get(key), f"{field}.{key}: CRD {ours.get(key)!r} != config {theirs.get(key)!r}"


def test_the_same_runtimes() -> None:
    assert crd_step()["properties"]["runtime"]["enum"] == config_step()["properties"]["runtime"]["enum"]
    assert tuple(config_step()["properties"]["runtime"]["enum"]) == RUNTIMES  # the operator picks their images


STEP_KINDS = [  # which of handler / runtime / model a step has
    {"handler": "pkg.mod:Handler"},
    {"runtime": "onnx"},
    {"runtime": "onnx", "model": "/models/net.onnx"},
    {"handler": "pkg.mod:Handler", "runtime": "onnx"},
    {"handler": "pkg.mod:Handler", "model": "/models/net.onnx"},
    {"handler": "pkg.mod:Handler", "runtime": "onnx", "model": "/models/net.onnx"},
    {"model": "/models/net.onnx"},
    {},
]


@pytest.mark.parametrize("kind", STEP_KINDS, ids=lambda kind: "+".join(kind) or "nothing")
def test_the_operator_and_the_pod_accept_the_same_kinds_of_step(kind: dict[str, Any]) -> None:
    """A step the operator accepts is one the pod's schema accepts, and the other way round (with spec.model
    set, which gives a runtime step its file: the pod gets it as MODEL_PATH)."""
    step = {"name": "s", **kind}
    body = {"metadata": {"name": "p", "namespace": "default", "uid": "u"},
            "spec": {"image": "aqueduct:dev", "steps": [step], "model": {"storageUri": "pvc://models/net.onnx"}}}
    try:
        parse(body)
        operator_accepts = True
    except InvalidSpec:
        operator_accepts = False
    pod_accepts = jsonschema.Draft202012Validator(config_step()).is_valid(step)
    assert operator_accepts == pod_accepts


def test_top_level_constraints_agree() -> None:
    spec = crd.openapi_schema()["properties"]["spec"]["properties"]
    config = crd.config_schema()["properties"]
    tensor = crd.config_schema()["$defs"]["tensor"]
    pairs = [
        (spec["queue"]["properties"]["size"], config["queue_size"]),
        (spec["queue"]["properties"]["priorities"], config["queue_priorities"]),
        (spec["server"]["properties"]["logLevel"], config["server"]["properties"]["log_level"]),
        (spec["server"]["properties"]["maxBodyBytes"], config["server"]["properties"]["max_body_bytes"]),
        (spec["inputs"]["items"]["properties"]["datatype"], tensor["properties"]["datatype"]),
    ]
    for ours, theirs in pairs:
        assert ours.get("minimum") == theirs.get("minimum")
        assert ours.get("maximum") == theirs.get("maximum")
        assert ours.get("enum") == theirs.get("enum")
    # timeout: OpenAPI v3.0 boolean exclusiveMinimum vs JSON Schema 2020-12 numeric exclusiveMinimum
    assert spec["timeout"]["exclusiveMinimum"] is True
    assert spec["timeout"]["minimum"] == config["timeout"]["exclusiveMinimum"]
    assert spec["timeout"]["default"] == config["timeout"]["default"]
    # batchDim: a boolean, unset (null in the config) when the pod decides from its models.
    assert spec["batchDim"]["type"] == "boolean" and types(config["batch_dim"]) == {"boolean", "null"}


def validate_config(body: dict[str, Any]) -> dict[str, Any]:
    objs = desired_objects(body, default_image="aqueduct:dev", policy=Policy(secrets=frozenset({"*"})))
    cm = next(obj for obj in objs if obj["kind"] == "ConfigMap")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    jsonschema.Draft202012Validator(crd.config_schema()).validate(config)
    return config


@pytest.mark.parametrize("path", [crd.EXAMPLES / "pipeline.yaml",
                                  *sorted((crd.EXAMPLES / "pipelines").glob("[!i]*.yaml"))], ids=lambda p: p.name)
def test_example_configs_validate(path: Any) -> None:
    body = crd.load_yaml(path)
    body["metadata"].update(namespace="default", uid="u")
    validate_config(body)


def test_example_matches_the_catdetector_config() -> None:
    body = crd.load_yaml(crd.EXAMPLES / "pipeline.yaml")
    body["metadata"].update(namespace="default", uid="u")
    ours = validate_config(body)
    theirs = crd.load_yaml(crd.EXAMPLES / "catdetector/pipeline.yaml")
    for key in ("name", "handler", "batch_size"):
        assert ours["steps"][0][key] == theirs["steps"][0][key], key
    for key in ("name", "inputs", "outputs", "queue_size", "timeout"):
        assert ours[key] == theirs[key], key


def test_a_runtime_pipeline_renders_a_valid_config() -> None:
    body = crd.load_yaml(crd.EXAMPLES / "pipeline.yaml")
    body["metadata"].update(namespace="default", uid="u")
    for key in ("inputs", "outputs"):
        del body["spec"][key]
    body["spec"].update(
        batchDim=True, model={"storageUri": "s3://models/iris.skops"},
        steps=[{"name": "pre", "handler": "pkg.pre:Scale", "options": {"factor": 0.5}},
               {"name": "model", "runtime": "sklearn", "batchSize": 64, "options": {"trustPickle": False}},
               {"name": "boost", "runtime": "xgboost", "model": "/models/boost.ubj"}],
    )
    config = validate_config(body)
    assert [step.get("runtime") for step in config["steps"]] == [None, "sklearn", "xgboost"]
    assert config["steps"][1]["model"] == "/mnt/models/iris.skops" and config["batch_dim"] is True


def test_the_pods_settings_loader_reads_a_rendered_runtime_config_with_the_pods_environment() -> None:
    """What the pod itself makes of the ConfigMap, with the environment the Deployment gives it (MODEL_PATH)."""
    from aqueduct_service.settings import parse_settings

    body = {"metadata": {"name": "iris", "namespace": "default", "uid": "u"},
            "spec": {"model": {"storageUri": "https://models.example.com/iris.skops"}, "batchDim": False,
                     "steps": [{"name": "model", "runtime": "sklearn", "batchSize": 64, "nprocs": 2,
                                "options": {"method": "predict_proba", "trustPickle": False}}]}}
    objs = {obj["kind"]: obj for obj in desired_objects(body, default_image="aqueduct:dev")}
    (container,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    environ = {item["name"]: item["value"] for item in container.get("env", [])}
    settings = parse_settings(yaml.safe_load(objs["ConfigMap"]["data"]["config.yaml"]), environ)
    (step,) = settings.steps
    assert (step.runtime, step.model, step.handler) == ("sklearn", "/mnt/models/iris.skops", None)
    assert (step.batch_size, step.nprocs, dict(step.options)) == (64, 2, {"method": "predict_proba",
                                                                        "trustPickle": False})
    assert settings.batch_dim is False and settings.inputs == () and settings.outputs == ()
    assert container["image"] == "aqueduct-sklearn:dev"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipelines())
def test_any_valid_pipeline_renders_a_valid_config(body: dict[str, Any]) -> None:
    validate_config(body)


def test_operator_knows_the_engine_default_queue_size() -> None:
    from aqueduct_operator.render import ENGINE_QUEUE_SIZE

    from aqueduct.flow import DEFAULT_QUEUE_SIZE

    assert ENGINE_QUEUE_SIZE == DEFAULT_QUEUE_SIZE  # the queue capacity the alerts compare against
