"""Task weights (``BaseTask.set_weight``): a batch holds at most ``batch_size`` rows, never part of a task;
without weights a batch holds ``batch_size`` tasks, as upstream."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from aqueduct import Flow, FlowStep

from .handlers import Recorder, Task

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_shm_leaks")]


async def run(weights: list[int | None], log: Path, batch_size: int = 8) -> tuple[list[list[int]], str]:
    """Send a task per weight at once (``value`` = its weight); the batches the handler saw, and /metrics."""
    flow = Flow(FlowStep(Recorder(log), batch_size=batch_size, batch_timeout=0.5))
    await flow.start_async()
    try:
        tasks = []
        for weight in weights:
            task = Task(weight or 1)
            if weight is not None:
                task.set_weight(weight)
            tasks.append(task)
        await asyncio.gather(*(flow.process(task, timeout_sec=10) for task in tasks))
        assert [t.result for t in tasks] == [w or 1 for w in weights]
        metrics = generate_latest(flow.metrics_registry).decode()
    finally:
        await flow.stop()
    batches = [[int(v) for v in line.split()] for line in log.read_text().splitlines()]
    return batches, metrics


def metric(text: str, name: str) -> float:
    (value,) = re.findall(rf"^{name}\{{step=\"[^\"]+\"\}} (\S+)$", text, re.M)
    return float(value)


async def test_a_batch_holds_at_most_batch_size_rows(tmp_path: Path) -> None:
    batches, metrics = await run([3, 3, 3, 1, 5, 2], tmp_path / "log")
    assert batches == [[3, 3], [3, 1], [5, 2]]  # in order; a task that does not fit heads the next batch
    assert metric(metrics, "aqueduct_batch_rows_total") == 17 and metric(metrics, "aqueduct_batch_size_count") == 3
    assert metric(metrics, "aqueduct_batch_size_sum") == 6  # tasks (requests), beside their rows


async def test_a_task_heavier_than_batch_size_is_a_batch_of_its_own(tmp_path: Path) -> None:
    batches, _ = await run([2, 12, 2], tmp_path / "log")
    assert batches == [[2], [12], [2]]


async def test_without_weights_a_batch_holds_batch_size_tasks(tmp_path: Path) -> None:
    batches, metrics = await run([None] * 11, tmp_path / "log")
    assert [len(b) for b in batches] == [8, 3]
    assert metric(metrics, "aqueduct_batch_rows_total") == metric(metrics, "aqueduct_batch_size_sum") == 11


def test_weight_must_be_a_positive_integer() -> None:
    task = Task(1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="weight must be an integer >= 1"):
            task.set_weight(bad)  # type: ignore[arg-type]
    task.set_weight(4)
    assert task.weight == 4 and Task(1).weight == 1
