"""The engine's Prometheus metrics, owned by the parent process.

Workers send their batch timings back with the results; the parent records everything in one
``CollectorRegistry`` (``Flow.metrics_registry``), so no multiprocess directory is needed.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

OUTCOMES = ("ok", "error", "expired", "rejected", "lost", "cancelled")
#: Why a replaced worker ended: before it was ready, killed by a signal, or exited.
RESTART_REASONS = ("start", "killed", "exited")
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TIME_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Tally:
    """A counter bumped on the flow's event loop only: ``inc`` is one addition (a
    ``prometheus_client.Counter`` takes a lock and three calls, a noticeable part of a small task's cost)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        """Add ``amount``."""
        self.value += amount


class _TaskCounts(Collector):
    """``aqueduct_tasks_total{step,outcome}``, from one ``Tally`` per step and outcome."""

    def __init__(self) -> None:
        self._tallies: dict[tuple[str, str], Tally] = {}

    def tallies(self, step: str) -> dict[str, Tally]:
        """The tallies of ``step``, by outcome."""
        return {outcome: self._tallies.setdefault((step, outcome), Tally()) for outcome in OUTCOMES}

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily("aqueduct_tasks", "Tasks by step and outcome", labels=["step", "outcome"])
        for (step, outcome), tally in list(self._tallies.items()):
            family.add_metric([step, outcome], tally.value)
        return [family]


class _RowCounts(Collector):
    """``aqueduct_batch_rows_total{step}``: rows handed to ``handle()``, the tasks' weights (``BaseTask.set_weight``;
    1 a task without). Over ``aqueduct_batch_size_count`` it is the mean rows per call."""

    def __init__(self) -> None:
        self._tallies: dict[str, Tally] = {}

    def tally(self, step: str) -> Tally:
        """The tally of ``step``."""
        return self._tallies.setdefault(step, Tally())

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily("aqueduct_batch_rows", "Rows (task weights) handed to handle()", labels=["step"])
        for step, tally in list(self._tallies.items()):
            family.add_metric([step], tally.value)
        return [family]


class StepMetrics:
    """Pre-bound metric children of one step (no label lookups on the hot path)."""

    def __init__(
        self,
        tasks: _TaskCounts,
        batch_size: Histogram,
        rows: _RowCounts,
        handle_seconds: Histogram,
        restarts: Counter,
        rerun: Counter,
        isolated: Counter,
        step: str,
    ):
        self.outcome = tasks.tallies(step)
        self.batch_size = batch_size.labels(step=step)
        self.rows = rows.tally(step)
        self.handle_seconds = handle_seconds.labels(step=step)
        self.restarts = {reason: restarts.labels(step=step, reason=reason) for reason in RESTART_REASONS}
        self.rerun = rerun.labels(step=step)
        self.isolated = isolated.labels(step=step)

    def batch(self, size: int, rows: int, seconds: float) -> None:
        """Record one handled batch of ``size`` tasks weighing ``rows`` (``BaseTask.set_weight``)."""
        self.batch_size.observe(size)
        self.rows.value += rows
        self.handle_seconds.observe(seconds)


class _StepGauges(Collector):
    """Queue depth and live workers, read at scrape time."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, int, int, int]]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily("aqueduct_queue_depth", "Tasks waiting for a worker of the step", labels=["step"])
        alive = GaugeMetricFamily(
            "aqueduct_workers_alive", "Started, live worker processes of the step", labels=["step"]
        )
        expected = GaugeMetricFamily(
            "aqueduct_workers_expected", "Worker processes the step should have", labels=["step"]
        )
        for step, queue_depth, n_alive, n_expected in self._read():
            depth.add_metric([step], queue_depth)
            alive.add_metric([step], n_alive)
            expected.add_metric([step], n_expected)
        return [depth, alive, expected]


class LatencyHistogram(Collector):
    """A histogram for one observation per task: ``observe`` only appends to a queue (no lock, no
    bucket search), and observations are counted into buckets in bulk, at a scrape or every
    ``FOLD_EVERY`` of them. A ``prometheus_client.Histogram`` costs as much as a third of the
    parent's other work for a small task."""

    FOLD_EVERY = 1024

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = [float(b) for b in buckets]
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        self._pending: deque[float] = deque()
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, seconds: float) -> None:
        """Record one observation."""
        pending = self._pending
        pending.append(seconds)
        if len(pending) >= self.FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        with self._lock:
            pending, bounds, counts = self._pending, self._bounds, self._counts
            for _ in range(len(pending)):
                value = pending.popleft()  # appends may go on meanwhile, from another thread
                counts[bisect_left(bounds, value)] += 1
                self._sum += value

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterable[Metric]:
        self._fold()
        with self._lock:
            cumulative, total = [], 0
            for bound, count in zip([*self._bounds, math.inf], self._counts, strict=True):
                total += count
                cumulative.append((str(bound) if bound != math.inf else "+Inf", total))
            family = HistogramMetricFamily(self._name, self._documentation, buckets=cumulative, sum_value=self._sum)
        return [family]


class FlowMetrics:
    """All metrics of one flow."""

    def __init__(
        self,
        registry: CollectorRegistry,
        step_names: Sequence[str],
        read_gauges: Callable[[], Iterable[tuple[str, int, int, int]]],
    ) -> None:
        self.registry = registry
        tasks = _TaskCounts()
        registry.register(tasks)
        batch_size = Histogram(
            "aqueduct_batch_size", "Tasks per handle() call", ["step"], buckets=_BATCH_BUCKETS, registry=registry
        )
        rows = _RowCounts()
        registry.register(rows)
        handle_seconds = Histogram(
            "aqueduct_handle_seconds", "Time of one handle() call", ["step"], buckets=_TIME_BUCKETS, registry=registry
        )
        restarts = Counter(
            "aqueduct_worker_restarts",
            "Worker processes replaced, by why the old one ended: start (before it was ready), killed (by a "
            "signal: SIGKILL, SIGSEGV, abort), exited",
            ["step", "reason"],
            registry=registry,
        )
        rerun = Counter(
            "aqueduct_crash_rerun_tasks",
            "Tasks run again, in halves, because their worker died handling their batch",
            ["step"],
            registry=registry,
        )
        isolated = Counter(
            "aqueduct_crash_isolated_tasks",
            "Tasks found to kill their worker by themselves (failed alone with WorkerDiedError)",
            ["step"],
            registry=registry,
        )
        self.latency = LatencyHistogram(
            "aqueduct_task_latency_seconds",
            "process() time of tasks that completed, end to end",
            _TIME_BUCKETS,
            registry,
        )
        self.steps = [
            StepMetrics(tasks, batch_size, rows, handle_seconds, restarts, rerun, isolated, name) for name in step_names
        ]
        self.flow_outcome = tasks.tallies("flow")
        registry.register(_StepGauges(read_gauges))
