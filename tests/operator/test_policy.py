"""The operator's policy: what a Pipeline may use (volumes, service accounts, Secrets), the requests and limits
it gets when it sets none, its /dev/shm size and its NetworkPolicy."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import kubernetes_validate
import pytest
from aqueduct_operator import policy
from aqueduct_operator.__main__ import main
from aqueduct_operator.policy import NetworkAccess, Policy, PolicyError
from aqueduct_operator.render import desired_objects, shm_size_limit
from aqueduct_operator.spec import InvalidSpec, parse

from tests.operator import crd
from tests.operator.conftest import Kube, OperatorThread, wait_for
from tests.operator.test_operator_kmock import condition, create, get_pipeline, pipeline, read

K8S_VERSION = "1.34.0"


def body(**spec: Any) -> dict[str, Any]:
    doc = crd.load_yaml(crd.EXAMPLES / "pipeline.yaml")
    doc["metadata"].update(namespace="team-a", uid="6f1a2b3c-0000-4000-8000-000000000001", generation=1)
    doc["spec"].update(spec)
    return doc


def kinds(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {obj["kind"]: obj for obj in objs}


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (serve,) = kinds(objs)["Deployment"]["spec"]["template"]["spec"]["containers"]
    return serve


def refused(doc: dict[str, Any], field: str, *words: str, with_policy: Policy | None = None) -> InvalidSpec:
    with pytest.raises(InvalidSpec) as info:
        parse(doc, policy=with_policy)
    assert info.value.field == field, str(info.value)
    for word in words:
        assert word in str(info.value)
    return info.value


HOST_PATH = {"name": "root", "hostPath": {"path": "/"}}
DOCKER_SOCKET = {"name": "docker", "hostPath": {"path": "/var/run/docker.sock", "type": "Socket"}}
TOKEN = {"name": "token", "projected": {"sources": [
    {"configMap": {"name": "ca"}},
    {"serviceAccountToken": {"path": "token", "audience": "vault"}},
]}}


@pytest.mark.parametrize("volume", [HOST_PATH, DOCKER_SOCKET])
def test_host_path_volumes_are_refused_naming_the_field_and_the_chart_value(volume: dict[str, Any]) -> None:
    doc = body(volumes=[{"name": "cache", "emptyDir": {}}, volume])
    error = refused(doc, "spec.volumes[1].hostPath", "hostPath volumes are not allowed by this operator's policy",
                    "pipelinePolicy.volumeTypes")
    assert str(error).startswith("spec.volumes[1].hostPath: ")


@pytest.mark.parametrize("volume", [
    {"name": "csi", "csi": {"driver": "secrets-store.csi.k8s.io"}},
    {"name": "nfs", "nfs": {"server": "nfs.example.com", "path": "/"}},
    {"name": "eph", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
])
def test_other_volume_types_are_refused_unless_listed(volume: dict[str, Any]) -> None:
    kind = next(key for key in volume if key != "name")
    refused(body(volumes=[volume]), f"spec.volumes[0].{kind}", f"{kind} volumes are not allowed")
    parse(body(volumes=[volume]), policy=Policy(volume_types=frozenset({kind})))


def test_the_default_volume_types_are_allowed() -> None:
    volumes = [
        {"name": "cm", "configMap": {"name": "labels"}},
        {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "models", "persistentVolumeClaim": {"claimName": "models"}},
        {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
        {"name": "bundle", "projected": {"sources": [{"configMap": {"name": "ca"}}]}},
    ]
    pod = kinds(desired_objects(body(volumes=volumes)))["Deployment"]["spec"]["template"]["spec"]
    assert all(volume in pod["volumes"] for volume in volumes)


def test_a_host_path_is_served_when_the_chart_allows_it() -> None:
    allowed = Policy(volume_types=frozenset({*policy.DEFAULT_VOLUME_TYPES, "hostPath"}))
    pod = kinds(desired_objects(body(volumes=[HOST_PATH]), policy=allowed))["Deployment"]["spec"]["template"]["spec"]
    assert HOST_PATH in pod["volumes"]


def test_service_account_tokens_in_projected_volumes_are_refused() -> None:
    refused(body(volumes=[TOKEN]), "spec.volumes[0].projected.sources[1].serviceAccountToken",
            "pipelinePolicy.serviceAccountTokens")
    parse(body(volumes=[TOKEN]), policy=Policy(service_account_tokens=True))


def test_foreign_service_accounts_are_refused() -> None:
    refused(body(serviceAccountName="cluster-admin-sa"), "spec.serviceAccountName", "'cluster-admin-sa'",
            "pipelinePolicy.serviceAccounts")
    assert parse(body(serviceAccountName="default")).service_account_name == "default"
    listed = Policy(service_accounts=frozenset({"reader"}))
    assert parse(body(serviceAccountName="reader"), policy=listed).service_account_name == "reader"
    refused(body(serviceAccountName="writer"), "spec.serviceAccountName", with_policy=listed)
    parse(body(serviceAccountName="writer"), policy=Policy(service_accounts=frozenset({"*"})))


SECRET_ENV = {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}


@pytest.mark.parametrize(("spec", "field"), [
    ({"env": [{"name": "A", "value": "1"}, SECRET_ENV]}, "spec.env[1].valueFrom.secretKeyRef.name"),
    ({"volumes": [{"name": "creds", "secret": {"secretName": "db"}}]}, "spec.volumes[0].secret.secretName"),
    ({"volumes": [{"name": "p", "projected": {"sources": [{"secret": {"name": "db"}}]}}]},
     "spec.volumes[0].projected.sources[0].secret.name"),
    ({"model": {"storageUri": "s3://models/m.onnx", "s3": {"secretName": "db"}}}, "spec.model.s3.secretName"),
])
def test_secrets_are_refused_unless_listed(spec: dict[str, Any], field: str) -> None:
    refused(body(**spec), field, "Secret 'db' is not allowed", "pipelinePolicy.secrets: none")
    parse(body(**spec), policy=Policy(secrets=frozenset({"db"})))
    parse(body(**spec), policy=Policy(secrets=frozenset({"*"})))
    refused(body(**spec), field, "pipelinePolicy.secrets: other", with_policy=Policy(secrets=frozenset({"other"})))


def test_env_from_config_maps_and_fields_is_not_a_secret() -> None:
    env = [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}},
           {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    assert container(desired_objects(body(env=env)))["env"] == env


def test_the_policy_is_read_from_the_charts_json() -> None:
    text = json.dumps({
        "volumeTypes": ["configMap", "hostPath"], "serviceAccounts": ["reader"], "serviceAccountTokens": True,
        "secrets": ["db"], "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "3Gi"}},
        "networkPolicy": {"enabled": True, "ingressNamespaces": ["gateway"], "metricsNamespaces": ["monitoring"]},
    })
    got = policy.from_environ({policy.POLICY_ENV: text})
    assert got == Policy(
        volume_types=frozenset({"configMap", "hostPath"}), service_accounts=frozenset({"reader"}),
        service_account_tokens=True, secrets=frozenset({"db"}),
        resources={"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "3Gi"}},
        network_policy=NetworkAccess(True, ("gateway",), ("monitoring",)),
    )
    assert policy.from_environ({}) == Policy() == policy.from_environ({policy.POLICY_ENV: " "})
    assert policy.from_json("{}") == Policy()


@pytest.mark.parametrize(("text", "key"), [
    ("[]", ""), ("{", ""), ('{"volumeType": []}', "volumeType"), ('{"secrets": "db"}', "secrets"),
    ('{"serviceAccountTokens": "yes"}', "serviceAccountTokens"),
    ('{"resources": {"requests": {"memory": "lots"}}}', "resources.requests.memory"),
    ('{"networkPolicy": {"enabled": 1}}', "networkPolicy.enabled"),
])
def test_a_malformed_policy_names_its_key(text: str, key: str) -> None:
    with pytest.raises(PolicyError) as info:
        policy.from_json(text)
    assert info.value.key == key and str(info.value).startswith(f"pipelinePolicy.{key}")


def test_the_operator_refuses_to_start_with_a_malformed_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(policy.POLICY_ENV, '{"volumeTypes": "hostPath"}')
    with pytest.raises(SystemExit, match=r"AQUEDUCT_PIPELINE_POLICY: pipelinePolicy\.volumeTypes: must be a list"):
        main(["--all-namespaces"])


# Requests and limits


def test_a_pipeline_without_resources_gets_the_default_requests_and_memory_limit() -> None:
    doc = body()
    doc["spec"].pop("resources", None)
    assert container(desired_objects(doc))["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"},
    }
    charted = Policy(resources={"requests": {"cpu": 2}, "limits": {"memory": "8Gi", "cpu": 4}})
    assert container(desired_objects(doc, policy=charted))["resources"] == {
        "requests": {"cpu": 2}, "limits": {"memory": "8Gi", "cpu": 4},
    }
    assert "resources" not in container(desired_objects(doc, policy=Policy(resources={})))


@pytest.mark.parametrize(("given", "rendered"), [
    # Limits only: Kubernetes requests the limits (Guaranteed); nothing is added for cpu or memory.
    ({"limits": {"cpu": 1, "memory": "1Gi"}}, {"limits": {"cpu": 1, "memory": "1Gi"}}),
    # A GPU alone would leave memory unbounded: the defaults are added beside it.
    ({"limits": {"nvidia.com/gpu": 1}},
     {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"nvidia.com/gpu": 1, "memory": "2Gi"}}),
    # A request above the default limit raises the limit to it.
    ({"requests": {"memory": "6Gi"}}, {"requests": {"memory": "6Gi", "cpu": "500m"}, "limits": {"memory": "6Gi"}}),
    ({"requests": {"cpu": 4}}, {"requests": {"cpu": 4, "memory": "1Gi"}, "limits": {"memory": "2Gi"}}),
])
def test_defaults_fill_what_the_pipeline_leaves_out(given: dict[str, Any], rendered: dict[str, Any]) -> None:
    got = container(desired_objects(body(resources=given)))["resources"]
    assert got == rendered
    kubernetes_validate.validate(kinds(desired_objects(body(resources=given)))["Deployment"], K8S_VERSION, strict=True)


def test_the_model_download_gets_the_serving_containers_cpu_and_memory_not_its_gpus() -> None:
    model = {"storageUri": "https://models.example.com/r50.pt"}
    resources = {"requests": {"cpu": 2, "memory": "4Gi"}, "limits": {"memory": "8Gi", "nvidia.com/gpu": 1}}
    pod = kinds(desired_objects(body(model=model, resources=resources)))["Deployment"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["resources"] == {"requests": {"cpu": 2, "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
    pod = kinds(desired_objects(body(model=model, resources={})))["Deployment"]["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["resources"] == pod["containers"][0]["resources"]  # the defaults


# /dev/shm


def shm(**spec: Any) -> str:
    volumes = kinds(desired_objects(body(**spec)))["Deployment"]["spec"]["template"]["spec"]["volumes"]
    (dshm,) = [v for v in volumes if v["name"] == "dshm"]
    assert dshm["emptyDir"]["medium"] == "Memory"
    size: str = dshm["emptyDir"]["sizeLimit"]
    assert size == shm_size_limit(parse(body(**spec)))
    return size


def test_dshm_is_sized_from_the_arenas() -> None:
    one_step = [{"name": "m", "handler": "m:H", "nprocs": 2}]
    # No CPU limit: up to 8 front ends x 32 MiB, 2 model workers x 32 MiB, twice the 128 MiB decoded at once.
    assert shm(steps=one_step, resources={}) == f"{8 * 32 + 2 * 32 + 256}Mi"
    # A CPU limit of 2: one process, one arena.
    assert shm(steps=one_step, resources={"limits": {"cpu": 2}}) == f"{32 + 2 * 32 + 256}Mi"
    assert shm(steps=one_step, resources={"limits": {"cpu": "6"}}) == f"{3 * 32 + 2 * 32 + 256}Mi"
    # Set explicitly: 4 front ends of 8 MiB, two steps; bodies of up to 256 MiB: four of them.
    two_steps = [{"name": "a", "handler": "m:H", "nprocs": 3}, {"name": "b", "handler": "m:H"}]
    server = {"workers": 4, "arenaBytes": 8 * 1024 * 1024, "maxBodyBytes": 256 * 1024 * 1024}
    assert shm(steps=two_steps, server=server) == f"{4 * 8 + 4 * 32 + 1024}Mi"
    server = {"workers": 1, "arenaBytes": 1, "maxBodyBytes": 1024}
    assert shm(steps=one_step, server=server) == f"{1 + 2 * 32 + 256}Mi"  # rounded up to whole MiB


def test_dshm_size_can_be_set() -> None:
    assert shm(server={"shmBytes": 3 * 1024**3}) == "3072Mi"
    assert shm(server={"shmBytes": 5 * 1024**2 + 1}) == "6Mi"
    refused(body(server={"shmBytes": 1000}), "spec.server.shmBytes", "must be in [1048576")


# NetworkPolicy


def test_no_network_policy_unless_asked() -> None:
    assert "NetworkPolicy" not in kinds(desired_objects(body()))
    assert "NetworkPolicy" not in kinds(desired_objects(body(networkPolicy={"enabled": False})))


def test_the_network_policy_admits_the_port_from_the_namespaces_chosen() -> None:
    spec = {"enabled": True, "ingressNamespaces": ["gateway", "apps"], "metricsNamespaces": ["monitoring"]}
    netpol = kinds(desired_objects(body(networkPolicy=spec)))["NetworkPolicy"]
    kubernetes_validate.validate(netpol, K8S_VERSION, strict=True)
    assert netpol["metadata"]["name"] == "catdetector" and netpol["metadata"]["namespace"] == "team-a"
    assert netpol["metadata"]["ownerReferences"][0]["kind"] == "Pipeline"
    assert netpol["spec"]["podSelector"] == {"matchLabels": {"aqueduct.dev/pipeline": "catdetector"}}
    assert netpol["spec"]["policyTypes"] == ["Ingress"]
    port = [{"protocol": "TCP", "port": 8080}]
    inference = [*port, {"protocol": "TCP", "port": 8081}]  # HTTP and gRPC
    namespaces = [
        {"namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": names}]}}
        for names in (["apps", "gateway"], ["monitoring"])
    ]
    assert netpol["spec"]["ingress"] == [
        {"from": [{"podSelector": {}}], "ports": inference},  # the Pipeline's own namespace
        {"from": [namespaces[0]], "ports": inference},
        {"from": [namespaces[1]], "ports": port},  # metrics: HTTP only
    ]


def test_the_charts_network_policy_is_the_default_and_a_pipeline_overrides_it() -> None:
    charted = Policy(network_policy=NetworkAccess(True, ("gateway",), ("monitoring",)))
    netpol = kinds(desired_objects(body(), policy=charted))["NetworkPolicy"]
    assert [rule["from"][0] for rule in netpol["spec"]["ingress"]][1:] == [
        {"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In",
                                                     "values": [name]}]}} for name in ("gateway", "monitoring")
    ]
    own = kinds(desired_objects(body(networkPolicy={"ingressNamespaces": []}), policy=charted))["NetworkPolicy"]
    assert len(own["spec"]["ingress"]) == 2  # own namespace, monitoring
    assert "NetworkPolicy" not in kinds(desired_objects(body(networkPolicy={"enabled": False}), policy=charted))


@pytest.mark.parametrize(("spec", "field"), [
    ({"enabled": "yes"}, "spec.networkPolicy.enabled"),
    ({"ingressNamespaces": ["Not_A_Namespace"]}, "spec.networkPolicy.ingressNamespaces[0]"),
    ({"metricsNamespaces": "monitoring"}, "spec.networkPolicy.metricsNamespaces"),
    ({"egress": []}, "spec.networkPolicy.egress"),
])
def test_a_bad_network_policy_names_the_field(spec: dict[str, Any], field: str) -> None:
    refused(body(networkPolicy=spec), field)


def test_the_crd_takes_the_new_fields() -> None:
    doc = body(networkPolicy={"enabled": True, "ingressNamespaces": ["gateway"], "metricsNamespaces": ["monitoring"]},
               server={"shmBytes": 512 * 1024 * 1024})
    assert crd.errors(doc) == []
    assert crd.errors(body(server={"shmBytes": 1024})) != []
    assert crd.errors(body(networkPolicy={"enabled": "yes"})) != []


# The operator, against kmock


async def test_the_operator_enforces_the_charts_policy(
    kube: Kube, operator: OperatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(policy.POLICY_ENV, json.dumps({"networkPolicy": {"metricsNamespaces": ["monitoring"]}}))
    await create(kube, pipeline("rooted", volumes=[copy.deepcopy(HOST_PATH)],
                                volumeMounts=[{"name": "root", "mountPath": "/host"}]))
    await create(kube, pipeline("fenced", networkPolicy={"enabled": True}))

    ready = await wait_for(lambda: condition(get_pipeline(kube, "rooted"), "Ready") or None, what="a condition")
    assert ready["reason"] == "InvalidSpec"
    assert ready["message"].startswith("spec.volumes[0].hostPath: hostPath volumes are not allowed")
    assert await asyncio.to_thread(read, kube, "Deployment", "rooted") is None

    netpol = await wait_for(lambda: read(kube, "NetworkPolicy", "fenced"), what="the NetworkPolicy")
    assert netpol["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == [
        "monitoring"
    ]
    dep = await wait_for(lambda: read(kube, "Deployment", "fenced"), what="the Deployment")
    (serve,) = dep["spec"]["template"]["spec"]["containers"]
    assert serve["resources"]["limits"]["memory"] == "1Gi"  # the example's own

    # Turned off in the spec: the NetworkPolicy goes.
    await asyncio.to_thread(
        kube.custom.patch_namespaced_custom_object, "aqueduct.dev", "v1alpha1", "default", "pipelines", "fenced",
        {"spec": {"networkPolicy": {"enabled": False}}}, _content_type="application/merge-patch+json",
    )
    await wait_for(lambda: read(kube, "NetworkPolicy", "fenced") is None, what="the NetworkPolicy deleted")
