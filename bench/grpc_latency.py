"""c = 1 latency of the pod over gRPC and HTTP, one tritonclient each (the client's own time included).

One process (``server.workers: 1``) on ``examples/noop/pipeline.yaml``; per row 3,000 calls after 200
warm-up calls: ServerLive, then the noop model's infer, twice, alternating the protocols. Prints p50/p99.

    .venv/bin/python bench/grpc_latency.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.processes import free_port  # noqa: E402

CALLS = 3000


def percentiles(call: Callable[[], Any]) -> tuple[float, float]:
    """p50 and p99 of ``CALLS`` calls, in ms, after 200 warm-up calls."""
    for _ in range(200):
        call()
    times = []
    for _ in range(CALLS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[CALLS // 2] * 1e3, times[CALLS * 99 // 100] * 1e3


def main() -> None:
    http_port, grpc_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'service'}")
    env.update(AQUEDUCT_SERVER__WORKERS="1", AQUEDUCT_SERVER__GRPC_PORT=str(grpc_port))
    argv = [sys.executable, "-m", "aqueduct_service", "--config", str(REPO / "examples/noop/pipeline.yaml")]
    argv += ["--host", "127.0.0.1", "--port", str(http_port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        x = np.array([1, 2, 3], dtype=np.int64)
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        http = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                if grpc.is_server_ready():
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

        def grpc_infer() -> Any:
            tensor = grpcclient.InferInput("x", [3], "INT64")
            tensor.set_data_from_numpy(x)
            return grpc.infer("noop", [tensor])

        def http_infer() -> Any:
            tensor = httpclient.InferInput("x", [3], "INT64")
            tensor.set_data_from_numpy(x, binary_data=False)
            return http.infer("noop", [tensor])

        rows = [("grpc ServerLive", grpc.is_server_live), ("http live", http.is_server_live)]
        rows += [("grpc infer", grpc_infer), ("http infer", http_infer)] * 2
        for name, call in rows:
            p50, p99 = percentiles(call)
            print(f"{name}: p50 {p50:.3f} ms, p99 {p99:.3f} ms", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
