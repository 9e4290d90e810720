"""gRPC calls over HTTP/2 without TLS (h2c), served by an asyncio protocol in the front end's event loop.

grpcio's asyncio server runs gRPC core on threads of its own and wakes the event loop for each of a
call's events: in this pod that cost about three times the CPU of an HTTP request per call, and half a
millisecond of latency. Here the loop that runs HTTP reads the frames itself, so a call costs what an
HTTP request does (``bench/grpc_serving.py``). What it serves:

- unary calls and server-streaming calls (``Method``), by ``:path``; an unknown path is answered
  ``UNIMPLEMENTED``; the request is one message, uncompressed or compressed with ``gzip`` or ``deflate``
  (``grpc-encoding``; inflated to at most ``max_message_bytes``), answers are sent uncompressed;
- the client's ``grpc-timeout`` (``Call.time_remaining()``) and its metadata (``Call.metadata``); the
  answer's status, message and trailing metadata from ``GrpcError`` or ``Call.trailers``;
- a request's message arrives where its method's ``gather`` says (shared memory for ``ModelInfer``),
  else in ordinary memory, and is handed over without another copy (a view);
- flow control both ways: a stream may send ``STREAM_WINDOW`` bytes before it is acknowledged, a
  connection ``CONNECTION_WINDOW``; answers are sent as the client's windows allow, and the answers a
  turn of the event loop makes on one connection leave in one write.

Bounds (the client is not trusted): a message over ``max_message_bytes`` is answered
``RESOURCE_EXHAUSTED`` and its bytes are dropped; a header block over ``max_header_bytes`` closes the
connection (``CONTINUATION`` floods too); ``MAX_STREAMS`` streams at once per connection (more are
refused); more than ``MAX_CONTROL_FRAMES_PER_S`` pings, settings, resets or empty frames a second close
the connection (``ENHANCE_YOUR_CALM``: ping floods and rapid resets); the preface must arrive within
``header_timeout``, a request's message within ``body_timeout`` of its headers (else its stream is
reset); the requests still arriving on all connections may hold ``max_buffered_bytes`` (a request
beyond it is answered ``UNAVAILABLE``); a client that does not read its answers is not read from
either; at ``max_connections`` a new connection closes the oldest idle one, or is refused when none is
idle. Anything against the protocol closes the connection with ``GOAWAY``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

from hpack import Decoder, HPACKError
from hpack.hpack import encode_integer
from hpack.table import HeaderTable

log = logging.getLogger("aqueduct_service")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x5, 0x6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x7, 0x8, 0x9, 0xB
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE = 0x1, 0x3, 0x4
SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x5, 0x6
MAX_WINDOW = 2**31 - 1

#: Bytes a stream may send before we acknowledge them (a 150 KB image arrives without waiting for us).
STREAM_WINDOW = 4 * 1024 * 1024
#: Bytes all streams of a connection may send before we acknowledge them.
CONNECTION_WINDOW = 16 * 1024 * 1024
#: The largest frame we take (the client may send a large message in few frames).
MAX_FRAME_SIZE = 1024 * 1024
#: Streams open at once per connection; a client that opens more has them refused.
MAX_STREAMS = 256
#: Header blocks a connection keeps decoded.
DECODED_BLOCKS = 16
#: Pings, settings, resets and empty data frames a connection may send per second.
MAX_CONTROL_FRAMES_PER_S = 1000

#: gRPC status codes by name (``grpc.StatusCode`` without importing grpcio's core here).
CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "RESOURCE_EXHAUSTED": 8,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
}
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_FRAME_HEAD = struct.Struct(">I B I")  # length << 8 | type, flags, stream id (the length's 3 bytes split off)
_SETTING = struct.Struct(">HI")


class GrpcError(Exception):
    """End a call with a gRPC status other than OK: ``code`` a name of ``CODES``, ``message`` its detail."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Gathered(Protocol):
    """Memory a method has a request's message arrive in (``aqueduct.remote.Lease``: shared memory, so the
    message's tensors reach the flow's workers without another copy). The transport frees it once the
    call's handler has returned; whoever else holds it (the flow) keeps it until done."""

    buffer: memoryview

    def free(self) -> None: ...  # noqa: D102


