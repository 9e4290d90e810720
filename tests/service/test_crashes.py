"""Over HTTP: a request that crashes its worker fails alone; a batch whose worker was killed is answered."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from .conftest import wait_for
from .handlers import CRASH
from .test_server import infer_body, metric, post_many

pytestmark = pytest.mark.timeout(180)


def config(workers: int, **step: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "name": "echo",
        "steps": [{"name": "echo", "handler": "tests.service.handlers:EchoHandler", "nprocs": 2, **step}],
        "timeout": 60,
        "server": {"log_level": "warning", "workers": workers},
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_a_request_that_crashes_its_worker_fails_alone(start_server: Any, workers: int) -> None:
    server = start_server(config(workers, batch_size=16, batch_timeout=5.0))
    bodies = [infer_body([i]) for i in range(15)] + [infer_body([CRASH])]
    replies = asyncio.run(post_many(server.url, bodies))
    assert [r.status_code for r in replies[:15]] == [200] * 15
    assert [r.json()["outputs"][0]["data"] for r in replies[:15]] == [[i] for i in range(15)]
    crashed = replies[15]
    assert crashed.status_code == 503 and "WorkerDiedError" in crashed.json()["error"]
    assert "SIGABRT" in crashed.json()["error"]
    wait_for(lambda: server.health()["steps"][0]["alive"] == 2, 60, "the workers to be replaced")


def test_a_batch_whose_worker_was_killed_is_answered(start_server: Any, tmp_path: Path) -> None:
    server = start_server(config(2, batch_size=4, batch_timeout=5.0))
    marker = tmp_path / "handling"
    bodies = [infer_body([i], sleep=1.0, marker=str(marker)) for i in range(4)]
    results: list[Any] = []
    sender = threading.Thread(target=lambda: results.extend(asyncio.run(post_many(server.url, bodies))))
    sender.start()
    wait_for(lambda: marker.exists() and marker.read_text(), 60, "the batch to start")
    os.kill(int(marker.read_text()), signal.SIGKILL)  # the worker handling the batch
    sender.join(120)
    # the batch ran again, in halves, on the other worker: every request is answered
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    assert metric(server, "aqueduct_crash_rerun_tasks_total", step="echo") == 4
    assert metric(server, "aqueduct_crash_isolated_tasks_total", step="echo") == 0
