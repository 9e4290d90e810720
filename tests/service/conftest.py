"""Fixtures that run the serving pod as a real process (``python -m aqueduct_service``) on a loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.processes import free_port, group_pids

REPO = Path(__file__).resolve().parents[2]
START_BOUND_S = 60.0


def shm_segments(pid: int) -> list[str]:
    """Shared-memory segments named after the server process ``pid`` (every one its flow made)."""
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(f"aqd-{pid}-"))


def wait_for(condition: Callable[[], Any], bound: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUEDUCT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "service")])
    env.update(extra or {})
    return env


class Server:
    """A serving pod subprocess in its own session; ``url`` is its base URL, ``grpc_target`` its gRPC address."""

    def __init__(self, config: Path, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"AQUEDUCT_SERVER__GRPC_PORT": str(free_port()), **(env or {})}
        #: the OIP gRPC service's address (``server.grpc_port``: a free port unless ``env`` sets one)
        self.grpc_target = f"127.0.0.1:{env['AQUEDUCT_SERVER__GRPC_PORT']}"
        self.log = workdir / f"server-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aqueduct_service", "--config", str(config)]
                + ["--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO,
                env=server_env(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def is_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
        try:
            return self.client.get("/v2/health/ready").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self) -> None:
        wait_for(self.is_ready, START_BOUND_S, "the server to become ready")

    def health(self) -> dict[str, Any]:
        detail: dict[str, Any] = self.client.get("/v2/health/ready").json()
        return detail

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL it if still there after a bound; assert no process outlived it."""
        self.client.close()
        try:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)  # as Kubernetes does: the main process only
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(30)
        finally:
            leftovers = group_pids(self.proc.pid)
            if leftovers or self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        assert not leftovers, f"processes outlived the server: {leftovers}"
        segments = shm_segments(self.proc.pid)
        assert not segments, f"shared memory left by the server: {segments}"

    def frontend_pids(self) -> list[int]:
        """The pids of the front-end processes."""
        return sorted(
            pid
            for pid in group_pids(self.proc.pid)
            if b"aqueduct_service.frontend" in Path(f"/proc/{pid}/cmdline").read_bytes()
        )


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start a server on a config dict (written to a file) and wait until it is ready; stopped at teardown."""
    servers: list[Server] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None, wait: bool = True) -> Server:
        path = tmp_path / f"pipeline-{len(servers)}.yaml"
        path.write_text(yaml.safe_dump(config))
        server = Server(path, tmp_path, env)
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    try:
        yield start
    finally:
        errors = []
        for server in servers:
            try:
                server.stop()
            except AssertionError as e:
                errors.append(e)
        assert not errors, errors


def echo_config(**overrides: Any) -> dict[str, Any]:
    """A one-step pipeline serving ``tests.service.handlers:EchoHandler`` as model ``echo``."""
    config: dict[str, Any] = {
        "version": 1,
        "name": "echo",
        "steps": [
            {
                "name": "echo",
                "handler": "tests.service.handlers:EchoHandler",
                "batch_size": 16,
                "batch_timeout": 0.05,
            }
        ],
        "queue_size": 256,
        "timeout": 30,
        "server": {"max_body_bytes": 1 << 20, "log_level": "warning"},
    }
    config.update(overrides)
    return config


@contextlib.contextmanager
def serving(workdir: Path, config: dict[str, Any], front_ends: int = 1) -> Iterator[Server]:
    """A server on ``config`` (written to ``workdir``) with ``front_ends`` HTTP processes, ready; stopped after."""
    path = workdir / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    server = Server(path, workdir, {"AQUEDUCT_SERVER__WORKERS": str(front_ends)})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


#: The pod with HTTP and the flow in one process, and with two front-end processes.
FRONT_ENDS = [pytest.param(1, id="1-process"), pytest.param(2, id="2-frontends")]


@pytest.fixture(scope="module", params=FRONT_ENDS)
def echo_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Server]:
    """One echo server shared by a module's tests, run with each ``server.workers`` of ``FRONT_ENDS``."""
    with serving(tmp_path_factory.mktemp("echo"), echo_config(), request.param) as server:
        yield server


@pytest.fixture(scope="module", params=FRONT_ENDS)
def catdetector_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Server]:
    """The shipped example, ``examples/catdetector/pipeline.yaml``, as the README runs it (each of ``FRONT_ENDS``)."""
    env = {"AQUEDUCT_SERVER__WORKERS": str(request.param)}
    server = Server(REPO / "examples/catdetector/pipeline.yaml", tmp_path_factory.mktemp("cat"), env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
