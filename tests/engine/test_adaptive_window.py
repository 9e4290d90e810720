"""The opt-in adaptive batch window: waits only while more tasks are expected and the target allows."""

from __future__ import annotations

import asyncio

import pytest

from aqueduct import Flow, FlowStep
from aqueduct._runtime.adaptive import AdaptiveWindow

from .handlers import Recorder, Task


def _trained(fixed: float, per_task: float) -> AdaptiveWindow:
    window = AdaptiveWindow(target=0.1)
    for size in (1, 2, 4, 8, 16):
        window.handled(size, fixed + per_task * size)
    return window


def test_cost_model_is_learned_from_batches() -> None:
    fixed, per_task = _trained(0.02, 0.001).model()
    assert fixed == pytest.approx(0.02)
    assert per_task == pytest.approx(0.001)


def test_a_quiet_step_dispatches_at_once() -> None:
    window = _trained(0.02, 0.001)
    window.arrived(100.0)
    window.arrived(100.5)  # ~2 tasks/s: not even one more expected within the target
    assert window.dispatch_at(now=100.5, oldest=100.5, waiting=1, batch_size=64) == 100.5


def test_a_busy_step_waits_but_keeps_the_oldest_task_within_the_target() -> None:
    window = _trained(0.02, 0.001)
    for i in range(40):
        window.arrived(100.0 + i * 0.01)  # 100 tasks/s
    now = 100.39
    due = window.dispatch_at(now=now, oldest=now, waiting=1, batch_size=64)
    assert due > now
    gathered = 1 + window.rate(now) * (due - now)
    assert due + 0.02 + 0.001 * gathered <= now + 0.1  # finishes within the target


def test_a_task_that_waited_long_is_dispatched_at_once() -> None:
    window = _trained(0.02, 0.001)
    for i in range(40):
        window.arrived(100.0 + i * 0.01)
    assert window.dispatch_at(now=100.39, oldest=100.25, waiting=3, batch_size=64) == 100.39


async def test_a_flow_with_a_latency_target_batches_a_burst() -> None:
    flow = Flow(FlowStep(Recorder(sleep=0.01), batch_size=16, latency_target=0.5))
    flow.start()
    try:
        tasks = [Task(i) for i in range(64)]
        await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks))
    finally:
        await flow.stop()
    assert [t.result for t in tasks] == list(range(64))
    assert max(t.batch for t in tasks) == 16


def test_latency_target_must_be_positive() -> None:
    with pytest.raises(ValueError):
        FlowStep(Recorder(), latency_target=0)


def test_waits_that_gather_nothing_stop_until_a_probe() -> None:
    window = _trained(0.02, 0.001)
    now = 100.0
    for i in range(40):
        window.arrived(now + i * 0.01)
    now += 0.4
    assert window.dispatch_at(now=now, oldest=now, waiting=1, batch_size=64) > now  # looks busy: waits
    window.dispatched(1)  # ... but nothing came during the wait (a closed-loop caller)
    waited = 0
    for _ in range(30):
        if window.dispatch_at(now=now, oldest=now, waiting=1, batch_size=64) > now:
            waited += 1
            window.dispatched(1)
        else:
            window.dispatched(1)
    assert waited == 1  # one probe in 30 batches, not a wait per batch


async def test_a_closed_loop_caller_is_not_kept_waiting() -> None:
    flow = Flow(FlowStep(Recorder(), batch_size=16, latency_target=2.0))
    flow.start()
    slow = 0
    try:
        for i in range(60):  # one caller: each task is sent when the previous one is answered
            started = asyncio.get_running_loop().time()
            await flow.process(Task(i), timeout_sec=30)
            if asyncio.get_running_loop().time() - started > 1.0:
                slow += 1
    finally:
        await flow.stop()
    assert slow <= 4  # a wait to learn, then a probe every 20 batches; not a 2 s wait per task
