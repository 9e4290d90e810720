"""``Flow``: runs tasks through its steps' worker processes, batching them on the way.

``Flow`` is the façade: it checks its arguments, starts and stops the workers and takes tasks from
``process()``. How batches form, and what happens when workers answer or die, lives in
``_runtime/scheduler.py``; tasks from other processes arrive through ``aqueduct.remote``.
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing as mp
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from prometheus_client import CollectorRegistry

from ._runtime import shm
from ._runtime.arena import Arena, Lease
from ._runtime.devices import check_cuda_not_initialised
from ._runtime.scheduler import LocalEntry, Scheduler, spawner
from ._runtime.supervisor import WorkerProcess, kill_all
from ._runtime.threads import worker_share
from .cpus import available_cpus
from .exceptions import (
    FlowError,
    MPStartMethodValueError,
    NotRunningError,
    QueueFullError,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerDiedError,
)
from .handler import BaseTaskHandler
from .logger import log
from .metrics import FlowMetrics
from .step import FlowStep
from .task import BaseTask

__all__ = ["Flow", "FlowHealth", "FlowState", "FlowStep", "StepHealth"]

#: ``queue_size=None``: at most this many tasks wait in a flow.
DEFAULT_QUEUE_SIZE = 1024
_STOP_JOIN_S = 1.0


class FlowState(Enum):
    """Where a flow is in its life."""

    RUNNING = "running"
    STARTING = "starting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    STEPS_INITIALIZED = "steps_initialized"


@dataclass(frozen=True)
class StepHealth:
    """One step's workers: ``alive`` counts started, live workers out of ``expected``; ``restart_reasons``
    counts the restarts by why the old worker ended (``start``: before it was ready, ``killed``: by a
    signal, ``exited``)."""

    name: str
    expected: int
    alive: int
    restarts: int
    pids: tuple[int, ...]
    queue_depth: int
    restart_reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FlowHealth:
    """A flow's state and its steps' health (what a readiness probe reads)."""

    state: str
    steps: tuple[StepHealth, ...]

    @property
    def ready(self) -> bool:
        """Running, and every step has at least one worker started and alive (one dead worker of several
        being replaced does not stop the flow from serving)."""
        return self.state == FlowState.RUNNING.value and all(s.alive >= 1 for s in self.steps)


class Flow:
    """A pipeline of steps, each running its handler in worker processes.

    Args:
        steps: ``FlowStep``s (or bare handlers, as ``FlowStep(handler)``), in order.
        metrics_enabled: record Prometheus metrics in ``metrics_registry``.
        metrics_collector: accepted for upstream compatibility and ignored.
        metrics_exporter: accepted for upstream compatibility and ignored.
        queue_size: most tasks waiting in the flow (queued, or held by a worker behind the batch it
            is handling); beyond it ``process()`` raises ``QueueFullError`` at once. ``None``: 1024.
        queue_priorities: priority levels; a task's ``priority`` (0 .. N-1) picks its queue and
            higher priorities are taken first.
        mp_start_method: ``fork`` (default), ``spawn`` or ``forkserver``.
        registry: a ``prometheus_client.CollectorRegistry`` for the metrics (default: a new one).
        worker_cpus: CPUs the workers share. Each worker's OpenMP/MKL/OpenBLAS/torch threads are
            limited to its share (``worker_cpus`` divided by the number of workers, at least 1),
            except where the user set ``OMP_NUM_THREADS`` and the like. Default: the CPUs this
            process may use (its affinity, capped by a cgroup CPU quota such as a pod's limit).
        arena_bytes: size of a shared-memory arena for ``lease()`` (0, the default: none), made
            when the flow starts and removed when it stops.

    Example:
        flow = Flow(FlowStep(CatDetectorHandler(), batch_size=20))
        flow.start()
        await flow.process(task)          # task's fields now hold the handler's results
        await flow.stop()
    """

    def __init__(
        self,
        *steps: FlowStep | BaseTaskHandler,
        metrics_enabled: bool = True,
        metrics_collector: Any = None,
        metrics_exporter: Any = None,
        queue_size: int | None = None,
        queue_priorities: int = 1,
        mp_start_method: Literal["fork", "spawn", "forkserver"] = "fork",
        registry: CollectorRegistry | None = None,
        worker_cpus: float | None = None,
        arena_bytes: int = 0,
    ) -> None:
        self._steps = [s if isinstance(s, FlowStep) else FlowStep(s) for s in steps]
        self._names = [s.name or s.handler.get_step_name(i) for i, s in enumerate(self._steps, 1)]
        if len(set(self._names)) != len(self._names):
            raise ValueError(f"step names must be unique, got {self._names}")
        if isinstance(queue_priorities, bool) or not isinstance(queue_priorities, int) or queue_priorities < 1:
            raise ValueError(f"queue_priorities must be an integer >= 1, got {queue_priorities!r}")
        if queue_size is not None and (
            isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1
        ):
            raise ValueError(f"queue_size must be None or an integer >= 1, got {queue_size!r}")
        if mp_start_method != "fork" and mp_start_method != mp.get_start_method():
            raise MPStartMethodValueError(
                f"Multiprocessing start method mismatch: got {mp.get_start_method()!r} for main process "
                f"and {mp_start_method!r} for Flow"
            )
        if worker_cpus is not None and (not isinstance(worker_cpus, (int, float)) or worker_cpus <= 0):
            raise ValueError(f"worker_cpus must be None or a number > 0, got {worker_cpus!r}")
        if isinstance(arena_bytes, bool) or not isinstance(arena_bytes, int) or arena_bytes < 0:
            raise ValueError(f"arena_bytes must be an integer >= 0, got {arena_bytes!r}")
        self._worker_cpus = worker_cpus
        self._arena_bytes = arena_bytes
        self._arena: Arena | None = None
        self._ctx = mp.get_context(mp_start_method)
        self._queue_priorities = queue_priorities
        self._queue_size = queue_size if queue_size is not None else DEFAULT_QUEUE_SIZE
        self._registry = registry if registry is not None else CollectorRegistry()
        self._metrics = FlowMetrics(self._registry, self._names, self._gauges) if metrics_enabled else None
        self._state = FlowState.STOPPED
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sched: Scheduler | None = None
        self._prefix = ""
        self._idle: asyncio.Event | None = None
        self._exited: asyncio.Event | None = None

    # ------------------------------------------------------------------ public API
    @property
    def state(self) -> FlowState:
        """The flow's ``FlowState``."""
        return self._state

    @property
    def is_running(self) -> bool:
        """Whether ``process()`` accepts tasks."""
        return self._state is FlowState.RUNNING

    @property
    def are_steps_initialized(self) -> bool:
        """Whether ``init_processes()`` ran and ``start_inited()`` did not yet."""
        return self._state is FlowState.STEPS_INITIALIZED

    @property
    def steps(self) -> list[FlowStep]:
        """The flow's steps, in order."""
        return list(self._steps)

    @property
    def step_names(self) -> list[str]:
        """The steps' names, in order."""
        return list(self._names)

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The registry holding the engine's ``aqueduct_*`` metrics."""
        return self._registry

    def start(self, timeout: float | None = None) -> None:
        """Start the workers and return when every one has run ``on_start``.

        Raises:
            FlowStartError: an ``on_start`` raised or a worker died while starting.
            FlowStartTimeout: ``timeout`` seconds passed first (also a ``TimeoutError``).
        """
        self.init_processes(timeout)
        self.start_inited()

    def init_processes(self, timeout: float | None = None) -> None:
        """Start the workers and wait for their ``on_start`` (``start()`` without attaching to a loop)."""
        self._begin()
        workers = self._spawn_all()
        try:
            self._wait_ready(workers, None if timeout is None else time.monotonic() + timeout)
        except BaseException:
            self._abort_start()
            raise
        self._state = FlowState.STEPS_INITIALIZED

    def start_inited(self) -> None:
        """Attach workers started by ``init_processes()`` to the running event loop and accept tasks."""
        if self._state is not FlowState.STEPS_INITIALIZED:
            raise FlowError("start_inited() needs init_processes() first")
        self._attach_all(_current_loop())

    async def start_async(self, timeout: float | None = None) -> None:
        """``start()`` that waits for ``on_start`` without blocking the event loop."""
        loop = asyncio.get_running_loop()
        self._begin()
        workers = self._spawn_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            await loop.run_in_executor(None, self._wait_ready, workers, deadline)
        except BaseException:
            self._abort_start()
            raise
        self._attach_all(loop)

    async def process(self, task: BaseTask, timeout_sec: float = 5.0, *, leases: Sequence[Lease] = ()) -> bool:
        """Run ``task`` through the steps; its fields hold the handlers' results when this returns True.

        ``leases``: blocks of this flow's arena (``lease()``) that the task's arrays lie in. The flow
        holds each until no worker can still read or write it, also when this call ends first (its
        timeout passed while a worker runs the task): the caller ``free()``s them when it is done
        with the answer, and the block is not reused before the worker is done too.

        Raises:
            NotRunningError: the flow is not running.
            QueueFullError: ``queue_size`` tasks are waiting already.
            TaskTimeoutError: ``timeout_sec`` passed first.
            TaskError: a handler raised for this task.
            WorkerDiedError: the worker holding the task died.
            TaskCancelledError: the flow stopped with the task in flight.
        """
        if self._state is not FlowState.RUNNING:
            raise NotRunningError("Flow is not running")
        loop = self._loop
        sched = self._sched
        assert loop is not None and sched is not None
        queued = sched.check_capacity()
        if queued is not None:
            if self._metrics:
                self._metrics.flow_outcome["rejected"].inc()
            raise QueueFullError(f"{queued} tasks are waiting, the flow's queue_size is {self._queue_size}")
        if task.priority:
            task.priority = max(0, min(task.priority, self._queue_priorities - 1))
        task.set_timeout(timeout_sec)
        entry = LocalEntry(task, loop.create_future(), tuple(leases))
        if self._arena is not None:  # the task's arrays may lie in leases of it: they travel by reference
            entry.segments[self._arena.name] = self._arena.segment
        sched.deadlines.add(entry)
        sched.submit(entry)
        try:
            finished = await entry.future
        except BaseException as exc:
            if self._metrics:
                self._metrics.flow_outcome[outcome_of(exc)].inc()
            raise
        finally:
            sched.complete(entry)
        if finished is not task:
            task.update(finished)
        if self._metrics:
            self._metrics.flow_outcome["ok"].inc()
            self._metrics.latency.observe(time.monotonic() - entry.arrived_at)
        return True

    async def stop(self, graceful: bool = True, timeout: float | None = None) -> None:
        """Stop the flow; afterwards ``process()`` raises ``NotRunningError``.

        Args:
            graceful: let tasks in flight finish (each within its own deadline, or ``timeout``);
                False fails them at once with ``TaskCancelledError``.
            timeout: bound on the graceful wait, seconds.
        """
        if self._state not in (FlowState.RUNNING, FlowState.STEPS_INITIALIZED):
            log.info("Flow is not running")
            return
        self._state = FlowState.STOPPING
        sched = self._sched
        assert sched is not None
        sched.running = False  # no more batches start, and workers that exit are not replaced
        if graceful and sched.inflight:
            self._idle = asyncio.Event()
            sched.on_idle = self._idle.set
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        for entry in list(sched.inflight):
            entry.fail(TaskCancelledError())
            if entry.done and not isinstance(entry, LocalEntry):
                sched.complete(entry)
        workers = sched.all_workers()
        for w in workers:
            w.close_input()
        if not graceful:
            for w in workers:
                w.signal(signal.SIGTERM)
        if self._loop is not None and any(not w.exited for w in workers):
            self._exited = asyncio.Event()
            sched.on_all_exited = self._exited.set
            try:
                await asyncio.wait_for(self._exited.wait(), _STOP_JOIN_S)
            except asyncio.TimeoutError:
                pass
        self._finish_stop()

    def lease(self, nbytes: int) -> Lease | None:
        """A block of the flow's arena (``arena_bytes``) to put a task's data in, or None (no arena, the
        flow is not running, or no room now).

        Numpy arrays over ``lease.buffer`` reach the workers by reference, without a copy; call
        ``lease.free()`` once the task's answer has been used (arrays over it must not be used after),
        and pass it to ``process(task, leases=[lease])`` so that it outlives a task that timed out.
        """
        if self._arena is None or self._state is not FlowState.RUNNING:
            return None
        return self._arena.lease(nbytes)

    def health(self) -> FlowHealth:
        """The flow's state and, per step, expected/alive workers, restarts, pids and queue depth."""
        steps = tuple(
            StepHealth(
                name=rt.name,
                expected=rt.step.nprocs,
                alive=len(rt.live_workers()),
                restarts=rt.restarts,
                pids=tuple(w.pid for w in rt.workers if w is not None and not w.exited),
                queue_depth=rt.waiting,
                restart_reasons=dict(rt.restart_reasons),
            )
            for rt in (self._sched.steps if self._sched is not None else ())
        )
        return FlowHealth(state=self._state.value, steps=steps)

    def worker_threads(self) -> int:
        """Math-library threads each worker gets (see ``worker_cpus``)."""
        cpus = self._worker_cpus if self._worker_cpus is not None else available_cpus()
        return worker_share(cpus, sum(step.nprocs for step in self._steps))

    def scheduler(self) -> Scheduler:
        """The running flow's scheduler (for ``aqueduct.remote``); raises ``NotRunningError`` otherwise."""
        if self._state is not FlowState.RUNNING or self._sched is None:
            raise NotRunningError("Flow is not running")
        return self._sched

    # ------------------------------------------------------------------ start / stop
    def _begin(self) -> None:
        if self._state is not FlowState.STOPPED:
            raise FlowError(f"Flow is {self._state.value}; start() needs a stopped flow")
        if self._ctx.get_start_method() == "fork":
            check_cuda_not_initialised()
        prefix = shm.new_flow_prefix()
        if self._arena_bytes:  # first: a /dev/shm too small for it fails start() with the flow still stopped
            self._arena = Arena(prefix + "-caller", self._arena_bytes)  # removed by the sweeps below
        self._state = FlowState.STARTING
        self._prefix = prefix
        self._idle = self._exited = None
        self._sched = Scheduler(
            self._steps,
            self._names,
            self._queue_priorities,
            self._queue_size,
            self._metrics,
            self._prefix,
            spawner(self._ctx, self._prefix, self.worker_threads()),
        )
        atexit.register(self._at_exit)

    def _spawn_all(self) -> list[tuple[Any, WorkerProcess]]:
        assert self._sched is not None
        try:
            return self._sched.spawn_all()
        except BaseException:
            self._abort_start()
            raise

    @staticmethod
    def _wait_ready(workers: list[tuple[Any, WorkerProcess]], deadline: float | None) -> None:
        for rt, w in workers:
            w.wait_ready(deadline, rt.name)

    def _attach_all(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._sched is not None
        self._loop = loop
        self._sched.attach_all(loop)
        self._state = FlowState.RUNNING
        log.info("Flow was started")

    def _all_workers(self) -> list[WorkerProcess]:
        return self._sched.all_workers() if self._sched is not None else []

    def _abort_start(self) -> None:
        workers = self._all_workers()
        kill_all(workers, grace=0.5)
        for w in workers:
            w.detach()
        self._stopped()

    def _finish_stop(self) -> None:
        workers = self._all_workers()
        kill_all(workers, grace=0.2)
        for w in workers:
            if not w.exited:
                w.detach()
        if self._sched is not None:
            self._sched.clear()
        self._stopped()
        log.info("Flow was stopped")

    def _stopped(self) -> None:
        """The workers are gone: remove the flow's shared memory (its arena too); it may start again."""
        shm.sweep(self._prefix + "-")
        self._arena = None
        self._state = FlowState.STOPPED
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        kill_all(self._all_workers(), grace=0.2)
        shm.sweep(self._prefix + "-")

    def _gauges(self) -> Iterator[tuple[str, int, int, int]]:
        if self._sched is not None:
            yield from self._sched.gauges()


def _current_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.get_event_loop_policy().get_event_loop()


def outcome_of(exc: BaseException) -> str:
    """The ``aqueduct_tasks`` outcome label of a task that failed with ``exc``."""
    if isinstance(exc, TaskTimeoutError):
        return "expired"
    if isinstance(exc, (TaskCancelledError, asyncio.CancelledError)):
        return "cancelled"
    if isinstance(exc, WorkerDiedError):
        return "lost"
    return "error"