@dataclass
class Call:
    """What a method's handler knows of its call and may add to its answer."""

    #: The request's headers (the client's metadata), names in lower case; values as sent.
    metadata: Mapping[str, str]
    #: Seconds left of the client's ``grpc-timeout`` when the call arrived (None: no deadline).
    timeout: float | None
    #: Trailing metadata to send with the status, as (name, value) pairs.
    trailers: list[tuple[str, str]] = field(default_factory=list)
    #: Where the message arrived, when the method's ``gather`` gave memory for it (its bytes are views of it).
    gathered: Gathered | None = None
    _start: float = field(default_factory=time.monotonic)

    def time_remaining(self) -> float | None:
        """Seconds left of the client's deadline (None: it set none)."""
        return None if self.timeout is None else self.timeout - (time.monotonic() - self._start)


Unary = Callable[[memoryview, Call], Awaitable[bytes]]
Streaming = Callable[[memoryview, Call], AsyncIterator[bytes]]


@dataclass(frozen=True)
class Method:
    """A method's handler: ``unary`` returns the answer's serialized message, ``stream`` yields them."""

    handler: Unary | Streaming
    kind: Literal["unary", "stream"] = "unary"
    #: Memory for a request's message of so many bytes (prefix included) to arrive in, or None (then
    #: ordinary memory); asked once the message's first frame says its length.
    gather: Callable[[int], Gathered | None] | None = None


@dataclass(frozen=True)
class Limits:
    """Per-process bounds (see the module docstring)."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 1000
    #: Bytes of requests not wholly arrived this process holds, of all connections; beyond, ``UNAVAILABLE``.
    max_buffered_bytes: int = 128 * 1024 * 1024


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return _FRAME_HEAD.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """HPACK literals without indexing: the same bytes whatever the client's table holds. They follow a
    table size update to 0, which a server may send first in any block: we never index, and so keep within
    whatever table size (``SETTINGS_HEADER_TABLE_SIZE``) the client allows, 0 included."""
    out = bytearray(b"\x20")
    for name, value in headers:
        out += b"\x00" + encode_integer(len(name), 7) + name + encode_integer(len(value), 7) + value
    return bytes(out)


def grpc_timeout(value: bytes) -> float:
    """Seconds of a ``grpc-timeout`` header value (at most 8 digits and a unit)."""
    digits, unit = value[:-1], value[-1:]
    if not 0 < len(digits) <= 8 or not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        raise ValueError(f"bad grpc-timeout {value!r}")
    return int(digits) * _TIMEOUT_UNITS[unit]


def _percent_encoded(message: str) -> bytes:
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in message.encode()[:4096])


#: ``grpc-encoding`` -> zlib's ``wbits`` for it.
ENCODINGS = {b"gzip": 31, b"deflate": 15}
#: Compressed messages at least this large are inflated in a thread (the event loop keeps answering).
INFLATE_IN_THREAD_BYTES = 256 * 1024
_ACCEPT_ENCODING = (b"grpc-accept-encoding", b"identity,gzip,deflate")
_RESPONSE_HEADERS = header_block([(b":status", b"200"), (b"content-type", b"application/grpc"), _ACCEPT_ENCODING])


class _ConnectionError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class _Stream:
    __slots__ = (
        "answering",
        "body",
        "gathered",
        "received",
        "call_task",
        "ended",
        "headers",
        "opened",
        "held",
        "over_budget",
        "oversized",
        "pending",
        "send_window",
        "sid",
        "unacked",
    )

    def __init__(self, sid: int, send_window: int) -> None:
        self.sid = sid
        self.opened = time.monotonic()
        self.headers: dict[bytes, bytes] = {}  # the request's (a repeated name: its last value)
        self.body: bytearray | memoryview = bytearray()
        self.received = 0  # bytes of the request's message (prefix included) so far
        self.gathered: Gathered | None = None  # where they go, when the method gave memory for them
        self.unacked = 0  # bytes received and not yet acknowledged with a WINDOW_UPDATE
        self.ended = False  # the client has sent all it will
        self.oversized = False
        self.over_budget = False  # its bytes came while the process held ``max_buffered_bytes`` of others
        self.held = 0  # bytes of its request counted in ``GrpcServer.buffered``
        self.send_window = send_window
        #: What waits to be sent: (bytes, whether they are a whole frame (else a message's), whether the last).
        self.pending: list[tuple[bytes | memoryview, bool, bool]] = []
        self.answering = False  # the answer's headers are sent (or queued)
        self.call_task: asyncio.Task[None] | None = None


class GrpcServer:
    """The calls of ``methods`` (by path, ``/package.Service/Method``) served on one listening socket."""

    def __init__(
        self, methods: Mapping[str, Method], limits: Limits, refused: Callable[[str, str], None] | None = None
    ) -> None:
        self.methods = dict(methods)
        self.limits = limits
        #: Told (path, code) of each call answered before its handler ran (unknown method, too large...).
        self.refused = refused
        self.connections: dict[H2Connection, None] = {}  # in the order they came
        self.buffered = 0  # bytes of requests not wholly arrived, of all connections
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (``SO_REUSEPORT``: every front-end process binds it)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: H2Connection(self), host, port, reuse_port=True)

    async def stop(self, grace: float) -> None:
        """Stop listening, tell every client to open no more streams, and close each connection once its
        calls are answered, or after ``grace`` seconds."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.go_away()
        deadline = time.monotonic() + grace
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.close()

    def admit(self, connection: H2Connection) -> bool:
        """Make room for ``connection`` at ``max_connections`` (closing the oldest idle one); False: no room."""
        if len(self.connections) >= self.limits.max_connections:
            idle = next((c for c in self.connections if not c.busy), None)
            if idle is None:
                return False
            idle.go_away()
            idle.close()
        self.connections[connection] = None
        return True


