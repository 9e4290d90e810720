"""The serving pod over real HTTP: protocol, batching, errors, health and metrics."""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from .conftest import REPO, Server, echo_config
from .handlers import POISON

pytestmark = pytest.mark.timeout(180)


def tensor(data: list[Any], name: str = "x", datatype: str = "INT64") -> dict[str, Any]:
    return {"name": name, "shape": [len(data)], "datatype": datatype, "data": data}


def infer_body(data: list[Any], **parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [tensor(data)]}
    if parameters:
        body["parameters"] = parameters
    return body


async def post_many(url: str, bodies: list[dict[str, Any]], model: str = "echo") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=100)) as client:
        return list(await asyncio.gather(*(client.post(f"/v2/models/{model}/infer", json=b) for b in bodies)))


def metric(server: Server, name: str, **labels: str) -> float:
    text = server.client.get("/metrics").text
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(selector) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(f"^{pattern}$", text, re.MULTILINE)
    assert match, f"{name} {labels} not in /metrics"
    return float(match.group(1))


def test_json_round_trip(echo_server: Server) -> None:
    reply = echo_server.client.post("/v2/models/echo/infer", json={"id": "a1", **infer_body([1, 2, 3])})
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert doc["id"] == "a1" and doc["model_name"] == "echo"
    outputs = {o["name"]: o for o in doc["outputs"]}
    assert outputs["y"] == {"name": "y", "datatype": "INT64", "shape": [3], "data": [1, 2, 3]}
    assert outputs["batch"]["datatype"] == "INT32"


async def test_concurrent_requests_are_batched(echo_server: Server) -> None:
    before = metric(echo_server, "aqueduct_batch_size_count", step="echo")
    before_sum = metric(echo_server, "aqueduct_batch_size_sum", step="echo")
    replies = await post_many(echo_server.url, [infer_body([i], sleep=0.1) for i in range(48)])
    assert [r.status_code for r in replies] == [200] * 48
    assert [r.json()["outputs"][0]["data"] for r in replies] == [[i] for i in range(48)]
    assert max(r.json()["outputs"][1]["data"][0] for r in replies) > 1
    batches = metric(echo_server, "aqueduct_batch_size_count", step="echo") - before
    tasks = metric(echo_server, "aqueduct_batch_size_sum", step="echo") - before_sum
    assert tasks == 48 and tasks / batches > 1


async def test_poisoned_request_fails_alone(echo_server: Server) -> None:
    bodies = [infer_body([i], sleep=0.05) for i in range(8)]
    bodies[3] = infer_body([POISON], sleep=0.05)
    replies = await post_many(echo_server.url, bodies)
    assert [r.status_code for r in replies] == [200] * 3 + [500] + [200] * 4
    error = replies[3].json()
    assert error["exc_type"] == "ValueError" and "poisoned input" in error["error"]
    assert error["step"] == "echo"


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (b"{nope", 400, "malformed JSON"),
        (orjson.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [1]}]}), 400, "needs 2"),
        (orjson.dumps({"inputs": [tensor([1], datatype="INT128")]}), 400, "unknown datatype 'INT128'"),
        (b"x" * (2 << 20), 413, "over the limit"),
    ],
)
def test_bad_requests_are_answered(echo_server: Server, content: bytes, status: int, message: str) -> None:
    reply = echo_server.client.post("/v2/models/echo/infer", content=content)
    assert reply.status_code == status
    assert message in reply.json()["error"]


def test_streamed_body_over_the_limit_is_413(echo_server: Server) -> None:
    chunks = (b"x" * 65536 for _ in range(40))  # chunked: no Content-Length to check up front
    reply = echo_server.client.post("/v2/models/echo/infer", content=chunks)
    assert reply.status_code == 413


def test_unknown_model_is_404(echo_server: Server) -> None:
    for reply in (
        echo_server.client.post("/v2/models/dog/infer", json=infer_body([1])),
        echo_server.client.get("/v2/models/dog"),
        echo_server.client.get("/v2/models/dog/ready"),
    ):
        assert reply.status_code == 404
        assert "'dog' not found" in reply.json()["error"]


