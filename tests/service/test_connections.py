"""Connection hygiene over raw sockets: header size, head and body timeouts, the connection cap, SIGTERM."""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .conftest import Server, echo_config

pytestmark = pytest.mark.timeout(120)

LIMITS = {"max_header_bytes": 4096, "header_timeout": 1, "body_timeout": 1, "keepalive_timeout": 1}
BOUND_S = 15.0  # how long a test waits for the server to act on a limit of about 1 s


def start(workdir: Path, **server: object) -> Server:
    config = echo_config()
    config["server"].update(LIMITS, **server)
    path = workdir / f"pipeline-{len(list(workdir.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = Server(path, workdir, {"AQUEDUCT_SERVER__WORKERS": "1"})
    started.wait_ready()
    return started


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = start(tmp_path_factory.mktemp("connections"), max_connections=16)
    try:
        yield started
    finally:
        started.stop()


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=BOUND_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails after ``BOUND_S``)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_a_head_over_the_limit_is_431_and_closed(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 16384 + b"\r\n\r\n")
        assert status_of(read_until_closed(sock)) == 431


def test_a_head_within_the_limit_is_served_on_a_kept_alive_connection(server: Server) -> None:
    with connect(server) as sock:
        for _ in range(2):
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Ok: " + b"a" * 1024 + b"\r\n\r\n")
            assert status_of(sock.recv(65536)) == 200


@pytest.mark.parametrize("sent", [b"", b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"], ids=["idle", "unfinished-head"])
def test_a_connection_without_a_whole_head_is_closed_after_header_timeout(server: Server, sent: bytes) -> None:
    with connect(server) as sock:
        sock.sendall(sent)
        assert status_of(read_until_closed(sock)) == 408


def test_a_trickling_head_is_closed_after_header_timeout(server: Server) -> None:
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: 1\r\n" * 1000
    with connect(server) as sock:
        deadline = time.monotonic() + BOUND_S
        for byte in head:  # slowloris: a byte every 50 ms, never finishing the head
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable or time.monotonic() > deadline:
                break
            sock.sendall(bytes([byte]))
        assert status_of(read_until_closed(sock)) == 408


def test_a_body_that_does_not_arrive_in_time_closes_the_connection(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b'POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"inputs"')
        assert read_until_closed(sock) == b""  # closed without an answer: the client is too slow
    assert server.client.get("/v2/health/ready").status_code == 200


def infer_head(body: bytes) -> bytes:
    return f"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


BODY = b'{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[1]}]}'


def test_at_max_connections_idle_ones_make_room_and_busy_ones_refuse(tmp_path: Path) -> None:
    server = start(tmp_path, max_connections=8, header_timeout=60, body_timeout=60)
    held: list[socket.socket] = []
    try:
        server.client.close()  # no connection of ours but the ones below
        held = [connect(server) for _ in range(12)]  # idle: each new one beyond 8 closes the oldest idle one
        assert all(status_of(read_until_closed(sock)) == 408 for sock in held[:4])
        with connect(server) as sock:  # a client with a request still gets in
            sock.sendall(infer_head(BODY))
            assert status_of(sock.recv(65536)) == 200
        for sock in held:
            sock.close()
        held = [connect(server) for _ in range(8)]
        for sock in held:  # eight requests in progress: the server has read their heads, they send a body
            sock.sendall(
                infer_head(b"").replace(b"Content-Length: 0", b"Expect: 100-continue\r\nContent-Length: %d" % len(BODY))
            )
            assert status_of(sock.recv(65536)) == 100
        with connect(server) as sock:  # no connection to give up: refused at once
            assert status_of(read_until_closed(sock)) == 503
        for sock in held:
            sock.sendall(BODY)
            assert status_of(sock.recv(65536)) == 200
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_sigterm_does_not_wait_for_a_trickling_body(tmp_path: Path) -> None:
    server = start(tmp_path, body_timeout=600, graceful_timeout=60)
    try:
        with connect(server) as sock:
            sock.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            time.sleep(0.2)  # the head is read: the request waits for its body
            os.kill(server.proc.pid, signal.SIGTERM)
            # well before the 60 s grace period and the 600 s body timeout: the trickle does not hold it
            assert server.proc.wait(BOUND_S) == 0
    finally:
        server.stop()
