"""End to end on a real cluster (kind), the steps deploy/kind/up.sh takes, driven from pytest.

Prepare once with `deploy/kind/up.sh` (creates the cluster, builds and loads aqueduct:dev), then
`E2E_CLUSTER=1 pytest -m kind tests/deploy`. Without a reachable cluster these tests skip and say why;
with E2E_CLUSTER=1 they fail instead (the shared gate, tests/cluster.py). Settings: E2E_CONTEXT (kubeconfig
context; default the current one, which up.sh sets to kind-aqueduct), E2E_IMAGE (aqueduct:dev, must already
be loaded into the cluster).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.cluster import require_cluster

from .conftest import CHART, ROOT, find_tool, run, wait_until

pytestmark = pytest.mark.kind

CONTEXT = os.environ.get("E2E_CONTEXT") or None
IMAGE = os.environ.get("E2E_IMAGE", "aqueduct:dev")
RELEASE, OPERATOR_NAMESPACE = "aqueduct", "aqueduct-system"
GROUP, VERSION, PLURAL = "aqueduct.dev", "v1alpha1", "pipelines"
REQUEST = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [4], "data": [0.1, 0.2, 0.3, 0.4]}]}


def kubectl(*args: str) -> list[str]:
    return [require_cluster(), *(["--context", CONTEXT] if CONTEXT else []), *args]


@pytest.fixture(scope="module")
def api() -> Any:
    """A kubernetes ApiClient for the cluster (skips, or fails with E2E_CLUSTER=1, when there is none)."""
    require_cluster()
    from kubernetes import client, config

    api_client = config.new_client_from_config(context=CONTEXT)
    version = client.VersionApi(api_client).get_code(_request_timeout=10)
    print(f"\n[kind] Kubernetes {version.git_version} (context {CONTEXT or 'current'})")
    return api_client


@pytest.fixture(scope="module")
def operator(api: Any) -> None:
    """The chart from this tree, installed as up.sh does (the image must be loaded: deploy/kind/up.sh)."""
    run(kubectl("apply", "-f", str(CHART / "crds" / "pipelines.yaml")))
    repository, _, tag = IMAGE.rpartition(":")
    run(
        [
            find_tool("helm"),
            "upgrade",
            "--install",
            RELEASE,
            str(CHART),
            *(["--kube-context", CONTEXT] if CONTEXT else []),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--create-namespace",
            "--set",
            f"image.repository={repository}",
            "--set",
            f"image.tag={tag}",
            "--set",
            "image.pullPolicy=IfNotPresent",
            "--wait",
            "--timeout",
            "180s",
        ],
        timeout=240,
    )


@pytest.fixture
def namespace(api: Any, operator: None) -> Iterator[str]:
    from kubernetes import client

    core = client.CoreV1Api(api)
    name = f"aqueduct-e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)



@contextlib.contextmanager
def port_forward(namespace: str, service: str) -> Iterator[str]:
    """kubectl port-forward service/NAME :8080; yields the local base URL."""
    proc = subprocess.Popen(
        kubectl("-n", namespace, "port-forward", f"service/{service}", ":8080"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"kubectl port-forward said: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        proc.terminate()
        proc.wait(10)


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def ready(custom: Any, namespace: str, name: str, generation: int | None = None) -> bool:
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    status = obj.get("status") or {}
    if generation is not None and status.get("observedGeneration", 0) < generation:
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])


def served_batch_size(namespace: str, service: str, model: str) -> int:
    with port_forward(namespace, service) as url:
        status, metadata = http("GET", f"{url}/v2/models/{model}")
        assert status == 200, metadata
        return int(metadata["parameters"]["steps"][0]["batch_size"])


def test_pipeline_lifecycle(api: Any, namespace: str) -> None:
    """apply -> Ready -> infer -> change batchSize (pods roll, new value served) -> delete (all gone)."""
    from kubernetes import client

    apps: Any = client.AppsV1Api(api)
    core: Any = client.CoreV1Api(api)
    custom: Any = client.CustomObjectsApi(api)
    pipeline = next(d for d in yaml.safe_load_all((ROOT / "examples" / "pipeline.yaml").read_text()) if d)
    pipeline["spec"]["image"] = IMAGE
    name = pipeline["metadata"]["name"]
    model = name
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/component=serving"

    # apply, wait Ready
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, pipeline)
    wait_until(f"Pipeline {name} Ready", lambda: ready(custom, namespace, name), 300, interval=1)

    # infer through a port-forward
    with port_forward(namespace, name) as url:

        def infer() -> Any:
            status, answer = http("POST", f"{url}/v2/models/{model}/infer", REQUEST)
            return answer if status == 200 else None

        answer = wait_until("an inference answer", infer, 60, interval=1)
        (output,) = answer["outputs"]
        assert output["name"] == "is_cat" and output["data"] == [True]
    old_batch = pipeline["spec"]["steps"][0]["batchSize"]
    assert served_batch_size(namespace, name, model) == old_batch

    # change batchSize: the pods roll and the new value is served
    old_pods = {p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector=selector).items}
    assert old_pods
    steps = copy.deepcopy(pipeline["spec"]["steps"])
    steps[0]["batchSize"] = new_batch = old_batch + 7
    patched = custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": {"steps": steps}})
    generation = patched["metadata"]["generation"]
    wait_until("Ready at the new generation", lambda: ready(custom, namespace, name, generation), 300, interval=1)

    def rolled() -> bool:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        names = {p.metadata.name for p in pods}
        return bool(names) and not names & old_pods

    wait_until("the serving pods to be replaced", rolled, 300, interval=1)
    wait_until(
        f"batch_size {new_batch} served",
        lambda: served_batch_size(namespace, name, model) == new_batch,
        120,
        interval=1,
    )

    # delete: the Pipeline's Deployment, Service, ConfigMap and pods go with it
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def all_gone() -> bool:
        listed = [
            custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"],
            apps.list_namespaced_deployment(namespace).items,
            core.list_namespaced_service(namespace).items,
            [c for c in core.list_namespaced_config_map(namespace).items if c.metadata.name != "kube-root-ca.crt"],
            core.list_namespaced_pod(namespace).items,
        ]
        return not any(listed)

    wait_until("everything the Pipeline owned to be deleted", all_gone, 300, interval=1)