class H2Connection(asyncio.Protocol):
    """One client's HTTP/2 connection: frames in, calls dispatched, answers out."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.decoder = Decoder(max_header_list_size=self.limits.max_header_bytes)
        self._buffer = bytearray()  # the start of a frame not wholly arrived
        self._needed = 0  # the bytes it needs before anything can be done
        self._preface = False
        self._headers_of: _Stream | None = None  # a header block continues in CONTINUATION frames
        self._header_fragments = bytearray()
        self._header_end_stream = False
        self._last_sid = 0
        self._going_away = False
        self._closed = False
        self._recv_unacked = 0
        self._send_window = 65535
        self._peer_initial_window = 65535
        self._peer_max_frame = 16384
        self._control_frames = 0
        self._control_since = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._out: list[bytes] = []  # what this turn of the loop sends
        #: Header blocks decoded since the client's table last changed (a client sends the same block, of
        #: indexed fields, for call after call: it is decoded once)
        self._decoded: dict[bytes, list[tuple[bytes, bytes]]] = {}

    @property
    def busy(self) -> bool:
        """Whether a call of this connection is in progress."""
        return bool(self.streams)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if not self.server.admit(self):
            transport.abort()
            self._closed = True
            return
        settings = b"".join(
            _SETTING.pack(key, value)
            for key, value in (
                (SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS),
                (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (SETTINGS_MAX_FRAME_SIZE, MAX_FRAME_SIZE),
                (SETTINGS_MAX_HEADER_LIST_SIZE, self.limits.max_header_bytes),
            )
        )
        increment = struct.pack(">I", CONNECTION_WINDOW - 65535)
        transport.write(frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, increment))
        self._timer = asyncio.get_running_loop().call_later(self.limits.header_timeout, self._preface_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.server.connections.pop(self, None)
        for stream in self.streams.values():
            self._release(stream)
            _free(stream)
            if stream.call_task is not None:
                stream.call_task.cancel()
        self.streams.clear()

    def data_received(self, data: bytes) -> None:  # noqa: D102
        if self._closed:
            return
        if self._buffer:  # a large frame arrives in many reads: gather it, read it once whole
            self._buffer += data
            if len(self._buffer) < self._needed:
                return
            data, self._buffer = bytes(self._buffer), bytearray()
        try:
            used = self._frames(data)
        except _ConnectionError as e:
            log.debug("gRPC connection closed: %s", e)
            self._fail(e.code)
            return
        if used < len(data):
            self._buffer = bytearray(data[used:])

    # -- frames in

    def _frames(self, buffer: bytes) -> int:
        """Handle the whole frames at the start of ``buffer``; the bytes used."""
        pos = 0
        if not self._preface:
            if len(buffer) < len(PREFACE):
                if not PREFACE.startswith(buffer):
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client")
                self._needed = len(PREFACE)
                return 0
            if not buffer.startswith(PREFACE):
                raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client")
            self._preface = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            pos = len(PREFACE)
        view = memoryview(buffer)
        end = len(buffer)
        out: list[bytes] = []
        self._needed = 9
        while end - pos >= 9:
            head, flags, sid = _FRAME_HEAD.unpack_from(buffer, pos)
            length, kind = head >> 8, head & 0xFF
            if length > MAX_FRAME_SIZE:
                raise _ConnectionError(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            if end - pos - 9 < length:
                self._needed = 9 + length
                break
            payload = view[pos + 9 : pos + 9 + length]
            pos += 9 + length
            self._frame(kind, flags, sid & MAX_WINDOW, payload, out)
        if out:
            self._write(b"".join(out))
        return pos

    def _frame(self, kind: int, flags: int, sid: int, payload: memoryview, out: list[bytes]) -> None:
        if self._headers_of is not None and kind != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self._data(flags, sid, payload, out)
        elif kind == HEADERS:
            self._headers(flags, sid, payload, out)
        elif kind == CONTINUATION:
            if self._headers_of is None or self._headers_of.sid != sid:
                raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self._fragment(payload, flags, out)
        elif kind == SETTINGS:
            self._settings(flags, sid, payload, out)
        elif kind == PING:
            if sid or len(payload) != 8:
                raise _ConnectionError(PROTOCOL_ERROR if sid else FRAME_SIZE_ERROR, "bad PING")
            if not flags & ACK:
                self._count_control()
                out.append(frame(PING, ACK, 0, bytes(payload)))
        elif kind == WINDOW_UPDATE:
            self._window_update(sid, payload, out)
        elif kind == RST_STREAM:
            if not sid or len(payload) != 4:
                raise _ConnectionError(PROTOCOL_ERROR, "bad RST_STREAM")
            self._count_control()
            stream = self.streams.get(sid)
            if stream is not None:
                self._release(stream)
                self._forget(stream)
                if stream.call_task is not None:
                    stream.call_task.cancel()
        elif kind == GOAWAY:
            self._going_away = True
            if not self.streams:
                self.close()
        elif kind == PRIORITY:
            if len(payload) != 5:
                raise _ConnectionError(FRAME_SIZE_ERROR, "bad PRIORITY")
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "a client may not push")
        # other frame types are ignored, as the protocol says

    def _count_control(self) -> None:
        now = time.monotonic()
        if now - self._control_since > 1.0:
            self._control_since, self._control_frames = now, 0
        self._control_frames += 1
        if self._control_frames > MAX_CONTROL_FRAMES_PER_S:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "too many control frames")

    def _settings(self, flags: int, sid: int, payload: memoryview, out: list[bytes]) -> None:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "bad SETTINGS")
        self._count_control()
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "initial window over 2^31-1")
                delta, self._peer_initial_window = value - self._peer_initial_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not 16384 <= value <= 16777215:
                    raise _ConnectionError(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self._peer_max_frame = value
        out.append(frame(SETTINGS, ACK, 0))
        self._flush_pending(out)

    def _window_update(self, sid: int, payload: memoryview, out: list[bytes]) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = int.from_bytes(payload) & MAX_WINDOW
        if not sid:
            if not increment:
                raise _ConnectionError(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        else:
            stream = self.streams.get(sid)
            if stream is None:
                return  # a stream we have answered and forgotten
            stream.send_window += increment
            if not increment or stream.send_window > MAX_WINDOW:
                self._reset(stream, FLOW_CONTROL_ERROR if increment else PROTOCOL_ERROR, out)
                return
        self._flush_pending(out)

    def _headers(self, flags: int, sid: int, payload: memoryview, out: list[bytes]) -> None:
        if not sid:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        payload = _unpadded(flags, payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        stream = self.streams.get(sid)
        if stream is None:
            if sid <= self._last_sid or not sid % 2:
                raise _ConnectionError(PROTOCOL_ERROR, f"stream {sid} opened out of order")
            self._last_sid = sid
            stream = _Stream(sid, self._peer_initial_window)
            refuse = self._going_away or len(self.streams) >= MAX_STREAMS
            if not refuse:
                self.streams[sid] = stream
                self._arm_body_timer()
            elif flags & END_HEADERS:  # still decode its headers: the table they may add to is shared
                self._decode(bytes(payload))
                out.append(frame(RST_STREAM, 0, sid, struct.pack(">I", REFUSED_STREAM)))
                return
        elif stream.ended:
            raise _ConnectionError(STREAM_CLOSED, f"HEADERS on half-closed stream {sid}")
        self._headers_of = stream
        self._header_fragments = bytearray()
        self._header_end_stream = bool(flags & END_STREAM)
        self._fragment(payload, flags, out)

    def _fragment(self, payload: memoryview, flags: int, out: list[bytes]) -> None:
        stream = self._headers_of
        assert stream is not None
        self._header_fragments += payload
        if len(self._header_fragments) > self.limits.max_header_bytes:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "a header block over max_header_bytes")
        if not flags & END_HEADERS:
            return
        self._headers_of = None
        headers = self._decode(bytes(self._header_fragments))
        if stream.sid not in self.streams:  # refused while its block continued
            out.append(frame(RST_STREAM, 0, stream.sid, struct.pack(">I", REFUSED_STREAM)))
            return
        if not stream.headers:
            stream.headers = dict(headers)
        if self._header_end_stream:  # trailers (or a request without a message)
            stream.ended = True
            self._dispatch(stream, out)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        headers = self._decoded.get(block)
        if headers is not None:
            return headers
        table = self.decoder.header_table
        size, length, newest = _table_state(table)
        try:
            headers = [(bytes(name), bytes(value)) for name, value in self.decoder.decode(block, raw=True)]
        except HPACKError as e:
            raise _ConnectionError(COMPRESSION_ERROR, f"bad header block: {e}") from None
        after = _table_state(table)
        if after[:2] != (size, length) or after[2] is not newest:
            self._decoded.clear()  # the block changed the table: blocks that refer to it now mean other headers
        elif len(self._decoded) < DECODED_BLOCKS:  # a block that leaves the table as it is means the same again
            self._decoded[block] = headers
        return headers

    def _data(self, flags: int, sid: int, payload: memoryview, out: list[bytes]) -> None:
        if not sid:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        self._recv_unacked += size
        if self._recv_unacked > CONNECTION_WINDOW:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "data beyond the connection window")
        if self._recv_unacked >= CONNECTION_WINDOW // 2:
            out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._recv_unacked)))
            self._recv_unacked = 0
        stream = self.streams.get(sid)
        if stream is None or stream.ended:
            if sid > self._last_sid:
                raise _ConnectionError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            if stream is not None:
                self._reset(stream, STREAM_CLOSED, out)
            return  # a stream we reset or answered: its data only counts against the connection
        if not size and not flags & END_STREAM:
            self._count_control()
        payload = _unpadded(flags, payload)
        if not stream.oversized and not stream.over_budget:
            server = self.server
            end = stream.received + len(payload)
            if end > self.limits.max_message_bytes + 5:
                stream.oversized = True
                self._release(stream)
            elif server.buffered > stream.held and server.buffered + len(payload) > self.limits.max_buffered_bytes:
                # (a request alone is always let in: max_message_bytes bounds it)
                stream.over_budget = True
                self._release(stream)
            elif stream.gathered is not None or (not stream.received and self._gather(stream, payload)):
                gathered = cast(Gathered, stream.gathered)
                if end <= len(gathered.buffer):  # (more than the prefix said: not one message, answered so)
                    gathered.buffer[stream.received : end] = payload
            elif flags & END_STREAM and not stream.received:
                stream.body = payload  # the whole message in one frame: no copy
            else:
                cast(bytearray, stream.body).extend(payload)  # a view only ever holds a whole message
            stream.received = end
            if not stream.oversized and not stream.over_budget:
                stream.held += len(payload)
                server.buffered += len(payload)
        if flags & END_STREAM:
            stream.ended = True
            self._dispatch(stream, out)
            return
        stream.unacked += size
        if stream.unacked >= STREAM_WINDOW // 2:
            out.append(frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", stream.unacked)))
            stream.unacked = 0

    # -- calls

    def _dispatch(self, stream: _Stream, out: list[bytes]) -> None:
        """Start the call of ``stream``, whose request has wholly arrived, or answer it at once."""
        self._release(stream)  # its bytes are the call's now (or dropped)
        headers = stream.headers
        path = headers.get(b":path", b"")
        if headers.get(b":method") != b"POST" or not headers.get(b"content-type", b"").startswith(b"application/grpc"):
            status = b"405" if headers.get(b":method") != b"POST" else b"415"
            out.append(frame(HEADERS, END_HEADERS | END_STREAM, stream.sid, header_block([(b":status", status)])))
            self._forget(stream)
            return
        method = self.server.methods.get(path.decode("latin-1"))
        gathered = stream.gathered
        body = gathered.buffer[: stream.received] if gathered is not None else stream.body
        failure: GrpcError | None = None
        timeout = None
        if method is None:
            failure = GrpcError("UNIMPLEMENTED", f"unknown method {path.decode('latin-1')}")
        elif stream.oversized:
            failure = GrpcError(
                "RESOURCE_EXHAUSTED", f"the request is larger than max_body_bytes ({self.limits.max_message_bytes})"
            )
        elif stream.over_budget:
            failure = GrpcError("UNAVAILABLE", "the server is reading too many requests at once; retry")
        elif len(body) < 5 or stream.received != len(body) or int.from_bytes(body[1:5]) != len(body) - 5:
            failure = GrpcError("INTERNAL", "a unary call must send exactly one message")
        elif body[0] and headers.get(b"grpc-encoding") not in ENCODINGS:
            encoding = headers.get(b"grpc-encoding", b"").decode("latin-1")
            failure = GrpcError("UNIMPLEMENTED", f"grpc-encoding {encoding!r} is not supported (gzip, deflate)")
        elif b"grpc-timeout" in headers:
            try:
                timeout = grpc_timeout(headers[b"grpc-timeout"])
            except ValueError as e:
                failure = GrpcError("INTERNAL", str(e))
        if failure is not None:
            self._forget(stream)
            out.append(_status_frame(stream.sid, failure, [], with_headers=True))
            self._refused(path, failure)
            return
        assert method is not None
        metadata = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items() if not k.startswith(b":")}
        call = Call(metadata, timeout, gathered=gathered)
        stream.body, stream.gathered = bytearray(), None  # the call's now
        message = memoryview(body)[5:]
        wbits = ENCODINGS[headers[b"grpc-encoding"]] if body[0] else None
        stream.call_task = asyncio.ensure_future(self._run(stream, method, message, call, wbits))

    async def _run(self, stream: _Stream, method: Method, message: memoryview, call: Call, wbits: int | None) -> None:
        try:
            if wbits is not None:
                try:
                    message = await self._inflated(message, wbits)
                except GrpcError as e:
                    self._end(stream, call, e)
                    self._refused(stream.headers.get(b":path", b""), e)
                    return
            await self._answer(stream, method, message, call)
        finally:
            if call.gathered is not None:  # whoever else holds it (the flow) keeps it
                call.gathered.free()

    async def _answer(self, stream: _Stream, method: Method, message: memoryview, call: Call) -> None:
        failure: GrpcError | None = None
        try:
            if method.kind == "unary":
                answer = await cast(Unary, method.handler)(message, call)
                self._send(stream, [answer])
            else:
                started = False
                async for answer in cast(Streaming, method.handler)(message, call):
                    self._send(stream, [answer], headers=not started)
                    started = True
                if not started:
                    self._send(stream, [])
        except GrpcError as e:
            failure = e
        except asyncio.CancelledError:  # the client reset the stream or left
            return
        except Exception as e:  # the handler's own failure: answered, never a dropped stream
            log.exception("gRPC call failed")
            failure = GrpcError("INTERNAL", f"internal error: {type(e).__name__}: {e}")
        self._end(stream, call, failure)

    async def _inflated(self, message: memoryview, wbits: int) -> memoryview:
        """A compressed message inflated, to at most ``max_message_bytes`` (a zip bomb stops there)."""
        limit = self.limits.max_message_bytes

        def inflate() -> bytes:
            inflater = zlib.decompressobj(wbits)
            try:
                data = inflater.decompress(message, limit + 1)
            except zlib.error as e:
                raise GrpcError("INTERNAL", f"the compressed message does not inflate: {e}") from None
            if len(data) > limit:
                raise GrpcError("RESOURCE_EXHAUSTED", f"the request is larger than max_body_bytes ({limit})")
            return data

        data = await asyncio.to_thread(inflate) if len(message) >= INFLATE_IN_THREAD_BYTES else inflate()
        return memoryview(data)

    def _end(self, stream: _Stream, call: Call, failure: GrpcError | None) -> None:
        """End ``stream``'s answer with its status (OK without ``failure``)."""
        if self._closed or self.streams.get(stream.sid) is not stream:
            return
        if failure is not None and not stream.answering:
            self._forget(stream)
            self._write(_status_frame(stream.sid, failure, call.trailers, with_headers=True))
        else:
            self._queue(stream, _status_frame(stream.sid, failure, call.trailers), is_frame=True, last=True)

    def _send(self, stream: _Stream, messages: list[bytes], headers: bool = True) -> None:
        if self._closed or self.streams.get(stream.sid) is not stream:
            return
        if headers:
            stream.answering = True
            stream.pending.append((frame(HEADERS, END_HEADERS, stream.sid, _RESPONSE_HEADERS), True, False))
        for message in messages:
            # uncompressed: flag 0, then the length
            # (a view: the DATA frames it is cut into are slices of it, not copies of the rest each)
            stream.pending.append((memoryview(len(message).to_bytes(5) + message), False, False))
        self._queue(stream)

    def _queue(self, stream: _Stream, data: bytes = b"", is_frame: bool = False, last: bool = False) -> None:
        if data:
            stream.pending.append((data, is_frame, last))
        out: list[bytes] = []
        self._flush(stream, out)
        if out:
            self._write(b"".join(out))

    # -- frames out

    def _flush(self, stream: _Stream, out: list[bytes]) -> None:
        """Frame what ``stream`` has to send as far as the windows allow; ``pending`` holds whole frames
        (headers, trailers) and message bytes (to split into DATA frames)."""
        while stream.pending:
            chunk, is_frame, last = stream.pending[0]
            if is_frame:
                out.append(bytes(chunk))  # (frames are bytes already: no copy)
                stream.pending.pop(0)
                if last:
                    self._forget(stream)
                continue
            room = min(self._send_window, stream.send_window, self._peer_max_frame)
            if room <= 0:
                return
            piece = chunk[:room]
            out.append(frame(DATA, 0, stream.sid, bytes(piece)))
            self._send_window -= len(piece)
            stream.send_window -= len(piece)
            if len(piece) == len(chunk):
                stream.pending.pop(0)
            else:
                stream.pending[0] = (chunk[room:], False, last)

    def _flush_pending(self, out: list[bytes]) -> None:
        for stream in list(self.streams.values()):
            if stream.pending:
                self._flush(stream, out)

    def _forget(self, stream: _Stream) -> None:
        """``stream`` is over; a connection told to go away closes once it has no stream left."""
        _free(stream)  # what its message arrived in, unless a call took it
        self.streams.pop(stream.sid, None)
        if self._going_away and not self.streams:
            self._close_soon()

    def _release(self, stream: _Stream) -> None:
        """Stop counting ``stream``'s request in ``GrpcServer.buffered`` (and drop what it gathered)."""
        self.server.buffered -= stream.held
        stream.held = 0
        if stream.oversized or stream.over_budget:
            stream.body = bytearray()
            _free(stream)

    def _refused(self, path: bytes, failure: GrpcError) -> None:
        if self.server.refused is not None:
            self.server.refused(path.decode("latin-1"), failure.code)

    def _gather(self, stream: _Stream, payload: memoryview) -> bool:
        """Have the stream's method give memory for its message, which ``payload`` starts; whether it did."""
        if len(payload) < 5 or payload[0]:
            return False
        path = stream.headers.get(b":path", b"").decode("latin-1")
        method = self.server.methods.get(path)
        size = 5 + int.from_bytes(payload[1:5])
        if method is None or method.gather is None or size > self.limits.max_message_bytes + 5:
            return False
        stream.gathered = method.gather(size)
        return stream.gathered is not None

    def _reset(self, stream: _Stream, code: int, out: list[bytes]) -> None:
        self._release(stream)
        self._forget(stream)
        if stream.call_task is not None:
            stream.call_task.cancel()
        out.append(frame(RST_STREAM, 0, stream.sid, struct.pack(">I", code)))

    def _write(self, data: bytes) -> None:
        """Send ``data`` at the end of this turn of the loop, with whatever else this connection sends in it
        (the answers of one batch leave in one write)."""
        if self._closed:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush_out)
        self._out.append(data)

    def _flush_out(self) -> None:
        out, self._out = self._out, []
        if out and not self._closed and self.transport is not None:
            self.transport.writelines(out)

    # -- ending

    def go_away(self) -> None:
        """Tell the client to open no more streams (those it opened are answered), and close once idle."""
        if self._closed:
            return
        self._going_away = True
        self._write(frame(GOAWAY, 0, 0, struct.pack(">II", self._last_sid, NO_ERROR)))
        if not self.streams:
            self._close_soon()

    def _close_soon(self) -> None:
        asyncio.get_running_loop().call_soon(self.close)

    def close(self) -> None:
        """Close the connection (its calls in flight are cancelled)."""
        self.server.connections.pop(self, None)  # at once: a connection let in this turn counts right
        if self.transport is not None and not self._closed:
            self._flush_out()
            self.transport.close()
        self._closed = True

    def _fail(self, code: int) -> None:
        self._write(frame(GOAWAY, 0, 0, struct.pack(">II", self._last_sid, code)))
        self.close()

    def _preface_timed_out(self) -> None:
        if not self._preface:
            self.close()

    def _check_bodies(self) -> None:
        """Reset the streams whose request has not wholly arrived within ``body_timeout``."""
        self._timer = None
        now = time.monotonic()
        out: list[bytes] = []
        waiting = False
        for stream in list(self.streams.values()):
            if not stream.ended:
                if now - stream.opened >= self.limits.body_timeout:
                    self._reset(stream, CANCEL, out)
                else:
                    waiting = True
        if out:
            self._write(b"".join(out))
        if waiting:
            self._arm_body_timer()

    def _arm_body_timer(self) -> None:
        if self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(self.limits.body_timeout / 4, self._check_bodies)

    # -- the transport's buffer

    def pause_writing(self) -> None:
        """The client reads its answers slower than it asks: read no more of its requests meanwhile."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:  # noqa: D102
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()


def _table_state(table: HeaderTable) -> tuple[int, int, object]:
    """What changes when a header block changes an HPACK table: its size, its length and its newest entry
    (every insertion makes a new object)."""
    entries = table.dynamic_entries
    return table.maxsize, len(entries), entries[0] if entries else None


def _free(stream: _Stream) -> None:
    if stream.gathered is not None:
        stream.gathered.free()
        stream.gathered = None


def _unpadded(flags: int, payload: memoryview) -> memoryview:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise _ConnectionError(PROTOCOL_ERROR, "bad padding")
    return payload[1 : len(payload) - payload[0]]


def _status_frame(
    sid: int, failure: GrpcError | None, trailers: list[tuple[str, str]], with_headers: bool = False
) -> bytes:
    """The frame that ends a call: its status (OK without ``failure``) and trailing metadata;
    ``with_headers``: a trailers-only answer (nothing else was sent)."""
    fields = [(b":status", b"200"), (b"content-type", b"application/grpc"), _ACCEPT_ENCODING] if with_headers else []
    fields.append((b"grpc-status", str(CODES[failure.code] if failure else 0).encode()))
    if failure is not None:
        fields.append((b"grpc-message", _percent_encoded(failure.message)))
    fields += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in trailers]
    return frame(HEADERS, END_HEADERS | END_STREAM, sid, header_block(fields))
