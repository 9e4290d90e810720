"""deploy/kind/up.sh and down.sh, run for real by bash against stand-in docker/kind/kubectl/helm/curl.

No kind cluster can exist here; these tests pin the sequence of commands the scripts run (and that they
stop on a failed inference), while test_kind.py drives a real cluster where one is reachable.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT

STUB = r"""#!/usr/bin/env bash
# Stand-in for {name}: logs its arguments, answers what the kind scripts ask.
echo "{name} $*" >> "$STUB_LOG"
case "{name} $*" in
  "kind get clusters"*) cat "$STUB_DIR/clusters" 2>/dev/null ;;
  "kind create cluster"*) echo aqueduct > "$STUB_DIR/clusters" ;;
  "kind delete cluster"*) rm -f "$STUB_DIR/clusters" ;;
  "docker image inspect"*) echo sha256:0123abcd ;;
  "kubectl "*" get deployment "*) exit "${{STUB_DEPLOYMENT_MISSING:-1}}" ;;
  "kubectl "*" port-forward "*) exec -a "stub-port-forward $STUB_DIR" sleep 30 ;;
  "curl "*"-X POST"*)
    printf '%s\nHTTP %s' '{{"model_name":"catdetector","outputs":[{{"data":[true]}}]}}' "${{STUB_HTTP_STATUS:-200}}" ;;
esac
exit 0
"""


@pytest.fixture
def stubs(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("docker", "kind", "kubectl", "helm", "curl"):
        path = bin_dir / name
        path.write_text(STUB.format(name=name))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "STUB_LOG": str(tmp_path / "calls.log"),
        "STUB_DIR": str(tmp_path),
    }


def running(marker: str) -> list[str]:
    """Processes whose command line starts with marker."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(marker.encode()):
                found.append(cmdline.parent.name)
        except OSError:
            continue
    return found


def run_script(script: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    Path(env["STUB_LOG"]).unlink(missing_ok=True)
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy" / "kind" / script)], env=env, capture_output=True, text=True, timeout=60
    )
    log = Path(env["STUB_LOG"])
    return proc, log.read_text().splitlines() if log.exists() else []


def test_up_runs_every_step_in_order(stubs: dict[str, str]) -> None:
    proc, calls = run_script("up.sh", stubs)
    assert not running(f"stub-port-forward {stubs['STUB_DIR']}"), "up.sh left its port-forward running"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    chart = f"{ROOT}/deploy/helm/aqueduct"
    expected = [
        "kind get clusters",
        "kind create cluster --name aqueduct --wait 120s",
        f"docker build -t aqueduct:dev {ROOT}",
        "docker image inspect --format {{.Id}} aqueduct:dev",
        "kind load docker-image aqueduct:dev --name aqueduct",
        f"kubectl --context kind-aqueduct apply -f {chart}/crds/pipelines.yaml",
        f"helm upgrade --install aqueduct {chart} --kube-context kind-aqueduct --namespace aqueduct-system "
        "--create-namespace --set image.repository=aqueduct --set image.tag=dev --set image.pullPolicy=IfNotPresent "
        "--set-string operator.podAnnotations.aqueduct\\.dev/image-id=0123abcd --wait --timeout 300s",
        f"kubectl --context kind-aqueduct apply -f {ROOT}/examples/pipeline.yaml",
        "kubectl --context kind-aqueduct get deployment catdetector",
        "kubectl --context kind-aqueduct wait pipeline/catdetector --for=condition=Ready --timeout 300s",
        "kubectl --context kind-aqueduct rollout status deployment/catdetector --timeout 300s",
        "kubectl --context kind-aqueduct get pipeline catdetector",
    ]
    assert calls[: len(expected)] == expected
    # port-forward runs in the background, so it may log after the first readiness probe
    assert "kubectl --context kind-aqueduct port-forward service/catdetector 8080:8080" in calls[len(expected) :]
    assert calls[-1].startswith("curl -sS -X POST") and calls[-1].endswith("/v2/models/catdetector/infer")
    assert 'answer: {"model_name":"catdetector"' in proc.stdout


def test_up_reuses_the_cluster_and_restarts_serving_pods(stubs: dict[str, str]) -> None:
    Path(stubs["STUB_DIR"], "clusters").write_text("aqueduct\n")
    proc, calls = run_script("up.sh", {**stubs, "STUB_DEPLOYMENT_MISSING": "0", "BASE": "local/python:3.11"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [c for c in calls if c.startswith("kind create")]
    assert f"docker build --build-arg BASE=local/python:3.11 -t aqueduct:dev {ROOT}" in calls
    assert "kubectl --context kind-aqueduct rollout restart deployment catdetector" in calls


def test_up_fails_when_inference_fails(stubs: dict[str, str]) -> None:
    proc, _ = run_script("up.sh", {**stubs, "STUB_HTTP_STATUS": "503"})
    assert proc.returncode == 1
    assert "inference request failed (HTTP 503)" in proc.stderr


def test_up_names_a_missing_tool(stubs: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "bin" / "kind").unlink()
    proc, _ = run_script("up.sh", stubs)
    assert proc.returncode == 1
    assert "kind is required" in proc.stderr


def test_down_is_idempotent(stubs: dict[str, str]) -> None:
    Path(stubs["STUB_DIR"], "clusters").write_text("aqueduct\n")
    proc, calls = run_script("down.sh", stubs)
    assert proc.returncode == 0, proc.stderr
    assert calls == ["kind get clusters", "kind delete cluster --name aqueduct"]
    proc, calls = run_script("down.sh", stubs)
    assert proc.returncode == 0 and calls == ["kind get clusters"]
    assert "nothing to do" in proc.stdout
