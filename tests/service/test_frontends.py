"""A pod with several HTTP front-end processes (``server.workers``) feeding one flow, over real sockets."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .conftest import Server, echo_config, wait_for
from .test_server import infer_body, metric

pytestmark = pytest.mark.timeout(180)


def frontends_config(batch_size: int = 16, batch_timeout: float = 0.05, **overrides: Any) -> dict[str, Any]:
    step = {"name": "echo", "handler": "tests.service.handlers:EchoHandler"}
    config = echo_config(steps=[{**step, "batch_size": batch_size, "batch_timeout": batch_timeout}], **overrides)
    config["server"]["workers"] = 2
    return config


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def server_side_inode(server_port: int, client_port: int) -> int:
    """The inode of the accepted socket of the loopback connection from ``client_port``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return int(fields[9])
    raise AssertionError(f"no connection from port {client_port}")


class Connection:
    """One keep-alive HTTP connection, and the front-end process that accepted it."""

    def __init__(self, server: Server) -> None:
        self.http = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        self.http.request("GET", "/v2/health/live")  # accepted and answered: its socket is in a front end
        self.http.getresponse().read()
        inode = server_side_inode(server.port, self.http.sock.getsockname()[1])
        self.frontend = next(pid for pid in server.frontend_pids() if inode in socket_inodes(pid))

    def infer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.http.request("POST", "/v2/models/echo/infer", json.dumps(body), {"Content-Type": "application/json"})
        reply = self.http.getresponse()
        return reply.status, json.loads(reply.read())

    def close(self) -> None:
        self.http.close()


def connections_on_both(server: Server, wanted: int) -> list[Connection]:
    """At least ``wanted`` connections, with at least one accepted by each front end."""
    pids = set(server.frontend_pids())
    assert len(pids) == 2
    conns: list[Connection] = []
    while len(conns) < wanted or {c.frontend for c in conns} != pids:
        assert len(conns) < 200, "the kernel never handed a connection to one of the front ends"
        conns.append(Connection(server))
    return conns


def connections_per_front_end(server: Server, each: int) -> list[Connection]:
    """Exactly ``each`` connections accepted by every front end."""
    pool = connections_on_both(server, 2 * each)
    while min(sum(c.frontend == pid for c in pool) for pid in server.frontend_pids()) < each:
        assert len(pool) < 200, "the kernel never handed enough connections to one of the front ends"
        pool.append(Connection(server))
    chosen: list[Connection] = []
    for pid in server.frontend_pids():
        chosen += [c for c in pool if c.frontend == pid][:each]
    for conn in pool:
        if conn not in chosen:
            conn.close()
    return chosen


def test_one_batch_mixes_requests_of_both_front_ends(start_server: Any) -> None:
    server = start_server(frontends_config(batch_size=64, batch_timeout=2.0))
    conns = connections_on_both(server, 8)
    with ThreadPoolExecutor(len(conns)) as pool:
        replies = list(pool.map(lambda c: c.infer(infer_body([7])), conns))
    assert [status for status, _ in replies] == [200] * len(conns)
    batches = [reply["outputs"][1]["data"][0] for _, reply in replies]
    per_frontend = {pid: sum(c.frontend == pid for c in conns) for pid in server.frontend_pids()}
    # every request was handled in one batch holding more requests than either front end received
    assert batches == [len(conns)] * len(conns), batches
    assert max(per_frontend.values()) < len(conns)
    assert metric(server, "aqueduct_batch_size_count", step="echo") == 1
    for conn in conns:
        conn.close()


def test_metrics_sum_every_front_end(start_server: Any) -> None:
    server = start_server(frontends_config())
    conns = connections_on_both(server, 4)
    for conn in conns:
        assert conn.infer(infer_body([1]))[0] == 200
    labels = {"method": "POST", "route": "/v2/models/{name}/infer", "status": "200"}
    for pid in server.frontend_pids():  # whichever front end answers /metrics, every request is counted
        conn = next(c for c in conns if c.frontend == pid)
        conn.http.request("GET", "/metrics")
        text = conn.http.getresponse().read().decode()
        line = next(x for x in text.splitlines() if x.startswith("aqueduct_http_requests_total{") and "infer" in x)
        assert line.endswith(f" {float(len(conns))}"), line
    assert metric(server, "aqueduct_http_requests_total", **labels) == len(conns)
    for conn in conns:
        conn.close()


def test_killed_front_end_fails_only_its_own_requests(start_server: Any, tmp_path: Path) -> None:
    server = start_server(frontends_config(batch_size=1))
    conns = connections_on_both(server, 2)
    victim = conns[0].frontend
    doomed = [c for c in conns if c.frontend == victim]
    spared = [c for c in conns if c.frontend != victim]
    marker = tmp_path / "handling"
    results: dict[int, Any] = {}

    def send(index: int, conn: Connection) -> None:
        try:
            results[index] = conn.infer(infer_body([index], sleep=1.0, marker=str(marker)))[0]
        except (ConnectionError, http.client.HTTPException) as e:
            results[index] = type(e).__name__

    threads = [threading.Thread(target=send, args=(i, c)) for i, c in enumerate(doomed + spared)]
    for thread in threads:
        thread.start()
    wait_for(marker.exists, 30, "a request to reach the handler")
    os.kill(victim, signal.SIGKILL)
    for thread in threads:
        thread.join(60)
    assert all(results[i] != 200 for i in range(len(doomed)))
    assert all(results[i] == 200 for i in range(len(doomed), len(conns)))
    wait_for(lambda: len(server.frontend_pids()) == 2 and victim not in server.frontend_pids(), 60, "a new front end")
    server.wait_ready()
    fresh = connections_on_both(server, 2)
    assert all(conn.infer(infer_body([5]))[0] == 200 for conn in fresh)
    for conn in fresh + spared:
        conn.close()


def test_sigterm_drains_every_front_end_and_exits_0(start_server: Any, tmp_path: Path) -> None:
    # one batch of 4 (2 requests from each front end) starts only once all of them are in the flow
    server = start_server(frontends_config(batch_size=4, batch_timeout=30))
    conns = connections_per_front_end(server, 2)
    marker = tmp_path / "handling"
    with ThreadPoolExecutor(len(conns)) as pool:
        futures = [pool.submit(c.infer, infer_body([i], sleep=0.5, marker=str(marker))) for i, c in enumerate(conns)]
        wait_for(marker.exists, 30, "the first batch to start")
        os.kill(server.proc.pid, signal.SIGTERM)
        replies = [future.result(timeout=60) for future in futures]
    statuses = [status for status, _ in replies]
    assert statuses == [200] * len(conns), replies
    assert server.proc.wait(60) == 0  # Server.stop at teardown checks no process and no segment is left
