"""OIP v2 decoding and encoding, without a server."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from aqueduct_service.errors import InferenceError
from aqueduct_service.inference import InferRequest, check_inputs, decode_request, encode_response
from aqueduct_service.settings import TensorSpec

LIMIT = 1 << 20


def body(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **extra})


def bad(raw: bytes, status: int = 400, header_length: int | None = None) -> str:
    with pytest.raises(InferenceError) as info:
        decode_request(raw, header_length, LIMIT)
    assert info.value.status == status
    return info.value.message


def test_json_tensors() -> None:
    request = decode_request(
        body(
            {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4.5]},
            {"name": "n", "shape": [2, 1], "datatype": "INT8", "data": [[1], [-2]]},
            {"name": "b", "shape": [2], "datatype": "BOOL", "data": [True, False]},
            {"name": "s", "shape": [2], "datatype": "BYTES", "data": ["cat", ""]},
            id="r1",
            parameters={"binary_data_output": True},
        ),
        None,
        LIMIT,
    )
    assert request.id == "r1" and request.binary_output
    x = request.inputs["x"]
    assert x.dtype == np.float32 and x.shape == (2, 2) and x[1, 1] == 4.5
    assert request.inputs["n"].dtype == np.int8 and request.inputs["n"].tolist() == [[1], [-2]]
    assert request.inputs["b"].tolist() == [True, False]
    assert request.inputs["s"].tolist() == [b"cat", b""] and request.inputs["s"].dtype.kind == "S"


def triton_request(binary: bool, outputs: list[triton.InferRequestedOutput] | None = None) -> tuple[bytes, Any]:
    x = triton.InferInput("x", [2, 3], "FP32")
    x.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3), binary_data=binary)
    s = triton.InferInput("s", [2], "BYTES")
    s.set_data_from_numpy(np.array([b"a", b"bcd"], dtype=np.object_), binary_data=binary)
    return triton.InferenceServerClient.generate_request_body([x, s], outputs=outputs)


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_request_bodies(binary: bool) -> None:
    raw, header_length = triton_request(binary)
    assert (header_length is not None) == binary
    request = decode_request(raw, header_length, LIMIT)
    assert request.inputs["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert request.inputs["s"].tolist() == [b"a", b"bcd"]
    assert request.binary_output  # no outputs named: tritonclient asks for binary outputs


@pytest.mark.parametrize("binary", [False, True])
def test_response_is_read_by_tritonclient(binary: bool) -> None:
    raw, header_length = triton_request(binary, outputs=[triton.InferRequestedOutput("y", binary_data=binary)])
    request = decode_request(raw, header_length, LIMIT)
    payload, response_header_length = encode_response("m", request, {"y": request.inputs["x"] * 2, "z": np.ones(1)})
    assert (response_header_length is not None) == binary
    result = triton.InferResult.from_response_body(payload, header_length=response_header_length)
    assert result.as_numpy("y").tolist() == [[0, 2, 4], [6, 8, 10]]
    assert result.as_numpy("z") is None  # only requested outputs are returned


def test_all_outputs_and_datatypes() -> None:
    request = InferRequest(id="7", inputs={}, parameters={}, outputs=None, binary_output=True)
    outputs = {
        "f16": np.array([1.5], dtype=np.float16),
        "u64": np.array([2**64 - 1], dtype=np.uint64),
        "flag": np.array([True, False]),
        "text": np.array(["kot", "猫"]),
    }
    payload, header_length = encode_response("m", request, outputs)
    result = triton.InferResult.from_response_body(payload, header_length=header_length)
    assert result.get_response()["id"] == "7"
    assert result.as_numpy("f16").tolist() == [1.5]
    assert result.as_numpy("u64").tolist() == [2**64 - 1]
    assert result.as_numpy("flag").tolist() == [True, False]
    assert result.as_numpy("text").tolist() == [b"kot", "猫".encode()]


def test_unsupported_output_dtype_is_500() -> None:
    request = InferRequest(id=None, inputs={}, parameters={}, outputs=None, binary_output=False)
    with pytest.raises(InferenceError) as info:
        encode_response("m", request, {"y": np.array([1 + 2j])})
    assert info.value.status == 500 and "complex" in info.value.message


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"[]", "must be a JSON object"),
        (orjson.dumps({"inputs": []}), "inputs: must be a non-empty list"),
        (body({"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}), "holds 1 elements, shape [2] needs 2"),
        (body({"name": "x", "shape": [2], "datatype": "COMPLEX", "data": [1, 2]}), "unknown datatype 'COMPLEX'"),
        (body({"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}), "shape: must be a list"),
        (body({"name": "x", "shape": [2**50], "datatype": "FP32", "data": [1]}), "shape: must be a list"),
        (body({"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}), "not all valid FP32"),
        (body({"name": "x", "shape": [1], "datatype": "BOOL", "data": ["false"]}), "not all valid BOOL"),
        (body({"name": "x", "shape": [1], "datatype": "INT32", "data": [1.5]}), "not all valid INT32"),
        (body({"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}), "out of range for UINT8"),
        (
            b'{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[1180591620717411303424]}]}',
            "not all valid INT64",
        ),
        (body({"name": "x", "shape": [2], "datatype": "FP32", "data": [[1], [2, 3]]}), "not a (nested) list"),
        (body({"name": "x", "shape": [1], "datatype": "FP32", "data": [None]}), "not all valid FP32"),
        (body({"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}), "list of strings"),
        (body({"name": "x", "shape": [1], "datatype": "FP32"}), "neither 'data' nor"),
        (
            body(
                {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
                {"name": "x", "shape": [0], "datatype": "FP32", "data": []},
            ),
            "appears twice",
        ),
    ],
)
def test_bad_json_requests(raw: bytes, message: str) -> None:
    assert message in bad(raw)


def binary_body(size: int, shape: list[int], datatype: str, payload: bytes) -> tuple[bytes, int]:
    header = body({"name": "x", "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}})
    return header + payload, len(header)


def test_binary_sizes_are_checked_before_allocation() -> None:
    raw, n = binary_body(8, [3], "FP32", bytes(8))
    assert "needs 12 bytes, binary_data_size is 8" in bad(raw, header_length=n)
    raw, n = binary_body(2**40, [2**38], "FP32", bytes(16))
    assert "runs past the end of the body" in bad(raw, header_length=n)
    raw, n = binary_body(4, [1], "FP32", bytes(8))
    assert "no input claims" in bad(raw, header_length=n)
    assert "outside the body" in bad(raw, header_length=len(raw) + 1)
    raw, n = binary_body(4, [1000], "BYTES", bytes(4))
    assert "need at least 4000 bytes" in bad(raw, header_length=n)
    raw, n = binary_body(8, [1], "BYTES", (100).to_bytes(4, "little") + bytes(4))
    assert "runs past binary_data_size" in bad(raw, header_length=n)


def test_binary_bool_and_empty() -> None:
    raw, n = binary_body(3, [3], "BOOL", b"\x00\x01\x07")
    assert decode_request(raw, n, LIMIT).inputs["x"].tolist() == [False, True, True]
    raw, n = binary_body(0, [0, 5], "FP32", b"")
    assert decode_request(raw, n, LIMIT).inputs["x"].shape == (0, 5)


def test_padded_bytes_tensor_over_limit_is_413() -> None:
    data = ["x" * 1000] + [""] * 2000
    bad(body({"name": "s", "shape": [len(data)], "datatype": "BYTES", "data": data}), status=413)


def test_check_inputs_against_declared() -> None:
    declared = (TensorSpec("image", "FP32", (-1, 3)),)
    check_inputs({"image": np.zeros((5, 3), np.float32)}, declared)
    for inputs, message in [
        ({"image": np.zeros((5, 4), np.float32)}, "shape [5, 4] does not match the model's [-1, 3]"),
        ({"image": np.zeros((5, 3), np.int32)}, "datatype INT32 does not match the model's FP32"),
        ({"other": np.zeros(1)}, "'other' is not an input of this model"),
        ({}, "missing input(s): image"),
    ]:
        with pytest.raises(InferenceError, match=".*") as info:
            check_inputs(inputs, declared)
        assert message in info.value.message
