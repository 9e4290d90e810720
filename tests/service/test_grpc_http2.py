"""The gRPC transport (``grpc_api.http2``) in-process: real calls with grpcio's client, and what real clients never
send (floods, broken prefaces, out-of-order streams) with a raw HTTP/2 client over asyncio streams."""

from __future__ import annotations

import asyncio
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import grpc
import pytest
from aqueduct_service.grpc_api.http2 import (
    CODES,
    MAX_CONTROL_FRAMES_PER_S,
    MAX_STREAMS,
    Call,
    GrpcError,
    GrpcServer,
    Limits,
    Method,
)
from hpack import Decoder, Encoder

from bench.processes import free_port

pytestmark = pytest.mark.timeout(60)

BOUND_S = 5.0  # how long a test waits for anything the server should do at once
T = TypeVar("T")

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x7, 0x8, 0xB
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

ECHO, STREAM, NOT_FOUND, BROKEN, TRAILERS, DEADLINE, METADATA, WAIT = (
    f"/test.T/{name}" for name in ("Echo", "Stream", "NotFound", "Broken", "Trailers", "Deadline", "Metadata", "Wait")
)


async def echo(message: memoryview, call: Call) -> bytes:
    return bytes(message)


async def three(message: memoryview, call: Call) -> AsyncIterator[bytes]:
    for i in range(3):
        yield b"%d" % i


async def not_found(message: memoryview, call: Call) -> bytes:
    raise GrpcError("NOT_FOUND", "x")


async def broken(message: memoryview, call: Call) -> bytes:
    raise ValueError("broken handler")


async def with_trailers(message: memoryview, call: Call) -> bytes:
    call.trailers.append(("x-trailer", "t"))
    return b""


async def time_remaining(message: memoryview, call: Call) -> bytes:
    return repr(call.time_remaining()).encode()


async def request_id(message: memoryview, call: Call) -> bytes:
    return call.metadata.get("x-request-id", "").encode()


@dataclass
class Gate:
    """A unary echo whose calls wait for ``release``; each puts its message in ``entered`` as it starts."""

    entered: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, message: memoryview, call: Call) -> bytes:
        self.entered.put_nowait(bytes(message))
        await self.release.wait()
        return bytes(message)

    async def wait_entered(self, calls: int) -> None:
        for _ in range(calls):
            await bounded(self.entered.get())


METHODS = {
    ECHO: Method(echo),
    STREAM: Method(three, "stream"),
    NOT_FOUND: Method(not_found),
    BROKEN: Method(broken),
    TRAILERS: Method(with_trailers),
    DEADLINE: Method(time_remaining),
    METADATA: Method(request_id),
}


async def bounded(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, BOUND_S)


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds (fails after ``BOUND_S``)."""
    deadline = time.monotonic() + BOUND_S
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(0.01)


@dataclass
class Served:
    server: GrpcServer
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a ``GrpcServer`` on a free port (``limits``, ``methods``); every one started is stopped after."""
    started: list[GrpcServer] = []

    async def start(limits: Limits | None = None, methods: Mapping[str, Method] = METHODS) -> Served:
        server = GrpcServer(methods, limits or Limits())
        port = free_port()
        await server.start("127.0.0.1", port)
        started.append(server)
        return Served(server, port)

    try:
        yield start
    finally:
        for server in started:
            await server.stop(0)


# -- a raw HTTP/2 client


class Frame(NamedTuple):
    kind: int
    flags: int
    sid: int
    payload: bytes


