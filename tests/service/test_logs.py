"""The pod's one log, over a socket: JSON lines from every logger (uvicorn's, the engine's, the workers'),
a failed task's line with its step, error and request id, tracebacks rate-limited, request ids
accepted, generated, echoed and seen by the handler, sampled access lines, plain text by config."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.service.conftest import FRONT_ENDS, Server, echo_config, serving, wait_for
from tests.service.handlers import CRASH, POISON

LOG_CONFIG = echo_config(
    steps=[{"name": "echo", "handler": "tests.service.log_handlers:RequestIdHandler", "batch_size": 4}],
    server={"log_level": "info", "access_log": 1},
)


@pytest.fixture(scope="module", params=FRONT_ENDS)
def log_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("logs"), LOG_CONFIG, request.param) as server:
        yield server


def infer(server: Server, x: float, headers: dict[str, str] | None = None, **doc: Any) -> httpx.Response:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [x]}], **doc}
    return server.client.post("/v2/models/echo/infer", json=body, headers=headers)


def records(server: Server) -> list[dict[str, Any]]:
    """Every line the server wrote, each of which must be a JSON object."""
    lines = [line for line in server.output().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def about(server: Server, request_id: str, **fields: Any) -> list[dict[str, Any]]:
    """The server's records about ``request_id`` that have ``fields``."""
    return [
        r
        for r in records(server)
        if r.get("request_id") == request_id and all(r.get(k) == v for k, v in fields.items())
    ]


def test_every_line_is_json_from_every_logger(log_server: Server) -> None:
    assert infer(log_server, 1.0, {"X-Request-Id": "first-1"}).status_code == 200
    wait_for(lambda: about(log_server, "first-1", logger="aqueduct_service.access"), 10, "the access line")
    loggers = {r["logger"] for r in records(log_server)}
    assert {"uvicorn.error", "aqueduct", "aqueduct_service.access", "tests.handler"} <= loggers, loggers
    for record in records(log_server):
        assert {"time", "level", "logger", "message"} <= set(record) and record["pipeline"] == "echo"
    (access,) = about(log_server, "first-1", logger="aqueduct_service.access")
    assert access["status"] == 200 and access["path"] == "/v2/models/echo/infer" and access["duration_ms"] > 0
    (handled,) = about(log_server, "first-1", logger="tests.handler")  # logged in the worker process


def test_a_failed_task_logs_one_line_with_step_error_and_request_id(log_server: Server) -> None:
    answer = infer(log_server, POISON, {"X-Request-Id": "poisoned-7"})
    assert answer.status_code == 500 and answer.headers["x-request-id"] == "poisoned-7"
    (line,) = wait_for(lambda: about(log_server, "poisoned-7", logger="aqueduct_service"), 10, "the failure line")
    assert line["level"] == "ERROR" and line["step"] == "echo" and line["error_type"] == "ValueError"
    assert "poisoned input" in line["message"]
    assert "Traceback (most recent call last)" in line["traceback"] and "raise ValueError" in line["traceback"]


def test_deadline_and_dead_worker_are_logged(log_server: Server) -> None:
    late = infer(log_server, 1.0, {"X-Request-Id": "late-1"}, parameters={"sleep": 1.0, "timeout": 100_000})
    assert late.status_code == 504
    (line,) = wait_for(lambda: about(log_server, "late-1", logger="aqueduct_service"), 10, "the deadline line")
    assert line["level"] == "WARNING" and line["error_type"] == "TaskTimeoutError"
    assert infer(log_server, CRASH, {"X-Request-Id": "crash-1"}).status_code == 503
    (line,) = wait_for(lambda: about(log_server, "crash-1", logger="aqueduct_service"), 10, "the worker-died line")
    assert line["level"] == "ERROR" and line["error_type"] == "WorkerDiedError" and "step 'echo'" in line["message"]
    wait_for(lambda: log_server.health().get("ready"), 30, "the worker's replacement")


def test_request_ids_are_taken_made_echoed_and_reach_the_handler(log_server: Server) -> None:
    given = infer(log_server, 1.0, {"X-Request-Id": "hdr-1"}, id="body-1")
    assert given.headers["x-request-id"] == "hdr-1"  # the header wins over the body's id
    assert given.json()["id"] == "body-1"  # the OIP id is echoed as it came
    outputs = {t["name"]: t for t in given.json()["outputs"]}
    assert outputs["request_id"]["data"] == ["hdr-1"]
    from_body = infer(log_server, 1.0, id="body-2")
    assert from_body.headers["x-request-id"] == "body-2"
    made = infer(log_server, 1.0)
    assert re.fullmatch(r"[0-9a-f]{16}", made.headers["x-request-id"])
    assert {t["name"]: t for t in made.json()["outputs"]}["request_id"]["data"] == [made.headers["x-request-id"]]
    too_long = infer(log_server, 1.0, {"X-Request-Id": "a" * 200})  # over 128 characters: one is made up
    assert re.fullmatch(r"[0-9a-f]{16}", too_long.headers["x-request-id"])


def test_tracebacks_are_rate_limited(log_server: Server) -> None:
    ids = [f"storm-{i}" for i in range(25)]
    for request_id in ids:
        assert infer(log_server, POISON, {"X-Request-Id": request_id}).status_code == 500
    lines = wait_for(
        lambda: (
            [r for r in records(log_server) if r.get("request_id") in ids and r["logger"] == "aqueduct_service"]
            if sum(r.get("request_id") in ids and r["logger"] == "aqueduct_service" for r in records(log_server)) == 25
            else None
        ),
        10,
        "a line per failed request",
    )
    with_traceback = [line for line in lines if "traceback" in line]
    processes = max(1, len(log_server.frontend_pids()))  # each HTTP process logs 10 a minute at most
    assert 1 <= len(with_traceback) <= 10 * processes < len(ids)


def test_text_lines_by_config(start_server: Callable[..., Server]) -> None:
    config = echo_config(server={"log_level": "info", "log_format": "text", "access_log": 1})
    server = start_server(config)
    assert infer(server, POISON, {"X-Request-Id": "text-1"}).status_code == 500
    wait_for(lambda: "request_id=text-1 step=echo error_type=ValueError" in server.output(), 10, "the failure line")
    first = server.output().splitlines()[0]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO \S+: ", first), first
    assert "\nTraceback (most recent call last)" in server.output()


def test_access_lines_are_sampled(start_server: Callable[..., Server]) -> None:
    server = start_server(echo_config(server={"log_level": "info", "access_log": 0.25}))
    for _ in range(8):
        assert infer(server, 1.0).status_code == 200
    wait_for(
        lambda: sum(r["logger"] == "aqueduct_service.access" for r in records(server)) == 2, 10, "2 access lines of 8"
    )
