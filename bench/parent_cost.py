#!/usr/bin/env python3
"""The flow process's CPU per task under S2's load (no-op handler, batch 64, 200 in flight), with the
share of flow_bench's own harness (semaphore, gather, a coroutine per task) taken out.

The harness alone is measured against a stand-in flow that answers every waiting task at once on the
next loop iteration; the engine's own cost is the difference. Also prints runs without a full
(generation 2) garbage collection apart: one costs a 2000-task run about a fifth of its speed.

    .venv/bin/python bench/parent_cost.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
import flow_bench as fb  # noqa: E402  (../shared/bench, beside the project)

from aqueduct import Flow, FlowStep  # noqa: E402

TASKS = 2000


class InstantFlow:
    """Answers every waiting task on the next loop iteration: the harness's cost, and nothing else."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[None]] = []

    def _answer(self) -> None:
        waiting, self.waiting = self.waiting, []
        for future in waiting:
            future.set_result(None)

    async def process(self, task: fb.NoopTask, timeout_sec: float = 5.0) -> bool:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self.waiting:
            loop.call_soon(self._answer)
        self.waiting.append(future)
        await future
        return True


async def measure(flow: object, runs: int) -> tuple[float, list[tuple[float, bool]]]:
    """CPU seconds of this process per task (tasks made outside), and each run's tasks/s and whether a full GC ran."""
    await fb.run_concurrent(flow, [fb.NoopTask() for _ in range(200)], 200)
    cpu = 0.0
    rates = []
    for _ in range(runs):
        tasks = [fb.NoopTask() for _ in range(TASKS)]
        full_gcs = gc.get_stats()[2]["collections"]
        start = time.process_time()
        wall, ok, errors = await fb.run_concurrent(flow, tasks, 200)
        cpu += time.process_time() - start
        assert ok == TASKS, errors[:3]
        rates.append((ok / wall, gc.get_stats()[2]["collections"] > full_gcs))
    return cpu / (runs * TASKS), rates


def summary(rates: list[tuple[float, bool]]) -> str:
    clean = [rate for rate, collected in rates if not collected]
    line = f"median {statistics.median(rate for rate, _ in rates):,.0f} tasks/s"
    if clean:
        line += f"; {statistics.median(clean):,.0f} in the {len(clean)} runs without a full GC"
    return line


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    harness_cpu, harness_rates = await measure(InstantFlow(), runs)
    flow = Flow(FlowStep(fb.RecordBatchHandler(), batch_size=64, batch_timeout=0.005, nprocs=1))
    flow.start()
    try:
        flow_cpu, flow_rates = await measure(flow, runs)
    finally:
        await flow.stop()
    print(f"harness alone: {harness_cpu * 1e6:.1f} us of CPU per task ({summary(harness_rates)})")
    print(f"flow:          {flow_cpu * 1e6:.1f} us of CPU per task ({summary(flow_rates)})")
    print(f"the engine's own share of the parent's CPU: {(flow_cpu - harness_cpu) * 1e6:.1f} us per task")


if __name__ == "__main__":
    asyncio.run(main())
