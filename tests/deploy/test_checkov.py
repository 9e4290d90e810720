"""checkov on what reaches a cluster: the chart as `helm template` renders it, and the objects the operator renders
for the example Pipelines. Every check passes except those deploy/checkov-skips.yaml lists with a reason, and
each of those still fails (no stale entries)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from aqueduct_operator.policy import NetworkAccess
from aqueduct_operator.render import desired_objects

from tests.operator import crd

from .conftest import CHART, ROOT, find_tool, run, unavailable

SKIPS = ROOT / "deploy" / "checkov-skips.yaml"
CHECKOV_VENV = ROOT / ".venv" / "checkov" / "bin" / "checkov"  # scripts/setup-venv installs it there
CHART_VALUES = {
    "defaults": [],
    "hardened": ["--set", "operator.replicas=2", "--set", "prometheusRule.enabled=true",
                 "--set", "operator.networkPolicy.enabled=true",
                 "--set", "operator.networkPolicy.egress[0].ports[0].port=6443",
                 "--set", "operator.watchNamespaces={team-a}"],
}
# The examples as a cluster with the chart's policy runs them: resnet.yaml's Secret listed, NetworkPolicies on.
POLICY = dataclasses.replace(crd.EXAMPLES_POLICY, network_policy=NetworkAccess(True, ("gateway",), ("monitoring",)))
NAMESPACE = "team-a"


def checkov() -> str:
    """checkov's path: its own venv (scripts/setup-venv), else PATH; missing: skipped here, failed in CI."""
    if CHECKOV_VENV.is_file() and os.access(CHECKOV_VENV, os.X_OK):
        return str(CHECKOV_VENV)
    found = shutil.which("checkov")
    if found is None:
        unavailable(f"checkov not found at {CHECKOV_VENV} or in PATH; run scripts/setup-venv")
    return found


def scan(directory: Path) -> dict[str, Any]:
    """checkov's JSON report on every YAML file in ``directory`` (offline: nothing downloaded)."""
    proc = run([checkov(), "--directory", str(directory), "--framework", "kubernetes", "--skip-download",
                "--output", "json"], check=False, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    (kubernetes,) = report if isinstance(report, list) else [report]
    assert kubernetes["summary"]["parsing_errors"] == 0, kubernetes["summary"]
    return dict(kubernetes)


def failures(report: dict[str, Any]) -> dict[str, set[str]]:
    """Failed check id -> the resources failing it."""
    failed: dict[str, set[str]] = defaultdict(set)
    for result in report["results"]["failed_checks"]:
        failed[result["check_id"]].add(result["resource"])
    return dict(failed)


def checked_kinds(report: dict[str, Any]) -> set[str]:
    results = report["results"]["passed_checks"] + report["results"]["failed_checks"]
    return {result["resource"].split(".")[0] for result in results}


def judge(report: dict[str, Any], target: str) -> None:
    listed = yaml.safe_load(SKIPS.read_text())[target]
    failed = failures(report)
    summary = report["summary"]
    print(f"\n[checkov {summary['checkov_version']}] {target}: {summary['resource_count']} resources, "
          f"{summary['passed']} passed, {summary['failed']} failed ("
          f"{', '.join(f'{k} x{len(v)}' for k, v in sorted(failed.items()))}), {summary['skipped']} skipped",
          file=sys.stderr)
    unexpected = {check: sorted(resources) for check, resources in failed.items() if check not in listed}
    assert not unexpected, f"checks failing that {SKIPS.name} does not list: {unexpected}"
    stale = sorted(set(listed) - set(failed))
    assert not stale, f"{SKIPS.name} lists {stale} for {target}, which now pass: remove them"
    assert all(isinstance(why, str) and len(why) > 40 for why in listed.values()), "each entry needs a reason"
    assert summary["passed"] > 10 * len(failed)


def test_every_listed_check_has_a_reason() -> None:
    skips = yaml.safe_load(SKIPS.read_text())
    assert set(skips) == {"chart", "pipelines"}
    for entries in skips.values():
        for check, why in entries.items():
            assert check.startswith("CKV") and isinstance(why, str) and len(why) > 40, check


def test_checkov_on_the_chart(tmp_path: Path) -> None:
    for name, values in CHART_VALUES.items():
        proc = run([find_tool("helm3"), "template", "rel", str(CHART), "-n", "aqueduct-system", "--include-crds",
                    *values])
        (tmp_path / f"chart-{name}.yaml").write_text(proc.stdout)
    report = scan(tmp_path)
    assert {"Deployment", "ClusterRole", "Role"} <= checked_kinds(report)
    judge(report, "chart")


@pytest.fixture(scope="module")
def pipelines_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pipelines")
    for path in [crd.EXAMPLES / "pipeline.yaml", *sorted(
        p for p in (crd.EXAMPLES / "pipelines").glob("*.yaml") if not p.name.startswith("invalid-")
    )]:
        body = crd.load_yaml(path)
        body["metadata"].update(namespace=NAMESPACE, uid="6f1a2b3c-0000-4000-8000-000000000001", generation=1)
        objs = desired_objects(body, default_image="registry.example.com/aqueduct:0.1.0", policy=POLICY)
        (directory / path.name).write_text(yaml.safe_dump_all(objs, sort_keys=False))
    return directory


def test_checkov_on_rendered_pipelines(pipelines_dir: Path) -> None:
    report = scan(pipelines_dir)
    assert {"Deployment", "Service", "ConfigMap"} <= checked_kinds(report)
    judge(report, "pipelines")
    # The only Secret in an environment is the model download's, in its init container.
    assert failures(report).get("CKV_K8S_35") == {f"Deployment.{NAMESPACE}.resnet"}


def test_checkov_sees_what_the_policy_refuses(tmp_path: Path) -> None:
    """The scan means something: the Docker socket the default policy refuses is flagged once a policy allows it."""
    body = crd.load_yaml(crd.EXAMPLES / "pipeline.yaml")
    body["metadata"].update(namespace=NAMESPACE, uid="u", generation=1)
    body["spec"]["volumes"] = [{"name": "docker", "hostPath": {"path": "/var/run/docker.sock", "type": "Socket"}}]
    body["spec"]["volumeMounts"] = [{"name": "docker", "mountPath": "/var/run/docker.sock"}]
    permissive = dataclasses.replace(POLICY, volume_types=frozenset({"hostPath"}))
    (tmp_path / "socket.yaml").write_text(yaml.safe_dump_all(desired_objects(body, policy=permissive)))
    assert "CKV_K8S_27" in failures(scan(tmp_path))  # "Do not expose the docker daemon socket to containers"
