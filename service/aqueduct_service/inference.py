"""Open Inference Protocol v2 request decoding and response encoding, JSON and binary tensor data.

Hostile bodies are the normal case here, so every size is checked against the body before anything is
allocated: shapes are multiplied out in Python integers (even with a 0 dimension the others may
multiply to at most the body limit), a JSON tensor's ``data`` must hold exactly ``prod(shape)``
elements, a binary tensor's ``binary_data_size`` must equal ``prod(shape) * itemsize`` and lie inside
the body. A tensor's name, datatype and shape are checked against the model's declared inputs before
its data is decoded. Free-form JSON (``parameters``) is bounded in depth and size (``limits.py``);
large JSON bodies have their numeric data parsed by numpy (``json_data.py``). Nothing is unpickled
and no ``object`` arrays are made.

``BYTES`` tensors become numpy ``S`` (fixed-width bytes) arrays: an element's trailing NUL bytes are lost,
and a tensor may take at most ``max_bytes`` once padded to its longest element. In JSON they travel as
UTF-8 strings (undecodable bytes are replaced); use the binary extension for raw bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .errors import InferenceError
from .json_data import SplitJson, parse_numbers, split_json
from .limits import check_free_form
from .settings import TensorSpec

# OIP datatype -> little-endian numpy dtype (BYTES is handled apart: numpy ``S`` arrays).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"
# numpy dtype kinds a JSON ``data`` list may be parsed as, per target kind (b: bool, iu: integer, f: float).
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
INT_RANGES = {name: (int(np.iinfo(t).min), int(np.iinfo(t).max)) for name, t in DATATYPES.items() if t.kind in "iu"}
MAX_DIMS = 32
#: The most characters of a request's ``id`` (it is echoed in the answer and on every log line about it).
MAX_ID_CHARS = 1024
MAX_DIM = 2**40


@dataclass
class InferRequest:
    """A decoded inference request."""

    id: str | None
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    # requested outputs as (name, binary); None: every output the handlers set.
    outputs: list[tuple[str, bool]] | None
    binary_output: bool


def decode_request(
    body: bytes | memoryview,
    header_length: int | None,
    max_bytes: int,
    declared: Sequence[TensorSpec] = (),
    max_rows: int | None = None,
) -> InferRequest:
    """Decode an OIP v2 inference request; ``header_length`` is the ``Inference-Header-Content-Length``.

    Each input's name, datatype and shape are checked against ``declared`` (when given) and its rows
    against ``max_rows`` (see ``check_inputs``) before its data is decoded. Bodies of a few MiB take
    a fraction of a second here: the app decodes those in a thread.

    Raises:
        InferenceError: 400 naming what is wrong with the request; 413 for JSON over ``json_data``'s limit.
    """
    header: bytes | memoryview = body
    binary: bytes | memoryview = b""
    if header_length is not None:
        if not 0 <= header_length <= len(body):
            raise _bad(f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes")
        view = memoryview(body)
        header, binary = view[:header_length], view[header_length:]
    split = split_json(header)
    try:
        doc = orjson.loads(split.text)
    except orjson.JSONDecodeError as e:
        raise _bad(f"malformed JSON: {e}") from None
    if not isinstance(doc, dict):
        raise _bad("the request must be a JSON object")
    request_id = doc.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_ID_CHARS):
        raise _bad(f"id: must be a string of at most {MAX_ID_CHARS} characters")
    parameters = _object(doc.get("parameters"), "parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad("inputs: must be a non-empty list of tensors")
    tensors = _Tensors(binary, max_bytes, split, {spec.name: spec for spec in declared}, max_rows)
    inputs: dict[str, np.ndarray] = {}
    for index, raw in enumerate(raw_inputs):
        name, array = tensors.decode(raw, f"inputs[{index}]")
        if name in inputs:
            raise _bad(f"inputs[{index}].name: {name!r} appears twice")
        inputs[name] = array
    if tensors.offset != len(binary):
        raise _bad(f"the body holds {len(binary) - tensors.offset} bytes of binary data no input claims")
    if split.spans:
        raise InferenceError(
            413,
            f"the request's JSON holds an array of over {len(next(iter(split.spans.values())))} bytes outside "
            "any input's data",
        )
    return InferRequest(
        id=request_id,
        inputs=inputs,
        parameters=parameters,
        outputs=_requested_outputs(doc.get("outputs"), parameters),
        binary_output=parameters.get("binary_data_output") is True,
    )


def check_inputs(inputs: dict[str, np.ndarray], declared: Sequence[TensorSpec], max_rows: int | None = None) -> None:
    """Check request inputs against the model's declared inputs (skipped when none are declared).

    ``max_rows``: the pod takes batches (``batch_dim``): every input's first dimension is the
    request's rows, the same in all, from 1 to ``max_rows``.
    """
    if max_rows is not None:
        _check_rows(inputs, max_rows)
    if not declared:
        return
    known = {spec.name: spec for spec in declared}
    for name, array in inputs.items():
        check_declared(name, datatype_of(array), list(array.shape), known)
    missing = [name for name in known if name not in inputs]
    if missing:
        raise _bad(f"missing input(s): {', '.join(missing)}")


def check_declared(name: str, datatype: str | None, shape: list[int], known: dict[str, TensorSpec]) -> None:
    """Refuse (400) an input the model does not declare, or of another datatype or shape."""
    spec = known.get(name)
    if spec is None:
        raise _bad(f"input {name!r} is not an input of this model (expected: {', '.join(known)})")
    if datatype != spec.datatype:
        raise _bad(f"input {name!r}: datatype {datatype} does not match the model's {spec.datatype}")
    if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)):
        raise _bad(f"input {name!r}: shape {shape} does not match the model's {list(spec.shape)}")


def _check_rows(inputs: dict[str, np.ndarray], max_rows: int) -> None:
    first: tuple[str, int] | None = None
    for name, array in inputs.items():
        if not array.ndim:
            raise _bad(f"input {name!r}: a scalar has no batch dimension (this model takes rows along the first)")
        if first is None:
            first = (name, array.shape[0])
        elif array.shape[0] != first[1]:
            raise _bad(
                f"inputs {first[0]!r} and {name!r} have {first[1]} and {array.shape[0]} rows: every input of a "
                "request must have the same first (batch) dimension"
            )
    rows = first[1] if first is not None else 0
    if rows < 1:
        raise _bad("a request must carry at least one row (its inputs' first dimension is the batch)")
    if rows > max_rows:
        raise _bad(f"a request of {rows} rows is over this model's limit of {max_rows} (the first step's batch_size)")


def check_requested_outputs(request: InferRequest, declared: Sequence[TensorSpec]) -> None:
    """Reject requested outputs the model does not declare (skipped when none are declared)."""
    if not declared or request.outputs is None:
        return
    names = [spec.name for spec in declared]
    for name, _ in request.outputs:
        if name not in names:
            raise _bad(f"output {name!r} is not an output of this model (expected: {', '.join(names)})")


def encode_response(model_name: str, request: InferRequest, outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """Encode the OIP v2 response; returns (body, Inference-Header-Content-Length or None if all JSON)."""
    wanted = request.outputs
    if wanted is None:
        wanted = [(name, request.binary_output) for name in outputs]
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in wanted:
        array, datatype = response_output(outputs, name)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = to_binary(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = _to_json_data(array, datatype)
        tensors.append(tensor)
    doc: dict[str, Any] = {"model_name": model_name, "outputs": tensors}
    if request.id is not None:
        doc["id"] = request.id
    header = orjson.dumps(doc)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def response_output(outputs: Mapping[str, np.ndarray], name: str) -> tuple[np.ndarray, str]:
    """Output ``name`` as an array and its OIP datatype, for a response (HTTP or gRPC).

    Raises:
        InferenceError: 400 when it was requested but not produced, 500 when its dtype has no datatype.
    """
    if name not in outputs:
        raise _bad(f"output {name!r} was requested but the model did not produce it")
    array = np.asarray(outputs[name])
    datatype = datatype_of(array)
    if datatype is None:
        raise InferenceError(500, f"the handler set output {name!r} with unsupported dtype {array.dtype}")
    return array, datatype


def datatype_of(array: np.ndarray) -> str | None:
    """The OIP datatype of a numpy array, or None when it has no OIP equivalent."""
    kind = array.dtype.kind
    if kind in ("S", "U"):
        return BYTES
    for name, dtype in DATATYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            return name
    return None


def _bad(message: str) -> InferenceError:
    return InferenceError(400, message)


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{where}: must be a JSON object")
    check_free_form(value, where)
    return value


def _requested_outputs(raw: Any, parameters: dict[str, Any]) -> list[tuple[str, bool]] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _bad("outputs: must be a list")
    default_binary = parameters.get("binary_data_output") is True
    wanted = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _bad(f"outputs[{index}]: must be an object with a string 'name'")
        binary = _object(item.get("parameters"), f"outputs[{index}].parameters").get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise _bad(f"outputs[{index}].parameters.binary_data: must be true or false")
        wanted.append((item["name"], binary))
    return wanted


class _Tensors:
    """Decodes a request's input tensors one by one, in the order their binary data lies in the body."""

    def __init__(
        self,
        binary: bytes | memoryview,
        max_bytes: int,
        split: SplitJson,
        known: dict[str, TensorSpec],
        max_rows: int | None,
    ) -> None:
        self.binary = binary
        self.max_bytes = max_bytes
        self.split = split
        self.known = known
        self.max_rows = max_rows
        #: bytes of binary data the inputs decoded so far used
        self.offset = 0

    def decode(self, raw: Any, where: str) -> tuple[str, np.ndarray]:
        """Decode one input tensor: (name, array)."""
        if not isinstance(raw, dict):
            raise _bad(f"{where}: must be a JSON object")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"{where}.name: must be a non-empty string")
        where = f"{where} ({name!r})"
        datatype = raw.get("datatype")
        if not isinstance(datatype, str) or (datatype != BYTES and datatype not in DATATYPES):
            raise _bad(f"{where}.datatype: unknown datatype {datatype!r} (supported: {', '.join([*DATATYPES, BYTES])})")
        shape = raw.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
        ):
            raise _bad(f"{where}.shape: must be a list of at most {MAX_DIMS} non-negative integers")
        # numpy refuses a shape whose other dimensions multiply past 2**63 even when a 0 makes it empty
        if 0 in shape and math.prod(d for d in shape if d) > self.max_bytes:
            raise _bad(
                f"{where}.shape: {shape}: besides the 0, its dimensions multiply to over {self.max_bytes} "
                "(the body limit)"
            )
        if self.known:
            check_declared(name, datatype, shape, self.known)
        if self.max_rows is not None and shape and shape[0] > self.max_rows:
            raise _bad(
                f"a request of {shape[0]} rows is over this model's limit of {self.max_rows} (the first step's "
                "batch_size)"
            )
        count = math.prod(shape)
        parameters = _object(raw.get("parameters"), f"{where}.parameters")
        size = parameters.get("binary_data_size")
        if size is None:
            if "data" not in raw:
                raise _bad(f"{where}: has neither 'data' nor parameters.binary_data_size")
            return name, self._from_json(raw["data"], datatype, shape, count, where)
        if type(size) is not int or size < 0:
            raise _bad(f"{where}.parameters.binary_data_size: must be a non-negative integer")
        if "data" in raw:
            raise _bad(f"{where}: has both 'data' and parameters.binary_data_size")
        if self.offset + size > len(self.binary):
            raise _bad(f"{where}: binary_data_size {size} runs past the end of the body")
        chunk = self.binary[self.offset : self.offset + size]
        self.offset += size
        if datatype == BYTES:
            return name, bytes_from_binary(chunk, shape, count, where, self.max_bytes)
        dtype = DATATYPES[datatype]
        if count * dtype.itemsize != size:
            raise _bad(
                f"{where}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, binary_data_size is {size}"
            )
        if datatype == "BOOL":
            return name, (np.frombuffer(chunk, dtype=np.uint8) != 0).reshape(shape)
        return name, np.frombuffer(chunk, dtype=dtype).reshape(shape)

    def _from_json(self, data: Any, datatype: str, shape: list[int], count: int, where: str) -> np.ndarray:
        span = self.split.take(data)
        if span is not None:
            if datatype == BYTES:
                raise _bad(f"{where}.data: BYTES data must be a list of strings")
            return parse_numbers(span, datatype, DATATYPES[datatype], count, where).reshape(shape)
        if not isinstance(data, list):
            raise _bad(f"{where}.data: must be a list")
        if datatype == BYTES:
            return _bytes_from_json(data, shape, count, where, self.max_bytes)
        dtype = DATATYPES[datatype]
        try:
            parsed = np.array(data)
        except (ValueError, TypeError) as e:
            raise _bad(f"{where}.data: not a (nested) list of numbers: {e}") from None
        if parsed.size != count:
            raise _bad(f"{where}.data: holds {parsed.size} elements, shape {shape} needs {count}")
        if parsed.dtype != dtype and count:
            if parsed.dtype.kind not in _JSON_KINDS[dtype.kind]:
                raise _bad(f"{where}.data: values are not all valid {datatype}")
            if dtype.kind in "iu":
                low, high = INT_RANGES[datatype]
                if parsed.min() < low or parsed.max() > high:
                    raise _bad(f"{where}.data: values out of range for {datatype}")
        return parsed.astype(dtype, copy=False).reshape(shape)


