"""Unit layer: spec.model (storageUri), spec.volumes/volumeMounts and spec.image's default -> the pod spec."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
from aqueduct_operator import status
from aqueduct_operator.policy import Policy
from aqueduct_operator.render import desired_objects
from aqueduct_operator.spec import InvalidSpec, parse

from tests.operator.test_render import K8S_VERSION, by_kind, example

SHA = "a" * 64
OPERATOR_IMAGE = "registry.example.com/aqueduct:0.2.0"


def with_spec(**changes: Any) -> dict[str, Any]:
    body = example()
    body["spec"].update(changes)
    return body


def pod_of(body: dict[str, Any], default_image: str | None = None) -> dict[str, Any]:
    objs = desired_objects(body, default_image, policy=Policy(secrets=frozenset({"minio-creds", "minio-credentials"})))
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    pod: dict[str, Any] = by_kind(objs)["Deployment"]["spec"]["template"]["spec"]
    return pod


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def test_https_model_is_fetched_by_an_init_container_of_the_same_image() -> None:
    pod = pod_of(with_spec(model={"storageUri": "https://models.example.com/r50/resnet50.pt", "sha256": SHA}))
    (init,) = pod["initContainers"]
    (serve,) = pod["containers"]
    assert init["image"] == serve["image"] == "aqueduct:dev"
    assert init["args"] == ["aqueduct-fetch", "https://models.example.com/r50/resnet50.pt", "/mnt/models",
                            "--sha256", SHA]
    assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert init["securityContext"] == serve["securityContext"]
    assert {"name": "model", "emptyDir": {}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/mnt/models"} in init["volumeMounts"]
    assert {"name": "model", "mountPath": "/mnt/models", "readOnly": True} in serve["volumeMounts"]
    assert env_of(serve)["MODEL_PATH"] == "/mnt/models/resnet50.pt"
    # The name aqueduct-fetch gives the file (percent-decoded, query left out).
    (serve,) = pod_of(with_spec(model={"storageUri": "https://h/r50%20v2.pt?sig=x"}))["containers"]
    assert env_of(serve)["MODEL_PATH"] == "/mnt/models/r50 v2.pt"


def test_s3_model_gets_endpoint_region_and_credentials_from_a_secret() -> None:
    model = {"storageUri": "s3://models/r50/resnet50.pt",
             "s3": {"endpoint": "http://minio:9000", "region": "eu-west-1", "secretName": "minio-creds"}}
    (init,) = pod_of(with_spec(model=model))["initContainers"]
    assert init["args"] == ["aqueduct-fetch", "s3://models/r50/resnet50.pt", "/mnt/models",
                            "--s3-endpoint", "http://minio:9000", "--s3-region", "eu-west-1"]
    assert init["envFrom"] == [{"secretRef": {"name": "minio-creds"}}]


def test_pvc_model_is_mounted_read_only_without_an_init_container() -> None:
    pod = pod_of(with_spec(model={"storageUri": "pvc://model-store/resnet/v2"}))
    assert "initContainers" not in pod
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "model-store", "readOnly": True}} in pod["volumes"]
    (serve,) = pod["containers"]
    assert {"name": "model", "mountPath": "/mnt/models", "readOnly": True} in serve["volumeMounts"]
    assert env_of(serve)["MODEL_PATH"] == "/mnt/models/resnet/v2"


def test_volumes_and_mounts_pass_through_next_to_the_operators_own() -> None:
    volumes = [{"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}},
               {"name": "labels", "configMap": {"name": "imagenet-labels"}}]
    mounts = [{"name": "cache", "mountPath": "/var/cache/torch"},
              {"name": "labels", "mountPath": "/etc/labels", "readOnly": True}]
    pod = pod_of(with_spec(volumes=volumes, volumeMounts=mounts, env=[{"name": "TORCH_HOME", "value": "/x"}]))
    assert [v["name"] for v in pod["volumes"]] == ["config", "dshm", "tmp", "cache", "labels"]
    assert pod["volumes"][3:] == volumes
    (serve,) = pod["containers"]
    assert serve["volumeMounts"][-2:] == mounts
    assert env_of(serve) == {"TORCH_HOME": "/x"}  # no MODEL_PATH without spec.model


def test_the_example_resnet_pipeline_renders_with_the_operators_image() -> None:
    pod = pod_of(example("pipelines/resnet.yaml"), default_image=OPERATOR_IMAGE)
    assert pod["containers"][0]["image"] == pod["initContainers"][0]["image"] == OPERATOR_IMAGE


def test_an_image_in_the_spec_wins_over_the_operators() -> None:
    assert parse(example(), default_image=OPERATOR_IMAGE).image == "aqueduct:dev"
    body = example()
    del body["spec"]["image"]
    assert parse(body, default_image=OPERATOR_IMAGE).image == OPERATOR_IMAGE
    with pytest.raises(InvalidSpec, match=r"spec\.image: is required"):
        parse(body)


@pytest.mark.parametrize(("changes", "field"), [
    ({"model": {"storageUri": "ftp://host/m.pt"}}, "spec.model.storageUri"),
    ({"model": {"storageUri": "https://host/"}}, "spec.model.storageUri"),
    ({"model": {"storageUri": "https://host/..%2Fetc%2Fpasswd"}}, "spec.model.storageUri"),
    ({"model": {"storageUri": "pvc://Bad_Claim/m"}}, "spec.model.storageUri"),
    ({"model": {"storageUri": "pvc://claim/../etc"}}, "spec.model.storageUri"),
    ({"model": {"storageUri": "https://h/m.pt", "sha256": "ABC"}}, "spec.model.sha256"),
    ({"model": {"storageUri": "pvc://claim/m", "sha256": SHA}}, "spec.model.sha256"),
    ({"model": {"storageUri": "https://h/m.pt", "s3": {"region": "x"}}}, "spec.model.s3"),
    ({"model": {"storageUri": "s3://b/m.pt", "s3": {"endpoint": "minio:9000"}}}, "spec.model.s3.endpoint"),
    ({"model": {"storageUri": "s3://b/m.pt", "s3": {"secret": "x"}}}, "spec.model.s3.secret"),
    ({"model": {"storageUri": "s3://b/m.pt"}, "env": [{"name": "MODEL_PATH", "value": "/x"}]}, "spec.env[0].name"),
    ({"volumes": [{"name": "config", "emptyDir": {}}]}, "spec.volumes[0].name"),
    ({"volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]}, "spec.volumes[1].name"),
    ({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, "spec.volumeMounts[0].name"),
    ({"volumes": [{"name": "a", "emptyDir": {}}], "volumeMounts": [{"name": "a", "mountPath": "/tmp/a"}]},
     "spec.volumeMounts[0].mountPath"),
    ({"volumes": [{"name": "a", "emptyDir": {}}], "volumeMounts": [{"name": "a", "mountPath": "rel"}]},
     "spec.volumeMounts[0].mountPath"),
])
def test_invalid_storage_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse(with_spec(**changes))
    assert info.value.field == field


def fetch_pod(name: str, *, state: dict[str, Any], last: dict[str, Any] | None = None) -> dict[str, Any]:
    init = {"name": "fetch-model", "state": state, "lastState": last or {}, "restartCount": 1}
    return {"metadata": {"name": name}, "status": {"initContainerStatuses": [init]}}


FAILED = {"terminated": {"exitCode": 1, "reason": "Error",
                         "message": "aqueduct-fetch: https://h/m.pt: HTTP 404 Not Found\n"}}


@pytest.mark.parametrize("pod", [
    fetch_pod("p-1", state=FAILED),
    fetch_pod("p-1", state={"waiting": {"reason": "CrashLoopBackOff"}}, last=FAILED),
])
def test_a_failed_download_makes_the_pipeline_degraded_with_the_fetchers_message(pod: dict[str, Any]) -> None:
    spec = parse(with_spec(model={"storageUri": "https://h/m.pt"}))
    deployment = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "replicas": 1}}
    new = status.compute(spec, deployment, {}, "2026-11-30T00:00:00Z", [pod])
    conditions = {c["type"]: c for c in new["conditions"]}
    message = "pod p-1: init container fetch-model failed (exit code 1): " + FAILED["terminated"]["message"].strip()
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "ModelFetchFailed")
    assert conditions["Ready"]["message"] == message
    assert (conditions["Degraded"]["status"], conditions["Degraded"]["reason"]) == ("True", "ModelFetchFailed")


def test_a_download_that_succeeded_after_a_failure_is_not_reported() -> None:
    spec = parse(with_spec(model={"storageUri": "https://h/m.pt"}))
    pod = fetch_pod("p-1", state={"terminated": {"exitCode": 0, "reason": "Completed"}}, last=FAILED)
    new = status.compute(spec, None, {}, "2026-11-30T00:00:00Z", [copy.deepcopy(pod)])
    assert {c["type"]: c["reason"] for c in new["conditions"]}["Degraded"] == "AsExpected"
