#!/usr/bin/env python3
"""Adaptive batch window vs fixed windows on a load that changes rate.

The handler costs ``fixed + per_task * n`` seconds for a batch of n (a GPU-like cost: 20 ms
launch overhead + 1 ms per item). Tasks arrive open-loop (Poisson) in phases of different rates:
quiet (5/s), moderate (40/s), busy (300/s), quiet, moderate. Each configuration gets the same
arrival schedule (same seed). A batch window trades latency for batch size: the goal is to keep
every task within a latency target (100 ms) while spending as little handler ("GPU") time per
task as possible. Prints per configuration: latency (mean, p50, p99, share within the target),
mean batch size and handler milliseconds per task.

    .venv/bin/python bench/adaptive_window.py [--target 0.1] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

from aqueduct import BaseTask, BaseTaskHandler, Flow, FlowStep

FIXED_S = 0.020
PER_TASK_S = 0.001
PHASES = [(5, 3.0), (40, 3.0), (300, 3.0), (5, 3.0), (40, 3.0)]  # (tasks/s, seconds)


class GpuLike(BaseTaskHandler):
    def handle(self, *tasks: BaseTask) -> None:
        time.sleep(FIXED_S + PER_TASK_S * len(tasks))


def schedule(seed: int) -> list[float]:
    rng = random.Random(seed)
    times, start = [], 0.0
    for rate, duration in PHASES:
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= start + duration:
                break
            times.append(t)
        start += duration
    return times


async def run(step: FlowStep, arrivals: list[float], target: float) -> dict[str, float]:
    flow = Flow(step, queue_size=100_000)
    flow.start()
    latencies: list[float] = []
    errors = 0

    async def one(at: float, t0: float) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        started = time.perf_counter()
        try:
            await flow.process(BaseTask(), timeout_sec=30)
        except Exception:  # noqa: BLE001 - counted
            errors += 1
            return
        latencies.append(time.perf_counter() - started)

    try:
        for _ in range(20):  # warm-up: let the window learn the cost model
            await flow.process(BaseTask(), timeout_sec=30)
        t0 = time.perf_counter()
        before = _handler_totals(flow)
        await asyncio.gather(*(one(at, t0) for at in arrivals))
        after = _handler_totals(flow)
    finally:
        await flow.stop()
    busy_s, batches, tasks = (a - b for a, b in zip(after, before, strict=True))
    latencies.sort()
    return {
        "within_target": sum(1 for x in latencies if x <= target) / len(latencies),
        "mean_batch": tasks / batches,
        "handler_ms_per_task": busy_s / tasks * 1000,
        "completed": len(latencies),
        "errors": errors,
        "mean_ms": statistics.fmean(latencies) * 1000,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def _handler_totals(flow: Flow) -> tuple[float, float, float]:
    registry, labels = flow.metrics_registry, {"step": flow.step_names[0]}
    return (
        registry.get_sample_value("aqueduct_handle_seconds_sum", labels) or 0.0,
        registry.get_sample_value("aqueduct_batch_size_count", labels) or 0.0,
        registry.get_sample_value("aqueduct_batch_size_sum", labels) or 0.0,
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=float, default=0.1, help="latency target of the adaptive window, s")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    arrivals = schedule(seed=7)
    configs: list[tuple[str, FlowStep]] = [
        (f"fixed {w * 1000:g} ms", FlowStep(GpuLike(), batch_size=64, batch_timeout=w)) for w in (0, 0.005, 0.02, 0.05)
    ]
    configs.append(
        (f"adaptive target {args.target * 1000:g} ms", FlowStep(GpuLike(), batch_size=64, latency_target=args.target))
    )
    cost = f"{FIXED_S * 1000:g} ms + {PER_TASK_S * 1000:g} ms/task"
    print(f"{len(arrivals)} tasks; phases (rate/s, s): {PHASES}; cost {cost}")
    within = f"within {args.target * 1000:g} ms"
    print(f"| window | done | mean ms | p50 ms | p99 ms | {within} | mean batch | handler ms/task |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for name, step in configs:
        r = await run(step, arrivals, args.target)
        results[name] = r
        print(
            f"| {name} | {r['completed']} | {r['mean_ms']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['within_target'] * 100:.1f}% | {r['mean_batch']:.1f} | {r['handler_ms_per_task']:.2f} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    asyncio.run(main())
