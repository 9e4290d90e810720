"""Large outputs come back through each worker's reusable output arena, and stay intact for their caller."""

from __future__ import annotations

import asyncio
import math
import os
import time

import numpy as np
import pytest

from aqueduct import Flow, FlowStep
from aqueduct._runtime.arena import OutputArena, free_output
from aqueduct._runtime.shm import Segment

from .handlers import MakesLargeOutput, Recorder, Task

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_shm_leaks")]


def test_blocks_are_freed_by_their_reader_and_reused() -> None:
    arena = OutputArena(f"aqd-{os.getpid()}-test", 1 << 20)
    try:
        data = memoryview(np.arange(1 << 16, dtype=np.int32).view(np.uint8))  # 256 KiB
        offsets = [arena.put(data, math.inf) for _ in range(3)]
        assert None not in offsets
        assert arena.put(data, math.inf) is None  # full: the caller falls back to a segment of its own
        reader = Segment.open(arena.name, arena.size)  # another mapping, as a reader process has
        assert bytes(reader.view(offsets[0], data.nbytes)) == data.tobytes()
        free_output(reader, offsets[1])  # freed out of order: its space comes back after the oldest's
        assert arena.put(data, math.inf) is None
        free_output(reader, offsets[0])
        assert arena.put(data, math.inf) is not None
    finally:
        arena.unlink()


def test_an_unread_block_is_taken_back_after_its_deadline() -> None:
    arena = OutputArena(f"aqd-{os.getpid()}-test", 1 << 20)
    try:
        data = memoryview(bytes(600 << 10))
        assert arena.put(data, time.monotonic() - 60) is not None  # its task expired a minute ago
        assert arena.put(data, math.inf) is not None  # so its block is free again
    finally:
        arena.unlink()


async def test_large_outputs_stay_intact_while_the_arena_is_reused() -> None:
    flow = Flow(FlowStep(MakesLargeOutput(), batch_size=4, nprocs=2))
    flow.start()
    try:
        tasks = [Task(i) for i in range(200)]  # 200 MiB of results through two 32 MiB arenas
        for wave in range(0, 200, 20):
            await asyncio.gather(*(flow.process(t, timeout_sec=60) for t in tasks[wave : wave + 20]))
    finally:
        await flow.stop()
    for i, task in enumerate(tasks):
        assert task.result.shape == (1 << 18,) and (task.result == i).all(), i


async def test_outputs_read_by_a_condition_then_returned_are_copies() -> None:
    flow = Flow(
        FlowStep(MakesLargeOutput(), batch_size=4),
        FlowStep(Recorder(), handle_condition=lambda task: task.value < 0),  # never true: finishes after step 1
    )
    flow.start()
    try:
        tasks = [Task(i) for i in range(100)]
        for wave in range(0, 100, 10):
            await asyncio.gather(*(flow.process(t, timeout_sec=60) for t in tasks[wave : wave + 10]))
    finally:
        await flow.stop()
    assert all((task.result == i).all() for i, task in enumerate(tasks))
