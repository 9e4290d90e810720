"""A lease of the flow's arena given to ``process(leases=...)`` is not reused while a worker may still use it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest

from aqueduct import Flow, FlowStep
from aqueduct._runtime.arena import Lease
from aqueduct.exceptions import TaskTimeoutError

from .handlers import Recorder, SlowInPlace, Task

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_shm_leaks")]

NBYTES = 256 * 1024


async def until(condition: Callable[[], bool], bound: float = 20.0) -> None:
    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def address(lease: Lease) -> int:
    return int(np.frombuffer(lease.buffer, np.uint8).__array_interface__["data"][0])


def leased_zeros(flow: Flow) -> tuple[Lease, np.ndarray]:
    lease = flow.lease(NBYTES)
    assert lease is not None
    array = np.frombuffer(lease.buffer, dtype=np.float64)
    array[:] = 0
    return lease, array


@pytest.mark.parametrize("dies", [False, True], ids=["worker-answers", "worker-dies"])
async def test_a_lease_of_a_task_that_timed_out_in_its_worker_is_kept_until_the_worker_is_done(dies: bool) -> None:
    flow = Flow(FlowStep(SlowInPlace(sleep=0.5), batch_size=1), arena_bytes=1 << 20)
    flow.start()
    try:
        lease, array = leased_zeros(flow)
        if dies:
            array[0] = -1
        with pytest.raises(TaskTimeoutError):
            await flow.process(Task(array), timeout_sec=0.1, leases=[lease])
        lease.free()  # the caller is done, as the serving pod is after its 504
        assert lease.held, "the block went back to the arena while the worker still runs the task"
        newer = flow.lease(NBYTES)
        assert newer is not None and address(newer) != address(lease)
        newer.free()
        await until(lambda: not lease.held)  # the worker answered, or died: the block comes back
        again = flow.lease(NBYTES)
        assert again is not None and address(again) == address(lease)  # the ring starts over: no leak
        again.free()
    finally:
        await flow.stop()


async def test_a_lease_is_back_as_soon_as_the_caller_and_the_flow_are_done() -> None:
    flow = Flow(FlowStep(SlowInPlace(sleep=0), batch_size=1), arena_bytes=1 << 20)
    flow.start()
    try:
        lease, array = leased_zeros(flow)
        task = Task(array)
        assert await flow.process(task, timeout_sec=30, leases=[lease])
        assert lease.held and np.all(task.value == 1)  # the caller reads its answer
        lease.free()
        lease.free()  # idempotent: a second free does not drop the flow's hold of another task
        assert not lease.held
    finally:
        await flow.stop()


async def test_a_leased_array_travels_by_reference_both_ways_unless_the_handler_changed_it() -> None:
    flow = Flow(FlowStep(Recorder()), arena_bytes=1 << 20)
    flow.start()
    try:
        lease, array = leased_zeros(flow)
        array[:] = 7
        task = Task(array)
        assert await flow.process(task, timeout_sec=30, leases=[lease])
        # the handler set result = value without changing it: its answer points into the caller's block
        assert np.shares_memory(task.result, array) and np.all(task.result == 7)
        lease.free()
    finally:
        await flow.stop()
