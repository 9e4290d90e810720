"""Fixtures for the deploy checks: the CLI tools (scripts/ci/install-k8s-tools.sh), the Docker engine
(scripts/ci/dockerd-up.sh), the base image (scripts/ci/base-image.sh) and the aqueduct image built from them.

A missing tool, engine or base image skips the test on a developer machine and FAILS it in CI (env CI set),
so a broken setup step can never turn the deploy checks into silent skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "aqueduct"
VALIDATE_MANIFESTS = ROOT / "scripts" / "ci" / "validate-manifests"
TOOLS_BIN = Path(os.environ.get("K8S_TOOLS_DIR", "/opt/k8s-tools")) / "bin"
PRIVATE_DOCKER_HOST = "unix:///var/lib/private-docker/docker.sock"
BASE_IMAGE = os.environ.get("AQUEDUCT_BASE_IMAGE", "local/python:3.11-bookworm")
TEST_IMAGE = "aqueduct:test"
IN_CI = bool(os.environ.get("CI"))


def unavailable(reason: str) -> NoReturn:
    """Skip on a developer machine; fail in CI, where every deploy check must really run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def find_tool(name: str) -> str:
    """Path of a CLI tool: scripts/ci/install-k8s-tools.sh's directory first, then PATH."""
    candidate = TOOLS_BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        unavailable(f"{name} not found in {TOOLS_BIN} or PATH; run scripts/ci/install-k8s-tools.sh")
    return found


def run(
    args: Sequence[str], *, timeout: float = 120, check: bool = True, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; on failure show both streams in the assertion."""
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        pytest.fail(
            f"$ {' '.join(map(str, args))}\nexit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}",
            pytrace=False,
        )
    return proc


def validate_manifests(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run scripts/ci/validate-manifests with this interpreter (the project venv has its dependencies)."""
    return run([sys.executable, str(VALIDATE_MANIFESTS), *args], input=stdin, check=check, timeout=60)


def wait_until(
    what: str,
    probe: Callable[[], Any],
    timeout: float,
    interval: float = 0.25,
    logs: Callable[[], str] | None = None,
) -> Any:
    """Poll probe() until it returns a truthy value; fail (with ``logs()`` if given) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (OSError, urllib.error.URLError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    tail = f"\n--- logs\n{logs()}" if logs is not None else ""
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r}){tail}", pytrace=False)


@pytest.fixture(scope="session")
def docker_env() -> dict[str, str]:
    """Environment for the docker CLI, pointed at a running engine (DOCKER_HOST, else the CI's private one)."""
    docker = shutil.which("docker")
    if docker is None:
        unavailable("docker CLI not found; run scripts/ci/dockerd-up.sh")
    env = dict(os.environ)
    if "DOCKER_HOST" not in env and Path(PRIVATE_DOCKER_HOST.removeprefix("unix://")).exists():
        env["DOCKER_HOST"] = PRIVATE_DOCKER_HOST
    env["DOCKER_BUILDKIT"] = "0"  # the legacy builder: no buildx here, and it never pulls a base present locally
    try:
        proc = subprocess.run(
            [docker, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, timeout=20, env=env
        )
    except subprocess.TimeoutExpired:
        unavailable("the Docker engine did not answer within 20 s")
    if proc.returncode != 0:
        unavailable(f"no Docker engine answers ({proc.stderr.strip()[:200]}); run scripts/ci/dockerd-up.sh")
    return env


@pytest.fixture(scope="session")
def docker(docker_env: dict[str, str]) -> Docker:
    return Docker(docker_env)


class Docker:
    """The docker CLI with the session's environment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["docker", *args], env=self.env, timeout=timeout, check=check)

    def image_exists(self, image: str) -> bool:
        return self("image", "inspect", image, check=False).returncode == 0


@pytest.fixture(scope="session")
def base_image(docker: Docker) -> str:
    if not docker.image_exists(BASE_IMAGE):
        unavailable(f"base image {BASE_IMAGE} is missing; run scripts/ci/base-image.sh")
    return BASE_IMAGE


def build_image(docker: Docker, tag: str, build_args: Mapping[str, str], context: Path = ROOT) -> tuple[float, str]:
    """docker build the Dockerfile in ``context`` (the repository's by default); returns (seconds, build log)."""
    started = time.monotonic()
    # pip inside the build uses the index the host uses (PyPI unless PIP_INDEX_URL says otherwise).
    index = {"PIP_INDEX_URL": os.environ["PIP_INDEX_URL"]} if os.environ.get("PIP_INDEX_URL") else {}
    args = [f"--build-arg={name}={value}" for name, value in {**index, **build_args}.items()]
    proc = docker("build", "--network", "host", *args, "-t", tag, str(context), timeout=900)
    return time.monotonic() - started, proc.stdout


@pytest.fixture(scope="session")
def aqueduct_image(docker: Docker, base_image: str) -> Iterator[str]:
    """The aqueduct image, built from the working tree (layers cached between runs on one machine)."""
    seconds, _ = build_image(docker, TEST_IMAGE, {"BASE": base_image})
    print(f"\n[deploy] docker build of {TEST_IMAGE} from {base_image}: {seconds:.1f} s", file=sys.stderr)
    yield TEST_IMAGE
