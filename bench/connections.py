"""Connection abuse against the serving pod (one process, the echo model), on loopback: what each costs it.

- a 16 MiB header: the status, and the pod's RSS before and after;
- slowloris (a header byte every 50 ms) and a body at one byte a second: seconds until the pod closes them;
- 2,000 connections that never send a byte, held open (twice ``max_connections``): whether 200 good
  requests sent meanwhile are answered (over fresh connections) and how long they took, and how many of
  the idle ones are still open after ``header_timeout``.

    .venv/bin/python bench/connections.py
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.processes import free_port  # noqa: E402

GOOD = b'{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[1]}]}'


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def good_request(port: int) -> float:
    """Seconds one inference over a fresh connection took; raises if it was not a 200."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = f"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(GOOD)}\r\n\r\n"
        sock.sendall(head.encode() + GOOD)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:80]
    return time.perf_counter() - started


def seconds_until_closed(sock: socket.socket, trickle: bytes, period: float, bound: float = 120.0) -> float:
    started = time.monotonic()
    for byte in trickle:
        readable, _, _ = select.select([sock], [], [], period)
        if readable or time.monotonic() - started > bound:
            break
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=2000, help="connections held open without sending")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "version": 1,
            "name": "echo",
            "steps": [{"name": "echo", "handler": "tests.service.handlers:EchoHandler", "batch_size": 16}],
            "server": {"log_level": "critical", "workers": 1},
        }
        path = Path(tmp) / "echo.yaml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'service'}")
        cmd = [sys.executable, "-m", "aqueduct_service", "--config", str(path), "--port", str(port)]
        proc = subprocess.Popen(cmd + ["--host", "127.0.0.1"], cwd=REPO, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    good_request(port)
                    break
                except (OSError, AssertionError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            before = rss_mib(proc.pid)
            sent, status = 0, "no answer"
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (16 << 20) + b"\r\n\r\n"
                try:
                    for start in range(0, len(head), 1 << 16):
                        sent += sock.send(head[start : start + (1 << 16)])
                    status = sock.recv(65536).split(b"\r\n", 1)[0].decode()
                except OSError as e:  # the pod answered 431 and closed while we still sent
                    status = f"closed by the pod ({type(e).__name__})"
            print(
                f"16 MiB header: {status}, after {sent / 1024:.0f} KiB sent; "
                f"pod RSS {before:.0f} -> {rss_mib(proc.pid):.0f} MiB"
            )

            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: 1\r\n" * 10_000
                seconds = seconds_until_closed(sock, head, 0.05)
                print(f"slowloris (a head byte every 50 ms): closed after {seconds:.1f} s")
            with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
                sock.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
                body = b"{" * 100_000
                print(f"a body at 1 byte/s: closed after {seconds_until_closed(sock, body, 1.0):.1f} s")

            idle = []
            for _ in range(args.idle):
                try:
                    idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
                except OSError as e:
                    print(f"could not open idle connection {len(idle) + 1}: {e}")
                    break
            times = []
            failures = 0
            for _ in range(200):
                try:
                    times.append(good_request(port))
                except (OSError, AssertionError):
                    failures += 1
            times.sort()
            p50 = times[len(times) // 2] * 1000 if times else float("nan")
            print(
                f"{len(idle)} idle connections open: {len(times)}/200 good requests answered 200 "
                f"(p50 {p50:.1f} ms), {failures} failed"
            )
            time.sleep(12)  # past the default header_timeout of 10 s
            poller = select.poll()
            for sock in idle:
                poller.register(sock, select.POLLIN)
            closed = {fd for fd, _ in poller.poll(0)}
            still = sum(1 for sock in idle if sock.fileno() not in closed)
            print(f"idle connections still open 12 s later: {still}/{len(idle)}")
            for sock in idle:
                sock.close()
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    main()
