"""``ModelInferRequest`` to the decoded request the HTTP path makes, and outputs to ``ModelInferResponse``.

The same bounds as the HTTP decoder: a tensor's name, datatype and shape are checked against the
model's declared inputs (and the first step's ``batch_size``) before its data is read, and its data
must hold exactly ``prod(shape)`` elements (raw: ``prod(shape) * itemsize`` bytes). Raw contents
become numpy arrays over the message's own bytes (no copy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from ..errors import InferenceError
from ..inference import (
    BYTES,
    DATATYPES,
    INT_RANGES,
    MAX_DIM,
    MAX_DIMS,
    MAX_ID_CHARS,
    InferRequest,
    bytes_array,
    bytes_from_binary,
    check_declared,
    response_output,
    to_binary,
)
from ..settings import TensorSpec
from . import oip_pb2 as pb

#: ``ModelInferRequest.raw_input_contents``' field number.
RAW_INPUT_CONTENTS = 7

#: OIP datatype -> the ``InferTensorContents`` field its typed contents go in (FP16: raw contents only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}


def decode_infer_request(
    message: pb.ModelInferRequest,
    max_bytes: int,
    declared: Sequence[TensorSpec] = (),
    max_rows: int | None = None,
    raw: Sequence[bytes | memoryview] | None = None,
) -> InferRequest:
    """The decoded request of a ``ModelInferRequest`` (then checked as an HTTP one: ``check_inputs``).

    ``raw``: the request's raw contents where they were copied (into shared memory), else the message's.

    Raises:
        InferenceError: 400 naming what is wrong with the request (413 for a BYTES tensor too large padded).
    """
    if len(message.id) > MAX_ID_CHARS:
        raise _bad(f"id: must be a string of at most {MAX_ID_CHARS} characters")
    if not message.inputs:
        raise _bad("inputs: must be a non-empty list of tensors")
    raw = message.raw_input_contents if raw is None else raw
    if raw and len(raw) != len(message.inputs):
        raise _bad(f"raw_input_contents holds {len(raw)} tensors for {len(message.inputs)} inputs")
    known = {spec.name: spec for spec in declared}
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        where = f"inputs[{index}] ({tensor.name!r})"
        if not tensor.name:
            raise _bad(f"inputs[{index}].name: must be a non-empty string")
        if tensor.name in inputs:
            raise _bad(f"inputs[{index}].name: {tensor.name!r} appears twice")
        shape = _shape(tensor, where, known, max_rows, max_bytes)
        if raw:
            if tensor.HasField("contents"):
                raise _bad(f"{where}: has contents while the request has raw_input_contents")
            inputs[tensor.name] = _from_raw(raw[index], tensor.datatype, shape, where, max_bytes)
        else:
            inputs[tensor.name] = _from_contents(tensor.contents, tensor.datatype, shape, where, max_bytes)
    parameters = _parameters(message.parameters)
    outputs = [(output.name, False) for output in message.outputs] or None
    return InferRequest(
        id=message.id or None, inputs=inputs, parameters=parameters, outputs=outputs, binary_output=False
    )


def split_raw_contents(data: memoryview) -> tuple[pb.ModelInferRequest, list[memoryview]]:
    """A serialized ``ModelInferRequest`` parsed without copying its ``raw_input_contents``: the message
    without them, and them as views of ``data`` (protobuf would copy each into a bytes object).

    Raises:
        InferenceError: 400 where ``data`` is not a well-formed message.
    """
    raw: list[memoryview] = []
    rest: list[memoryview] = []
    run = pos = 0  # the start of the current run of other fields; the field being read
    end = len(data)
    while pos < end:
        start = pos
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                break
            if key >> 3 == RAW_INPUT_CONTENTS:
                rest.append(data[run:start])
                raw.append(data[pos : pos + length])
                run = pos + length
            pos += length
        else:
            raise _bad(f"the request is not a ModelInferRequest: wire type {wire} at byte {start}")
    if pos != end:
        raise _bad("the request is not a ModelInferRequest: it ends inside a field")
    rest.append(data[run:end])
    try:
        message = pb.ModelInferRequest.FromString(b"".join(rest))
    except DecodeError as e:
        raise _bad(f"the request is not a ModelInferRequest: {e}") from None
    return message, raw


def encode_infer_response(
    model_name: str, request: InferRequest, outputs: Mapping[str, np.ndarray], raw: bool
) -> pb.ModelInferResponse:
    """The ``ModelInferResponse`` for ``outputs`` (those requested, else all): raw contents when ``raw``
    (or when an output is FP16, which has no typed contents), else typed contents."""
    names = [name for name, _ in request.outputs] if request.outputs is not None else list(outputs)
    arrays: list[tuple[str, np.ndarray, str]] = []
    for name in names:
        array, datatype = response_output(outputs, name)
        arrays.append((name, array, datatype))
    raw = raw or any(datatype not in CONTENTS_FIELD for _, _, datatype in arrays)
    response = pb.ModelInferResponse(model_name=model_name, model_version="1", id=request.id or "")
    for name, array, datatype in arrays:
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(to_binary(array, datatype))
        elif datatype == BYTES:
            tensor.contents.bytes_contents.extend(_bytes_items(array))
        else:
            getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())
    return response


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` of ``data`` and the position after it."""
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _bad("the request is not a ModelInferRequest: a varint runs past its end")


