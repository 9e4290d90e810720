"""A request whose body lies in shared memory keeps its block until no worker can touch it.

The reproduction of a corrupted answer: request A (a binary tensor of 80 KB, so read into the arena)
times out (504) while its worker still holds it; request B, sent next on the same connection (so to
the same front end), would reuse A's block; A's handler then scales its input in place, that is,
B's tensor, and B was answered 200 with half its sum.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .conftest import FRONT_ENDS, Server, echo_config, serving

pytestmark = pytest.mark.timeout(180)

ELEMENTS = 20_000  # 80 KB of FP32: over the 64 KiB above which bodies are read into the arena


def binary_request(x: np.ndarray, **parameters: Any) -> tuple[bytes, dict[str, str]]:
    header = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "parameters": {"binary_data_size": x.nbytes}}
        ],
        "parameters": parameters,
    }
    head = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    return head + x.astype("<f4").tobytes(), headers


def post(conn: http.client.HTTPConnection, x: np.ndarray, **parameters: Any) -> tuple[int, dict[str, Any]]:
    body, headers = binary_request(x, **parameters)
    conn.request("POST", "/v2/models/echo/infer", body=body, headers=headers)
    reply = conn.getresponse()
    return reply.status, json.loads(reply.read())


IN_PLACE = {"name": "scale", "handler": "tests.service.handlers:InPlaceHandler", "batch_size": 1}
#: Two steps: the first copies x into a new output y (large: it travels in the worker's output arena),
#: the second halves y in place.
THROUGH_OUTPUT = [
    {"name": "copy", "handler": "tests.service.handlers:ScaleHandler", "options": {"factor": 1.0}},
    {**IN_PLACE, "options": {"output": "y"}},
]


@pytest.fixture(
    scope="module",
    params=[(f, s) for f in FRONT_ENDS for s in ("input", "output")],
    ids=[f"{f.id}-{s}" for f in FRONT_ENDS for s in ("input", "output")],
)
def in_place_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Any:
    front_ends, through = request.param
    config = echo_config(steps=[IN_PLACE] if through == "input" else THROUGH_OUTPUT)
    with serving(tmp_path_factory.mktemp("inplace"), config, front_ends.values[0]) as server:
        yield server


def test_a_timed_out_request_does_not_write_into_the_next_ones_tensor(in_place_server: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", in_place_server.port, timeout=60)
    try:
        for _ in range(3):
            # A: its worker sleeps 0.6 s, then halves its input in place; the client gives up after 0.1 s
            status, doc = post(conn, np.ones(ELEMENTS, np.float32), sleep=0.6, timeout=100_000)
            assert status == 504, doc
            # B: queued behind A on the one worker, its body read into shared memory meanwhile
            status, doc = post(conn, np.full(ELEMENTS, 2.0, np.float32))
            assert status == 200, doc
            outputs = {o["name"]: o for o in doc["outputs"]}
            assert outputs["sum_seen"]["data"] == [2.0 * ELEMENTS], "B's tensor was changed by A's handler"
    finally:
        conn.close()


def test_over_grpc_a_timed_out_request_does_not_write_into_the_next_ones_tensor(in_place_server: Server) -> None:
    """The same over gRPC: raw contents of 64 KiB or more are copied into the same shared memory."""

    def infer(x: np.ndarray, **options: Any) -> grpcclient.InferResult:
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer("echo", [tensor], **options)

    with grpcclient.InferenceServerClient(in_place_server.grpc_target) as client:
        for _ in range(3):
            with pytest.raises(InferenceServerException) as caught:
                infer(np.ones(ELEMENTS, np.float32), parameters={"sleep": 0.6}, timeout=100_000)
            assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            sum_seen = infer(np.full(ELEMENTS, 2.0, np.float32)).as_numpy("sum_seen")
            assert sum_seen.tolist() == [2.0 * ELEMENTS], "B's tensor was changed by A's handler"
