"""Start, worker death, SIGTERM draining and bad configs, on the real process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import REPO, group_pids, server_env, wait_for
from .test_server import infer_body, post_many

pytestmark = pytest.mark.timeout(180)


def echo_step(**options: Any) -> dict[str, Any]:
    return {"name": "echo", "handler": "tests.service.handlers:EchoHandler", **options}


def config(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": 1, "name": "echo", "steps": [echo_step()], "server": {"log_level": "warning"}}
    doc.update(overrides)
    return doc


@pytest.mark.parametrize("workers", [1, 2])
def test_live_while_workers_start_then_ready(start_server: Any, workers: int) -> None:
    server = start_server(
        config(server={"log_level": "warning", "workers": workers}), env={"TEST_START_SLEEP": "1.5"}, wait=False
    )

    def live() -> bool:
        try:
            return server.client.get("/v2/health/live").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(live, 60, "liveness")
    reply = server.client.get("/v2/health/ready")
    assert reply.status_code == 503 and reply.json()["ready"] is False
    server.wait_ready()


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_worker_is_replaced_while_the_pod_stays_ready(start_server: Any, workers: int) -> None:
    doc = config(steps=[echo_step(nprocs=2)], server={"log_level": "warning", "workers": workers})
    server = start_server(doc, env={"TEST_START_SLEEP": "1"})
    victim = server.health()["steps"][0]["pids"][0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in server.health()["steps"][0]["pids"], 30, "the kill to be seen")
    # the other worker keeps serving while the replacement runs on_start: the pod stays in its Service
    step = server.health()["steps"][0]
    assert step["alive"] >= 1 and server.client.get("/v2/health/ready").status_code == 200
    assert server.client.post("/v2/models/echo/infer", json=infer_body([1])).status_code == 200
    wait_for(lambda: server.health()["steps"][0]["alive"] == 2, 30, "the replacement")
    step = server.health()["steps"][0]
    assert len(step["pids"]) == 2 and step["restarts"] == 1 and step["restart_reasons"] == {"killed": 1}
    replies = [server.client.post("/v2/models/echo/infer", json=infer_body([i])) for i in range(10)]
    assert [r.status_code for r in replies] == [200] * 10


@pytest.mark.parametrize("workers", [1, 2])
def test_the_only_worker_killed_turns_ready_false_then_true(start_server: Any, workers: int) -> None:
    doc = config(steps=[echo_step()], server={"log_level": "warning", "workers": workers})
    server = start_server(doc, env={"TEST_START_SLEEP": "1"})
    os.kill(server.health()["steps"][0]["pids"][0], signal.SIGKILL)
    wait_for(lambda: server.client.get("/v2/health/ready").status_code == 503, 30, "not ready after the kill")
    server.wait_ready()
    assert server.client.post("/v2/models/echo/infer", json=infer_body([1])).status_code == 200


def test_sigterm_answers_requests_in_flight_and_exits_0(start_server: Any, tmp_path: Path) -> None:
    server = start_server(config(steps=[echo_step(batch_size=4)], timeout=30))
    children = group_pids(server.proc.pid)
    marker = tmp_path / "handling"
    bodies = [infer_body([i], sleep=0.5, marker=str(marker)) for i in range(12)]
    results: list[Any] = []
    sender = threading.Thread(target=lambda: results.extend(asyncio.run(post_many(server.url, bodies))))
    sender.start()
    wait_for(marker.exists, 60, "the first batch to start")
    os.kill(server.proc.pid, signal.SIGTERM)
    sender.join(120)
    assert [r.status_code for r in results] == [200] * 12
    assert server.proc.wait(60) == 0
    assert len(children) > 1
    wait_for(lambda: not group_pids(server.proc.pid), 10, "the workers to exit")


@pytest.mark.parametrize("workers", [1, 2])
def test_flow_start_failure_exits_nonzero(start_server: Any, workers: int) -> None:
    doc = config(steps=[echo_step()], server={"log_level": "warning", "workers": workers})
    server = start_server(doc, env={"TEST_START_SLEEP": "not a number"}, wait=False)
    assert server.proc.wait(60) == 1
    assert "the flow failed to start" in server.output()


def run_cli(tmp_path: Path, doc: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return subprocess.run(
        [sys.executable, "-m", "aqueduct_service", "--config", str(path), "--port", "1"],
        cwd=REPO,
        env=server_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("doc", "env", "message"),
    [
        (config(steps=[echo_step(batch_size=-1)]), {}, r"steps[0].batch_size: -1 is less than the minimum of 1"),
        (config(), {"AQUEDUCT_STEPS__ECHO__BATCH_SIZE": "0"}, "(from AQUEDUCT_STEPS__ECHO__BATCH_SIZE)"),
        (config(steps=[echo_step(handler="tests.service.nope:X")]), {}, "steps[0].handler: cannot import module"),
        (config(steps=[echo_step(handler="tests.service.handlers:POISON")]), {}, "is not a BaseTaskHandler"),
        ({"name": "x"}, {}, "'version' is a required property"),
        (
            config(steps=[echo_step(options={"weights": "/models/w.pt"})]),
            {},
            "steps[0].options.weights: step 'echo': tests.service.handlers:EchoHandler does not accept option",
        ),
    ],
)
def test_bad_config_exits_before_binding(tmp_path: Path, doc: Any, env: dict[str, str], message: str) -> None:
    done = run_cli(tmp_path, doc, env)  # port 1 is never bindable: reaching the bind would fail differently
    assert done.returncode == 2
    assert message in done.stderr


def test_cli_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "aqueduct_service", "--help"],
        cwd=REPO,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "--config" in done.stdout and "AQUEDUCT_STEPS__DETECT__BATCH_SIZE" in done.stdout
