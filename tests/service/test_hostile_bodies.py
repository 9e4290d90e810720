"""Hostile request bodies (issue 18): each client mistake is a 4xx naming it, large JSON is decoded by
numpy without Python lists, and the pod's decode budget answers 503 with Retry-After beyond it."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from aqueduct_service.errors import InferenceError
from aqueduct_service.inference import MAX_ID_CHARS, decode_request
from aqueduct_service.json_data import MAX_JSON_BYTES, SPLIT_MIN_BYTES, parse_numbers
from aqueduct_service.limits import MAX_FREE_FORM_BYTES, MAX_FREE_FORM_DEPTH, DecodeBudget, check_free_form
from aqueduct_service.settings import TensorSpec

from .conftest import Server, echo_config, serving, wait_for

pytestmark = pytest.mark.timeout(180)

LIMIT = 8 << 20
HUGE_EMPTY = [0, 2**40, 2**40, 2**40]
INFER = "/v2/models/echo/infer"


def request(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **extra})


def binary_request(shape: list[int], datatype: str, payload: bytes) -> tuple[bytes, int]:
    header = request(
        {"name": "x", "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": len(payload)}}
    )
    return header + payload, len(header)


def refused(raw: bytes, header_length: int | None = None, **kwargs: Any) -> InferenceError:
    with pytest.raises(InferenceError) as info:
        decode_request(raw, header_length, LIMIT, **kwargs)
    return info.value


def deep(levels: int) -> bytes:
    """``{"a": {"a": ... 1 ...}}``, ``levels`` objects deep, as JSON text (no recursion to build it)."""
    return b'{"a":' * levels + b"1" + b"}" * levels


def large_json(values: np.ndarray, datatype: str, **extra: Any) -> bytes:
    """A JSON request whose ``x`` holds ``values`` as nested lists, over ``SPLIT_MIN_BYTES``."""
    raw = request({"name": "x", "shape": list(values.shape), "datatype": datatype, "data": values.tolist()}, **extra)
    assert len(raw) >= SPLIT_MIN_BYTES
    return raw


# -- decoding, without a server ---------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_an_empty_shape_whose_other_dimensions_overflow_is_400(datatype: str) -> None:
    error = refused(request({"name": "x", "shape": HUGE_EMPTY, "datatype": datatype, "data": []}))
    assert error.status == 400 and "besides the 0" in error.message
    raw, n = binary_request(HUGE_EMPTY, datatype, b"")
    error = refused(raw, n)
    assert error.status == 400 and "besides the 0" in error.message


def test_an_empty_shape_within_the_limit_is_decoded() -> None:
    raw, n = binary_request([0, 1024, 1024], "FP32", b"")
    assert decode_request(raw, n, LIMIT).inputs["x"].shape == (0, 1024, 1024)


@pytest.mark.parametrize("where", ["request", "tensor", "output"])
def test_parameters_nested_beyond_the_limit_are_400(where: str) -> None:
    nested = deep(600)
    tensor = b'{"name":"x","shape":[1],"datatype":"FP32","data":[1]'
    if where == "request":
        raw = b'{"inputs":[' + tensor + b'}],"parameters":' + nested + b"}"
    elif where == "tensor":
        raw = b'{"inputs":[' + tensor + b',"parameters":' + nested + b"}]}"
    else:
        raw = b'{"inputs":[' + tensor + b'}],"outputs":[{"name":"y","parameters":' + nested + b"}]}"
    error = refused(raw)
    assert error.status == 400 and f"nested deeper than the limit of {MAX_FREE_FORM_DEPTH}" in error.message


def test_parameters_within_the_limits_pass_and_beyond_them_are_400() -> None:
    check_free_form(json.loads(deep(MAX_FREE_FORM_DEPTH)), "parameters")
    with pytest.raises(InferenceError, match="nested deeper"):
        check_free_form(json.loads(deep(MAX_FREE_FORM_DEPTH + 1)), "parameters")
    with pytest.raises(InferenceError, match=f"larger than the limit of {MAX_FREE_FORM_BYTES} bytes"):
        check_free_form({"blob": "a" * MAX_FREE_FORM_BYTES}, "parameters")
    with pytest.raises(InferenceError, match="larger than the limit"):
        check_free_form({"many": [1] * MAX_FREE_FORM_BYTES}, "parameters")


def test_a_declared_datatype_is_checked_before_the_data_is_decoded() -> None:
    declared = (TensorSpec("x", "FP32", (-1,)),)
    # BYTES elements whose length prefixes run past the data: decoding them would fail otherwise
    raw, n = binary_request([4], "BYTES", (1 << 30).to_bytes(4, "little") * 4)
    error = refused(raw, n, declared=declared)
    assert error.status == 400 and "datatype BYTES does not match the model's FP32" in error.message
    error = refused(request({"name": "x", "shape": [2], "datatype": "BYTES", "data": [1, 2]}), declared=declared)
    assert "datatype BYTES does not match the model's FP32" in error.message
    error = refused(request({"name": "z", "shape": [2], "datatype": "FP32", "data": "no"}), declared=declared)
    assert "'z' is not an input of this model" in error.message
    error = refused(request({"name": "x", "shape": [9], "datatype": "FP32", "data": "no"}), max_rows=8)
    assert "9 rows is over this model's limit of 8" in error.message


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("FP32", np.linspace(-1e6, 1e6, 300_000, dtype=np.float32).reshape(1000, 300)),
        ("FP64", np.random.default_rng(0).standard_normal(150_000)),
        ("INT64", np.arange(-150_000, 150_000, dtype=np.int64) * 1_000_003),
        ("UINT8", np.arange(400_000, dtype=np.int64).astype(np.uint8).reshape(4, 100, 1000)),
        ("BOOL", np.arange(300_000) % 3 == 0),
    ],
)
def test_large_json_data_is_decoded_as_the_small_path_does(datatype: str, values: np.ndarray) -> None:
    decoded = decode_request(large_json(values, datatype), None, LIMIT).inputs["x"]
    assert decoded.shape == values.shape
    np.testing.assert_array_equal(decoded, values.astype(decoded.dtype))


@pytest.mark.parametrize(
    ("datatype", "old", "new", "message"),
    [
        ("UINT8", b"1]", b"300]", "out of range for UINT8"),
        ("INT64", b"1]", b"99999999999999999999]", "out of range for INT64"),
        ("INT32", b"1]", b"1.5]", "not all valid INT32"),
        ("FP32", b"1]", b"true]", "not all valid FP32"),
        ("FP32", b"1]", b"NaN]", "not all valid FP32"),
        ("BOOL", b"true]", b"1]", "not all valid BOOL"),
        ("FP32", b"1]", b"1][2]", "brackets do not match"),
        ("FP32", b"[1,", b"[1,,", "missing"),
        ("FP32", b"1]", b"1,]", "missing"),
        ("FP32", b"1]", b"1,2]", "holds more than"),
        ("FP32", b"[1,", b"[", "holds 599999 elements"),
    ],
)
def test_large_json_data_mistakes_are_400(datatype: str, old: bytes, new: bytes, message: str) -> None:
    data = [True] * 600_000 if datatype == "BOOL" else [1] * 600_000
    raw = request({"name": "x", "shape": [600_000], "datatype": datatype, "data": data})
    assert len(raw) >= SPLIT_MIN_BYTES
    if old.startswith(b"["):  # the data's first element
        raw = raw.replace(b'"data":' + old, b'"data":' + new, 1)
    else:  # its last
        before, _, after = raw.rpartition(old)
        raw = before + new + after
    error = refused(raw)
    assert error.status == 400 and message in error.message


def test_large_json_is_refused_unless_its_bulk_is_numeric_input_data() -> None:
    strings = request({"name": "x", "shape": [200_000], "datatype": "BYTES", "data": ["abcdefgh"] * 200_000})
    error = refused(strings)
    assert error.status == 413 and "binary tensor extension" in error.message and str(MAX_JSON_BYTES) in error.message
    elsewhere = request(
        {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}, parameters={"data": [1] * 600_000}
    )
    error = refused(elsewhere)
    assert error.status == 413 and "outside any input's data" in error.message


def test_parse_numbers_never_allocates_beyond_what_the_text_can_hold() -> None:
    with pytest.raises(InferenceError, match="cannot hold the 1000000 elements"):
        parse_numbers(memoryview(b"[1,2,3]"), "FP32", np.dtype(np.float32), 1_000_000, "x")


def test_the_decode_budget_lets_one_request_in_and_refuses_beyond_it() -> None:
    budget = DecodeBudget(100)
    first = budget.hold(1000)  # alone: let in whatever its size
    with pytest.raises(InferenceError) as info:
        budget.hold(1)
    assert info.value.status == 503 and info.value.headers == {"Retry-After": "1"}
    first.release()
    first.release()
    assert budget.used == 0
    budget.hold(60).take(40)
    with pytest.raises(InferenceError):
        budget.hold(1)


# -- the pod, over a socket -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The echo model with a declared FP32 input ``x``, 8 MiB bodies and a decode budget of 1 KiB."""
    config = echo_config(inputs=[{"name": "x", "datatype": "FP32", "shape": [-1]}])
    config["server"].update(max_body_bytes=LIMIT, decode_budget_bytes=1024)
    with serving(tmp_path_factory.mktemp("hostile"), config) as server:
        yield server


