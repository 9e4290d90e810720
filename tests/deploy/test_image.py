"""The one image, built by a real Docker engine and run as both the serving pod and the operator.

Built from the base scripts/ci/base-image.sh makes (no registry here), with `docker build --network host`
and `docker run --network host` (the CI engine has no bridge); servers bind 127.0.0.1 inside the container.
Containers run as Kubernetes runs them: read-only root filesystem, writable /tmp only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from bench.processes import free_port, terminate

from .conftest import ROOT, Docker, build_image, unavailable, wait_until
from .containers import container, http

pytestmark = pytest.mark.docker

KMOCK_SERVE = ROOT / "tests" / "operator" / "kmock_serve.py"


def test_image_user_and_contents(docker: Docker, aqueduct_image: str) -> None:
    script = (
        "import getpass, os, shutil, sys; "
        "print(os.getuid(), os.getgid(), getpass.getuser(), os.getcwd()); "
        "print([t for t in ('gcc', 'cc', 'make', 'hatchling') if shutil.which(t)]); "
        "print(os.path.exists('/opt/venv/bin/pip'), sys.prefix)"
    )
    out = docker("run", "--rm", "--network", "host", aqueduct_image, "python", "-c", script).stdout.splitlines()
    assert out[0] == "10001 10001 aqueduct /app"  # non-root, with a passwd entry (kopf needs getpass.getuser)
    assert out[1] == "[]", "build tools left in the image"
    assert out[2] == "False /opt/venv", "the shipped venv carries no pip"
    inspect = json.loads(docker("image", "inspect", aqueduct_image).stdout)[0]["Config"]
    assert inspect["User"] == "10001"
    assert inspect["Cmd"] == ["aqueduct-serve", "--config", "examples/catdetector/pipeline.yaml"]
    assert "8080/tcp" in inspect["ExposedPorts"]


@pytest.mark.parametrize("command", ["aqueduct-serve", "aqueduct-operator", "aqueduct-fetch"])
def test_both_entry_points(docker: Docker, aqueduct_image: str, command: str) -> None:
    proc = docker("run", "--rm", "--network", "host", aqueduct_image, command, "--help")
    assert f"usage: {command}" in proc.stdout


def test_fetch_init_container_downloads_the_model(docker: Docker, aqueduct_image: str, tmp_path: Path) -> None:
    """aqueduct-fetch as the operator runs it (read-only root, the model folder an emptyDir): ok, then a 404."""
    (tmp_path / "model.pt").write_bytes(b"weights" * 1000)
    sha256 = hashlib.sha256(b"weights" * 1000).hexdigest()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    run = ("run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp", "--tmpfs", "/mnt/models:uid=10001",
           aqueduct_image)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        ok = docker(*run, "sh", "-c", f"aqueduct-fetch {base}/model.pt /mnt/models --sha256 {sha256} "
                    "&& sha256sum /mnt/models/model.pt")
        assert sha256 in ok.stdout, ok.stdout + ok.stderr
        missing = docker(*run, "aqueduct-fetch", f"{base}/missing.pt", "/mnt/models", check=False)
        assert missing.returncode == 1
        assert f"aqueduct-fetch: {base}/missing.pt: HTTP 404" in missing.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_pre_stop_hook_runs_in_the_serving_container(docker: Docker, aqueduct_image: str) -> None:
    """The operator's preStop hook (`sleep drainDelay`) runs as the pod runs it: uid 10001, read-only root."""
    from aqueduct_operator.render import desired_objects

    from tests.operator import crd

    body = crd.load_yaml(crd.EXAMPLES / "pipeline.yaml")
    body["metadata"].update(namespace="default", uid="u", generation=1)
    body["spec"]["server"] = {"drainDelay": 0.2}
    deployment = next(o for o in desired_objects(body) if o["kind"] == "Deployment")
    hook = deployment["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    docker("run", "--rm", "--network", "host", "--read-only", "--user", "10001", aqueduct_image, *hook)


def test_rebuild_is_cached(docker: Docker, aqueduct_image: str, base_image: str) -> None:
    """An unchanged tree rebuilds from cache alone: dependencies are not reinstalled."""
    seconds, log = build_image(docker, aqueduct_image, {"BASE": base_image})
    print(f"\n[deploy] cached rebuild: {seconds:.1f} s", file=sys.stderr)
    assert "Using cache" in log and " ---> Running in " not in log, log


def test_serving_container_answers(docker: Docker, aqueduct_image: str) -> None:
    port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    with container(
        docker,
        aqueduct_image,
        "aqueduct-serve",
        "--config",
        "examples/catdetector/pipeline.yaml",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        options=("-e", f"AQUEDUCT_SERVER__GRPC_PORT={grpc_port}"),
    ) as logs:
        wait_until("/v2/health/ready", lambda: http("GET", f"{base}/v2/health/ready")[0] == 200, 90, logs=logs)
        status, metadata = http("GET", f"{base}/v2/models/catdetector")
        assert status == 200, metadata
        assert metadata["name"] == "catdetector"
        request = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [4], "data": [0.1, 0.2, 0.3, 0.4]}]}
        status, answer = http("POST", f"{base}/v2/models/catdetector/infer", request, timeout=30)
        assert status == 200, f"{answer}\n--- logs\n{logs()}"
        (output,) = answer["outputs"]
        assert output["name"] == "is_cat" and output["datatype"] == "BOOL" and output["data"] == [True]
        # the same over gRPC: the image has what the gRPC service needs
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            image = grpcclient.InferInput("image", [4], "FP32")
            image.set_data_from_numpy(np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))
            assert client.infer("catdetector", [image], client_timeout=30).as_numpy("is_cat").tolist() == [True]


