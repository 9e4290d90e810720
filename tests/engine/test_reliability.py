"""What upstream gets wrong and this engine must not: bad tasks, dead workers, deadlines, full queues, stop."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from aqueduct import Flow, FlowStep
from aqueduct.exceptions import (
    FlowError,
    QueueFullError,
    TaskCancelledError,
    TaskError,
    TaskTimeoutError,
    WorkerDiedError,
)

from .conftest import children_alive, leased_arrays
from .handlers import (
    BornHere,
    DiesOnValue,
    InPlace,
    InPlaceDiesOnNegative,
    InPlaceThenDiesOnNegative,
    Poisoned,
    Recorder,
    SetsBornHere,
    SetsUnpicklable,
    Task,
)

ROOT = Path(__file__).resolve().parents[2]


async def _wait_for(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_failing_task_fails_alone_and_the_flow_goes_on() -> None:
    flow = Flow(FlowStep(Poisoned(), batch_size=8, batch_timeout=0.2))
    flow.start()
    try:
        tasks = [Task(i) for i in range(7)] + [Task("poison")]
        results = await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks), return_exceptions=True)
        assert results[:7] == [True] * 7
        error = results[7]
        assert isinstance(error, TaskError) and isinstance(error, FlowError)
        assert error.exc_type == "ValueError" and error.during == TaskError.HANDLER
        assert error.exc_message == "poisoned input"
        assert "raise ValueError" in error.traceback_text
        assert [t.result for t in tasks[:7]] == list(range(7))
        later = Task("after")
        assert await flow.process(later, timeout_sec=30)
        assert later.result == "after"
        assert flow.health().steps[0].restarts == 0
    finally:
        await flow.stop()


async def test_a_task_its_worker_cannot_unpickle_fails_alone() -> None:
    # A batch of small tasks travels as one pickle: one that cannot be read spoils it, so the batch
    # is sent again one pickle per task, and only that task fails.
    flow = Flow(FlowStep(Recorder(), batch_size=8, batch_timeout=0.2))
    flow.start()
    try:
        tasks = [Task(i) for i in range(7)] + [Task(BornHere())]
        results = await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks), return_exceptions=True)
        assert results[:7] == [True] * 7
        assert [t.result for t in tasks[:7]] == list(range(7))
        assert max(t.batch for t in tasks[:7]) > 1
        error = results[7]
        assert isinstance(error, TaskError) and error.exc_type == "ValueError"
        assert "cannot be rebuilt" in error.exc_message and error.during == TaskError.UNPICKLING_TASK
        later = Task("after")
        assert await flow.process(later, timeout_sec=30) and later.result == "after"
    finally:
        await flow.stop()


@pytest.mark.parametrize("where", ["caller", "handler"])
async def test_a_task_that_cannot_be_pickled_fails_alone(where: str) -> None:
    # By the caller: a field holding a lock; by the handler: it sets one. Either way the batch's one
    # pickle fails, the tasks are pickled one by one, and only that task fails.
    flow = Flow(FlowStep(SetsUnpicklable(), batch_size=8, batch_timeout=0.2))
    flow.start()
    try:
        bad = Task(threading.Lock()) if where == "caller" else Task("lock")
        tasks = [Task(i) for i in range(7)] + [bad]
        results = await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks), return_exceptions=True)
        assert results[:7] == [True] * 7
        assert [t.result for t in tasks[:7]] == list(range(7))
        assert isinstance(results[7], TaskError) and results[7].exc_type == "TypeError"
        assert "lock" in results[7].exc_message
        stage = TaskError.PICKLING_TASK if where == "caller" else TaskError.PICKLING_RESULT
        assert results[7].during == stage and f"{stage} TypeError" in str(results[7])
    finally:
        await flow.stop()


async def test_tasks_queued_behind_a_batch_that_could_not_be_pickled_are_still_sent() -> None:
    # A whole batch fails in this process, before reaching a worker: no answer will come back for it,
    # yet the tasks queued behind it must still go out (they used to wait for their deadline).
    flow = Flow(FlowStep(Recorder(), batch_size=4, batch_timeout=0.2))
    flow.start()
    try:
        bad = [Task(threading.Lock()) for _ in range(4)]
        good = Task("after")
        results = await asyncio.gather(*(flow.process(t, timeout_sec=10) for t in [*bad, good]), return_exceptions=True)
        assert all(isinstance(r, TaskError) and r.during == TaskError.PICKLING_TASK for r in results[:4]), results
        assert results[4] is True and good.result == "after"
    finally:
        await flow.stop()


async def test_answers_this_process_cannot_unpickle_fail_as_task_errors_and_the_flow_goes_on() -> None:
    flow = Flow(FlowStep(SetsBornHere(), batch_size=4, batch_timeout=0.2))
    flow.start()
    try:
        tasks = [Task(1), Task("stuck"), Task(3)]
        results = await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks), return_exceptions=True)
        assert isinstance(results[1], TaskError) and "cannot be rebuilt" in results[1].exc_message
        assert results[1].during == TaskError.UNPICKLING_RESULT
        for result, task in zip(results, tasks, strict=True):  # those answered with it fail too, or succeed
            assert result is True and task.result == task.value or isinstance(result, TaskError)
        later = Task("after")
        assert await flow.process(later, timeout_sec=30) and later.result == "after"
    finally:
        await flow.stop()


def _needs_int(task: Task) -> bool:
    return int(task.value) % 2 == 0  # type: ignore[call-overload]


async def test_a_raising_handle_condition_fails_its_task_alone_and_says_so() -> None:
    flow = Flow(FlowStep(Recorder()), FlowStep(Recorder(), handle_condition=_needs_int))
    flow.start()
    try:
        bad, good = Task("not a number"), Task(4)
        results = await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in (bad, good)), return_exceptions=True)
        error = results[0]
        assert isinstance(error, TaskError) and error.during == TaskError.CONDITION
        assert str(error).startswith("step 'step2_Recorder': handle_condition raised ValueError: invalid literal")
        assert pickle.loads(pickle.dumps(error)).during == TaskError.CONDITION  # as it reaches remote callers
        assert results[1] is True and good.result == 4
    finally:
        await flow.stop()


async def test_without_bisect_the_whole_batch_fails_but_the_flow_goes_on() -> None:
    flow = Flow(FlowStep(Poisoned(), batch_size=4, batch_timeout=0.2, bisect=False))
    flow.start()
    try:
        tasks = [Task(1), Task(2), Task("poison"), Task(3)]
        results = await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks), return_exceptions=True)
        assert all(isinstance(r, TaskError) for r in results)
        ok = Task(5)
        assert await flow.process(ok, timeout_sec=30)
    finally:
        await flow.stop()


async def test_a_task_whose_worker_was_killed_runs_again_on_its_replacement() -> None:
    flow = Flow(FlowStep(Recorder(sleep=2.0)))
    flow.start()
    try:
        [victim] = flow.health().steps[0].pids
        task = Task(1)
        held = asyncio.ensure_future(flow.process(task, timeout_sec=60))
        await asyncio.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        assert await held  # run once more, alone, by the replacement: not failed for a death it did not cause
        assert task.result == 1
        step = flow.health().steps[0]
        assert step.restarts == 1 and victim not in step.pids
        again = Task(2)
        assert await flow.process(again, timeout_sec=30)
        assert again.result == 2
    finally:
        await flow.stop()


async def test_a_worker_that_crashes_on_a_task_is_replaced_and_others_are_served() -> None:
    flow = Flow(FlowStep(DiesOnValue(), nprocs=2))
    flow.start()
    try:
        with pytest.raises(WorkerDiedError, match="exited with code 139"):
            await flow.process(Task("die"), timeout_sec=30)
        results = await asyncio.gather(*(flow.process(Task(i), timeout_sec=30) for i in range(20)))
        assert results == [True] * 20
        await _wait_for(lambda: flow.health().ready)
    finally:
        await flow.stop()


@pytest.mark.usefixtures("no_shm_leaks")
@pytest.mark.parametrize(
    "handler", [InPlaceDiesOnNegative(), InPlaceThenDiesOnNegative()], ids=["dies", "writes-then-dies"]
)
async def test_a_task_that_kills_its_worker_fails_alone_among_arrays_in_the_flows_arena(handler: InPlace) -> None:
    # Such a batch travels as one pickle with references to the arena: bisection re-sends its halves
    # the same way. A handler that changed its inputs in place before its worker died changed only
    # the worker's copy-on-write view: the tasks run again from the caller's data, not from +1.
    flow = Flow(FlowStep(handler, batch_size=8, batch_timeout=0.5), arena_bytes=4 << 20)
    flow.start()
    try:
        with leased_arrays(flow, 8) as arrays:
            for i, array in enumerate(arrays):
                array[:] = -1 if i == 5 else 0
            tasks = [Task(array) for array in arrays]
            results = await asyncio.gather(*(flow.process(t, timeout_sec=60) for t in tasks), return_exceptions=True)
            assert isinstance(results[5], WorkerDiedError)
            assert [r for i, r in enumerate(results) if i != 5] == [True] * 7
            assert all(np.all(t.value == 1) for i, t in enumerate(tasks) if i != 5)
    finally:
        await flow.stop()


async def test_tasks_a_dead_worker_had_not_started_are_served_by_its_replacement() -> None:
    flow = Flow(FlowStep(DiesOnValue(sleep=0.2)))
    flow.start()
    try:
        doomed = asyncio.ensure_future(flow.process(Task("die"), timeout_sec=30))
        await asyncio.sleep(0.05)
        queued = [Task(i) for i in range(3)]  # handed to the worker behind "die" (bs=1 prefetch)
        pending = [asyncio.ensure_future(flow.process(t, timeout_sec=30)) for t in queued]
        with pytest.raises(WorkerDiedError):
            await doomed
        assert await asyncio.gather(*pending) == [True, True, True]
        assert [t.result for t in queued] == [0, 1, 2]
        assert flow.health().steps[0].restarts == 2  # "die" ran twice (the second time alone) before it failed
    finally:
        await flow.stop()


async def test_a_crash_looping_worker_is_backed_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="aqueduct")
    flow = Flow(FlowStep(DiesOnValue()))
    flow.start()
    try:
        for _ in range(3):
            await _wait_for(lambda: flow.health().ready)
            with pytest.raises(WorkerDiedError):
                await flow.process(Task("die"), timeout_sec=30)
        # each worker died on its first batch: its replacement waits 0.5 s, 1 s, 2 s ... instead of starting
        # hot; the task's second run, alone (its worker's death then explained), restarts at once
        delays = [float(d) for d in re.findall(r"restarting it in ([\d.]+) s", caplog.text)]
        assert delays == [0.5, 0.0, 1.0, 0.0, 2.0, 0.0]
        await _wait_for(lambda: flow.health().ready)
        assert flow.health().steps[0].restarts == 6
    finally:
        await flow.stop()


async def test_expired_tasks_never_reach_the_handler(tmp_path: Path) -> None:
    log = tmp_path / "seen.log"
    flow = Flow(FlowStep(Recorder(log=log, sleep=0.5)))
    flow.start()
    try:
        blocker = asyncio.ensure_future(flow.process(Task("blocker"), timeout_sec=30))
        await asyncio.sleep(0.05)
        late = [Task(f"late{i}") for i in range(3)]
        results = await asyncio.gather(*(flow.process(t, timeout_sec=0.2) for t in late), return_exceptions=True)
        assert all(isinstance(r, TaskTimeoutError) for r in results)
        assert str(results[0]) == "Task timeout error"
        await blocker
        assert await flow.process(Task("after"), timeout_sec=30)
    finally:
        await flow.stop()
    assert log.read_text().split() == ["blocker", "after"]


async def test_a_full_queue_fails_fast() -> None:
    flow = Flow(FlowStep(Recorder(sleep=1.0)), queue_size=2)
    flow.start()
    try:
        busy = asyncio.ensure_future(flow.process(Task(0), timeout_sec=30))
        await asyncio.sleep(0.1)  # the worker holds task 0; the next two wait
        waiting = []
        for i in (1, 2):
            waiting.append(asyncio.ensure_future(flow.process(Task(i), timeout_sec=30)))
            await asyncio.sleep(0.05)  # handed on to the worker (prefetched), still waiting: they count
        with pytest.raises(QueueFullError):
            await flow.process(Task(3), timeout_sec=30)
        assert await busy and all(await asyncio.gather(*waiting))
    finally:
        await flow.stop()


async def test_graceful_stop_lets_tasks_in_flight_finish() -> None:
    flow = Flow(FlowStep(Recorder(sleep=0.3)))
    flow.start()
    pids = list(flow.health().steps[0].pids)
    tasks = [Task(i) for i in range(3)]
    pending = [asyncio.ensure_future(flow.process(t, timeout_sec=30)) for t in tasks]
    await asyncio.sleep(0.05)
    await flow.stop()
    assert all(p.result() for p in pending)
    assert [t.result for t in tasks] == [0, 1, 2]
    assert children_alive(pids) == []


async def test_non_graceful_stop_fails_tasks_in_flight_at_once() -> None:
    flow = Flow(FlowStep(Recorder(sleep=5.0)))
    flow.start()
    pids = list(flow.health().steps[0].pids)
    pending = [asyncio.ensure_future(flow.process(Task(i), timeout_sec=30)) for i in range(3)]
    await asyncio.sleep(0.05)
    await flow.stop(graceful=False)
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, TaskCancelledError) for r in results)
    assert children_alive(pids) == []


@pytest.mark.usefixtures("no_shm_leaks")
async def test_no_shared_memory_left_when_a_handler_raises_mid_transfer() -> None:
    flow = Flow(FlowStep(Poisoned(), batch_size=4, batch_timeout=0.1))
    flow.start()
    try:
        tasks = [Task(np.ones(1 << 18)) for _ in range(3)] + [Task("poison")]
        results = await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks), return_exceptions=True)
        assert isinstance(results[3], TaskError)
    finally:
        await flow.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_parent_killed_leaves_no_processes_or_shared_memory(tmp_path: Path, signum: int) -> None:
    # The first step's worker has answered a large output (its output arena exists) and idles; the
    # second's is busy with the task. Both see their parent die and remove the flow's memory, even
    # where the kernel tells them when the parent's first thread ends, before its last one has.
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, os, sys, threading, time
            import numpy as np
            from aqueduct import Flow, FlowStep
            from tests.engine.handlers import Recorder, Task

            async def main():
                # Another thread, as a server has: the one that started the workers may end first.
                threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
                flow = Flow(FlowStep(Recorder()), FlowStep(Recorder(sleep=60)))
                flow.start()
                pids = [p for s in flow.health().steps for p in s.pids]
                task = Task(np.ones(1 << 20))
                pending = asyncio.ensure_future(flow.process(task, timeout_sec=120))
                mine = f"aqd-{os.getpid()}-"
                while not any(n.startswith(mine) and n.endswith("-out-arena") for n in os.listdir("/dev/shm")):
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
                print(" ".join(map(str, pids)), flush=True)
                await pending

            asyncio.run(main())
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        prefix = f"aqd-{proc.pid}-"
        assert any(name.startswith(prefix) and name.endswith("-out-arena") for name in os.listdir("/dev/shm"))
        proc.send_signal(signum)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while children_alive(pids) or any(name.startswith(prefix) for name in os.listdir("/dev/shm")):
            assert time.monotonic() < deadline, (children_alive(pids), os.listdir("/dev/shm"))
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_metrics_count_outcomes_batches_and_restarts() -> None:
    flow = Flow(FlowStep(Poisoned(), batch_size=4, batch_timeout=0.1, name="detect"))
    flow.start()
    try:
        tasks = [Task(1), Task(2), Task("poison")]
        await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks), return_exceptions=True)
        text = generate_latest(flow.metrics_registry).decode()
    finally:
        await flow.stop()
    assert 'aqueduct_tasks_total{outcome="ok",step="detect"} 2.0' in text
    assert 'aqueduct_tasks_total{outcome="error",step="detect"} 1.0' in text
    assert 'aqueduct_tasks_total{outcome="ok",step="flow"} 2.0' in text
    assert 'aqueduct_batch_size_count{step="detect"}' in text
    assert 'aqueduct_handle_seconds_bucket{le="+Inf",step="detect"}' in text
    assert "aqueduct_task_latency_seconds_count 2.0" in text
    assert 'aqueduct_queue_depth{step="detect"} 0.0' in text
    assert 'aqueduct_workers_alive{step="detect"} 1.0' in text
    for reason in ("start", "killed", "exited"):
        assert f'aqueduct_worker_restarts_total{{reason="{reason}",step="detect"}} 0.0' in text


async def test_metrics_can_be_switched_off() -> None:
    flow = Flow(FlowStep(Recorder()), metrics_enabled=False)
    flow.start()
    try:
        await flow.process(Task(1))
    finally:
        await flow.stop()
    assert "aqueduct_" not in generate_latest(flow.metrics_registry).decode()
