"""Integration layer: every API call the operator made against kmock is allowed by the chart's RBAC rules."""

from __future__ import annotations

import asyncio

import yaml
from aqueduct_operator import GROUP, PLURAL, VERSION

from tests.operator import crd, rbac
from tests.operator.conftest import Kube, OperatorThread, wait_for
from tests.operator.test_operator_kmock import NS, condition, create, get_pipeline, pipeline, read

OPERATOR_AGENTS = ("kopf/", "aqueduct-operator")
OPTIONAL_RESOURCES = {"horizontalpodautoscalers", "scaledobjects", "poddisruptionbudgets", "podmonitors",
                      "prometheusrules", "networkpolicies"}


def test_rules_are_least_privilege() -> None:
    rules = yaml.safe_load(crd.RBAC_PATH.read_text())
    assert isinstance(rules, list) and rules
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "deletecollection" not in rule["verbs"]
        if "delete" in rule["verbs"]:  # only the optional children, which the operator prunes
            assert set(rule["resources"]) <= OPTIONAL_RESOURCES, rule
        assert not {"secrets", "pods/exec", "pods/log"} & set(rule["resources"])
        if "pods" in rule["resources"]:  # read only: a failed model download shows in the pods' status
            assert set(rule["verbs"]) <= {"get", "list", "watch"}


async def test_every_operator_call_is_allowed(kube: Kube, operator: OperatorThread) -> None:
    await create(kube, pipeline())
    await create(kube, pipeline("fetched", model={"storageUri": "https://models.example.com/m.pt"}))
    bad = pipeline("bad")
    bad["spec"]["steps"][0]["handler"] = "nope"
    await create(kube, bad)
    dep = await wait_for(lambda: read(kube, "Deployment", "catdetector"), what="the Deployment")
    await asyncio.to_thread(
        kube.apps.patch_namespaced_deployment_status, "catdetector", NS,
        {"status": {"observedGeneration": dep["metadata"]["generation"], "replicas": 1, "readyReplicas": 1,
                    "availableReplicas": 1, "updatedReplicas": 1}},
        _content_type="application/merge-patch+json",
    )
    await wait_for(lambda: condition(get_pipeline(kube, "catdetector"), "Ready").get("status") == "True",
                   what="Ready")
    await wait_for(lambda: condition(get_pipeline(kube, "bad"), "Ready").get("reason") == "InvalidSpec",
                   what="InvalidSpec")
    await wait_for(lambda: get_pipeline(kube, "fetched").get("status", {}).get("url"), what="fetched's status")
    await asyncio.to_thread(kube.apps.delete_namespaced_deployment, "catdetector", NS)
    await wait_for(lambda: read(kube, "Deployment", "catdetector"), what="the recreated Deployment")
    await asyncio.to_thread(kube.custom.delete_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "catdetector")
    await wait_for(lambda: read(kube, "Service", "catdetector") is None, what="the Service gone")

    rules = yaml.safe_load(crd.RBAC_PATH.read_text())
    calls = {
        attrs
        for request in kube.shim.requests
        if str(request.headers.get("User-Agent", "")).startswith(OPERATOR_AGENTS)
        and (attrs := rbac.attributes(request)) is not None
    }
    assert ("apps", "deployments", "create") in calls and (GROUP, "pipelines/status", "patch") in calls
    assert ("", "events", "create") in calls and ("", "pods", "list") in calls
    denied = sorted(call for call in calls if not rbac.allowed(rules, *call))
    assert denied == []
