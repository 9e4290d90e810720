"""Shared gate for tests that need a real Kubernetes cluster (marker ``kind``).

``require_cluster()`` skips with a clear reason when no cluster is reachable, and FAILS instead when
``E2E_CLUSTER=1`` (CI jobs that create a kind cluster must not silently skip). One place for this
logic: tests/operator and tests/deploy both import it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache

import pytest


def _kubectl() -> str | None:
    tools = os.path.join(os.environ.get("K8S_TOOLS_DIR", "/opt/k8s-tools"), "bin", "kubectl")
    return tools if os.access(tools, os.X_OK) else shutil.which("kubectl")


@cache
def cluster_problem() -> str | None:
    """Why no cluster is usable, or None when ``kubectl cluster-info`` answers."""
    kubectl = _kubectl()
    if kubectl is None:
        return "kubectl not found (scripts/ci/install-k8s-tools.sh installs it)"
    kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    if not any(os.path.exists(p) for p in kubeconfig.split(os.pathsep)):
        return f"no kubeconfig ({kubeconfig}); create a kind cluster first"
    try:
        result = subprocess.run([kubectl, "cluster-info", "--request-timeout=5s"], capture_output=True, text=True,
                                timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"kubectl cluster-info failed: {e}"
    if result.returncode != 0:
        return f"no reachable cluster: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'error'}"
    return None


def require_cluster() -> str:
    """Return the kubectl path, or skip (fail with E2E_CLUSTER=1) when no cluster is reachable."""
    problem = cluster_problem()
    if problem is not None:
        if os.environ.get("E2E_CLUSTER") == "1":
            pytest.fail(f"E2E_CLUSTER=1 but {problem}", pytrace=False)
        pytest.skip(f"needs a Kubernetes cluster: {problem}")
    kubectl = _kubectl()
    assert kubectl is not None
    return kubectl
