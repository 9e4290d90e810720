"""``Flow``: runs tasks through its steps' worker processes, batching them on the way.

The parent process schedules: each step keeps its waiting tasks in per-priority queues and hands
batches to its workers over pipes (one pair per worker), so the parent knows which tasks each
worker holds. That is what lets a failing task fail alone, a dead worker's tasks fail at once and
the worker be replaced, deadlines be enforced before a task reaches a handler, and a stop be quick.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import multiprocessing as mp
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from prometheus_client import CollectorRegistry

from ._runtime import codec, pipes, shm
from ._runtime.adaptive import AdaptiveWindow
from ._runtime.supervisor import WorkerProcess, kill_all, spawn
from ._runtime.worker import ERROR, EXPIRED, OK, describe_exception
from .exceptions import (
    FlowError,
    MPStartMethodValueError,
    NotRunningError,
    QueueFullError,
    TaskCancelledError,
    TaskError,
    TaskTimeoutError,
    WorkerDiedError,
)
from .handler import BaseTaskHandler
from .logger import log
from .metrics import FlowMetrics, StepMetrics
from .step import FlowStep
from .task import BaseTask

__all__ = ["Flow", "FlowHealth", "FlowState", "FlowStep", "StepHealth"]

#: ``queue_size=None``: at most this many tasks wait in a flow.
DEFAULT_QUEUE_SIZE = 1024
#: A worker that dies within this many seconds of its start counts as crash-looping.
CRASH_LOOP_WINDOW_S = 10.0
MAX_RESTART_DELAY_S = 30.0
#: Tasks a worker may hold beyond the batch it is handling (full batches only).
PREFETCH_TASKS = 32
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
    """One step's workers: ``alive`` counts started, live workers out of ``expected``."""

    name: str
    expected: int
    alive: int
    restarts: int
    pids: tuple[int, ...]
    queue_depth: int


@dataclass(frozen=True)
class FlowHealth:
    """A flow's state and its steps' health (what a readiness probe reads)."""

    state: str
    steps: tuple[StepHealth, ...]

    @property
    def ready(self) -> bool:
        """Running, and every step has all its workers started and alive."""
        return self.state == FlowState.RUNNING.value and all(s.alive == s.expected for s in self.steps)


class _Entry:
    """A task in flight: the caller's object, its latest copy, its future and its shared memory."""

    __slots__ = (
        "task",
        "current",
        "future",
        "priority",
        "segments",
        "keep",
        "in_worker",
        "released",
        "timer",
        "enqueued_at",
    )

    def __init__(self, task: BaseTask, future: asyncio.Future[BaseTask]) -> None:
        self.task = task
        self.current = task
        self.future = future
        self.priority = task.priority
        self.segments = task.shared_segments()
        self.keep = frozenset(self.segments)  # share_value's segments belong to the task, not to this trip
        self.in_worker = False
        self.released = False
        self.timer: asyncio.TimerHandle | None = None
        self.enqueued_at = 0.0


