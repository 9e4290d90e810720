"""Fixtures for the monitoring checks: Debian's Prometheus and promtool (scripts/ci/install-prometheus.sh),
two real serving pods on loopback ports, and a Prometheus scraping them with the project's scrape job.

A missing prometheus or promtool skips the test on a developer machine and FAILS it in CI (env CI set).
"""

from __future__ import annotations

import contextlib
import copy
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aqueduct_operator import render
from aqueduct_operator.spec import parse

from bench.processes import terminate
from tests.deploy.conftest import unavailable
from tests.service.conftest import Server, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/helm/aqueduct/files/prometheus-rules.yaml"
SCRAPE_CONFIG = ROOT / "deploy/prometheus/scrape-config.yaml"
ADAPTER_RULES = ROOT / "deploy/prometheus/adapter-rules.yaml"
DASHBOARD = ROOT / "deploy/grafana/aqueduct-dashboard.json"
ALERT_TESTS = Path(__file__).with_name("alerts.test.yaml")
NAMESPACE = "default"
PIPELINE = "noop"
PODS = ("noop-0", "noop-1")
START_BOUND_S = 60.0


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        unavailable(f"{name} not found on PATH; run scripts/ci/install-prometheus.sh (Debian's prometheus package)")
    return found


def pipeline() -> dict[str, Any]:
    """The Pipeline the two pods stand for: the noop example, with a latency objective and prometheus-operator."""
    body = yaml.safe_load((ROOT / "examples/pipelines/noop.yaml").read_text())
    body["metadata"].update(namespace=NAMESPACE, uid="6f1a2b3c-0000-4000-8000-000000000002", generation=1)
    body["spec"]["monitoring"] = {"prometheusOperator": True, "latencyTarget": 0.25}
    return body


def objectives_rule_file() -> dict[str, Any]:
    """The objectives PrometheusRule the operator renders for :func:`pipeline`, as a plain rule file."""
    rule = next(o for o in render.render(parse(pipeline())) if o["kind"] == "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def label_name(key: str) -> str:
    """A Kubernetes label or annotation key as Kubernetes discovery names it in Prometheus."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def scrape_job(pods: dict[str, Server]) -> dict[str, Any]:
    """deploy/prometheus/scrape-config.yaml's job, its pod discovery replaced by the same labels given statically."""
    (job,) = copy.deepcopy(yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"])
    del job["kubernetes_sd_configs"]
    deployment = next(o for o in render.render(parse(pipeline())) if o["kind"] == "Deployment")
    template = deployment["spec"]["template"]["metadata"]
    job["static_configs"] = []
    for name, server in pods.items():
        meta = {"__meta_kubernetes_namespace": NAMESPACE, "__meta_kubernetes_pod_name": name}
        meta.update({f"__meta_kubernetes_pod_label_{label_name(k)}": v for k, v in template["labels"].items()})
        meta.update(
            {f"__meta_kubernetes_pod_annotation_{label_name(k)}": v for k, v in template["annotations"].items()}
        )
        meta["__meta_kubernetes_pod_annotation_prometheus_io_port"] = str(server.port)  # one loopback IP for both
        job["static_configs"].append({"targets": ["127.0.0.1"], "labels": meta})
    job["scrape_interval"] = "1s"
    job["scrape_timeout"] = "1s"
    return job


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Two serving pods of the noop example, as `aqueduct-serve --config` processes on loopback ports."""
    workdir = tmp_path_factory.mktemp("pods")
    config = yaml.safe_load((ROOT / "examples/noop/pipeline.yaml").read_text())
    path = workdir / "noop.yaml"
    path.write_text(yaml.safe_dump(config))
    servers: dict[str, Server] = {}
    try:
        for name in PODS:
            servers[name] = Server(path, workdir)
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


class Prometheus:
    """A Prometheus process on a loopback port, with its HTTP API."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            return self.client.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (raises on a PromQL error)."""
        reply = self.client.get("/api/v1/query", params={"query": expr})
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", f"{expr}\n{body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def series(self, selector: str) -> list[dict[str, str]]:
        body = self.client.get("/api/v1/series", params={"match[]": selector}).json()
        assert body["status"] == "success", f"{selector}\n{body}"
        found: list[dict[str, str]] = body["data"]
        return found

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            terminate(self.proc, 30)


@pytest.fixture(scope="module")
def prometheus(pods: dict[str, Server], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A real Prometheus scraping both pods every second, with the chart's rules and the Pipeline's objectives."""
    workdir = tmp_path_factory.mktemp("prometheus")
    objectives = workdir / "objectives.yaml"
    objectives.write_text(yaml.safe_dump(objectives_rule_file()))
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES), str(objectives)],
        "scrape_configs": [scrape_job(pods)],
    }))
    check = subprocess.run(
        [tool("promtool"), "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    server = Prometheus(config, workdir)
    try:
        wait_for(server.ready, START_BOUND_S, "Prometheus to be ready")
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def load(pods: dict[str, Server], *, concurrency: int = 4) -> Iterator[None]:
    """Inference requests to every pod from background threads while the block runs."""
    stop = threading.Event()
    body = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}

    def loop(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                client.post(f"/v2/models/{PIPELINE}/infer", json=body)

    threads = [threading.Thread(target=loop, args=(server.url,), daemon=True)
               for server in pods.values() for _ in range(concurrency // len(pods))]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