def pack(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I B I", len(payload) << 8 | kind, flags, sid) + payload


def grpc_message(message: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">?I", compressed, len(message)) + message


def split(data: bytes, size: int = 16384) -> list[bytes]:
    """``data`` in pieces of at most ``size`` bytes (the frame size a peer takes by default)."""
    return [data[i : i + size] for i in range(0, len(data), size)]


def goaway_code(frames: list[Frame]) -> int | None:
    """The error code of the last of ``frames`` if it is a GOAWAY."""
    if not frames or frames[-1].kind != GOAWAY:
        return None
    return int(struct.unpack(">II", frames[-1].payload)[1])


class Raw:
    """One HTTP/2 connection written frame by frame: what real clients never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder, self.decoder = Encoder(), Decoder()

    @classmethod
    async def open(cls, port: int, preface: bool = True) -> Raw:
        """Connect; with ``preface``, send the client preface and an empty SETTINGS frame."""
        raw = cls(*await bounded(asyncio.open_connection("127.0.0.1", port)))
        if preface:
            raw.send(PREFACE + pack(SETTINGS, 0, 0))
        return raw

    async def settled(self) -> None:
        """Wait for the server's acknowledgement of our SETTINGS: it has read all we sent so far."""
        frames = await self.until(lambda f: f.kind == SETTINGS and bool(f.flags & ACK))
        assert frames and frames[-1].kind == SETTINGS, frames

    def send(self, *data: bytes) -> None:
        self.writer.write(b"".join(data))

    def headers(self, sid: int, path: str = ECHO, method: str = "POST", flags: int = END_HEADERS) -> bytes:
        fields = [(":method", method), (":scheme", "http"), (":path", path), (":authority", "test")]
        fields += [("content-type", "application/grpc"), ("te", "trailers")]
        return pack(HEADERS, flags, sid, self.encoder.encode(fields))

    def request(self, sid: int, message: bytes, path: str = ECHO, compressed: bool = False) -> bytes:
        return self.headers(sid, path) + pack(DATA, END_STREAM, sid, grpc_message(message, compressed))

    async def frame(self) -> Frame | None:
        """The next frame; None once the server has closed the connection."""
        try:
            head = await self.reader.readexactly(9)
            length_kind, flags, sid = struct.unpack(">I B I", head)
            payload = await self.reader.readexactly(length_kind >> 8)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None
        return Frame(length_kind & 0xFF, flags, sid & 0x7FFFFFFF, payload)

    async def until(self, stop: Callable[[Frame], bool]) -> list[Frame]:
        """Frames up to the first that ``stop`` accepts, or to the connection's close (bounded)."""

        async def read() -> list[Frame]:
            frames: list[Frame] = []
            while (received := await self.frame()) is not None:
                frames.append(received)
                if stop(received):
                    break
            return frames

        return await bounded(read())

    async def until_closed(self) -> list[Frame]:
        return await self.until(lambda _: False)

    async def answers(self, *sids: int) -> dict[int, dict[str, str]]:
        """The header fields (headers and trailers) of streams ``sids``'s answers, read to their ends."""
        fields: dict[int, dict[str, str]] = {sid: {} for sid in sids}
        left = set(sids)

        async def read() -> None:
            while left:
                received = await self.frame()
                assert received is not None, f"closed before the answers of streams {sorted(left)}"
                kind, flags, sid, payload = received
                assert not (kind == RST_STREAM and sid in left), received
                if kind == HEADERS:  # every block, in order: they share the decoder's table
                    decoded = [(str(name), str(value)) for name, value in self.decoder.decode(payload)]
                    fields.get(sid, {}).update(decoded)
                if kind in (DATA, HEADERS) and flags & END_STREAM:
                    left.discard(sid)

        await bounded(read())
        return fields

    async def answer(self, sid: int) -> dict[str, str]:
        return (await self.answers(sid))[sid]

    def close(self) -> None:
        self.writer.close()


RawClients = Callable[..., Awaitable[Raw]]


@pytest.fixture
async def raw_clients() -> AsyncIterator[RawClients]:
    """Open raw connections (``Raw.open``); every one is closed after."""
    opened: list[Raw] = []

    async def open_(port: int, preface: bool = True) -> Raw:
        opened.append(await Raw.open(port, preface))
        return opened[-1]

    try:
        yield open_
    finally:
        for raw in opened:
            raw.close()


# -- grpcio's client


@pytest.mark.parametrize("size", [1, 0, 6 * 1024 * 1024], ids=["1 byte", "0 bytes", "6 MiB"])
async def test_a_unary_call_echoes_its_bytes_within_the_clients_windows(serve: Serve, size: int) -> None:
    """6 MiB is over grpcio's windows (4 MiB, stream and connection): the answer waits for its WINDOW_UPDATEs."""
    served = await serve()
    message = bytes(i % 251 for i in range(size))
    options = [("grpc.max_receive_message_length", 2 * size)]  # grpcio's own default is 4 MiB
    async with grpc.aio.insecure_channel(served.target, options=options) as channel:
        assert await bounded(channel.unary_unary(ECHO)(message)) == message


async def test_fifty_concurrent_calls_on_one_channel_are_each_answered(serve: Serve) -> None:
    served = await serve()
    async with grpc.aio.insecure_channel(served.target) as channel:
        call = channel.unary_unary(ECHO)
        answers = await bounded(asyncio.gather(*(call(b"call %d" % i) for i in range(50))))
    assert answers == [b"call %d" % i for i in range(50)]


async def test_a_streaming_method_yields_each_message(serve: Serve) -> None:
    served = await serve()
    async with grpc.aio.insecure_channel(served.target) as channel:
        call = channel.unary_stream(STREAM)(b"")

        async def messages() -> list[Any]:
            return [m async for m in call]

        assert await bounded(messages()) == [b"0", b"1", b"2"]
        assert await call.code() == grpc.StatusCode.OK


async def status_of(target: str, path: str) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await bounded(channel.unary_unary(path)(b"request"))
    return failed.value.code(), failed.value.details()


async def test_a_grpc_error_is_the_calls_status_and_details(serve: Serve) -> None:
    served = await serve()
    assert await status_of(served.target, NOT_FOUND) == (grpc.StatusCode.NOT_FOUND, "x")


async def test_a_handlers_exception_is_internal(serve: Serve) -> None:
    served = await serve()
    code, details = await status_of(served.target, BROKEN)
    assert code == grpc.StatusCode.INTERNAL and "ValueError" in details


async def test_an_unknown_path_is_unimplemented(serve: Serve) -> None:
    served = await serve()
    assert (await status_of(served.target, "/test.T/Nope"))[0] == grpc.StatusCode.UNIMPLEMENTED


async def test_call_trailers_arrive_as_trailing_metadata(serve: Serve) -> None:
    served = await serve()
    async with grpc.aio.insecure_channel(served.target) as channel:
        call = channel.unary_unary(TRAILERS)(b"")
        assert await bounded(call) == b""
        assert ("x-trailer", "t") in list(await call.trailing_metadata())


async def test_the_clients_timeout_is_the_calls_time_remaining(serve: Serve) -> None:
    served = await serve()
    async with grpc.aio.insecure_channel(served.target) as channel:
        remaining = float(await bounded(channel.unary_unary(DEADLINE)(b"", timeout=2.5)))
    assert 0 < remaining <= 2.5 * 1.01  # grpcio's core rounds the grpc-timeout it sends up: 2.5 s as 2500m or 2510m


async def test_the_clients_metadata_is_the_calls_metadata(serve: Serve) -> None:
    served = await serve()
    async with grpc.aio.insecure_channel(served.target) as channel:
        answer = await bounded(channel.unary_unary(METADATA)(b"", metadata=(("x-request-id", "abc"),)))
    assert answer == b"abc"


async def test_a_message_over_max_message_bytes_is_resource_exhausted_and_the_connection_serves_on(
    serve: Serve,
) -> None:
    served = await serve(Limits(max_message_bytes=1024))
    async with grpc.aio.insecure_channel(served.target) as channel:
        call = channel.unary_unary(ECHO)
        assert await bounded(call(b"a" * 1024)) == b"a" * 1024
        connections = list(served.server.connections)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await bounded(call(b"a" * 1025))
        assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await bounded(call(b"next")) == b"next"
        assert list(served.server.connections) == connections and len(connections) == 1


# -- a raw client: what real clients never send


async def test_bytes_that_are_not_the_preface_close_the_connection(serve: Serve, raw_clients: RawClients) -> None:
    served = await serve()
    raw = await raw_clients(served.port, preface=False)
    raw.send(b"GET / HTTP/1.1\r\n\r\n")
    assert goaway_code(await raw.until_closed()) == PROTOCOL_ERROR


async def test_a_silent_connection_is_closed_after_header_timeout(serve: Serve, raw_clients: RawClients) -> None:
    served = await serve(Limits(header_timeout=0.2))
    raw = await raw_clients(served.port, preface=False)
    start = time.monotonic()
    frames = await raw.until_closed()
    assert time.monotonic() - start >= 0.15
    assert [f.kind for f in frames] == [SETTINGS, WINDOW_UPDATE]  # the server's own, then the close


async def test_a_header_block_growing_past_max_header_bytes_closes_the_connection(
    serve: Serve, raw_clients: RawClients
) -> None:
    served = await serve(Limits(max_header_bytes=1024))
    raw = await raw_clients(served.port)
    block = raw.encoder.encode([(":method", "POST"), (":path", ECHO), ("x-big", "a" * 4096)], huffman=False)
    pieces = split(block, 512)[:3]  # one more than max_header_bytes holds
    raw.send(pack(HEADERS, 0, 1, pieces[0]), *(pack(CONTINUATION, 0, 1, piece) for piece in pieces[1:]))
    assert goaway_code(await raw.until_closed()) == ENHANCE_YOUR_CALM


async def test_pings_are_acknowledged_and_a_ping_flood_closes_the_connection(
    serve: Serve, raw_clients: RawClients
) -> None:
    served = await serve()
    raw = await raw_clients(served.port)
    raw.send(*(pack(PING, 0, 0, struct.pack(">Q", i)) for i in range(10)))
    frames = await raw.until(lambda f: f.kind == PING and f.payload == struct.pack(">Q", 9))
    acks = [(f.flags, struct.unpack(">Q", f.payload)[0]) for f in frames if f.kind == PING]
    assert acks == [(ACK, i) for i in range(10)]
    raw.send(*(pack(PING, 0, 0, bytes(8)) for _ in range(MAX_CONTROL_FRAMES_PER_S + 1)))
    assert goaway_code(await raw.until_closed()) == ENHANCE_YOUR_CALM


async def test_rapid_resets_close_the_connection(serve: Serve, raw_clients: RawClients) -> None:
    served = await serve()
    raw = await raw_clients(served.port)
    raw.send(
        *(
            raw.headers(sid) + pack(RST_STREAM, 0, sid, struct.pack(">I", CANCEL))
            for sid in range(1, 2 * (MAX_CONTROL_FRAMES_PER_S + 1), 2)
        )
    )
    assert goaway_code(await raw.until_closed()) == ENHANCE_YOUR_CALM


async def test_streams_over_max_streams_are_refused(serve: Serve, raw_clients: RawClients) -> None:
    served = await serve()
    raw = await raw_clients(served.port)
    sids = range(1, 2 * (MAX_STREAMS + 1), 2)
    raw.send(*(raw.headers(sid) for sid in sids))
    frames = await raw.until(lambda f: f.kind == RST_STREAM)
    assert [(f.sid, f.payload) for f in frames if f.kind == RST_STREAM] == [
        (sids[-1], struct.pack(">I", REFUSED_STREAM))
    ]
    raw.send(pack(DATA, END_STREAM, 1, grpc_message(b"still served")))
    assert (await raw.answer(1))["grpc-status"] == "0"


async def test_a_stream_id_below_a_previous_one_closes_the_connection(serve: Serve, raw_clients: RawClients) -> None:
    served = await serve()
    raw = await raw_clients(served.port)
    raw.send(raw.headers(3), raw.headers(1))
    assert goaway_code(await raw.until_closed()) == PROTOCOL_ERROR


async def test_a_compressed_message_is_unimplemented(serve: Serve, raw_clients: RawClients) -> None:
    served = await serve()
    raw = await raw_clients(served.port)
    raw.send(raw.request(1, b"zipped", compressed=True))
    answer = await raw.answer(1)
    assert (answer[":status"], answer["grpc-status"]) == ("200", "12")


async def test_a_request_other_than_post_is_405(serve: Serve, raw_clients: RawClients) -> None:
    served = await serve()
    raw = await raw_clients(served.port)
    raw.send(raw.headers(1, method="GET", flags=END_HEADERS | END_STREAM))
    assert (await raw.answer(1))[":status"] == "405"


async def test_a_request_whose_message_does_not_arrive_within_body_timeout_is_reset(
    serve: Serve, raw_clients: RawClients
) -> None:
    served = await serve(Limits(body_timeout=0.2))
    raw = await raw_clients(served.port)
    raw.send(raw.headers(1))
    start = time.monotonic()
    frames = await raw.until(lambda f: f.kind == RST_STREAM)
    assert time.monotonic() - start >= 0.15
    assert (frames[-1].sid, frames[-1].payload) == (1, struct.pack(">I", CANCEL))
    raw.send(raw.request(3, b"in time"))
    assert (await raw.answer(3))["grpc-status"] == "0"


async def test_a_client_that_does_not_read_its_answers_is_not_read_from(serve: Serve, raw_clients: RawClients) -> None:
    served = await serve()
    raw = await raw_clients(served.port)
    await raw.settled()
    (connection,) = served.server.connections
    transport = connection.transport
    assert transport is not None
    windows = pack(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 2**31 - 1))  # SETTINGS_INITIAL_WINDOW_SIZE
    windows += pack(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1 - 65535))
    raw.send(windows)  # the answers may all be sent at once as far as HTTP/2 goes: only TCP holds them back
    message, calls, bound = bytes(1024 * 1024), 32, 8 * 1024 * 1024
    for sid in range(1, 2 * calls, 2):
        raw.send(raw.headers(sid), *(pack(DATA, 0, sid, piece) for piece in split(grpc_message(message))))
        raw.send(pack(DATA, END_STREAM, sid))
    await eventually(lambda: not transport.is_reading() or transport.get_write_buffer_size() > bound)
    assert transport.get_write_buffer_size() <= bound
    answers = await raw.answers(*range(1, 2 * calls, 2))  # once read, every answer comes
    assert {fields["grpc-status"] for fields in answers.values()} == {"0"}