def _bytes_from_json(data: list[Any], shape: list[int], count: int, where: str, max_bytes: int) -> np.ndarray:
    if len(data) != count:
        raise _bad(f"{where}.data: holds {len(data)} elements, shape {shape} needs {count} (BYTES data must be flat)")
    if not all(isinstance(item, str) for item in data):
        raise _bad(f"{where}.data: BYTES data must be a list of strings")
    items = [item.encode() for item in data]
    return bytes_array(items, shape, where, max_bytes)


def bytes_from_binary(
    chunk: bytes | memoryview, shape: list[int], count: int, where: str, max_bytes: int
) -> np.ndarray:
    """A BYTES tensor from its length-prefixed elements: straight into the padded array, no list of
    ``bytes`` (two passes: the widest element, then the copies; one numpy copy when all are as long)."""
    if count * 4 > len(chunk):
        raise _bad(f"{where}: {count} BYTES elements need at least {count * 4} bytes, binary_data_size is {len(chunk)}")
    raw = bytes(chunk)
    first = int.from_bytes(raw[:4], "little") if count else 0
    if count and len(raw) == count * (4 + first):
        rows = np.frombuffer(raw, np.uint8).reshape(count, 4 + first)
        if (rows[:, :4].copy().view("<u4") == first).all():  # every element is ``first`` bytes long
            _check_padded(max(first, 1) * count, where, max_bytes)
            if not first:
                return np.zeros(shape, "S1")
            return rows[:, 4:].copy().view(f"S{first}").reshape(shape)
    width = pos = 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise _bad(f"{where}: BYTES element length prefix runs past binary_data_size")
        length = int.from_bytes(raw[pos : pos + 4], "little")
        pos += 4 + length
        if pos > len(raw):
            raise _bad(f"{where}: BYTES element of {length} bytes runs past binary_data_size")
        width = max(width, length)
    if pos != len(raw):
        raise _bad(f"{where}: {len(raw) - pos} bytes after the last BYTES element")
    _check_padded(max(width, 1) * count, where, max_bytes)
    width = max(width, 1)
    out = bytearray(width * count)
    pos = 0
    for start in range(0, width * count, width):
        length = int.from_bytes(raw[pos : pos + 4], "little")
        out[start : start + length] = raw[pos + 4 : pos + 4 + length]
        pos += 4 + length
    return np.frombuffer(out, f"S{width}").reshape(shape)


