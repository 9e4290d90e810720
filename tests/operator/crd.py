"""The Pipeline CRD (loaded from the chart, its single source) and its schema as JSON Schema."""

from __future__ import annotations

import copy
import pathlib
from functools import cache
from typing import Any

import jsonschema
import yaml
from aqueduct_operator.policy import Policy

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "deploy/helm/aqueduct/crds/pipelines.yaml"
RBAC_PATH = ROOT / "deploy/helm/aqueduct/files/operator-rbac-rules.yaml"
CONFIG_SCHEMA_PATH = ROOT / "service/aqueduct_service/config.schema.json"
EXAMPLES = ROOT / "examples"
# Third-party CRDs the operator's optional children belong to (KEDA, prometheus-operator), vendored.
VENDOR_CRDS = ROOT / "deploy/vendor-crds"
# examples/pipelines/resnet.yaml downloads its model with credentials from a Secret, which the default policy
# refuses (whoever writes the Pipeline's code could read it): its cluster lists it in pipelinePolicy.secrets.
EXAMPLES_POLICY = Policy(secrets=frozenset({"minio-credentials"}))


@cache
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def version() -> dict[str, Any]:
    (only,) = crd()["spec"]["versions"]
    return only


def openapi_schema() -> dict[str, Any]:
    return copy.deepcopy(version()["schema"]["openAPIV3Schema"])


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema draft 4 (boolean exclusiveMinimum).

    ``nullable`` becomes a null type, ``x-kubernetes-int-or-string`` an integer-or-string, objects
    without ``x-kubernetes-preserve-unknown-fields`` reject unknown properties (as the API server's
    strict field validation does). CEL rules (``x-kubernetes-validations``) are not evaluated.
    """
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        pattern = out.pop("pattern", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string", **({"pattern": pattern} if pattern else {})}]
    if node.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    out.pop("default", None)  # defaults are applied by the server, never validated
    return out


@cache
def _validator() -> jsonschema.Draft4Validator:
    schema = to_json_schema(openapi_schema())
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)


def errors(obj: dict[str, Any]) -> list[str]:
    """Schema errors of a Pipeline against the CRD's openAPIV3Schema (CEL rules not evaluated)."""
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(obj)]


def config_schema() -> dict[str, Any]:
    return yaml.safe_load(CONFIG_SCHEMA_PATH.read_text())


def vendored_crds() -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in sorted(VENDOR_CRDS.glob("*.yaml"))]


def load_yaml(path: pathlib.Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())