# -- connections


async def test_at_max_connections_a_new_connection_closes_the_oldest_idle_one(
    serve: Serve, raw_clients: RawClients
) -> None:
    served = await serve(Limits(max_connections=2))
    oldest, other = await raw_clients(served.port), await raw_clients(served.port)
    for raw in (oldest, other):
        await raw.settled()
    newest = await raw_clients(served.port)
    for raw in (newest, other):
        raw.send(pack(PING, 0, 0, b"served!!"))
        frames = await raw.until(lambda f: f.kind == PING)
        assert (frames[-1].flags, frames[-1].payload) == (ACK, b"served!!")
    assert goaway_code(await oldest.until_closed()) == NO_ERROR
    assert len(served.server.connections) == 2


async def test_a_burst_of_connections_at_max_connections_leaves_max_connections_open(
    serve: Serve, raw_clients: RawClients
) -> None:
    served = await serve(Limits(max_connections=2))
    for _ in range(2):
        await (await raw_clients(served.port)).settled()
    burst = await bounded(asyncio.gather(*(raw_clients(served.port, preface=False) for _ in range(10))))
    for raw in burst:  # the server's SETTINGS: each was admitted (closing an older one)
        assert [f.kind for f in await raw.until(lambda _: True)] == [SETTINGS]
    await eventually(lambda: len(served.server.connections) <= 2)


