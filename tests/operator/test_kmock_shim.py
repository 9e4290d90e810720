"""The KubeShim's gap fixes (RECIPES.md section 5), checked with the real kubernetes client."""

from __future__ import annotations

import asyncio

import pytest
from aqueduct_operator import GROUP, PLURAL, VERSION
from kubernetes import client

from tests.operator.conftest import Kube

NS = "default"


def body(name: str = "p") -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Pipeline", "metadata": {"name": name},
            "spec": {"image": "x", "steps": [{"name": "a", "handler": "m:C"}]}, "status": {"url": "forged"}}


async def test_gaps(kube: Kube) -> None:
    custom = kube.custom
    created = await asyncio.to_thread(custom.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, body())
    meta = created["metadata"]  # 1 and 4: filled metadata, and a 201 (else the client returns None)
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert meta["namespace"] == NS and "status" not in created  # 3

    def patch(patch: dict, status: bool = False) -> dict:
        fn = custom.patch_namespaced_custom_object_status if status else custom.patch_namespaced_custom_object
        return fn(GROUP, VERSION, NS, PLURAL, "p", patch, _content_type="application/merge-patch+json")

    after = await asyncio.to_thread(patch, {"metadata": {"labels": {"a": "b"}}, "status": {"url": "x"}})
    assert int(after["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])  # 2
    assert after["metadata"]["generation"] == 1 and "status" not in after  # 2, 3
    after = await asyncio.to_thread(patch, {"spec": {"replicas": 3}})
    assert after["metadata"]["generation"] == 2
    after = await asyncio.to_thread(patch, {"spec": {"replicas": 4}, "status": {"url": "u"}}, True)
    assert after["status"] == {"url": "u"} and after["spec"]["replicas"] == 3  # 3

    listed = await asyncio.to_thread(custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL)
    assert listed["kind"] == "PipelineList" and listed["apiVersion"] == f"{GROUP}/{VERSION}"  # 6
    resources = await asyncio.to_thread(client.CoreV1Api(kube.api).get_api_resources)
    assert resources.group_version == "v1"  # 5

    with pytest.raises(client.ApiException) as info:  # 7
        await asyncio.to_thread(custom.replace_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "p", body())
    assert info.value.status == 501
    with pytest.raises(client.ApiException) as info:
        await asyncio.to_thread(custom.patch_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "p", body(),
                                _content_type="application/apply-patch+yaml")
    assert info.value.status == 501

    events = client.CoreV1Api(kube.api)
    ev = {"metadata": {"generateName": "p."}, "involvedObject": {"name": "p"}, "reason": "R", "message": "m"}
    first = await asyncio.to_thread(events.create_namespaced_event, NS, ev)
    second = await asyncio.to_thread(events.create_namespaced_event, NS, ev)
    assert first.metadata.name != second.metadata.name and first.metadata.name.startswith("p.")  # 1


async def test_stale_json_patch_test_is_422_and_unknown_kinds_are_404(kube: Kube) -> None:
    custom = kube.custom
    created = await asyncio.to_thread(custom.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, body())
    stale = str(int(created["metadata"]["resourceVersion"]) - 1)
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": stale},
           {"op": "add", "path": "/metadata/finalizers", "value": []}]
    with pytest.raises(client.ApiException) as info:  # 8: kopf re-reads on 422 (kmock said 500)
        await asyncio.to_thread(custom.patch_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "p", ops,
                                _content_type="application/json-patch+json")
    assert info.value.status == 422
    with pytest.raises(client.ApiException) as info:  # a kind without a (CRD) declaration
        await asyncio.to_thread(custom.create_namespaced_custom_object, "example.com", "v1", NS, "widgets",
                                {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    assert info.value.status == 404