def _check_padded(nbytes: int, where: str, max_bytes: int) -> None:
    if nbytes > max_bytes:
        raise InferenceError(413, f"{where}: BYTES tensor takes {nbytes} bytes padded, over {max_bytes}")


def bytes_array(items: list[bytes], shape: list[int], where: str, max_bytes: int) -> np.ndarray:
    """A BYTES tensor (numpy ``S``) of ``items``; 413 when padded to the longest it takes over ``max_bytes``."""
    width = max((len(item) for item in items), default=0) or 1
    _check_padded(width * len(items), where, max_bytes)
    return np.array(items, dtype=f"S{width}").reshape(shape)


def _to_json_data(array: np.ndarray, datatype: str) -> list[Any]:
    flat = array.reshape(-1)
    if datatype != BYTES:
        data: list[Any] = flat.tolist()
        return data
    if flat.dtype.kind == "U":
        return [str(item) for item in flat.tolist()]
    return [item.decode("utf-8", "replace") for item in flat.tolist()]


def to_binary(array: np.ndarray, datatype: str) -> bytes:
    """An output's raw bytes: little-endian row-major, BYTES elements each after its 4-byte length."""
    if datatype != BYTES:
        return np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
    items = [item.encode() if isinstance(item, str) else item for item in array.reshape(-1).tolist()]
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)