async def test_at_max_connections_with_every_connection_busy_a_new_one_is_refused(
    serve: Serve, raw_clients: RawClients
) -> None:
    gate = Gate()
    served = await serve(Limits(max_connections=2), {WAIT: Method(gate)})
    busy = [await raw_clients(served.port) for _ in range(2)]
    for raw in busy:
        raw.send(raw.request(1, b"busy", WAIT))
    await gate.wait_entered(2)
    refused = await raw_clients(served.port, preface=False)
    assert await refused.until_closed() == []  # not even the server's SETTINGS
    gate.release.set()
    for raw in busy:
        assert (await raw.answer(1))["grpc-status"] == "0"


async def test_stop_drains_calls_in_flight_and_refuses_new_connections(serve: Serve, raw_clients: RawClients) -> None:
    gate = Gate()
    served = await serve(methods={WAIT: Method(gate)})
    raw = await raw_clients(served.port)
    raw.send(raw.request(1, b"raw", WAIT))
    async with grpc.aio.insecure_channel(served.target) as channel:
        grpc_call = asyncio.ensure_future(channel.unary_unary(WAIT)(b"grpcio"))
        await gate.wait_entered(2)
        stopping = asyncio.ensure_future(served.server.stop(grace=5))
        goaway = await raw.until(lambda f: f.kind == GOAWAY)
        assert struct.unpack(">II", goaway[-1].payload) == (1, NO_ERROR)
        assert not stopping.done()
        gate.release.set()
        assert await bounded(grpc_call) == b"grpcio"
        assert (await raw.answer(1))["grpc-status"] == "0"
        assert await raw.until_closed() == []
        await bounded(stopping)
    with pytest.raises(ConnectionRefusedError):
        await bounded(asyncio.open_connection("127.0.0.1", served.port))