def post(server: Server, raw: bytes, header_length: int | None = None) -> httpx.Response:
    headers = {"Inference-Header-Content-Length": str(header_length)} if header_length is not None else {}
    return server.client.post(INFER, content=raw, headers=headers)


def test_the_pod_answers_an_empty_shape_that_overflows_with_400(server: Server) -> None:
    reply = post(server, request({"name": "x", "shape": HUGE_EMPTY, "datatype": "FP32", "data": []}))
    assert reply.status_code == 400 and "besides the 0" in reply.json()["error"]
    reply = post(server, *binary_request(HUGE_EMPTY, "FP32", b""))
    assert reply.status_code == 400 and "besides the 0" in reply.json()["error"]
    assert "Traceback" not in server.output()


def test_the_pod_answers_deep_parameters_with_400(server: Server) -> None:
    raw = b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}],"parameters":' + deep(600) + b"}"
    reply = post(server, raw)
    assert reply.status_code == 400 and "nested deeper than the limit" in reply.json()["error"]


def test_the_pod_refuses_a_bytes_tensor_for_an_fp32_input_with_400(server: Server) -> None:
    raw, n = binary_request([4], "BYTES", (1 << 30).to_bytes(4, "little") * 4)
    reply = post(server, raw, n)
    assert reply.status_code == 400 and "does not match the model's FP32" in reply.json()["error"]


