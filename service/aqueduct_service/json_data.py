"""Large JSON request bodies: numeric tensor ``data`` parsed by numpy, never as Python lists.

A JSON body of ``SPLIT_MIN_BYTES`` or more has every ``"data": [...]`` array of numbers (or
``true``/``false``) of ``SPAN_MIN_BYTES`` or more cut out before the JSON parser sees it: each is
replaced by a placeholder string no client can guess, and parsed later, 1 MiB at a time, straight
into an array of the tensor's datatype (memory: the array, plus 1 MiB). What is left of the JSON
may take at most ``MAX_JSON_BYTES`` (else 413): large ``BYTES`` tensors, and large arrays anywhere
but in an input's ``data``, are refused in JSON; the binary tensor extension carries them.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import numpy as np
import orjson

from .errors import InferenceError

SPLIT_MIN_BYTES = 1 << 20
SPAN_MIN_BYTES = 64 << 10
MAX_JSON_BYTES = 1 << 20
_CHUNK = 1 << 20
_DATA_KEY = re.compile(rb'"data"\s*:\s*(?=\[)')
# what a JSON array of numbers or booleans is made of; other words (null, NaN) are refused when parsed
_ARRAY_RUN = re.compile(rb"[-+.0-9A-Za-z,\s\[\]]*")
_NUMBER_CHARS = b"0123456789+-.eE,[] \t\r\n"
_BOOL_CHARS = b"truefals,[] \t\r\n"
_LONG_INTEGER = re.compile(rb"-?\d{19,}")


class SplitJson:
    """A JSON text with its large ``data`` arrays cut out: ``text`` for the JSON parser, ``spans`` by placeholder."""

    def __init__(self, text: bytes | memoryview, spans: dict[str, memoryview]) -> None:
        self.text = text
        self.spans = spans

    def take(self, value: Any) -> memoryview | None:
        """The array cut out where the parsed JSON holds ``value``, or None when ``value`` is no placeholder."""
        if isinstance(value, str) and value in self.spans:
            return self.spans.pop(value)
        return None


def split_json(header: bytes | memoryview) -> SplitJson:
    """Cut the large ``data`` arrays out of the JSON text ``header`` (see the module docstring).

    Raises:
        InferenceError: 413 when the JSON left is over ``MAX_JSON_BYTES``.
    """
    if len(header) < SPLIT_MIN_BYTES:
        return SplitJson(header, {})
    view = memoryview(header)
    nonce = secrets.token_hex(8)
    pieces: list[bytes | memoryview] = []
    spans: dict[str, memoryview] = {}
    pos = 0
    for match in _DATA_KEY.finditer(view):
        start = match.end()
        run = _ARRAY_RUN.match(view, start)
        end = run.end() if run else start
        while end > start and view[end - 1] in b" \t\r\n,":
            end -= 1
        if end - start < SPAN_MIN_BYTES or view[end - 1] != ord("]"):
            continue
        placeholder = f"\x00aqueduct-data:{nonce}:{len(spans)}"
        pieces += [view[pos:start], orjson.dumps(placeholder)]
        spans[placeholder] = view[start:end]
        pos = end
    if not spans:
        rest = len(view)
    else:
        pieces.append(view[pos:])
        rest = sum(len(piece) for piece in pieces)
    if rest > MAX_JSON_BYTES:
        raise InferenceError(
            413,
            f"the request's JSON is {rest} bytes besides large numeric input data, over the limit of "
            f"{MAX_JSON_BYTES}: send large tensors (and any BYTES tensor) with the binary tensor extension",
        )
    return SplitJson(b"".join(pieces) if spans else header, spans)


def parse_numbers(span: memoryview, datatype: str, dtype: np.dtype[Any], count: int, where: str) -> np.ndarray:
    """Parse the JSON array ``span`` (nested lists of numbers, or of booleans for ``BOOL``) as ``count``
    values of the OIP ``datatype`` (numpy ``dtype``), a chunk at a time.

    Raises:
        InferenceError: 400 naming what is wrong with the data.
    """
    if count > len(span) // 2 + 1:
        raise _bad(f"{where}.data: {len(span)} bytes of JSON cannot hold the {count} elements its shape needs")
    out = np.empty(count, dtype)
    filled = depth = pos = 0
    while pos < len(span):
        end = min(pos + _CHUNK, len(span))
        chunk = bytes(span[pos:end])
        if end < len(span):
            cut = chunk.rfind(b",")
            if cut < 0:
                raise _bad(f"{where}.data: an element of over {_CHUNK} bytes")
            chunk, end = chunk[:cut], pos + cut + 1
        depth = _check_brackets(chunk, depth, end == len(span), where)
        compact = chunk.translate(None, b" \t\r\n")
        if b",," in compact or b",]" in compact or b"[," in compact or (pos and compact[:1] in (b",", b"]")):
            raise _bad(f"{where}.data: an element is missing between commas or brackets")
        values = _parse_chunk(chunk, datatype, dtype, where)
        if filled + len(values) > count:
            raise _bad(f"{where}.data: holds more than the {count} elements its shape needs")
        out[filled : filled + len(values)] = values
        filled += len(values)
        pos = end
    if filled != count:
        raise _bad(f"{where}.data: holds {filled} elements, its shape needs {count}")
    return out


def _check_brackets(chunk: bytes, depth: int, last: bool, where: str) -> int:
    """The nesting depth after ``chunk``, which began at ``depth``; refuse brackets that close the array
    before its end (``[1][2]``) or leave it open."""
    raw = np.frombuffer(chunk, np.uint8)
    opens = raw == ord("[")
    brackets = np.flatnonzero(opens | (raw == ord("]")))
    if not len(brackets):  # the depth changes only at brackets; the span ends with one
        return depth
    levels = depth + np.cumsum(np.where(opens[brackets], 1, -1))
    inner = levels[:-1] if last else levels
    if (len(inner) and int(inner.min()) < 1) or (last and int(levels[-1]) != 0):
        raise _bad(f"{where}.data: brackets do not match")
    return int(levels[-1])


def _parse_chunk(chunk: bytes, name: str, dtype: np.dtype[Any], where: str) -> np.ndarray:
    if dtype.kind == "b":
        if chunk.translate(None, _BOOL_CHARS):
            raise _bad(f"{where}.data: values are not all valid {name}")
        chunk = chunk.replace(b"true", b"1").replace(b"false", b"0")
        if chunk.translate(None, b"01,[] \t\r\n"):
            raise _bad(f"{where}.data: values are not all valid {name}")
        flags: np.ndarray = _from_text(chunk, np.dtype(np.uint8), where, name) != 0
        return flags
    if chunk.translate(None, _NUMBER_CHARS):
        raise _bad(f"{where}.data: values are not all valid {name}")
    parse: np.dtype[Any] = np.dtype(np.float64 if dtype.kind == "f" else np.uint64 if dtype == np.uint64 else np.int64)
    values = _from_text(chunk, parse, where, name)
    if dtype.kind in "iu" and len(values):
        info = np.iinfo(dtype)
        low, high = int(values.min()), int(values.max())
        # the parser clamps what is beyond 64 bits to the extremes: those are read again exactly
        clamped = {low, high} & {int(np.iinfo(parse).min), int(np.iinfo(parse).max)}
        if low < info.min or high > info.max or (clamped and _beyond(chunk, int(info.min), int(info.max))):
            raise _bad(f"{where}.data: values out of range for {name}")
    return values


def _beyond(chunk: bytes, low: int, high: int) -> bool:
    return any(not low <= int(digits) <= high for digits in _LONG_INTEGER.findall(chunk))


def _from_text(chunk: bytes, dtype: np.dtype[Any], where: str, name: str) -> np.ndarray:
    text = chunk.translate(None, b"[]")
    if not text.strip(b" \t\r\n,"):
        if text.count(b","):
            raise _bad(f"{where}.data: values are not all valid {name}")
        return np.empty(0, dtype)
    try:
        return np.fromstring(text, dtype=dtype, sep=",")
    except ValueError:
        raise _bad(f"{where}.data: values are not all valid {name}") from None


def _bad(message: str) -> InferenceError:
    return InferenceError(400, message)