def test_deadline_is_504(echo_server: Server) -> None:
    reply = echo_server.client.post("/v2/models/echo/infer", json=infer_body([1], sleep=1.0, timeout=50_000))
    assert reply.status_code == 504
    assert "TaskTimeoutError" in reply.json()["error"]


async def test_flood_of_bad_requests_leaves_good_ones_served(echo_server: Server) -> None:
    bad = [b"{", b"[]", b'{"inputs":[{"name":"x","shape":[99999999999],"datatype":"FP32","data":[]}]}', b"\xff" * 999]
    good = infer_body([7])
    async with httpx.AsyncClient(base_url=echo_server.url, timeout=60) as client:
        replies = await asyncio.gather(
            *(client.post("/v2/models/echo/infer", content=bad[i % len(bad)]) for i in range(400)),
            *(client.post("/v2/models/echo/infer", json=good) for _ in range(20)),
        )
    assert {r.status_code for r in replies[:400]} == {400}
    assert [r.status_code for r in replies[400:]] == [200] * 20


def test_health_metadata_and_metrics(echo_server: Server) -> None:
    client = echo_server.client
    assert client.get("/v2/health/live").json() == {"live": True}
    health = echo_server.health()
    assert health["ready"] and health["state"] == "running"
    assert health["steps"][0]["name"] == "echo" and len(health["steps"][0]["pids"]) == 1
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    assert client.get("/v2/models/echo/ready").json() == {"name": "echo", "ready": True}
    metadata = client.get("/v2/models/echo").json()
    assert metadata["parameters"]["steps"][0]["batch_size"] == 16
    client.post("/v2/models/echo/infer", json=infer_body([1]))
    assert (
        metric(
            echo_server, "aqueduct_http_requests_total", method="POST", route="/v2/models/{name}/infer", status="200"
        )
        >= 1
    )
    assert (
        metric(
            echo_server, "aqueduct_http_request_duration_seconds_count", method="POST", route="/v2/models/{name}/infer"
        )
        >= 1
    )
    assert metric(echo_server, "aqueduct_workers_alive", step="echo") == 1


def test_queue_full_is_503_with_retry_after(start_server: Any) -> None:
    server = start_server(
        echo_config(
            queue_size=2, steps=[{"name": "echo", "handler": "tests.service.handlers:EchoHandler", "batch_size": 1}]
        )
    )
    replies = asyncio.run(post_many(server.url, [infer_body([i], sleep=0.3) for i in range(12)]))
    statuses = sorted(r.status_code for r in replies)
    assert 200 in statuses and 503 in statuses and set(statuses) == {200, 503}
    rejected = next(r for r in replies if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1"
    assert "QueueFullError" in rejected.json()["error"]


def test_tritonclient(catdetector_server: Server) -> None:
    client = triton.InferenceServerClient(catdetector_server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("catdetector")
        assert not client.is_model_ready("dog")
        metadata = client.get_model_metadata("catdetector")
        assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1]}]
        assert metadata["outputs"] == [{"name": "is_cat", "datatype": "BOOL", "shape": [1]}]
        assert metadata["parameters"]["steps"][0]["batch_size"] == 20
        assert client.get_server_metadata()["name"] == "aqueduct"
        image = np.random.default_rng(0).random(3 * 64 * 64, dtype=np.float32)
        for binary in (False, True):
            inputs = [triton.InferInput("image", list(image.shape), "FP32")]
            inputs[0].set_data_from_numpy(image, binary_data=binary)
            outputs = [triton.InferRequestedOutput("is_cat", binary_data=binary)]
            result = client.infer("catdetector", inputs, outputs=outputs)
            assert result.as_numpy("is_cat").tolist() == [True]
        result = client.infer("catdetector", inputs)  # no outputs named: all, binary
        assert result.as_numpy("is_cat").tolist() == [True]
        wrong = [triton.InferInput("image", [2], "INT32")]
        wrong[0].set_data_from_numpy(np.zeros(2, np.int32))
        with pytest.raises(triton.InferenceServerException, match="datatype INT32 does not match"):
            client.infer("catdetector", wrong)
    finally:
        client.close()


