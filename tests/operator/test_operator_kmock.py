"""Integration layer: the real kopf operator against kmock (KubeShim)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kubernetes
import pytest
import yaml
from aqueduct_operator import GROUP, PLURAL, VERSION
from aqueduct_operator.apply import Cluster, reconcile
from aqueduct_operator.handlers import IMAGE_ENV
from kubernetes import client

from tests.operator import crd
from tests.operator.conftest import Kube, OperatorThread, wait_for
from tests.operator.kmock_shim import BUILTINS, crd_resources, serving, write_kubeconfig

NS = "default"


def pipeline(name: str = "catdetector", **spec: Any) -> dict[str, Any]:
    body = crd.load_yaml(crd.EXAMPLES / "pipeline.yaml")
    body["metadata"] = {"name": name, "namespace": NS}
    body["spec"].update(spec)
    return body


def get_pipeline(kube: Kube, name: str) -> dict[str, Any]:
    return kube.custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (body.get("status") or {}).get("conditions", []) if c["type"] == kind), {})


def read(kube: Kube, kind: str, name: str) -> dict[str, Any] | None:
    return Cluster(kube.api).get(kind, NS, name)


async def create(kube: Kube, body: dict[str, Any]) -> dict[str, Any]:
    return await asyncio.to_thread(kube.custom.create_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, body)


async def test_pipeline_becomes_a_ready_serving_deployment(kube: Kube, operator: OperatorThread) -> None:
    created = await create(kube, pipeline())
    assert created["metadata"]["uid"]
    uid = created["metadata"]["uid"]

    dep = await wait_for(lambda: read(kube, "Deployment", "catdetector"), what="the Deployment")
    cm = await wait_for(lambda: read(kube, "ConfigMap", "catdetector-config"), what="the ConfigMap")
    svc = await wait_for(lambda: read(kube, "Service", "catdetector"), what="the Service")
    for obj in (dep, cm, svc):
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["uid"] == uid and owner["kind"] == "Pipeline" and owner["controller"] is True
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config["steps"][0]["batch_size"] == 20
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "aqueduct:dev"

    body = await wait_for(lambda: (b := get_pipeline(kube, "catdetector")).get("status", {}).get("conditions") and b,
                          what="a status")
    assert body["status"]["observedGeneration"] == 1
    assert condition(body, "Ready")["status"] == "False"
    assert body["status"]["url"] == "http://catdetector.default.svc.cluster.local:8080/v2/models/catdetector"

    # The deployment controller's part: the pods come up.
    generation = dep["metadata"]["generation"]
    await asyncio.to_thread(
        kube.apps.patch_namespaced_deployment_status, "catdetector", NS,
        {"status": {"observedGeneration": generation, "replicas": 1, "readyReplicas": 1, "availableReplicas": 1,
                    "updatedReplicas": 1}},
        _content_type="application/merge-patch+json",
    )
    body = await wait_for(lambda: condition(b := get_pipeline(kube, "catdetector"), "Ready").get("status") == "True"
                          and b, what="Ready=True")
    assert body["status"]["readyReplicas"] == 1 and body["status"]["replicas"] == 1
    assert condition(body, "Progressing")["status"] == "False"
    assert condition(body, "Degraded")["status"] == "False"
    for c in body["status"]["conditions"]:
        assert set(c) == {"type", "status", "observedGeneration", "lastTransitionTime", "reason", "message"}

    # Changing batchSize rewrites the config and rolls the pods (new checksum), and bumps observedGeneration.
    old_checksum = dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    steps = copy.deepcopy(body["spec"]["steps"])
    steps[0]["batchSize"] = 32
    await asyncio.to_thread(
        kube.custom.patch_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "catdetector",
        {"spec": {"steps": steps}}, _content_type="application/merge-patch+json",
    )
    dep = await wait_for(
        lambda: (d := read(kube, "Deployment", "catdetector"))
        and d["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != old_checksum and d,
        what="a rolled pod template",
    )
    cm = await asyncio.to_thread(read, kube, "ConfigMap", "catdetector-config")
    assert cm is not None and yaml.safe_load(cm["data"]["config.yaml"])["steps"][0]["batch_size"] == 32
    await wait_for(lambda: get_pipeline(kube, "catdetector")["status"]["observedGeneration"] == 2,
                   what="observedGeneration 2")

    # Events were posted about the Pipeline.
    events = await wait_for(lambda: [e for e in kube.core.list_namespaced_event(NS).items
                                     if e.involved_object.name == "catdetector" and e.reason == "Ready"],
                            what="a Ready event")
    assert events[0].involved_object.kind == "Pipeline"


async def test_reconcile_is_idempotent(kube: Kube, operator: OperatorThread) -> None:
    await create(kube, pipeline())
    await wait_for(lambda: get_pipeline(kube, "catdetector").get("status", {}).get("url"), what="status.url")
    await wait_for(lambda: read(kube, "Service", "catdetector"), what="the Service")
    # Quiesce: the operator's own writes have settled when a direct reconcile writes nothing.
    cluster = Cluster(kube.api)
    events: list[tuple[str, str, str]] = []

    def writes() -> list[str]:
        return [f"{r.method.value} {r.url.path}" for r in kube.shim.requests if r.method.value != "GET"]

    def quiet_reconcile() -> bool:
        before = len(writes())
        reconcile(cluster, NS, "catdetector", lambda *e: events.append(e))
        return len(writes()) == before

    await wait_for(quiet_reconcile, what="a reconcile that changes nothing")
    before = writes()
    for _ in range(3):
        await asyncio.to_thread(reconcile, cluster, NS, "catdetector", lambda *e: events.append(e))
    assert writes() == before


async def ready_pipeline(kube: Kube, name: str = "catdetector") -> dict[str, Any]:
    await create(kube, pipeline(name))
    await wait_for(lambda: get_pipeline(kube, name).get("status", {}).get("url"), what="status.url")
    return await wait_for(lambda: read(kube, "Service", name), what="the Service")


async def test_drift_is_repaired(kube: Kube, operator: OperatorThread) -> None:
    await ready_pipeline(kube)
    dep = await asyncio.to_thread(read, kube, "Deployment", "catdetector")
    assert dep is not None

    # A deleted Deployment comes back (a new object: new uid).
    await asyncio.to_thread(kube.apps.delete_namespaced_deployment, "catdetector", NS)
    again = await wait_for(lambda: (d := read(kube, "Deployment", "catdetector"))
                           and d["metadata"]["uid"] != dep["metadata"]["uid"] and d, what="a recreated Deployment")
    assert again["spec"]["template"] == {**again["spec"]["template"]}  # same shape, rendered anew
    assert again["spec"]["template"]["metadata"]["annotations"]["checksum/config"] == \
        dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    # A hand-edited ConfigMap is put back.
    cm = await asyncio.to_thread(read, kube, "ConfigMap", "catdetector-config")
    assert cm is not None
    await asyncio.to_thread(
        kube.core.patch_namespaced_config_map, "catdetector-config", NS,
        {"data": {"config.yaml": "version: 1\nname: hacked\n"}}, _content_type="application/merge-patch+json",
    )
    await wait_for(lambda: read(kube, "ConfigMap", "catdetector-config")["data"] == cm["data"],
                   what="the ConfigMap restored")

    # A hand-edited Deployment (replicas, image) is put back.
    await asyncio.to_thread(
        kube.apps.patch_namespaced_deployment, "catdetector", NS,
        [{"op": "replace", "path": "/spec/replicas", "value": 5},
         {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "evil:latest"}],
        _content_type="application/json-patch+json",
    )
    await wait_for(lambda: (d := read(kube, "Deployment", "catdetector"))["spec"]["replicas"] == 1
                   and d["spec"]["template"]["spec"]["containers"][0]["image"] == "aqueduct:dev",
                   what="the Deployment restored")


async def test_deleting_the_pipeline_deletes_its_children(kube: Kube, operator: OperatorThread) -> None:
    await ready_pipeline(kube)
    await asyncio.to_thread(kube.custom.delete_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "catdetector")
    # kmock has no garbage collector: the shim stands in for it, following the ownerReferences.
    await wait_for(lambda: all(read(kube, kind, name) is None for kind, name in
                               [("Deployment", "catdetector"), ("Service", "catdetector"),
                                ("ConfigMap", "catdetector-config")]), what="children gone")
    assert operator.thread.is_alive()


async def test_invalid_spec_reports_without_crashing(kube: Kube, operator: OperatorThread) -> None:
    bad = pipeline("bad")
    bad["spec"]["steps"][0]["handler"] = "examples/catdetector/model.py"  # kmock does not validate the schema
    await create(kube, bad)
    body = await wait_for(lambda: condition(b := get_pipeline(kube, "bad"), "Ready").get("reason") == "InvalidSpec"
                          and b, what="Ready=False InvalidSpec")
    ready = condition(body, "Ready")
    assert ready["status"] == "False" and "spec.steps[0].handler" in ready["message"]
    assert condition(body, "Degraded")["status"] == "True"
    events = await wait_for(lambda: [e for e in kube.core.list_namespaced_event(NS).items
                                     if e.involved_object.name == "bad" and e.reason == "InvalidSpec"],
                            what="an InvalidSpec event")
    assert events[0].type == "Warning" and "spec.steps[0].handler" in events[0].message
    assert await asyncio.to_thread(read, kube, "Deployment", "bad") is None

    # Fixing the spec heals it.
    good = copy.deepcopy(bad["spec"]["steps"])
    good[0]["handler"] = "examples.catdetector.model:CatDetectorHandler"
    await asyncio.to_thread(
        kube.custom.patch_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "bad",
        {"spec": {"steps": good}}, _content_type="application/merge-patch+json",
    )
    await wait_for(lambda: read(kube, "Deployment", "bad"), what="the Deployment after the fix")
    await wait_for(lambda: condition(get_pipeline(kube, "bad"), "Ready").get("reason") == "ReplicasNotReady",
                   what="InvalidSpec cleared")


async def test_operator_survives_a_flood_of_bad_pipelines(kube: Kube, operator: OperatorThread) -> None:
    names = [f"bad-{i}" for i in range(25)]
    for i, name in enumerate(names):
        body = pipeline(name)
        body["spec"]["steps"][0]["batchSize"] = -i  # or worse:
        if i % 3 == 1:
            body["spec"]["steps"] = "not a list"
        if i % 3 == 2:
            body["spec"] = {"image": 42}
        await create(kube, body)
    await create(kube, pipeline("good"))

    def all_reported() -> bool:
        return all(condition(get_pipeline(kube, n), "Ready").get("reason") == "InvalidSpec" for n in names)

    await wait_for(all_reported, timeout=40, what="every bad Pipeline reported InvalidSpec")
    await wait_for(lambda: read(kube, "Deployment", "good"), what="the good Pipeline served despite the flood")
    assert operator.thread.is_alive()
    # No retry loop: each bad Pipeline's status was written once.
    status_writes = [r for r in kube.shim.requests if r.method.value == "PATCH" and r.url.path.endswith("/status")
                     and "/pipelines/bad-" in r.url.path]
    assert len(status_writes) == len(names)


async def test_model_storage_and_the_operators_image(
    kube: Kube, operator: OperatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Pipeline without image runs the operator's; a failed model download shows in its conditions."""
    monkeypatch.setenv(IMAGE_ENV, "registry.example.com/aqueduct:0.2.0")
    uri = "https://models.example.com/resnet50.pt"
    body = pipeline("resnet", model={"storageUri": uri}, volumes=[{"name": "cache", "emptyDir": {}}],
                    volumeMounts=[{"name": "cache", "mountPath": "/var/cache/torch"}])
    del body["spec"]["image"]
    await create(kube, body)

    dep = await wait_for(lambda: read(kube, "Deployment", "resnet"), what="the Deployment")
    template = dep["spec"]["template"]
    pod = template["spec"]
    (init,), (serve,) = pod["initContainers"], pod["containers"]
    assert init["image"] == serve["image"] == "registry.example.com/aqueduct:0.2.0"
    assert init["args"][:3] == ["aqueduct-fetch", uri, "/mnt/models"]
    assert {"name": "cache", "emptyDir": {}} in pod["volumes"] and {"name": "model", "emptyDir": {}} in pod["volumes"]
    assert {"name": "cache", "mountPath": "/var/cache/torch"} in serve["volumeMounts"]
    assert {"name": "MODEL_PATH", "value": "/mnt/models/resnet50.pt"} in serve["env"]

    # The kubelet's part: the pod's init container fails to download and backs off. (Pods that exist before
    # kopf's pod watch starts come in its initial listing, which the operator leaves to the resync timer.)
    await wait_for(lambda: any(r.url.path.endswith("/pods") and r.params.get("watch") == "true"
                               for r in kube.shim.requests), what="kopf watching pods")
    await asyncio.to_thread(kube.core.create_namespaced_pod, NS, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "resnet-5d4f-x2b9q", "labels": template["metadata"]["labels"]},
        "spec": pod,
    })
    message = f"aqueduct-fetch: {uri}: HTTP 404 Not Found"
    await asyncio.to_thread(
        kube.core.patch_namespaced_pod_status, "resnet-5d4f-x2b9q", NS,
        {"status": {"phase": "Pending", "initContainerStatuses": [{
            "name": "fetch-model", "ready": False, "restartCount": 2, "image": init["image"], "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": message + "\n"}},
        }]}},
        _content_type="application/merge-patch+json",
    )
    body = await wait_for(lambda: condition(b := get_pipeline(kube, "resnet"), "Ready").get("reason")
                          == "ModelFetchFailed" and b, what="Ready=False ModelFetchFailed")
    assert uri in condition(body, "Ready")["message"] and message in condition(body, "Degraded")["message"]
    assert condition(body, "Degraded")["status"] == "True"
    events = await wait_for(lambda: [e for e in kube.core.list_namespaced_event(NS).items
                                     if e.involved_object.name == "resnet" and e.reason == "ModelFetchFailed"],
                            what="a ModelFetchFailed event")
    assert events[0].type == "Warning" and uri in events[0].message