class _Step:
    """A step at run time: its queues, workers and restart bookkeeping."""

    def __init__(self, step: FlowStep, index: int, name: str, priorities: int, metrics: StepMetrics | None) -> None:
        self.step = step
        self.index = index
        self.name = name
        self.queues: list[deque[_Entry]] = [deque() for _ in range(priorities)]
        self.waiting = 0
        self.workers: list[WorkerProcess | None] = [None] * step.nprocs
        self.restarts = 0
        self.crashes = [0] * step.nprocs
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0
        self.quick = False  # the last batch took under pipes.SPIN_S in handle()
        self.metrics = metrics
        # Full batches a worker may hold behind the one it handles. None with priorities: a task that
        # arrives later with a higher priority must not find lower ones already handed out ahead of it.
        self.max_inflight = 1 + (max(1, PREFETCH_TASKS // step.batch_size) if priorities == 1 else 0)
        self.adaptive = AdaptiveWindow(step.latency_target) if step.latency_target else None

    def dispatch_at(self, now: float) -> float:
        """When a free worker should take the waiting (fewer than a batch) tasks."""
        if self.adaptive is not None:
            return self.adaptive.dispatch_at(now, self.oldest(), self.waiting, self.step.batch_size)
        if self.step.batch_timeout:
            return self.oldest() + self.step.batch_timeout
        return now

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w is not None and w.ready and not w.exited]

    def oldest(self) -> float:
        return min(q[0].enqueued_at for q in self.queues if q)


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
        self._ctx = mp.get_context(mp_start_method)
        self._queue_priorities = queue_priorities
        self._queue_size = queue_size if queue_size is not None else DEFAULT_QUEUE_SIZE
        self._registry = registry if registry is not None else CollectorRegistry()
        self._metrics = FlowMetrics(self._registry, self._names, self._gauges) if metrics_enabled else None
        self._state = FlowState.STOPPED
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rt: list[_Step] = []
        self._prefix = ""
        self._waiting = 0
        self._prefetch_bound = 0
        self._inflight: set[_Entry] = set()
        self._dirty: list[_Step] = []
        self._batch_ids = itertools.count()
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

    async def process(self, task: BaseTask, timeout_sec: float = 5.0) -> bool:
        """Run ``task`` through the steps; its fields hold the handlers' results when this returns True.

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
        assert loop is not None
        if self._waiting + self._prefetch_bound >= self._queue_size:  # near the limit: count exactly
            queued = self._queued()
            if queued >= self._queue_size:
                if self._metrics:
                    self._metrics.flow_outcome["rejected"].inc()
                raise QueueFullError(f"{queued} tasks are waiting, the flow's queue_size is {self._queue_size}")
        task.priority = max(0, min(task.priority, self._queue_priorities - 1))
        task.set_timeout(timeout_sec)
        started = loop.time()
        entry = _Entry(task, loop.create_future())
        entry.timer = loop.call_at(started + timeout_sec, self._on_deadline, entry)
        self._inflight.add(entry)
        self._route(entry, 0)
        try:
            finished = await entry.future
        except BaseException as exc:
            if self._metrics:
                self._metrics.flow_outcome[_outcome(exc)].inc()
            raise
        finally:
            entry.timer.cancel()
            self._inflight.discard(entry)
            if not self._inflight and self._idle is not None:
                self._idle.set()
            if not entry.in_worker:
                self._release(entry)
        if finished is not task:
            task.update(finished)
        if self._metrics:
            self._metrics.flow_outcome["ok"].inc()
            self._metrics.latency.observe(loop.time() - started)
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
        if graceful and self._inflight:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        for entry in list(self._inflight):
            if not entry.future.done():
                entry.future.set_exception(TaskCancelledError())
        workers = self._all_workers()
        for w in workers:
            w.close_input()
        if not graceful:
            for w in workers:
                w.signal(signal.SIGTERM)
        if self._loop is not None and any(not w.exited for w in workers):
            self._exited = asyncio.Event()
            try:
                await asyncio.wait_for(self._exited.wait(), _STOP_JOIN_S)
            except asyncio.TimeoutError:
                pass
        self._finish_stop()

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
            )
            for rt in self._rt
        )
        return FlowHealth(state=self._state.value, steps=steps)

    # ------------------------------------------------------------------ start / stop
    def _begin(self) -> None:
        if self._state is not FlowState.STOPPED:
            raise FlowError(f"Flow is {self._state.value}; start() needs a stopped flow")
        self._state = FlowState.STARTING
        self._prefix = shm.new_flow_prefix()
        self._waiting = 0
        self._inflight = set()
        self._dirty = []
        self._idle = self._exited = None
        self._rt = [
            _Step(step, i, name, self._queue_priorities, self._metrics.steps[i] if self._metrics else None)
            for i, (step, name) in enumerate(zip(self._steps, self._names, strict=True))
        ]
        # most tasks workers can hold beyond their current batches: below this margin, no need to count them
        self._prefetch_bound = sum(rt.step.nprocs * (rt.max_inflight - 1) * rt.step.batch_size for rt in self._rt)
        atexit.register(self._at_exit)

    def _spawn_all(self) -> list[tuple[_Step, WorkerProcess]]:
        spawned = []
        try:
            for rt in self._rt:
                for slot in range(rt.step.nprocs):
                    w = self._spawn(rt, slot)
                    spawned.append((rt, w))
        except BaseException:
            self._abort_start()
            raise
        return spawned

    def _spawn(self, rt: _Step, slot: int) -> WorkerProcess:
        w = spawn(self._ctx, rt.step.handler, rt.name, rt.step.bisect, self._prefix, slot)
        rt.workers[slot] = w
        return w

    @staticmethod
    def _wait_ready(workers: list[tuple[_Step, WorkerProcess]], deadline: float | None) -> None:
        for rt, w in workers:
            w.wait_ready(deadline, rt.name)

    def _attach_all(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for rt in self._rt:
            for w in rt.workers:
                if w is not None:
                    self._attach(rt, w)
        self._state = FlowState.RUNNING
        log.info("Flow was started")

    def _attach(self, rt: _Step, w: WorkerProcess) -> None:
        assert self._loop is not None
        w.attach(self._loop, lambda message: self._on_message(rt, w, message), lambda: self._on_exit(rt, w))

    def _all_workers(self) -> list[WorkerProcess]:
        return [w for rt in self._rt for w in rt.workers if w is not None]

    def _abort_start(self) -> None:
        workers = self._all_workers()
        kill_all(workers, grace=0.5)
        for w in workers:
            w.detach()
        shm.sweep(self._prefix + "-")
        self._state = FlowState.STOPPED
        atexit.unregister(self._at_exit)

    def _finish_stop(self) -> None:
        workers = self._all_workers()
        kill_all(workers, grace=0.2)
        for w in workers:
            if not w.exited:
                w.detach()
        for rt in self._rt:
            if rt.timer is not None:
                rt.timer.cancel()
            for queue in rt.queues:
                queue.clear()
        for entry in list(self._inflight):
            self._release(entry)
        shm.sweep(self._prefix + "-")
        self._state = FlowState.STOPPED
        atexit.unregister(self._at_exit)
        log.info("Flow was stopped")

    def _at_exit(self) -> None:
        kill_all(self._all_workers(), grace=0.2)
        shm.sweep(self._prefix + "-")

    # ------------------------------------------------------------------ scheduling
    def _route(self, entry: _Entry, start: int) -> None:
        """Queue the task at the first step from ``start`` whose condition holds, or finish it."""
        for rt in self._rt[start:]:
            try:
                wanted = rt.step.handle_condition(entry.current)
            except Exception as exc:  # noqa: BLE001 - the task fails, the flow goes on
                self._fail(entry, TaskError(rt.name, *describe_exception(exc)))
                return
            if wanted:
                entry.enqueued_at = time.monotonic()
                if rt.adaptive is not None:
                    rt.adaptive.arrived(entry.enqueued_at)
                rt.queues[entry.priority].append(entry)
                rt.waiting += 1
                self._waiting += 1
                self._schedule(rt)
                return
        if not entry.future.done():
            entry.future.set_result(entry.current)

    def _schedule(self, rt: _Step) -> None:
        if not self._dirty:
            assert self._loop is not None
            self._loop.call_soon(self._dispatch_dirty)
        if rt not in self._dirty:
            self._dirty.append(rt)

    def _dispatch_dirty(self) -> None:
        dirty, self._dirty = self._dirty, []
        for rt in dirty:
            self._dispatch(rt)

    def _dispatch(self, rt: _Step) -> None:
        """Hand waiting tasks of a step to its free workers, as batches."""
        if not rt.waiting or self._state is not FlowState.RUNNING:
            return
        size = rt.step.batch_size
        for w in sorted(rt.live_workers(), key=lambda w: len(w.inflight)):
            batches: list[list[_Entry]] = []
            while rt.waiting:
                held = len(w.inflight) + len(batches)
                if held >= rt.max_inflight or (held and rt.waiting < size):
                    break
                if not held and rt.waiting < size:
                    now = time.monotonic()
                    due = rt.dispatch_at(now)
                    if now < due:
                        self._wake_at(rt, due)
                        break
                if not held and rt.adaptive is not None:
                    rt.adaptive.dispatched(rt.waiting)
                batch = self._take(rt, size)
                if batch:
                    batches.append(batch)
            if batches:
                self._send(rt, w, batches)
            if not rt.waiting:
                return

    def _wake_at(self, rt: _Step, due: float) -> None:
        if rt.timer is not None and rt.timer_due <= due:
            return
        if rt.timer is not None:
            rt.timer.cancel()
        assert self._loop is not None
        rt.timer_due = due
        rt.timer = self._loop.call_later(max(0.0, due - time.monotonic()), self._on_batch_timer, rt)

    def _on_batch_timer(self, rt: _Step) -> None:
        rt.timer = None
        self._dispatch(rt)

    def _take(self, rt: _Step, size: int) -> list[_Entry]:
        """Up to ``size`` live tasks, highest priority first; tasks whose caller gave up are dropped."""
        batch: list[_Entry] = []
        for queue in reversed(rt.queues):
            while queue and len(batch) < size:
                entry = queue.popleft()
                rt.waiting -= 1
                self._waiting -= 1
                if entry.future.done():
                    if rt.metrics:
                        rt.metrics.outcome["expired"].inc()
                    continue
                if entry.task.is_expired():
                    if rt.metrics:
                        rt.metrics.outcome["expired"].inc()
                    self._fail(entry, TaskTimeoutError())
                    continue
                batch.append(entry)
        return batch

    def _queued(self) -> int:
        """Tasks waiting: in the steps' queues, or held by a worker behind the batch it is handling."""
        prefetched = sum(
            len(batch)
            for rt in self._rt
            for w in rt.workers
            if w is not None
            for batch in itertools.islice(w.inflight.values(), 1, None)
        )
        return self._purge() + prefetched

    def _purge(self) -> int:
        """Drop waiting tasks whose callers gave up (timed out, cancelled); returns tasks still waiting."""
        for rt in self._rt:
            for queue in rt.queues:
                live = [e for e in queue if not e.future.done()]
                dropped = len(queue) - len(live)
                if dropped:
                    queue.clear()
                    queue.extend(live)
                    rt.waiting -= dropped
                    self._waiting -= dropped
        return self._waiting

    def _send(self, rt: _Step, w: WorkerProcess, batches: list[list[_Entry]]) -> None:
        payload = []
        for batch in batches:
            sent: list[_Entry] = []
            encoded: list[codec.Encoded] = []
            for entry in batch:
                try:
                    encoded.append(codec.encode(entry.current, entry.segments, self._prefix + "-p"))
                except Exception as exc:  # noqa: BLE001 - an unpicklable task fails alone
                    self._fail(entry, TaskError(rt.name, *describe_exception(exc)))
                    continue
                entry.in_worker = True
                sent.append(entry)
            if sent:
                batch_id = next(self._batch_ids)
                w.inflight[batch_id] = sent
                payload.append((batch_id, encoded))
        if payload:
            assert w.writer is not None
            w.writer.write(pipes.pack(("run", payload)))
            # A lone task on a fast handler: its answer is due in microseconds, sooner than this
            # process would wake up from the event loop's sleep, so wait for it here.
            lone = rt.quick and len(self._inflight) == 1 and w.reader is not None
            if lone and pipes.spin_until_readable(w.from_worker, 2 * pipes.SPIN_S):
                assert w.reader is not None
                w.reader.drain()

    # ------------------------------------------------------------------ worker events
    def _on_message(self, rt: _Step, w: WorkerProcess, message: Any) -> None:
        kind = message[0]
        if kind == "done":
            self._on_done(rt, w, message[1], message[2], message[3])
        elif kind == "ready":
            w.ready = True
            log.info("step %r: worker %d is ready", rt.name, w.pid)
            self._schedule(rt)
        elif kind == "start_failed":
            log.error("step %r: worker %d on_start raised %s: %s\n%s", rt.name, w.pid, *message[1:])

    def _on_done(self, rt: _Step, w: WorkerProcess, batch_id: int, outcomes: list[Any], seconds: float) -> None:
        batch = w.inflight.pop(batch_id, None)
        if batch is None:
            return
        handled = 0
        metrics = rt.metrics
        for entry, (status, payload) in zip(batch, outcomes, strict=True):
            entry.in_worker = False
            if status != EXPIRED:
                handled += 1
            if entry.future.done():
                self._release(entry)
                continue
            if status == OK:
                try:
                    entry.current = codec.decode(payload[0], payload[1], entry.segments)
                except Exception as exc:  # noqa: BLE001
                    self._fail(entry, TaskError(rt.name, *describe_exception(exc)))
                    continue
                if metrics:
                    metrics.outcome["ok"].inc()
                self._route(entry, rt.index + 1)
            elif status == ERROR:
                if metrics:
                    metrics.outcome["error"].inc()
                self._fail(entry, TaskError(rt.name, *payload))
            else:
                if metrics:
                    metrics.outcome["expired"].inc()
                self._fail(entry, TaskTimeoutError())
        rt.quick = seconds < pipes.SPIN_S
        if handled:
            if metrics:
                metrics.batch(handled, seconds)
            if rt.adaptive is not None:
                rt.adaptive.handled(handled, seconds)
        self._schedule(rt)

    def _on_exit(self, rt: _Step, w: WorkerProcess) -> None:
        """A worker process ended: fail the batch it was handling, queue again the batches it had not
        started, clean up, and replace it if the flow runs."""
        w.detach()
        batches = list(w.inflight.values())  # in the order the worker takes them
        w.inflight.clear()
        reason = _exit_reason(w.process.exitcode)
        for entry in reversed([entry for batch in batches[1:] for entry in batch]):
            entry.in_worker = False
            if entry.future.done():
                self._release(entry)
            else:
                rt.queues[entry.priority].appendleft(entry)
                rt.waiting += 1
                self._waiting += 1
        for entry in batches[0] if batches else ():
            entry.in_worker = False
            if rt.metrics:
                rt.metrics.outcome["lost"].inc()
            if entry.future.done():
                self._release(entry)
            else:
                self._fail(entry, WorkerDiedError(f"step {rt.name!r}: worker {w.pid} {reason} holding the task"))
        shm.sweep(f"{self._prefix}-w{w.pid}-")
        if self._state is FlowState.RUNNING:
            slot = rt.workers.index(w)
            quick = not w.ready or time.monotonic() - w.started_at < CRASH_LOOP_WINDOW_S
            rt.crashes[slot] = rt.crashes[slot] + 1 if quick else 0
            delay = 0.0 if not rt.crashes[slot] else min(MAX_RESTART_DELAY_S, 0.5 * 2 ** (rt.crashes[slot] - 1))
            log.error("step %r: worker %d %s; restarting it in %.1f s", rt.name, w.pid, reason, delay)
            assert self._loop is not None
            self._loop.call_later(delay, self._restart, rt, slot)
            self._schedule(rt)
        elif self._exited is not None and all(x.exited for x in self._all_workers()):
            self._exited.set()

    def _restart(self, rt: _Step, slot: int) -> None:
        if self._state is not FlowState.RUNNING:
            return
        try:
            w = self._spawn(rt, slot)
        except Exception:  # noqa: BLE001 - e.g. out of memory to fork: try again later
            log.exception("step %r: could not start a worker", rt.name)
            assert self._loop is not None
            self._loop.call_later(MAX_RESTART_DELAY_S, self._restart, rt, slot)
            return
        rt.restarts += 1
        if rt.metrics:
            rt.metrics.restarts.inc()
        self._attach(rt, w)

    def _on_deadline(self, entry: _Entry) -> None:
        if not entry.future.done():
            entry.future.set_exception(TaskTimeoutError())

    def _fail(self, entry: _Entry, exc: BaseException) -> None:
        if not entry.future.done():
            entry.future.set_exception(exc)

    def _release(self, entry: _Entry) -> None:
        """Unlink the shared memory made for this trip (mappings stay valid for arrays using them)."""
        if entry.released or not entry.future.done():
            return
        entry.released = True
        for name, seg in entry.segments.items():
            if name not in entry.keep:
                seg.unlink()

    def _gauges(self) -> Iterator[tuple[str, int, int, int]]:
        for rt in self._rt:
            yield rt.name, rt.waiting, len(rt.live_workers()), rt.step.nprocs


def _current_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.get_event_loop_policy().get_event_loop()


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, TaskTimeoutError):
        return "expired"
    if isinstance(exc, (TaskCancelledError, asyncio.CancelledError)):
        return "cancelled"
    if isinstance(exc, WorkerDiedError):
        return "lost"
    return "error"
