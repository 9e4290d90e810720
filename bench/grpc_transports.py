"""The gRPC transport alone: grpcio's asyncio server against the pod's own HTTP/2 (``grpc_api/http2.py``).

Why the pod reads HTTP/2 itself (issue 20 asked for grpcio's asyncio server in the front end's event
loop, "or show by measurement that another arrangement is better"): each server below runs in one
process on uvloop, as a front end does, and answers ``ModelInfer`` with an empty message without
reading the request, so only the transport is measured. Load: h2load (``bench/grpc_serving.py``'s
runner): c = 1 with a 33-byte request, then c = 64 (64 connections x 1 stream, and 4 x 16) with a
150 KB one. Prints req/s, p50/p99 and the server's CPU per call.

    apt-get install -y nghttp2-client
    .venv/bin/python bench/grpc_transports.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "service"))
from bench.grpc_serving import MODEL_INFER, Level, h2load  # noqa: E402
from bench.processes import free_port  # noqa: E402
from bench.serving.run import group_cpu_seconds  # noqa: E402

SERVERS = ("grpcio-aio", "aqueduct-http2")
LEVELS = [(Level("grpc", 1), 33), (Level("grpc", 64), 150_528), (Level("grpc", 4, 16), 150_528)]


async def _empty(*_: Any) -> bytes:
    return b""


async def serve_grpcio(port: int) -> None:
    import grpc
    from grpc import aio

    server = aio.server()
    handler = grpc.unary_unary_rpc_method_handler(_empty)  # no (de)serializers: bytes in, bytes out
    service, method = MODEL_INFER.strip("/").split("/")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def serve_http2(port: int) -> None:
    from aqueduct_service.grpc_api.http2 import GrpcServer, Limits, Method

    server = GrpcServer({MODEL_INFER: Method(_empty)}, Limits())
    await server.start("127.0.0.1", port)
    await asyncio.Event().wait()


Serve = Callable[[int], Coroutine[Any, Any, None]]
SERVE: dict[str, Serve] = {"grpcio-aio": serve_grpcio, "aqueduct-http2": serve_http2}


def request_file(tmp: str, size: int) -> str:
    """A framed gRPC message of ``size`` bytes (its content does not matter: the servers do not read it)."""
    path = os.path.join(tmp, f"{size}.bin")
    Path(path).write_bytes(b"\0" + size.to_bytes(4, "big") + bytes(size))
    return path


def bench(server: str, tmp: str, seconds: float) -> list[str]:
    port = free_port()
    argv = [sys.executable, __file__, "--serve", server, "--port", str(port)]
    proc = subprocess.Popen(argv, start_new_session=True)
    rows = []
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server} did not start")
            time.sleep(0.1)
        for level, size in LEVELS:
            body = request_file(tmp, size)
            h2load(port, body, level, 2, os.path.join(tmp, "warm.log"))
            before, start = group_cpu_seconds(proc.pid), time.perf_counter()
            load = h2load(port, body, level, seconds, os.path.join(tmp, "h2load.log"))
            cpu, wall = group_cpu_seconds(proc.pid) - before, time.perf_counter() - start
            rows.append(
                f"| {server} | {level.connections} x {level.streams} | {size:,} B | {load.rps:,.0f} | "
                f"{load.p50_ms:.3f} | {load.p99_ms:.3f} | {load.errors} | {100 * cpu / wall:.0f} | "
                f"{1e6 * cpu / max(1, load.count):.0f} |"
            )
            print(rows[-1], flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per level")
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(SERVE[args.serve](args.port))
        return
    print(
        "| server | connections x streams | request | calls/s | p50 ms | p99 ms | errors | server CPU % | CPU µs/call |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for server in SERVERS:
            bench(server, tmp, args.duration)


if __name__ == "__main__":
    main()