async def test_autoscaled_replicas_are_left_to_the_autoscaler(kube: Kube, operator: OperatorThread) -> None:
    body = pipeline("scaled")
    body["spec"]["autoscaling"] = {"minReplicas": 2, "maxReplicas": 6, "metric": "queueDepth", "target": 10}
    await create(kube, body)
    hpa = await wait_for(lambda: read(kube, "HorizontalPodAutoscaler", "scaled"), what="the HPA")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "scaled" and hpa["spec"]["maxReplicas"] == 6
    dep = await wait_for(lambda: read(kube, "Deployment", "scaled"), what="the Deployment")
    assert dep["spec"]["replicas"] == 2
    await wait_for(lambda: read(kube, "PodDisruptionBudget", "scaled"), what="the PodDisruptionBudget")

    # The autoscaler scales to 5, and the pods come up: the operator keeps the count and reports it.
    await asyncio.to_thread(
        kube.apps.patch_namespaced_deployment, "scaled", NS, [{"op": "replace", "path": "/spec/replicas", "value": 5}],
        _content_type="application/json-patch+json",
    )
    await asyncio.to_thread(
        kube.apps.patch_namespaced_deployment_status, "scaled", NS,
        {"status": {"observedGeneration": 99, "replicas": 5, "readyReplicas": 5, "availableReplicas": 5,
                    "updatedReplicas": 5}},
        _content_type="application/merge-patch+json",
    )
    scaled = await wait_for(lambda: (b := get_pipeline(kube, "scaled")).get("status", {}).get("readyReplicas") == 5
                            and b, what="5 ready replicas in the status")
    assert scaled["status"]["desiredReplicas"] == 5 and scaled["status"]["replicas"] == 5
    assert condition(scaled, "Ready")["status"] == "True"

    # Everything else is still repaired: a hand-edited image comes back, replicas stay at 5, the HPA returns.
    await asyncio.to_thread(
        kube.apps.patch_namespaced_deployment, "scaled", NS,
        [{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "evil:latest"}],
        _content_type="application/json-patch+json",
    )
    dep = await wait_for(lambda: (d := read(kube, "Deployment", "scaled"))
                         and d["spec"]["template"]["spec"]["containers"][0]["image"] == "aqueduct:dev" and d,
                         what="the image restored")
    assert dep["spec"]["replicas"] == 5
    cluster = Cluster(kube.api)
    await asyncio.to_thread(cluster.delete, "HorizontalPodAutoscaler", NS, "scaled")
    await asyncio.to_thread(reconcile, cluster, NS, "scaled", lambda *e: None)  # what the resync timer does
    assert await asyncio.to_thread(read, kube, "HorizontalPodAutoscaler", "scaled") is not None
    replica_writes = [r for r in kube.shim.requests if r.method.value == "PATCH" and r.url.path.endswith(
        "/deployments/scaled") and str(r.headers.get("User-Agent", "")).startswith("aqueduct-operator")
        and "/spec/replicas" in r.text]
    assert replica_writes == []

    # Autoscaling off: the HPA goes, and the operator owns spec.replicas again.
    await asyncio.to_thread(
        kube.custom.patch_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, "scaled",
        [{"op": "remove", "path": "/spec/autoscaling"}, {"op": "add", "path": "/spec/replicas", "value": 3}],
        _content_type="application/json-patch+json",
    )
    await wait_for(lambda: read(kube, "HorizontalPodAutoscaler", "scaled") is None, what="the HPA deleted")
    dep = await wait_for(lambda: (d := read(kube, "Deployment", "scaled"))["spec"]["replicas"] == 3 and d,
                         what="replicas back to 3")
    assert "aqueduct.dev/replicas-owner" not in dep["metadata"]["annotations"]


