"""The OIP v2 gRPC service (``server.grpc_port``) over real sockets with ``tritonclient.grpc``, beside HTTP on
the same flow, with HTTP and the flow in one process and with two front ends."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from .conftest import FRONT_ENDS, Server, echo_config, group_pids, wait_for
from .handlers import CRASH, POISON
from .test_server import infer_body

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def client(echo_server: Server) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(echo_server.grpc_target) as c:
        yield c


@pytest.fixture
def stub(echo_server: Server) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(echo_server.grpc_target) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def x_input(array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("x", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def status_of(call: Any) -> tuple[str, str]:
    """(status, message) of the InferenceServerException ``call()`` raises (("OK", "") if none)."""
    try:
        call()
    except InferenceServerException as e:
        return str(e.status()), str(e.message())
    return "OK", ""


def test_health_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("echo")
    assert client.get_server_metadata().name == "aqueduct"
    metadata = client.get_model_metadata("echo")
    assert (metadata.name, list(metadata.versions), metadata.platform) == ("echo", ["1"], "aqueduct")
    assert status_of(lambda: client.get_model_metadata("nope"))[0] == "StatusCode.NOT_FOUND"
    assert status_of(lambda: client.is_model_ready("echo", "2"))[0] == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize(
    ("array", "datatype"),
    [
        (np.arange(6, dtype=np.float32).reshape(2, 3), "FP32"),
        (np.array([1.5, 2.5], dtype=np.float16), "FP16"),
        (np.array([True, False]), "BOOL"),
        (np.array([b"a", b"bcd", b""], dtype=np.object_), "BYTES"),
    ],
)
def test_infer_with_raw_contents(client: grpcclient.InferenceServerClient, array: np.ndarray, datatype: str) -> None:
    result = client.infer("echo", [x_input(array, datatype)], request_id="req-1")
    assert result.get_response().id == "req-1"
    assert result.get_output("y").datatype == datatype
    np.testing.assert_array_equal(result.as_numpy("y"), array)
    assert result.as_numpy("batch").shape == (1,)
    only_y = client.infer("echo", [x_input(array, datatype)], outputs=[grpcclient.InferRequestedOutput("y")])
    assert [o.name for o in only_y.get_response().outputs] == ["y"]


def test_infer_with_typed_contents(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    tensor = service_pb2.ModelInferRequest.InferInputTensor
    request = service_pb2.ModelInferRequest(
        model_name="echo",
        inputs=[
            tensor(
                name="x",
                datatype="INT16",
                shape=[3],
                contents=service_pb2.InferTensorContents(int_contents=[1, -3, 300]),
            )
        ],
    )
    response, call = stub.ModelInfer.with_call(request, metadata=(("x-request-id", "grpc-abc"),))
    y = next(o for o in response.outputs if o.name == "y")
    assert (y.datatype, list(y.shape), list(y.contents.int_contents)) == ("INT16", [3], [1, -3, 300])
    assert not response.raw_output_contents
    assert ("x-request-id", "grpc-abc") in call.trailing_metadata()


def bad_raw(datatype: str, shape: list[int], raw: bytes, model: str = "echo") -> service_pb2.ModelInferRequest:
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=shape)
    return service_pb2.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[raw])


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (bad_raw("FP32", [3], b"\0" * 12, model="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope' not found"),
        (bad_raw("FP32", [3], b"\0" * 8), grpc.StatusCode.INVALID_ARGUMENT, "needs 12 bytes"),
        (bad_raw("FP8", [3], b"\0" * 3), grpc.StatusCode.INVALID_ARGUMENT, "unknown datatype 'FP8'"),
        (
            service_pb2.ModelInferRequest(
                model_name="echo",
                inputs=[
                    service_pb2.ModelInferRequest.InferInputTensor(
                        name="x",
                        datatype="INT8",
                        shape=[1],
                        contents=service_pb2.InferTensorContents(int_contents=[300]),
                    )
                ],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "out of range for INT8",
        ),
        (bad_raw("INT64", [1], np.array([POISON]).tobytes()), grpc.StatusCode.INTERNAL, "ValueError: poisoned input"),
        (bad_raw("UINT8", [2 << 20], b"\0" * (2 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ],
    ids=["unknown-model", "raw-size", "datatype", "typed-range", "handler-error", "over-max_body_bytes"],
)
def test_errors_have_their_status_codes(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, request_: Any, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_)
    assert caught.value.code() == code
    assert message in caught.value.details()


def test_deadlines(client: grpcclient.InferenceServerClient) -> None:
    x = x_input(np.array([1], dtype=np.int64), "INT64")
    # the client's grpc-timeout, then the pod's (the OIP ``timeout`` parameter, microseconds)
    assert status_of(lambda: client.infer("echo", [x], parameters={"sleep": 2}, client_timeout=0.3))[0] == (
        "StatusCode.DEADLINE_EXCEEDED"
    )
    assert status_of(lambda: client.infer("echo", [x], parameters={"sleep": 2}, timeout=300_000))[0] == (
        "StatusCode.DEADLINE_EXCEEDED"
    )


def test_one_batch_mixes_grpc_and_http(
    echo_server: Server, client: grpcclient.InferenceServerClient, tmp_path: Path
) -> None:
    marker = tmp_path / "blocker-started"
    blocker = threading.Thread(
        target=lambda: echo_server.client.post(
            "/v2/models/echo/infer", json=infer_body([0], sleep=3, marker=str(marker))
        )
    )
    blocker.start()
    try:
        wait_for(marker.exists, 60, "the blocking batch to start")
        # both queue behind the blocking batch, so they make the next batch together
        with ThreadPoolExecutor(2) as pool:
            over_grpc = pool.submit(client.infer, "echo", [x_input(np.array([7], dtype=np.int64), "INT64")])
            over_http = pool.submit(echo_server.client.post, "/v2/models/echo/infer", json=infer_body([8]))
            grpc_batch = over_grpc.result(60).as_numpy("batch").tolist()
            http_answer = over_http.result(60)
    finally:
        blocker.join(60)
    assert http_answer.status_code == 200
    http_batch = next(o for o in http_answer.json()["outputs"] if o["name"] == "batch")["data"]
    assert (grpc_batch, http_batch) == ([2], [2])


def test_grpc_health_probe(echo_server: Server) -> None:
    with grpc.insecure_channel(echo_server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert (
            health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="other"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        watched = health.Watch(health_pb2.HealthCheckRequest(service="other"), timeout=30)
        assert [answer.status for answer in watched] == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]


def test_grpc_health_watch_follows_readiness_until_the_pod_stops(start_server: Any) -> None:
    server: Server = start_server(echo_config(server={"log_level": "warning", "graceful_timeout": 30}))
    with grpc.insecure_channel(server.grpc_target) as channel:
        statuses = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
        os.kill(server.proc.pid, signal.SIGTERM)
        # the watch ends (NOT_SERVING first) instead of holding the pod's shutdown for the grace period
        assert [answer.status for answer in statuses] == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert server.proc.wait(60) == 0


def grpc_calls(server: Server, method: str, code: str) -> float:
    """``aqueduct_grpc_requests_total`` of ``method`` and ``code`` (0 before the first such call)."""
    line = f'aqueduct_grpc_requests_total{{code="{code}",method="{method}"}} '
    found = [row for row in server.client.get("/metrics").text.splitlines() if row.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


def test_metrics_count_grpc_calls_by_method_and_code(
    echo_server: Server, client: grpcclient.InferenceServerClient
) -> None:
    before = grpc_calls(echo_server, "ModelInfer", "NOT_FOUND")
    status_of(lambda: client.infer("nope", [x_input(np.array([1], dtype=np.int64), "INT64")]))
    client.infer("echo", [x_input(np.array([1], dtype=np.int64), "INT64")])
    assert grpc_calls(echo_server, "ModelInfer", "NOT_FOUND") == before + 1
    assert grpc_calls(echo_server, "ModelInfer", "OK") >= 1
    # calls answered before a handler ran count too; an unknown method under one label, whatever its path
    before = grpc_calls(echo_server, "unknown", "UNIMPLEMENTED")
    with grpc.insecure_channel(echo_server.grpc_target) as channel:
        for path in ("/inference.GRPCInferenceService/Nope", "/x.Y/Z"):
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(path)(b"", timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert grpc_calls(echo_server, "unknown", "UNIMPLEMENTED") == before + 2


@pytest.mark.parametrize("front_ends", FRONT_ENDS)
def test_sigterm_drains_grpc_calls_in_flight(start_server: Any, tmp_path: Path, front_ends: int) -> None:
    config = echo_config(server={"log_level": "warning", "workers": front_ends, "graceful_timeout": 30})
    server: Server = start_server(config)
    marker = tmp_path / "batch-started"
    x = x_input(np.array([3], dtype=np.int64), "INT64")
    with grpcclient.InferenceServerClient(server.grpc_target) as c, ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(c.infer, "echo", [x], parameters={"sleep": 1.5, "marker": str(marker)}) for _ in range(4)]
        wait_for(marker.exists, 60, "the first batch to start")
        os.kill(server.proc.pid, signal.SIGTERM)
        # a call after SIGTERM is refused (draining, or the port closed), never left hanging
        wait_for(
            lambda: status_of(lambda: c.infer("echo", [x], client_timeout=30))[0] == "StatusCode.UNAVAILABLE",
            60,
            "new calls to be refused",
        )
        assert [call.result(60).as_numpy("y").tolist() for call in calls] == [[3]] * 4
    assert server.proc.wait(60) == 0
    wait_for(lambda: not group_pids(server.proc.pid), 10, "the workers to exit")


def test_full_queue_is_resource_exhausted_and_a_dead_worker_unavailable(start_server: Any) -> None:
    step = {"name": "echo", "handler": "tests.service.handlers:EchoHandler", "batch_size": 1}
    server: Server = start_server(echo_config(queue_size=2, steps=[step]))
    with grpcclient.InferenceServerClient(server.grpc_target) as c, ThreadPoolExecutor(12) as pool:
        x = x_input(np.array([1], dtype=np.int64), "INT64")
        calls = [pool.submit(status_of, lambda: c.infer("echo", [x], parameters={"sleep": 0.3})) for _ in range(12)]
        answers = [call.result(60) for call in calls]
        assert {code for code, _ in answers} == {"OK", "StatusCode.RESOURCE_EXHAUSTED"}
        assert any("QueueFullError" in message for _, message in answers)
        code, message = status_of(lambda: c.infer("echo", [x_input(np.array([CRASH], dtype=np.int64), "INT64")]))
        assert (code, "WorkerDiedError" in message) == ("StatusCode.UNAVAILABLE", True)
