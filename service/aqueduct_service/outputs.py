"""What a request gets back: the outputs its handlers set, checked against the model's declared outputs.

A handler bug (an output not set, a wrong datatype or shape) is the server's fault, so it is a 500
naming the output, what the model declares and what the handler set; it is logged, and the request's
neighbours in the batch are unaffected. A lossless cast is made where the datatypes differ only by
width (``int32`` set for ``INT64``, ``float32`` for ``FP64``): numpy's ``safe`` casts, less those from
64-bit integers to ``FP64``, which would round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from .errors import InferenceError
from .inference import BYTES, DATATYPES, InferRequest, datatype_of
from .settings import TensorSpec

log = logging.getLogger("aqueduct_service")


def declared_outputs(
    request: InferRequest, outputs: Mapping[str, np.ndarray], declared: Sequence[TensorSpec], batch_dim: bool
) -> dict[str, np.ndarray]:
    """The outputs to send back: every declared output, checked and cast (all of ``outputs`` when none are declared).

    Outputs a step set that the model does not declare (a pre-processing step's intermediates) are
    not sent back. With ``batch_dim`` the first dimension of every output must be the request's rows.

    Raises:
        InferenceError: 500 naming the output, the declared and the found datatype or shape.
    """
    if not declared:
        return dict(outputs)
    rows = next(iter(request.inputs.values())).shape[0] if batch_dim and request.inputs else None
    checked: dict[str, np.ndarray] = {}
    for spec in declared:
        if spec.name not in outputs:
            raise _wrong(spec.name, "was not set by the handler", f"{spec.datatype} {list(spec.shape)}", None)
        checked[spec.name] = _checked(spec, outputs[spec.name], rows)
    return checked


def _checked(spec: TensorSpec, value: object, rows: int | None) -> np.ndarray:
    array = value if type(value) is np.ndarray else np.asarray(value)
    dtype = array.dtype
    if dtype != DATATYPES.get(spec.datatype) and not (spec.datatype == BYTES and dtype.kind in "SU"):
        found = datatype_of(array)
        if found != spec.datatype:
            array = _cast(spec, array, found)
    shape = array.shape
    expected = spec.shape if rows is None else (rows, *spec.shape[1:])
    if shape != expected and (
        len(shape) != len(expected) or any(want not in (-1, got) for want, got in zip(expected, shape, strict=True))
    ):
        raise _wrong(spec.name, "has the wrong shape", list(expected), list(shape))
    return array


def _cast(spec: TensorSpec, array: np.ndarray, found: str | None) -> np.ndarray:
    """``array`` as ``spec.datatype`` when the cast loses nothing; else the 500."""
    label = found or f"numpy {array.dtype}"
    if spec.datatype == BYTES or found in (None, BYTES):
        raise _wrong(spec.name, "has the wrong datatype", spec.datatype, label)
    target = DATATYPES[spec.datatype]
    rounds = array.dtype.kind in "iu" and target.kind == "f" and array.dtype.itemsize >= target.itemsize
    if not np.can_cast(array.dtype, target, casting="safe") or rounds:
        raise _wrong(spec.name, "has the wrong datatype", spec.datatype, label)
    return array.astype(target)


def _wrong(name: str, what: str, expected: object, found: object) -> InferenceError:
    message = f"output {name!r} {what}: expected {expected}"
    if found is not None:
        message += f", the handler set {found}"
    log.error("%s", message)
    error = InferenceError(500, message)
    error.extra = {"output": name, "expected": expected, "found": found}
    return error