async def test_requests_still_arriving_hold_at_most_max_buffered_bytes(serve: Serve, raw_clients: RawClients) -> None:
    served = await serve(Limits(max_buffered_bytes=64 * 1024))
    raw = await raw_clients(served.port)
    big = grpc_message(bytes(100 * 1024))
    windows = pack(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 2**31 - 1))  # echoed answers may come whole
    raw.send(windows + pack(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1 - 65535)))
    # alone, a request over the budget is let in (max_message_bytes bounds it)
    raw.send(raw.headers(1), *(pack(DATA, 0, 1, piece) for piece in split(big)), pack(DATA, END_STREAM, 1))
    assert (await raw.answer(1))["grpc-status"] == "0"
    # while stream 3 holds half the budget unfinished, stream 5's bytes beyond it are dropped: UNAVAILABLE
    raw.send(raw.headers(3), pack(DATA, 0, 3, big[: 32 * 1024]))
    raw.send(raw.headers(5), *(pack(DATA, 0, 5, piece) for piece in split(big)), pack(DATA, END_STREAM, 5))
    assert (await raw.answer(5))["grpc-status"] == str(CODES["UNAVAILABLE"])
    raw.send(pack(DATA, END_STREAM, 3, big[32 * 1024 :]))
    assert (await raw.answer(3))["grpc-status"] == "0"
    assert served.server.buffered == 0