def test_binary_16_mib_batch(catdetector_server: Server) -> None:
    image = np.ones(4 << 20, dtype=np.float32)  # 16 MiB
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [image.size],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": image.nbytes},
                }
            ],
            "outputs": [{"name": "is_cat", "parameters": {"binary_data": True}}],
        }
    )
    reply = catdetector_server.client.post(
        "/v2/models/catdetector/infer",
        content=header + image.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert reply.status_code == 200, reply.text
    header_length = int(reply.headers["inference-header-content-length"])
    doc = orjson.loads(reply.content[:header_length])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 1
    assert reply.content[header_length:] == b"\x01"


def test_readme_curl(catdetector_server: Server) -> None:
    readme = (REPO / "examples/catdetector/README.md").read_text()
    body = (REPO / "examples/catdetector/request.json").read_bytes()
    assert body.decode().strip() in readme  # the README's curl sends request.json's body
    expected = re.search(r"^# (\{\"model_name\".*)$", readme, re.MULTILINE)
    assert expected
    reply = catdetector_server.client.post("/v2/models/catdetector/infer", content=body)
    assert reply.status_code == 200
    assert reply.json() == orjson.loads(expected.group(1))


async def test_in_flight_gauge_counts_requests_being_answered(echo_server: Server) -> None:
    assert metric(echo_server, "aqueduct_http_requests_in_flight") == 0
    async with httpx.AsyncClient(base_url=echo_server.url, timeout=60) as client:
        pending = [
            asyncio.create_task(client.post("/v2/models/echo/infer", json=infer_body([i], sleep=1.0))) for i in range(3)
        ]
        deadline = asyncio.get_running_loop().time() + 30
        while await asyncio.to_thread(metric, echo_server, "aqueduct_http_requests_in_flight") < 3:
            assert asyncio.get_running_loop().time() < deadline, "3 requests never showed as in flight"
            await asyncio.sleep(0.02)
        replies = await asyncio.gather(*pending)
    assert [r.status_code for r in replies] == [200] * 3
    assert metric(echo_server, "aqueduct_http_requests_in_flight") == 0


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One HTTP/1.1 response with a Content-Length from ``sock`` (``buffer`` holds what was read beyond it)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-head: {bytes(buffer)!r}"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)}
    length = int(headers[b"content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        rest += chunk
    buffer[:] = rest[length:]
    return status, headers, rest[:length]


def test_responses_are_framed_on_a_raw_connection(echo_server: Server) -> None:
    # Pipelined requests on one connection, a body larger than one write, and a Connection: close.
    large = list(range(20_000))  # about 110 KB of JSON each way
    small = orjson.dumps(infer_body([7]))
    big = orjson.dumps(infer_body(large))
    host = f"127.0.0.1:{echo_server.port}".encode()

    def post(body: bytes, close: bool = False) -> bytes:
        extra = b"Connection: close\r\n" if close else b""
        return (
            b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
        )

    with socket.create_connection(("127.0.0.1", echo_server.port), timeout=30) as sock:
        sock.sendall(post(small) + b"GET /v2/health/live HTTP/1.1\r\nHost: " + host + b"\r\n\r\n" + post(big))
        buffer = bytearray()
        answers = [_read_response(sock, buffer) for _ in range(3)]
        assert [status for status, _, _ in answers] == [b"HTTP/1.1 200 OK"] * 3
        assert orjson.loads(answers[0][2])["outputs"][0]["data"] == [7]
        assert orjson.loads(answers[1][2]) == {"live": True}
        assert orjson.loads(answers[2][2])["outputs"][0]["data"] == large
        sock.sendall(post(small, close=True))
        status, headers, body = _read_response(sock, buffer)
        assert status == b"HTTP/1.1 200 OK" and headers[b"connection"] == b"close"
        assert orjson.loads(body)["outputs"][0]["data"] == [7]
        assert sock.recv(1) == b"" and not buffer  # then the server closes, with nothing after the answer


def test_a_malformed_request_is_answered_400_before_the_connection_closes(echo_server: Server) -> None:
    with socket.create_connection(("127.0.0.1", echo_server.port), timeout=30) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 400 "), received