@pytest.fixture
def kmock_kubeconfig(tmp_path: Path) -> Iterator[Path]:
    """The operator tests' in-process API stand-in (kmock + shim), served on loopback for other processes."""
    if not KMOCK_SERVE.exists():
        unavailable(f"{KMOCK_SERVE.relative_to(ROOT)} (the operator's API stand-in server) does not exist yet")
    kubeconfig = tmp_path / "kubeconfig"
    port = free_port()
    log = (tmp_path / "kmock.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.operator.kmock_serve", "--port", str(port), "--kubeconfig", str(kubeconfig)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not (kubeconfig.exists() and kubeconfig.stat().st_size and port_open(port)):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"kmock_serve did not come up:\n{(tmp_path / 'kmock.log').read_text()}", pytrace=False)
            time.sleep(0.1)
        kubeconfig.chmod(0o644)  # read by the container's uid 10001
        yield kubeconfig
    finally:
        terminate(proc)
        log.close()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_operator_container_reconciles_the_example(docker: Docker, aqueduct_image: str, kmock_kubeconfig: Path) -> None:
    """The image's own operator (as the chart runs it) turns examples/pipeline.yaml into its Deployment."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(kmock_kubeconfig))
    apps: Any = client.AppsV1Api(api)
    custom: Any = client.CustomObjectsApi(api)
    pipeline = next(d for d in yaml.safe_load_all((ROOT / "examples" / "pipeline.yaml").read_text()) if d)
    name, namespace = pipeline["metadata"]["name"], "default"
    health = free_port()
    with container(
        docker,
        aqueduct_image,
        "aqueduct-operator",
        "--all-namespaces",
        "--standalone",
        f"--liveness=http://127.0.0.1:{health}/healthz",
        "--verbose",
        # A short resync: kopf can take a stale event from the stand-in's watch for the new object, have
        # its finalizer patch refused, and wait for the next cycle; the resync timer is that cycle.
        options=(
            "-v",
            f"{kmock_kubeconfig}:/kube/config:ro",
            "-e",
            "KUBECONFIG=/kube/config",
            "-e",
            "AQUEDUCT_OPERATOR_RESYNC_SECONDS=5",
        ),
    ) as logs:
        wait_until(
            "the operator's liveness endpoint",
            lambda: http("GET", f"http://127.0.0.1:{health}/healthz")[0] == 200,
            60,
            logs=logs,
        )
        created = custom.create_namespaced_custom_object("aqueduct.dev", "v1alpha1", namespace, "pipelines", pipeline)
        uid = created["metadata"]["uid"]

        def deployment() -> Any:
            try:
                return apps.read_namespaced_deployment(name, namespace)
            except client.ApiException as e:
                if e.status == 404:
                    return None
                raise

        found = wait_until(f"Deployment {namespace}/{name}", deployment, 60, logs=logs)
        assert found.spec.template.spec.containers[0].image == pipeline["spec"]["image"]
        assert [ref.uid for ref in found.metadata.owner_references] == [uid]
        assert found.spec.replicas == pipeline["spec"]["replicas"]