async def test_an_autoscaler_the_cluster_does_not_serve_is_reported(tmp_path: Any) -> None:
    """KEDA not installed: the ScaledObject cannot be created, and the status says which kind is missing."""
    async with serving({**BUILTINS, **crd_resources(crd.crd())}) as (_, url):  # no KEDA CRD
        path = str(tmp_path / "kubeconfig")
        write_kubeconfig(path, url)
        configuration = client.Configuration()
        kubernetes.config.load_kube_config(config_file=path, client_configuration=configuration)
        with client.ApiClient(configuration) as api:
            body = pipeline("scaled")
            body["spec"]["autoscaling"] = {"engine": "keda", "maxReplicas": 4, "target": 10,
                                           "prometheus": "http://prometheus:9090"}
            await asyncio.to_thread(client.CustomObjectsApi(api).create_namespaced_custom_object,
                                    GROUP, VERSION, NS, PLURAL, body)
            events: list[tuple[str, str, str]] = []
            status = await asyncio.to_thread(reconcile, Cluster(api), NS, "scaled", lambda *e: events.append(e))
    assert status is not None
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ApplyFailed"
    assert ready["message"].startswith("ScaledObject scaled: ") and "keda.sh/v1alpha1 ScaledObject" in ready["message"]
    assert ("Warning", "ApplyFailed", ready["message"]) in events


