"""A task that crashes its worker fails alone; worker churn never takes the flow down for long."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from aqueduct import Flow, FlowStep
from aqueduct.exceptions import WorkerDiedError

from .handlers import DiesOnValue, Recorder, StartChangesWithMarker, Task

pytestmark = pytest.mark.timeout(120)


async def wait_for(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def metric(flow: Flow, name: str) -> float:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", generate_latest(flow.metrics_registry).decode(), re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("nprocs", [1, 2])
async def test_a_task_that_kills_its_worker_fails_alone(nprocs: int) -> None:
    flow = Flow(FlowStep(DiesOnValue(), batch_size=16, batch_timeout=5.0, nprocs=nprocs))
    flow.start()
    try:
        tasks = [Task(i) for i in range(15)] + [Task("die")]
        results = await asyncio.gather(*(flow.process(t, timeout_sec=60) for t in tasks), return_exceptions=True)
        assert results[:15] == [True] * 15
        assert [t.result for t in tasks[:15]] == list(range(15))
        assert isinstance(results[15], WorkerDiedError) and "exited with code 139" in str(results[15])
        assert metric(flow, "aqueduct_crash_isolated_tasks_total") == 1
        assert metric(flow, "aqueduct_crash_rerun_tasks_total") >= 16
        await wait_for(lambda: flow.health().steps[0].alive == nprocs)
    finally:
        await flow.stop()


async def test_a_batch_whose_worker_was_killed_is_run_again() -> None:
    flow = Flow(FlowStep(Recorder(sleep=1.0), batch_size=4, batch_timeout=5.0))
    flow.start()
    try:
        [victim] = flow.health().steps[0].pids
        tasks = [Task(i) for i in range(4)]
        pending = asyncio.gather(*(flow.process(t, timeout_sec=60) for t in tasks))
        await asyncio.sleep(0.3)  # the batch of 4 is in the handler's sleep
        os.kill(victim, signal.SIGKILL)
        assert await pending == [True] * 4
        assert [t.result for t in tasks] == [0, 1, 2, 3]
        step = flow.health().steps[0]
        assert victim not in step.pids and step.restarts >= 1 and step.restart_reasons.get("killed", 0) >= 1
        assert metric(flow, "aqueduct_crash_rerun_tasks_total") == 4
        assert metric(flow, "aqueduct_crash_isolated_tasks_total") == 0
    finally:
        await flow.stop()


async def test_without_bisect_a_crash_fails_the_whole_batch() -> None:
    flow = Flow(FlowStep(DiesOnValue(), batch_size=4, batch_timeout=5.0, bisect=False))
    flow.start()
    try:
        tasks = [Task(1), Task(2), Task("die"), Task(3)]
        results = await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks), return_exceptions=True)
        assert all(isinstance(r, WorkerDiedError) for r in results)
        assert metric(flow, "aqueduct_crash_rerun_tasks_total") == 0
    finally:
        await flow.stop()


def restart_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [float(m) for m in re.findall(r"restarting it in ([\d.]+) s", caplog.text)]


async def test_a_worker_that_did_work_is_replaced_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="aqueduct")
    flow = Flow(FlowStep(Recorder()))
    flow.start()
    try:
        for round_ in range(3):
            assert await flow.process(Task(round_), timeout_sec=30)
            [victim] = flow.health().steps[0].pids
            os.kill(victim, signal.SIGKILL)
            await wait_for(lambda v=victim: flow.health().ready and v not in flow.health().steps[0].pids)  # type: ignore[misc]
        assert restart_delays(caplog) == [0.0, 0.0, 0.0]
    finally:
        await flow.stop()


async def test_a_worker_that_dies_before_it_is_ready_is_backed_off(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.ERROR, logger="aqueduct")
    marker = tmp_path / "broken"
    flow = Flow(FlowStep(StartChangesWithMarker(marker, die=True)))
    flow.start()
    try:
        [victim] = flow.health().steps[0].pids
        marker.touch()  # from now on, on_start dies (a broken model, CUDA out of memory at start)
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: len(restart_delays(caplog)) >= 3)
        assert restart_delays(caplog)[:3] == [0.5, 1.0, 2.0]
        assert flow.health().steps[0].restart_reasons.get("start", 0) >= 1
        assert not flow.health().ready
        marker.unlink()
        await wait_for(lambda: flow.health().ready, timeout=60)
    finally:
        await flow.stop()


async def test_ready_while_one_worker_of_each_step_serves(tmp_path: Path) -> None:
    slow = tmp_path / "slow"
    flow = Flow(FlowStep(Recorder(), nprocs=2, name="a"), FlowStep(StartChangesWithMarker(slow, die=False), name="b"))
    flow.start()
    try:
        victim = flow.health().steps[0].pids[0]
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: flow.health().steps[0].alive == 1 or flow.health().steps[0].restarts == 1)
        assert flow.health().ready  # step a has one live worker: the flow still serves
        assert await flow.process(Task(1), timeout_sec=30)
        [b_worker] = flow.health().steps[1].pids
        slow.touch()  # b's replacement takes a second to start: b has no live worker meanwhile
        os.kill(b_worker, signal.SIGKILL)
        await wait_for(lambda: not flow.health().ready)
        await wait_for(lambda: flow.health().ready and flow.health().steps[1].restarts == 1)
    finally:
        await flow.stop()