def test_the_pod_serves_large_json_tensors(server: Server) -> None:
    values = np.linspace(0, 1, 400_000, dtype=np.float32)
    reply = post(server, large_json(values, "FP32", outputs=[{"name": "y", "parameters": {"binary_data": True}}]))
    assert reply.status_code == 200, reply.text
    header_length = int(reply.headers["inference-header-content-length"])
    np.testing.assert_array_equal(np.frombuffer(reply.content[header_length:], np.float32), values)


def test_the_pod_answers_503_with_retry_after_beyond_its_decode_budget(server: Server) -> None:
    held = b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[7]}]}'.ljust(4096)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(held)}\r\n\r\n".encode()
        sock.sendall(head + held[:100])  # the rest of the body is held back: this request is being read
        small = request({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]})
        refused_reply = wait_for(lambda: (r := post(server, small)).status_code == 503 and r, what="a 503")
        assert refused_reply.headers["retry-after"] == "1"
        assert "decode_budget_bytes" in refused_reply.json()["error"]
        sock.sendall(held[100:])
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert post(server, small).status_code == 200


@pytest.mark.parametrize(
    "items",
    [[b"ab", b"cd", b"ef", b"gh"], [b"a", b"bcd", b"", b"x\x00"], [b"", b"", b"", b""], [b"\x00\x00"] * 4],
    ids=["same-length", "mixed", "empty", "nul"],
)
def test_binary_bytes_elements_become_one_padded_array(items: list[bytes]) -> None:
    blob = b"".join(len(item).to_bytes(4, "little") + item for item in items)
    decoded = decode_request(*binary_request([2, 2], "BYTES", blob), LIMIT).inputs["x"]
    expected = np.array(items, dtype=f"S{max(max(map(len, items)), 1)}").reshape(2, 2)
    assert decoded.dtype == expected.dtype
    np.testing.assert_array_equal(decoded, expected)


def test_a_request_id_over_the_limit_is_400() -> None:
    tensor = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}
    assert decode_request(request(tensor, id="a" * MAX_ID_CHARS), None, LIMIT).id == "a" * MAX_ID_CHARS
    error = refused(request(tensor, id="a" * (MAX_ID_CHARS + 1)))
    assert error.status == 400 and f"at most {MAX_ID_CHARS} characters" in error.message