async def test_a_runtime_pipeline_runs_its_runtimes_image_and_reports_a_model_it_cannot_load(
    kube: Kube, operator: OperatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No image, no handler: the sklearn image serves spec.model's file; a pod exiting 2 shows on the Pipeline."""
    monkeypatch.setenv(IMAGE_ENV, "registry.example.com/aqueduct:0.2.0")
    monkeypatch.setenv("AQUEDUCT_RUNTIME_IMAGE_SKLEARN", "registry.example.com/aqueduct-sklearn:0.2.0")
    body = pipeline("iris", model={"storageUri": "pvc://models/iris/iris.skops"}, batchDim=True,
                    steps=[{"name": "model", "runtime": "sklearn", "batchSize": 64, "batchTimeout": 0.002,
                            "options": {"method": "predict_proba"}}],
                    autoscaling={"minReplicas": 1, "maxReplicas": 8})
    for key in ("image", "inputs", "outputs"):
        del body["spec"][key]
    await create(kube, body)

    dep = await wait_for(lambda: read(kube, "Deployment", "iris"), what="the Deployment")
    template = dep["spec"]["template"]
    (serve,) = template["spec"]["containers"]
    assert serve["image"] == "registry.example.com/aqueduct-sklearn:0.2.0"
    assert serve["terminationMessagePolicy"] == "FallbackToLogsOnError"
    cm = await wait_for(lambda: read(kube, "ConfigMap", "iris-config"), what="the ConfigMap")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config["steps"][0]["runtime"] == "sklearn" and config["steps"][0]["model"] == "/mnt/models/iris/iris.skops"
    assert config["steps"][0]["options"] == {"method": "predict_proba"} and "handler" not in config["steps"][0]
    assert config["batch_dim"] is True and "inputs" not in config
    hpa = await wait_for(lambda: read(kube, "HorizontalPodAutoscaler", "iris"), what="the HPA")
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "64"  # one batch waiting per worker

    # The first pod serves; then a rollout's new pod cannot load its model and exits 2 (the kubelet's part).
    await asyncio.to_thread(
        kube.apps.patch_namespaced_deployment_status, "iris", NS,
        {"status": {"observedGeneration": dep["metadata"]["generation"], "replicas": 1, "readyReplicas": 1,
                    "availableReplicas": 1, "updatedReplicas": 1}},
        _content_type="application/merge-patch+json",
    )
    await wait_for(lambda: condition(get_pipeline(kube, "iris"), "Ready").get("status") == "True", what="Ready")
    await wait_for(lambda: any(r.url.path.endswith("/pods") and r.params.get("watch") == "true"
                               for r in kube.shim.requests), what="kopf watching pods")
    await asyncio.to_thread(kube.core.create_namespaced_pod, NS, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "iris-6b7d-q8z2c", "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    })
    error = "aqueduct-serve: steps[0] (model): runtime 'sklearn': model file '/mnt/models/iris/iris.skops' is corrupt"
    await asyncio.to_thread(
        kube.core.patch_namespaced_pod_status, "iris-6b7d-q8z2c", NS,
        {"status": {"phase": "Running", "containerStatuses": [{
            "name": "serve", "ready": False, "restartCount": 3, "image": serve["image"], "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 2, "reason": "Error", "message": f"{error}\n"}},
        }]}},
        _content_type="application/merge-patch+json",
    )
    body = await wait_for(lambda: condition(b := get_pipeline(kube, "iris"), "Degraded").get("reason")
                          == "ServingConfigInvalid" and b, what="Degraded=True ServingConfigInvalid")
    assert condition(body, "Ready")["status"] == "True"  # the old pod still serves
    degraded = condition(body, "Degraded")["message"]
    assert error in degraded and "iris-6b7d-q8z2c" in degraded

    def warnings() -> list[Any]:
        return [e for e in kube.core.list_namespaced_event(NS).items
                if e.involved_object.name == "iris" and e.reason == "ServingConfigInvalid" and e.type == "Warning"]

    events = await wait_for(warnings, what="a ServingConfigInvalid Warning event")
    assert error in events[0].message

    # The old pod goes: the Pipeline is not Ready, and says why.
    await asyncio.to_thread(
        kube.apps.patch_namespaced_deployment_status, "iris", NS,
        {"status": {"readyReplicas": 0, "availableReplicas": 0}}, _content_type="application/merge-patch+json",
    )
    body = await wait_for(lambda: condition(b := get_pipeline(kube, "iris"), "Ready").get("reason")
                          == "ServingConfigInvalid" and b, what="Ready=False ServingConfigInvalid")
    assert condition(body, "Ready")["status"] == "False" and error in condition(body, "Ready")["message"]