class Memory:
    """A method's ``gather``: bytearrays standing in for shared memory, each remembered with whether freed."""

    def __init__(self) -> None:
        self.given: list[Given] = []

    def __call__(self, nbytes: int) -> Given:
        self.given.append(Given(memoryview(bytearray(nbytes))))
        return self.given[-1]


class Given:
    def __init__(self, buffer: memoryview) -> None:
        self.buffer = buffer
        self.freed = False

    def free(self) -> None:
        self.freed = True


async def test_a_message_arrives_in_the_memory_its_method_gives_and_that_is_freed_after_the_call(
    serve: Serve, raw_clients: RawClients
) -> None:
    memory = Memory()
    seen: list[bool] = []

    async def in_memory(message: memoryview, call: Call) -> bytes:
        assert call.gathered is memory.given[-1] and not memory.given[-1].freed
        seen.append(message.obj is call.gathered.buffer.obj)  # a view of the given memory, not a copy
        return bytes(message[:4])

    served = await serve(methods={ECHO: Method(in_memory, gather=memory)})
    raw = await raw_clients(served.port)
    big = grpc_message(bytes(range(256)) * 512)
    raw.send(raw.headers(1), *(pack(DATA, 0, 1, piece) for piece in split(big)), pack(DATA, END_STREAM, 1))
    assert (await raw.answer(1))["grpc-status"] == "0"
    assert seen == [True] and [len(given.buffer) for given in memory.given] == [len(big)]
    await eventually(lambda: memory.given[0].freed)
    # more bytes than the message's prefix said: not one message, and the memory is freed all the same
    raw.send(raw.headers(3), pack(DATA, 0, 3, big), pack(DATA, END_STREAM, 3, b"more"))
    assert (await raw.answer(3))["grpc-status"] == str(CODES["INTERNAL"])
    # a stream reset halfway: its memory is freed
    raw.send(raw.headers(5), pack(DATA, 0, 5, big[:1000]), pack(RST_STREAM, 0, 5, struct.pack(">I", CANCEL)))
    await eventually(lambda: len(memory.given) == 3 and all(given.freed for given in memory.given))
    assert seen == [True]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_message_is_inflated_within_max_message_bytes(
    serve: Serve, raw_clients: RawClients, encoding: str
) -> None:
    served = await serve(Limits(max_message_bytes=1024 * 1024))
    raw = await raw_clients(served.port)
    windows = pack(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 2**31 - 1))  # the echoed answer may come whole
    raw.send(windows + pack(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1 - 65535)))

    def compressed(sid: int, data: bytes) -> bytes:
        packer = zlib.compressobj(wbits=31 if encoding == "gzip" else 15)
        message = packer.compress(data) + packer.flush()
        fields = [(":method", "POST"), (":scheme", "http"), (":path", ECHO), (":authority", "test")]
        fields += [("content-type", "application/grpc"), ("grpc-encoding", encoding)]
        return pack(HEADERS, END_HEADERS, sid, raw.encoder.encode(fields)) + pack(
            DATA, END_STREAM, sid, grpc_message(message, compressed=True)
        )

    text = b"the same words again and again " * 1000
    raw.send(compressed(1, text))
    frames = await raw.until(lambda f: f.sid == 1 and bool(f.flags & END_STREAM))
    assert b"".join(f.payload for f in frames if f.kind == DATA and f.sid == 1)[5:] == text
    raw.send(compressed(3, bytes(16 * 1024 * 1024)))  # inflates past max_message_bytes: stopped there
    assert (await raw.answer(3))["grpc-status"] == str(CODES["RESOURCE_EXHAUSTED"])
    raw.send(raw.headers(5) + pack(DATA, END_STREAM, 5, grpc_message(b"not deflated", compressed=True)))
    assert (await raw.answer(5))["grpc-status"] == str(CODES["UNIMPLEMENTED"])  # without grpc-encoding


async def test_grpcios_gzip_calls_are_answered(serve: Serve) -> None:
    served = await serve()
    message = bytes(range(256)) * 400
    async with grpc.aio.insecure_channel(served.target, compression=grpc.Compression.Gzip) as channel:
        assert await bounded(channel.unary_unary(ECHO)(message)) == message