def _bad(message: str) -> InferenceError:
    return InferenceError(400, message)


def _shape(
    tensor: pb.ModelInferRequest.InferInputTensor,
    where: str,
    known: dict[str, TensorSpec],
    max_rows: int | None,
    max_bytes: int,
) -> list[int]:
    datatype = tensor.datatype
    if datatype != BYTES and datatype not in DATATYPES:
        raise _bad(f"{where}.datatype: unknown datatype {datatype!r} (supported: {', '.join([*DATATYPES, BYTES])})")
    shape = list(tensor.shape)
    if len(shape) > MAX_DIMS or not all(0 <= d <= MAX_DIM for d in shape):
        raise _bad(f"{where}.shape: must be a list of at most {MAX_DIMS} non-negative integers")
    if 0 in shape and math.prod(d for d in shape if d) > max_bytes:
        raise _bad(f"{where}.shape: {shape}: besides the 0, its dimensions multiply to over {max_bytes}")
    if known:
        check_declared(tensor.name, datatype, shape, known)
    if max_rows is not None and shape and shape[0] > max_rows:
        raise _bad(
            f"a request of {shape[0]} rows is over this model's limit of {max_rows} (the first step's batch_size)"
        )
    return shape


def _from_raw(data: bytes | memoryview, datatype: str, shape: list[int], where: str, max_bytes: int) -> np.ndarray:
    count = math.prod(shape)
    if datatype == BYTES:
        return bytes_from_binary(data, shape, count, where, max_bytes)
    dtype = DATATYPES[datatype]
    if count * dtype.itemsize != len(data):
        raise _bad(
            f"{where}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, raw contents hold {len(data)}"
        )
    if datatype == "BOOL":
        flags: np.ndarray = np.frombuffer(data, dtype=np.uint8) != 0
        return flags.reshape(shape)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _from_contents(
    contents: pb.InferTensorContents, datatype: str, shape: list[int], where: str, max_bytes: int
) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise _bad(f"{where}: {datatype} travels in raw_input_contents only (it has no typed contents)")
    values: Any = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise _bad(f"{where}.contents.{field}: holds {len(values)} elements, shape {shape} needs {count}")
    if datatype == BYTES:
        return bytes_array(list(values), shape, where, max_bytes)
    dtype = DATATYPES[datatype]
    source = np.uint64 if datatype == "UINT64" else np.int64 if dtype.kind in "iu" else dtype
    array = np.array(values, dtype=source)
    if datatype in INT_RANGES and count:
        low, high = INT_RANGES[datatype]
        if array.min() < low or array.max() > high:
            raise _bad(f"{where}.contents.{field}: values out of range for {datatype}")
    return array.astype(dtype, copy=False).reshape(shape)


def _parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, choice) if choice is not None else None
    return values


def _bytes_items(array: np.ndarray) -> list[bytes]:
    return [item.encode() if isinstance(item, str) else bytes(item) for item in array.reshape(-1).tolist()]
