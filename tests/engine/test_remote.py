"""``aqueduct.remote``: client processes feeding one flow through a ``FlowGateway``."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aqueduct import Flow, FlowStep
from aqueduct.remote import FlowGateway

from . import remote_clients
from .handlers import Doubler, Poisoned, Recorder

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_shm_leaks")]
SPAWN = mp.get_context("spawn")


@pytest.fixture
async def gateway_of() -> AsyncIterator[Callable[[Flow], FlowGateway]]:
    """Start a flow and a gateway to it; both stopped at teardown."""
    started: list[tuple[Flow, FlowGateway]] = []

    def make(flow: Flow) -> FlowGateway:
        flow.start()
        gateway = FlowGateway(flow)
        started.append((flow, gateway))
        return gateway

    yield make
    for flow, gateway in started:
        gateway.close()
        await flow.stop()


async def start_client(gateway: FlowGateway, target: Callable[..., None], *args: Any) -> tuple[Any, Any]:
    """Start ``target(address, *args, conn)`` in a spawned process; returns (process, receiving end)."""
    address = gateway.connect()
    receive, send = SPAWN.Pipe(duplex=False)
    process = SPAWN.Process(target=target, args=(address, *args, send), daemon=True)
    process.start()
    address.close()
    send.close()
    return process, receive


async def result_of(process: Any, receive: Any, bound: float = 60.0) -> Any:
    loop = asyncio.get_running_loop()
    ready = await loop.run_in_executor(None, receive.poll, bound)
    assert ready, "the client process sent nothing"
    value = receive.recv()
    await loop.run_in_executor(None, process.join, 10)
    return value


async def test_one_batch_mixes_tasks_of_two_client_processes(gateway_of: Any) -> None:
    gateway = gateway_of(Flow(FlowStep(Recorder(), batch_size=16, batch_timeout=2.0)))
    clients = [await start_client(gateway, remote_clients.run_tasks, list(range(i * 8, i * 8 + 8))) for i in (0, 1)]
    reports = [await result_of(*client) for client in clients]
    pids = {pid for pid, _ in reports}
    assert len(pids) == 2
    for index, (_, results) in enumerate(reports):
        assert [value for value, _, _ in results] == list(range(index * 8, index * 8 + 8))
        assert all(outcome == "ok" for _, _, outcome in results)
        # 16 tasks, 8 from each process, handled in one batch of 16
        assert {batch for _, batch, _ in results} == {16}


async def test_errors_cross_the_process_boundary(gateway_of: Any) -> None:
    gateway = gateway_of(Flow(FlowStep(Poisoned(), batch_size=4)))
    process, receive = await start_client(gateway, remote_clients.run_tasks, ["poison", 1, 2])
    _, results = await result_of(process, receive)
    assert [(value, outcome) for value, _, outcome in results] == [("poison", "TaskError"), (1, "ok"), (2, "ok")]


async def test_leased_arrays_reach_the_workers_and_come_back(gateway_of: Any) -> None:
    gateway = gateway_of(Flow(FlowStep(Doubler(), batch_size=8, nprocs=2)))
    process, receive = await start_client(gateway, remote_clients.run_leased_arrays, 40)
    results = await result_of(process, receive)
    assert all(doubled for _, doubled in results)
    concurrent, sequential = results[:40], results[40:]
    assert 0 < sum(leased for leased, _ in concurrent) < 40  # the arena filled up; the rest went without
    assert all(leased for leased, _ in sequential)  # freed leases are reused


async def test_not_running_flow_refuses_remote_tasks() -> None:
    flow = Flow(FlowStep(Recorder()))
    gateway = FlowGateway(flow)
    process, receive = await start_client(gateway, remote_clients.run_tasks, [1])
    _, results = await result_of(process, receive)
    gateway.close()
    assert results == [(1, 0, "NotRunningError")]


async def test_a_dead_client_loses_only_its_own_tasks(gateway_of: Any) -> None:
    flow = Flow(FlowStep(Recorder(sleep=0.05), batch_size=4))
    gateway = gateway_of(flow)
    disconnected: list[str] = []
    gateway._on_disconnect = disconnected.append
    address = gateway.connect()
    doomed = SPAWN.Process(target=remote_clients.hold_tasks, args=(address, 50), daemon=True)
    doomed.start()
    address.close()
    for _ in range(500):
        if flow.health().steps[0].queue_depth:
            break
        await asyncio.sleep(0.01)
    assert doomed.pid is not None
    os.kill(doomed.pid, signal.SIGKILL)
    await asyncio.get_running_loop().run_in_executor(None, doomed.join, 10)
    process, receive = await start_client(gateway, remote_clients.run_tasks, [1, 2, 3])
    _, results = await result_of(process, receive)
    assert [outcome for _, _, outcome in results] == ["ok"] * 3
    assert len(disconnected) == 2
    for _ in range(500):
        if not flow.health().steps[0].queue_depth:
            break
        await asyncio.sleep(0.01)
    assert flow.health().steps[0].queue_depth == 0
