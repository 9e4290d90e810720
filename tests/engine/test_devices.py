"""GPU placement: each worker sees its own GPU when asked, knows its index; CUDA in the parent fails fast."""

from __future__ import annotations

import asyncio
import sys
import types

import pytest

from aqueduct import Flow, FlowStartError, FlowStep

from .handlers import DeviceReporter, Task

pytestmark = pytest.mark.timeout(60)


async def seen_by_workers(flow: Flow, tasks: int = 12) -> set[object]:
    await flow.start_async()
    try:
        batch = [Task() for _ in range(tasks)]
        await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in batch))
        return {t.result for t in batch}
    finally:
        await flow.stop()


async def test_each_worker_sees_one_gpu_round_robin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    # queue_priorities=2: no prefetching, so one task at a time goes to each free worker
    seen = await seen_by_workers(Flow(FlowStep(DeviceReporter(), nprocs=3, gpu_per_worker=True), queue_priorities=2))
    assert seen == {(0, "0", "3"), (1, "1", "5"), (2, "2", "3")}


async def test_without_placement_every_worker_sees_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    seen = await seen_by_workers(Flow(FlowStep(DeviceReporter(), nprocs=2), queue_priorities=2))
    assert seen == {(0, "0", "3,5"), (1, "1", "3,5")}


def test_cuda_initialised_in_the_parent_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    flow = Flow(FlowStep(DeviceReporter()))
    with pytest.raises(FlowStartError, match="on_start"):
        flow.start()
    assert not flow.is_running
