"""The upstream-compatible contract: batching, steps, conditions, priorities, shared memory, lifecycle."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from aqueduct import BaseTask, Flow, FlowStep
from aqueduct.exceptions import FlowError, FlowStartError, FlowStartTimeout, NotRunningError

from .conftest import leased_arrays
from .handlers import Doubler, FailingStart, InPlace, Recorder, SlowStart, Task, is_even


async def _run(flow: Flow, tasks: list[Task], timeout: float = 30.0) -> None:
    await asyncio.gather(*(flow.process(t, timeout_sec=timeout) for t in tasks))


async def test_batch_never_exceeds_batch_size_under_a_flood() -> None:
    flow = Flow(FlowStep(Recorder(sleep=0.002), batch_size=7, nprocs=2))
    flow.start()
    try:
        tasks = [Task(i) for i in range(500)]
        await _run(flow, tasks)
    finally:
        await flow.stop()
    sizes = {t.batch for t in tasks}
    assert max(sizes) == 7  # a flood fills batches ...
    assert all(1 <= s <= 7 for s in sizes)  # ... and never overfills them
    assert [t.result for t in tasks] == list(range(500))


async def test_without_batch_timeout_a_single_task_is_handled_at_once() -> None:
    flow = Flow(FlowStep(Recorder(), batch_size=64))
    flow.start()
    try:
        task = Task(1)
        started = time.monotonic()
        await flow.process(task, timeout_sec=30)
        elapsed = time.monotonic() - started
    finally:
        await flow.stop()
    assert task.batch == 1
    assert elapsed < 5  # no waiting for the other 63 (a generous bound, not a benchmark)


async def test_batch_timeout_waits_for_a_fuller_batch_but_not_longer() -> None:
    window = 0.3
    flow = Flow(FlowStep(Recorder(), batch_size=8, batch_timeout=window))
    flow.start()
    try:
        first = Task(0)
        started = time.monotonic()
        pending = asyncio.ensure_future(flow.process(first, timeout_sec=30))
        await asyncio.sleep(0.05)
        rest = [Task(i) for i in (1, 2)]
        await _run(flow, rest)
        await pending
        elapsed = time.monotonic() - started
    finally:
        await flow.stop()
    assert {t.batch for t in [first, *rest]} == {3}  # the late tasks joined the first one's batch
    assert elapsed >= window * 0.9  # it did wait for the window ...
    assert elapsed < window + 5  # ... and then went with what it had


async def test_full_batch_does_not_wait_for_the_window() -> None:
    flow = Flow(FlowStep(Recorder(), batch_size=4, batch_timeout=60))
    flow.start()
    try:
        tasks = [Task(i) for i in range(4)]
        await _run(flow, tasks, timeout=30)
    finally:
        await flow.stop()
    assert {t.batch for t in tasks} == {4}


async def test_multi_step_flow_with_nprocs_and_handle_condition() -> None:
    flow = Flow(
        FlowStep(Recorder(tag="a"), nprocs=2, batch_size=4),
        FlowStep(Recorder(tag="even"), handle_condition=is_even, batch_size=3, batch_timeout=0.01),
        FlowStep(Recorder(tag="c"), nprocs=3),
    )
    flow.start()
    try:
        tasks = [Task(i) for i in range(60)]
        await _run(flow, tasks)
    finally:
        await flow.stop()
    for t in tasks:
        assert t.trail == (["a", "even", "c"] if t.value % 2 == 0 else ["a", "c"])
    assert max(t.batch for t in tasks) <= 4


async def test_steps_run_in_their_own_processes() -> None:
    flow = Flow(FlowStep(Recorder(), nprocs=2))
    flow.start()
    try:
        pids = set(flow.health().steps[0].pids)
        tasks = [Task(i) for i in range(50)]
        await _run(flow, tasks)
    finally:
        await flow.stop()
    assert len(pids) == 2
    assert {t.pid for t in tasks} <= pids


async def test_higher_priority_tasks_are_taken_first(tmp_path: Path) -> None:
    log = tmp_path / "order.log"
    flow = Flow(FlowStep(Recorder(log=log, sleep=0.2)), queue_priorities=2)
    flow.start()
    try:
        blocker = asyncio.ensure_future(flow.process(Task("blocker"), timeout_sec=30))
        await asyncio.sleep(0.05)  # the worker is busy with the blocker; the rest queue up
        low = [Task(f"low{i}") for i in range(3)]
        high = [Task(f"high{i}") for i in range(3)]
        for t in high:
            t.set_priority(1)
        await _run(flow, [*low, *high])
        await blocker
    finally:
        await flow.stop()
    order = log.read_text().split()
    assert order[0] == "blocker"
    assert order[1:4] == ["high0", "high1", "high2"]
    assert order[4:] == ["low0", "low1", "low2"]


async def test_a_later_high_priority_task_overtakes_earlier_low_ones(tmp_path: Path) -> None:
    log = tmp_path / "order.log"
    flow = Flow(FlowStep(Recorder(log=log, sleep=0.1)), queue_priorities=2)
    flow.start()
    try:
        pending = []
        for i in range(4):  # low-priority tasks arrive one by one, while the worker is busy
            pending.append(asyncio.ensure_future(flow.process(Task(f"low{i}"), timeout_sec=30)))
            await asyncio.sleep(0.01)
        high = Task("high")
        high.set_priority(1)
        await flow.process(high, timeout_sec=30)
        await asyncio.gather(*pending)
    finally:
        await flow.stop()
    order = log.read_text().split()
    assert order.index("high") <= 1  # at most the task already being handled goes before it


async def test_results_reach_the_callers_task_object() -> None:
    flow = Flow(FlowStep(Doubler()))
    flow.start()
    try:
        task = Task(np.arange(5))
        assert await flow.process(task) is True
    finally:
        await flow.stop()
    np.testing.assert_array_equal(task.result, np.arange(5) * 2)


@pytest.mark.usefixtures("no_shm_leaks")
@pytest.mark.parametrize("nbytes", [16, 1 << 20])
async def test_share_value_round_trips_numpy_and_bytes_exactly(nbytes: int) -> None:
    rng = np.random.default_rng(0)
    array = rng.standard_normal(nbytes // 8).reshape(-1, 1)
    data = rng.bytes(nbytes)
    flow = Flow(FlowStep(Recorder()), FlowStep(Recorder()))
    flow.start()
    try:
        a, b = Task(array.copy()), Task(data)
        a.share_value("value")
        b.share_value("value")
        await flow.process(a)
        await flow.process(b)
    finally:
        await flow.stop()
    np.testing.assert_array_equal(a.result, array)
    assert a.result.dtype == array.dtype and a.result.shape == array.shape
    assert b.result == data and type(b.result) is bytes


@pytest.mark.usefixtures("no_shm_leaks")
@pytest.mark.parametrize("size", [16, 100_000])  # small arrays travel by reference too when shared
async def test_shared_array_changed_in_place_by_the_handler_is_seen_by_the_caller(size: int) -> None:
    flow = Flow(FlowStep(InPlace()))
    flow.start()
    try:
        task = Task(np.zeros(size))
        task.share_value("value")
        shared = task.value  # the array over shared memory, as the caller holds it
        await flow.process(task)
    finally:
        await flow.stop()
    assert np.all(shared == 1) and np.all(task.value == 1)


@pytest.mark.usefixtures("no_shm_leaks")
async def test_large_arrays_and_bytes_travel_without_share_value() -> None:
    array = np.arange(4 << 20, dtype=np.float32)
    flow = Flow(FlowStep(Doubler()), FlowStep(Recorder(), handle_condition=lambda t: isinstance(t.value, bytes)))
    flow.start()
    try:
        task = Task(array)
        await flow.process(task)
        raw = Task(b"x" * (1 << 20))
        await flow.process(raw)
    finally:
        await flow.stop()
    np.testing.assert_array_equal(task.result, array * 2)
    assert raw.result == b"x" * (1 << 20)


def test_share_value_rejects_what_it_cannot_share() -> None:
    task = Task([1, 2, 3])
    with pytest.raises(ValueError):
        task.share_value("value")
    with pytest.raises(ValueError):
        task.share_value("missing")
    shared = Task(np.zeros(3))
    shared.share_value("value")
    with pytest.raises(ValueError):
        shared.share_value("value")


async def test_start_fails_clearly_when_on_start_raises() -> None:
    flow = Flow(FlowStep(FailingStart()))
    with pytest.raises(FlowStartError, match="RuntimeError: model file missing"):
        flow.start()
    with pytest.raises(NotRunningError):
        await flow.process(BaseTask())


async def test_start_timeout_raises_and_stops_the_workers() -> None:
    flow = Flow(FlowStep(SlowStart()))
    with pytest.raises(FlowStartTimeout):
        flow.start(timeout=0.5)
    assert flow.health().steps[0].pids == ()


async def test_start_async_does_not_block_the_loop() -> None:
    flow = Flow(FlowStep(Recorder()))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.ensure_future(tick())
    try:
        await flow.start_async()
        assert flow.health().ready
        task = Task(3)
        await flow.process(task)
        assert task.result == 3
    finally:
        ticker.cancel()
        await flow.stop()
    assert ticks > 0


async def test_not_running_before_start_and_after_stop() -> None:
    flow = Flow(FlowStep(Recorder()))
    with pytest.raises(NotRunningError):
        await flow.process(Task(1))
    await flow.stop()  # stopping a flow that never ran is harmless
    flow.start()
    await flow.process(Task(1))
    await flow.stop()
    with pytest.raises(NotRunningError):
        await flow.process(Task(1))
    assert issubclass(NotRunningError, FlowError)


async def test_a_stopped_flow_starts_again_at_once() -> None:
    flow = Flow(FlowStep(Recorder()))
    for i in range(3):
        flow.start()
        task = Task(i)
        await flow.process(task, timeout_sec=10)
        assert task.result == i
        await flow.stop()


def test_bad_step_settings_are_rejected() -> None:
    with pytest.raises(ValueError):
        FlowStep(Recorder(), batch_size=0)
    with pytest.raises(ValueError):
        FlowStep(Recorder(), nprocs=0)
    with pytest.raises(ValueError):
        FlowStep(Recorder(), batch_timeout=-1)
    with pytest.raises(TypeError):
        FlowStep(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Flow(FlowStep(Recorder(), name="a"), FlowStep(Recorder(), name="a"))


def test_spawn_start_method(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "spawned.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, multiprocessing as mp
            import numpy as np
            from aqueduct import Flow, FlowStep
            from tests.engine.handlers import Recorder, Task

            async def main():
                flow = Flow(FlowStep(Recorder(), nprocs=2), FlowStep(Recorder()), mp_start_method="spawn")
                flow.start(timeout=120)
                task = Task(np.ones(1 << 18))
                await flow.process(task, timeout_sec=30)
                await flow.stop()
                print("sum", task.result.sum())

            if __name__ == "__main__":
                mp.set_start_method("spawn")
                asyncio.run(main())
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr
    assert "sum 262144.0" in result.stdout


def test_task_ids_are_unique_uuids_also_across_forks() -> None:
    ids = {Task().task_id for _ in range(1000)}
    assert len(ids) == 1000
    assert all(uuid.UUID(i).version == 4 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert all(str(uuid.UUID(i)) == i for i in ids)  # the canonical text
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, Task().task_id.encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = os.read(read, 100).decode()
    os.close(read)
    os.close(write)
    assert child_id not in ids and child_id != Task().task_id


async def test_small_arrays_of_any_layout_round_trip_writable() -> None:
    arrays = [
        np.array([1, 2, 3]),
        np.zeros((2, 3), dtype=">f4"),
        np.array(5),
        np.array([], dtype=np.int16),
        np.arange(10)[::2],
        np.zeros((3, 2), order="F"),
        np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
        np.array(["ab", "c"], dtype="S2"),
    ]
    flow = Flow(FlowStep(Recorder()))
    flow.start()
    try:
        tasks = [Task(a) for a in arrays]
        await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks))
    finally:
        await flow.stop()
    for array, task in zip(arrays, tasks, strict=True):
        assert task.result.dtype == array.dtype and task.result.shape == array.shape
        np.testing.assert_array_equal(task.result, array)
        assert task.result.flags.writeable


async def test_stopping_workers_that_never_ran_closes_each_pipe_once(monkeypatch: pytest.MonkeyPatch) -> None:
    flow = Flow(FlowStep(Recorder()))
    flow.init_processes()  # workers started, never attached to the loop
    closed: list[int] = []
    real_close = os.close

    def counting_close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "close", counting_close)
    await flow.stop()
    assert len(closed) == len(set(closed))  # a second close could hit an fd reused in between


@pytest.mark.usefixtures("no_shm_leaks")
async def test_arrays_in_a_lease_of_the_flows_arena_reach_the_handler_by_reference() -> None:
    flow = Flow(FlowStep(InPlace(), batch_size=4), arena_bytes=1 << 20)
    assert flow.lease(1024) is None  # not running yet
    flow.start()
    try:
        for _ in range(10):  # 10 x 256 KiB through a 1 MiB arena: its blocks are reused
            lease = flow.lease(256 * 1024)
            assert lease is not None
            array = np.frombuffer(lease.buffer, dtype=np.float64)
            array[:] = 0
            task = Task(array)
            assert await flow.process(task, timeout_sec=30)
            assert np.all(task.value == 1) and np.all(array == 0)  # the worker's change is in its answer only
            lease.free()
        assert flow.lease(2 << 20) is None  # larger than the arena
        small = [Task(np.zeros(4)) for _ in range(8)]  # small tasks still travel as one pickle per batch
        assert all(await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in small)))
        assert all(np.all(t.value == 1) for t in small)
    finally:
        await flow.stop()
    assert flow.lease(1024) is None


@pytest.mark.usefixtures("no_shm_leaks")
async def test_a_batch_of_leased_arrays_reaches_the_handler_together_and_by_reference() -> None:
    flow = Flow(FlowStep(InPlace(), batch_size=4, batch_timeout=0.5), arena_bytes=2 << 20)
    flow.start()
    try:
        with leased_arrays(flow, 4) as arrays:
            for array in arrays:
                array[:] = 0
            tasks = [Task(array) for array in arrays]
            assert all(await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks)))
            assert [t.batch for t in tasks] == [4] * 4
            assert all(np.all(t.value == 1) for t in tasks) and all(np.all(array == 0) for array in arrays)
            # with a large array outside the arena beside it, the leased one still goes by reference
            outside = np.zeros(256 * 1024 // 8)
            mixed = [Task(arrays[0]), Task(outside)]
            assert all(await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in mixed)))
            assert np.all(mixed[0].value == 1) and np.all(mixed[1].value == 1)
    finally:
        await flow.stop()


def test_arena_bytes_is_checked() -> None:
    with pytest.raises(ValueError, match="arena_bytes"):
        Flow(FlowStep(Recorder()), arena_bytes=-1)
