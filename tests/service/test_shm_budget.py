"""The /dev/shm size the operator gives a pod holds what the pod puts there under a flood of large requests.

On Kubernetes the pod's /dev/shm is a tmpfs of the operator's ``sizeLimit`` (render.shm_size_limit); a write
past it fails in the writer. Here the pod runs as a process and the test adds up its segments while 32
clients send bodies of 7 MiB, one at a time each: what the arena cannot hold waits in segments of its own.
At most 32 bodies are in flight, whatever the machine's speed, so the bound holds on a loaded machine too.
"""

from __future__ import annotations

import http.client
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from aqueduct_operator.policy import quantity
from aqueduct_operator.render import shm_size_limit
from aqueduct_operator.spec import parse

from bench.processes import group_pids

from .conftest import Server, echo_config
from .test_leases import binary_request

pytestmark = pytest.mark.timeout(300)

MIB = 1 << 20
CLIENTS = 32
REQUESTS_EACH = 4
BODY = 7 * MIB


def segments_bytes(pids: set[int]) -> int:
    """Bytes of memory held by the segments named for ``pids`` (what a tmpfs counts against its size)."""
    total = 0
    for name in os.listdir("/dev/shm"):
        if any(name.startswith((f"aqd-{pid}-", f"aqd-task-{pid}-")) for pid in pids):
            try:
                total += os.stat(f"/dev/shm/{name}").st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def test_a_flood_of_large_requests_stays_within_the_operators_shm_size(tmp_path: Path) -> None:
    config: dict[str, Any] = echo_config(queue_size=1024)
    config["server"].update(workers=1, max_body_bytes=8 * MIB)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    pipeline = {
        "metadata": {"name": "echo"},
        "spec": {
            "image": "aqueduct:dev",
            "steps": [{"name": "echo", "handler": "tests.service.handlers:EchoHandler"}],
            "server": {"workers": 1, "maxBodyBytes": 8 * MIB},
        },
    }
    limit = int(quantity(shm_size_limit(parse(pipeline))))

    server = Server(path, tmp_path)
    peak, statuses, done = 0, {}, threading.Event()
    try:
        server.wait_ready()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, segments_bytes({server.proc.pid, *group_pids(server.proc.pid)}))
                time.sleep(0.005)

        x = np.ones(BODY // 4, dtype=np.float32)
        body, headers = binary_request(x)

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            try:
                for _ in range(REQUESTS_EACH):
                    conn.request("POST", "/v2/models/echo/infer", body=body, headers=headers)
                    reply = conn.getresponse()
                    reply.read()
                    statuses[reply.status] = statuses.get(reply.status, 0) + 1
            finally:
                conn.close()

        sampler = threading.Thread(target=sample)
        sampler.start()
        clients = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(240)
        done.set()
        sampler.join(10)
    finally:
        done.set()
        server.stop()
    print(
        f"\n[shm] 1 front end, {CLIENTS} clients x {REQUESTS_EACH} bodies of {BODY // MIB} MiB: "
        f"peak {peak / MIB:.0f} MiB of /dev/shm, the operator's sizeLimit {limit // MIB} MiB; statuses {statuses}",
        file=sys.stderr,
    )
    assert sum(statuses.values()) == CLIENTS * REQUESTS_EACH and set(statuses) <= {200, 503, 504}, statuses
    assert statuses.get(200, 0) > 0
    assert peak > 32 * MIB  # the arena was full: requests waited in segments of their own
    assert peak <= limit
