"""How a batch forms: the parent's per-step queues, dispatch to workers, and worker events.

Tasks arrive as entries: from ``Flow.process`` in this process (a future to resolve) or from another
process through ``aqueduct.remote`` (a client to answer). Either way an entry waits in its step's
per-priority queue until a worker is free, travels to it as part of a batch and comes back as an
outcome. A batch of local tasks travels as one pickle each way (``codec.encode_batch``), which costs a
third of one pickle per task; their large arrays go by reference where they lie in an arena (the
caller's leases), else the batch goes one pickle per task. Other tasks travel one pickle each, and
between steps they stay in the encoded form the worker sent back (bytes and shared memory
references): the parent decodes one only where a ``handle_condition`` must look at it, or where a
local caller waits for it.

Because the parent knows which batches each worker holds, a failing task fails alone, a dead
worker's batches are failed or queued again at once and the worker is replaced, expired tasks
never reach a handler, and a stop is quick.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import operator
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from ..exceptions import TaskError, TaskTimeoutError, WorkerDiedError
from ..logger import log
from ..metrics import FlowMetrics, StepMetrics
from ..step import FlowStep
from ..task import BaseTask
from . import codec, pipes, shm
from .adaptive import AdaptiveWindow
from .arena import Lease
from .devices import worker_environment
from .shm import ARENA_SUFFIX
from .supervisor import WorkerProcess, spawn
from .worker import ERROR, EXPIRED, OK, describe_exception

MAX_RESTART_DELAY_S = 30.0
#: How long a dead worker's shared memory keeps its names, for the answers it sent before it died.
DEAD_WORKER_SWEEP_DELAY_S = 10.0
#: Tasks a worker may hold beyond the batch it is handling (full batches only).
PREFETCH_TASKS = 32


class Entry:
    """A task in flight: its latest decoded and/or encoded form, and the shared memory of its trip.

    ``segments`` maps the names of segments this process mapped for the task; ``keep`` names those
    that belong to the caller (never unlinked here); ``worker_refs`` names the segments workers
    made for the task's intermediate results, unlinked when the task is done.
    """

    __slots__ = (
        "current",
        "encoded",
        "priority",
        "weight",
        "expires_at",
        "segments",
        "keep",
        "worker_refs",
        "worker_blocks",
        "delivered",
        "in_worker",
        "released",
        "enqueued_at",
        "arrived_at",
    )

    def __init__(
        self,
        current: BaseTask | None,
        encoded: codec.Encoded | None,
        priority: int,
        expires_at: float,
        weight: int = 1,
    ) -> None:
        self.current = current
        self.encoded = encoded
        self.priority = priority
        self.weight = weight  # toward batch_size (BaseTask.set_weight)
        self.expires_at = expires_at
        self.segments: dict[str, shm.Segment] = {}
        self.keep: frozenset[str] = frozenset()
        self.worker_refs: set[str] | None = None
        self.worker_blocks: set[tuple[str, int, int]] | None = None  # in workers' output arenas
        self.delivered = False  # the caller got the final result (and frees its output blocks)
        self.in_worker = False
        self.released = False
        self.enqueued_at = 0.0
        self.arrived_at = 0.0

    @property
    def done(self) -> bool:
        """The task has its answer, or its caller stopped waiting."""
        raise NotImplementedError

    def finish(self, step_name: str) -> None:
        """The task passed every step: hand it to its caller."""
        raise NotImplementedError

    def fail(self, exc: BaseException) -> None:
        """The task failed: tell its caller (once)."""
        raise NotImplementedError

    def release(self) -> None:
        """Unlink the shared memory workers made for this trip, once it is done and out of workers."""
        if self.released or self.in_worker or not self.done:
            return
        self.released = True
        if self.worker_refs:
            for name in self.worker_refs:
                shm.unlink(name)
        self.free_blocks()
        for name, seg in self.segments.items():
            if name not in self.keep and not name.endswith(ARENA_SUFFIX):  # arenas outlive their tasks
                seg.unlink()

    def free_blocks(self) -> None:
        """Free the output-arena blocks of this task's results that its caller will not read."""
        if self.worker_blocks:
            blocks = self.worker_blocks
            if self.delivered and self.encoded is not None:
                blocks = blocks - codec.output_blocks(self.encoded[1])  # the caller frees those
            codec.free_outputs(blocks)


class LocalEntry(Entry):
    """A task from ``Flow.process`` in this process: the caller awaits ``future``.

    ``leases`` are blocks of the flow's arena the task's arrays lie in: the entry holds them until it
    is released, that is, until no worker can still read or write them (not when its caller stops
    waiting: a worker may be running the task then).
    """

    __slots__ = ("task", "future", "timer", "leases")

    def __init__(self, task: BaseTask, future: asyncio.Future[BaseTask], leases: tuple[Lease, ...] = ()) -> None:
        super().__init__(task, None, task.priority, task.expiration_time or float("inf"), task.weight)
        self.task = task
        self.future = future
        self.segments = task.shared_segments()
        self.keep = frozenset(self.segments)  # share_value's segments belong to the task, not to this trip
        self.timer: asyncio.TimerHandle | None = None  # its own deadline timer, when out of order
        self.leases = leases
        for lease in leases:
            lease.retain()

    def release(self) -> None:
        if self.released or self.in_worker or not self.done:
            return
        super().release()
        for lease in self.leases:
            lease.release()

    @property
    def done(self) -> bool:
        return self.future.done()

    def finish(self, step_name: str) -> None:
        if self.future.done():
            return
        if self.encoded is not None:  # (a decoding made for a handle_condition holds views, not copies)
            try:
                self.current = codec.decode(self.encoded[0], self.encoded[1], self.segments, final=True)
            except Exception as exc:  # noqa: BLE001 - the task fails, the flow goes on
                self.fail(TaskError(step_name, *describe_exception(exc), TaskError.UNPICKLING_RESULT))
                return
            self.delivered = True
        self.future.set_result(self.current if self.current is not None else self.task)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Deadlines:
    """Fails local tasks with ``TaskTimeoutError`` when their deadline passes, with one timer for them all.

    Tasks mostly arrive with the same timeout, so their deadlines come in order: they wait in a
    queue, and one timer is armed for the earliest. A task whose deadline is earlier than the last
    one queued gets a timer of its own. Tasks that finished leave the queue's head as they finish,
    and the timer stays as it is: cancelling and arming one per task would cost more than the task.
    It may then fire for a task that is done; it sleeps again until the next deadline.
    """

    def __init__(self) -> None:
        self.queue: deque[LocalEntry] = deque()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = math.inf

    def add(self, entry: LocalEntry) -> None:
        """Watch ``entry``'s deadline."""
        assert self.loop is not None
        queue = self.queue
        if queue and entry.expires_at < queue[-1].expires_at:
            entry.timer = self.loop.call_later(max(0.0, entry.expires_at - time.monotonic()), _expire, entry)
            return
        queue.append(entry)
        if entry.expires_at < self._due:
            self._arm(entry.expires_at)

    def done(self, entry: LocalEntry) -> None:
        """``entry`` has its answer."""
        if entry.timer is not None:
            entry.timer.cancel()
        queue = self.queue
        if queue and queue[0] is entry:
            while queue and queue[0].future.done():
                queue.popleft()

    def _arm(self, due: float) -> None:
        assert self.loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._due = due
        self._timer = self.loop.call_later(max(0.0, due - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._due = math.inf
        queue = self.queue
        now = time.monotonic()
        while queue and (queue[0].future.done() or queue[0].expires_at <= now):
            _expire(queue.popleft())
        if queue:
            self._arm(queue[0].expires_at)

    def clear(self) -> None:
        """Stop watching (the flow stopped)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = math.inf
        for entry in self.queue:
            if entry.timer is not None:
                entry.timer.cancel()
        self.queue.clear()


def _expire(entry: LocalEntry) -> None:
    entry.fail(TaskTimeoutError())


class _StepRuntime:
    """A step at run time: its queues, workers and restart bookkeeping."""

    def __init__(self, step: FlowStep, index: int, name: str, priorities: int, metrics: StepMetrics | None) -> None:
        self.step = step
        self.index = index
        self.name = name
        self.queues: list[deque[Entry]] = [deque() for _ in range(priorities)]
        self.waiting = 0
        #: The weights of the tasks in ``queues`` (suspect groups aside): rows, where tasks carry several.
        self.rows = 0
        self.workers: list[WorkerProcess | None] = [None] * step.nprocs
        self.restarts = 0
        self.restart_reasons: dict[str, int] = {}
        self.crashes = [0] * step.nprocs
        # Groups of tasks a dead worker held, each to be run as a batch of its own (crash bisection).
        self.suspects: deque[list[Entry]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0
        self.quick = False  # the last batch took under pipes.SPIN_S in handle()
        self.metrics = metrics
        # The default condition is true for every task: no need to decode a task to ask it.
        self.always = step.handle_condition is operator.truth
        # Full batches a worker may hold behind the one it handles. None with priorities: a task that
        # arrives later with a higher priority must not find lower ones already handed out ahead of it.
        self.max_inflight = 1 + (max(1, PREFETCH_TASKS // step.batch_size) if priorities == 1 else 0)
        self.adaptive = AdaptiveWindow(step.latency_target) if step.latency_target else None

    def dispatch_at(self, now: float) -> float:
        """When a free worker should take the waiting (fewer than a batch) tasks."""
        if self.adaptive is not None:
            return self.adaptive.dispatch_at(now, self.oldest(), self.rows, self.step.batch_size)
        if self.step.batch_timeout:
            return self.oldest() + self.step.batch_timeout
        return now

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w is not None and w.ready and not w.exited]

    def oldest(self) -> float:
        return min(q[0].enqueued_at for q in self.queues if q)

    def suspect_count(self) -> int:
        """Tasks waiting in suspect groups (counted in ``waiting`` too)."""
        return sum(len(group) for group in self.suspects) if self.suspects else 0


class Scheduler:
    """The run-time state of one started flow: steps, queues, workers and the tasks in flight."""

    def __init__(
        self,
        steps: list[FlowStep],
        names: list[str],
        priorities: int,
        queue_size: int,
        metrics: FlowMetrics | None,
        prefix: str,
        spawn_worker: Callable[[FlowStep, str, int], WorkerProcess],
    ) -> None:
        self.steps = [
            _StepRuntime(step, i, name, priorities, metrics.steps[i] if metrics else None)
            for i, (step, name) in enumerate(zip(steps, names, strict=True))
        ]
        self.priorities = priorities
        self.queue_size = queue_size
        self.metrics = metrics
        self.prefix = prefix
        self.running = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiting = 0
        self.inflight: set[Entry] = set()
        self.deadlines = Deadlines()
        self.on_idle: Callable[[], None] | None = None
        self.on_all_exited: Callable[[], None] | None = None
        self._spawn_worker = spawn_worker
        self._dirty: list[_StepRuntime] = []
        self._batch_ids = itertools.count()
        # most tasks workers can hold beyond their current batches: below this margin, no need to count them
        self._prefetch_bound = sum(rt.step.nprocs * (rt.max_inflight - 1) * rt.step.batch_size for rt in self.steps)
        self._worker_prefix = prefix + "-w"

    # ------------------------------------------------------------------ workers
    def spawn_all(self) -> list[tuple[_StepRuntime, WorkerProcess]]:
        """Start every step's workers (not yet attached to a loop)."""
        return [(rt, self._spawn(rt, slot)) for rt in self.steps for slot in range(rt.step.nprocs)]

    def _spawn(self, rt: _StepRuntime, slot: int) -> WorkerProcess:
        w = self._spawn_worker(rt.step, rt.name, slot)
        rt.workers[slot] = w
        return w

    def attach_all(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the workers' pipes from ``loop`` and start dispatching."""
        self.loop = self.deadlines.loop = loop
        for rt in self.steps:
            for w in rt.workers:
                if w is not None:
                    self._attach(rt, w)
        self.running = True

    def _attach(self, rt: _StepRuntime, w: WorkerProcess) -> None:
        assert self.loop is not None
        w.attach(self.loop, lambda message: self._on_message(rt, w, message), lambda: self._on_exit(rt, w))

    def all_workers(self) -> list[WorkerProcess]:
        return [w for rt in self.steps for w in rt.workers if w is not None]

    def gauges(self) -> Iterator[tuple[str, int, int, int]]:
        """(step, queue depth, live workers, expected workers) per step."""
        for rt in self.steps:
            yield rt.name, rt.waiting, len(rt.live_workers()), rt.step.nprocs

    # ------------------------------------------------------------------ tasks in
    def check_capacity(self) -> int | None:
        """None when a task may enter; else how many wait already (the caller raises ``QueueFullError``)."""
        if self.waiting + self._prefetch_bound < self.queue_size:
            return None
        queued = self._queued()
        return queued if queued >= self.queue_size else None

    def submit(self, entry: Entry) -> None:
        """Take a task in: queue it at its first step."""
        entry.arrived_at = time.monotonic()
        self.inflight.add(entry)
        self.route(entry, 0, entry.arrived_at)
        if entry.done:
            self._forget(entry)

    def complete(self, entry: Entry) -> None:
        """The entry's caller has its answer (or gave up): forget the entry."""
        if isinstance(entry, LocalEntry):
            self.deadlines.done(entry)
        self.inflight.discard(entry)
        if not self.inflight and self.on_idle is not None:
            self.on_idle()
        entry.release()

    def route(self, entry: Entry, start: int, now: float | None = None) -> None:
        """Queue the task at the first step from ``start`` whose condition holds, or finish it
        (``now``: ``time.monotonic()``, where the caller has it)."""
        steps = self.steps
        for index in range(start, len(steps)):
            rt = steps[index]
            if not rt.always:
                try:
                    if entry.current is None:
                        assert entry.encoded is not None
                        entry.current = codec.decode(entry.encoded[0], entry.encoded[1], entry.segments)
                    wanted = rt.step.handle_condition(entry.current)
                except Exception as exc:  # noqa: BLE001 - the task fails, the flow goes on
                    entry.fail(TaskError(rt.name, *describe_exception(exc), TaskError.CONDITION))
                    return
                if not wanted:
                    continue
            entry.enqueued_at = now if now is not None else time.monotonic()
            if rt.adaptive is not None:
                rt.adaptive.arrived(entry.enqueued_at)
            rt.queues[entry.priority].append(entry)
            rt.waiting += 1
            rt.rows += entry.weight
            self.waiting += 1
            self._schedule(rt)
            return
        entry.finish(steps[-1].name if steps else "")

    # ------------------------------------------------------------------ dispatch
    def _schedule(self, rt: _StepRuntime) -> None:
        if not self._dirty:
            assert self.loop is not None
            self.loop.call_soon(self._dispatch_dirty)
        if rt not in self._dirty:
            self._dirty.append(rt)

    def _dispatch_dirty(self) -> None:
        dirty, self._dirty = self._dirty, []
        for rt in dirty:
            self._dispatch(rt)

    def _dispatch(self, rt: _StepRuntime) -> None:
        """Hand waiting tasks of a step to its free workers, as batches."""
        if not rt.waiting or not self.running:
            return
        size = rt.step.batch_size
        for w in sorted(rt.live_workers(), key=lambda w: len(w.inflight)):
            if w.suspect:
                continue  # nothing joins a group under suspicion: if the worker dies, the group is to blame
            if rt.suspects:
                # a group under suspicion runs alone, on a worker with nothing else in hand
                if w.inflight:
                    continue
                group = self._take_suspects(rt)
                if group and not self._send(rt, w, [group], suspect=True) and rt.waiting:
                    self._schedule(rt)  # it failed here: no answer will come back to dispatch the rest
                continue
            batches: list[list[Entry]] = []
            while rt.waiting > rt.suspect_count():
                held = len(w.inflight) + len(batches)
                queued = rt.rows
                if held >= rt.max_inflight or (held and queued < size):
                    break
                if not held and queued < size:
                    now = time.monotonic()
                    due = rt.dispatch_at(now)
                    if now < due:
                        self._wake_at(rt, due)
                        break
                if not held and rt.adaptive is not None:
                    rt.adaptive.dispatched(queued)
                batch = self._take(rt, size)
                if batch:
                    batches.append(batch)
            if batches and self._send(rt, w, batches) < len(batches) and rt.waiting:
                # a batch failed here, before reaching the worker: no answer will come back for it to
                # dispatch the tasks queued behind it, so dispatch them now
                self._schedule(rt)
            if not rt.waiting:
                return

    def _wake_at(self, rt: _StepRuntime, due: float) -> None:
        if rt.timer is not None and rt.timer_due <= due:
            return
        if rt.timer is not None:
            rt.timer.cancel()
        assert self.loop is not None
        rt.timer_due = due
        rt.timer = self.loop.call_later(max(0.0, due - time.monotonic()), self._on_batch_timer, rt)

    def _on_batch_timer(self, rt: _StepRuntime) -> None:
        rt.timer = None
        self._dispatch(rt)

    def _take(self, rt: _StepRuntime, size: int) -> list[Entry]:
        """Live tasks of at most ``size`` rows (their weights; one task at least), highest priority first;
        tasks whose caller gave up are dropped."""
        batch: list[Entry] = []
        rows = 0
        now = time.monotonic()
        for queue in reversed(rt.queues):
            while queue and rows < size:
                entry = queue[0]
                if batch and rows + entry.weight > size:
                    return batch  # the next task does not fit: it heads the next batch
                queue.popleft()
                rt.waiting -= 1
                rt.rows -= entry.weight
                self.waiting -= 1
                if entry.done:
                    if rt.metrics:
                        rt.metrics.outcome["expired"].inc()
                    self._forget(entry)
                    continue
                if now >= entry.expires_at:
                    if rt.metrics:
                        rt.metrics.outcome["expired"].inc()
                    entry.fail(TaskTimeoutError())
                    self._forget(entry)
                    continue
                batch.append(entry)
                rows += entry.weight
        return batch

    def _take_suspects(self, rt: _StepRuntime) -> list[Entry]:
        """The next suspect group, less the tasks that are done or expired."""
        group = rt.suspects.popleft()
        rt.waiting -= len(group)
        self.waiting -= len(group)
        live = []
        now = time.monotonic()
        for entry in group:
            if not entry.done and now >= entry.expires_at:
                entry.fail(TaskTimeoutError())
            if entry.done:
                self._forget(entry)
            else:
                live.append(entry)
        return live

    def _forget(self, entry: Entry) -> None:
        """An entry left the queues or a worker done: release it (a local caller forgets its own entry)."""
        if isinstance(entry, LocalEntry):
            entry.release()
        else:
            self.complete(entry)

    def _queued(self) -> int:
        """Tasks waiting: in the steps' queues, or held by a worker behind the batch it is handling."""
        prefetched = sum(
            len(batch)
            for rt in self.steps
            for w in rt.workers
            if w is not None
            for batch in itertools.islice(w.inflight.values(), 1, None)
        )
        return self.purge() + prefetched

    def purge(self) -> int:
        """Drop waiting tasks that are done or expired; returns tasks still waiting."""
        now = time.monotonic()
        for rt in self.steps:
            for queue in rt.queues:
                live = [e for e in queue if not e.done and now < e.expires_at]
                dropped = len(queue) - len(live)
                if dropped:
                    gone = [e for e in queue if e.done or now >= e.expires_at]
                    queue.clear()
                    queue.extend(live)
                    rt.waiting -= dropped
                    rt.rows -= sum(e.weight for e in gone)
                    self.waiting -= dropped
                    for entry in gone:
                        entry.fail(TaskTimeoutError())
                        self._forget(entry)
            if rt.suspects:
                groups = list(rt.suspects)
                rt.suspects.clear()
                for group in groups:
                    live = [e for e in group if not e.done and now < e.expires_at]
                    dropped = len(group) - len(live)
                    rt.waiting -= dropped
                    self.waiting -= dropped
                    for entry in group:
                        if entry not in live:
                            entry.fail(TaskTimeoutError())
                            self._forget(entry)
                    if live:
                        rt.suspects.append(live)
        return self.waiting

    def _send(self, rt: _StepRuntime, w: WorkerProcess, batches: list[list[Entry]], suspect: bool = False) -> int:
        """Send ``batches`` to worker ``w``; returns how many went (a batch none of whose tasks could be
        pickled has failed here)."""
        payload = []
        for batch in batches:
            sent, tasks = self._encode(rt, batch)
            if sent:
                for entry in sent:
                    entry.in_worker = True
                batch_id = next(self._batch_ids)
                w.inflight[batch_id] = sent
                payload.append((batch_id, tasks))
        if payload:
            if suspect:
                w.suspect = True
            assert w.writer is not None
            w.writer.write(pipes.pack(("run", payload)))
            # A lone task on a fast handler: its answer is due in microseconds, sooner than this
            # process would wake up from the event loop's sleep, so wait for it here.
            lone = rt.quick and len(self.inflight) == 1 and w.reader is not None
            if lone and pipes.spin_until_readable(w.from_worker, 2 * pipes.SPIN_S):
                assert w.reader is not None
                w.reader.drain()
        return len(payload)

    def _encode(self, rt: _StepRuntime, batch: list[Entry]) -> tuple[list[Entry], codec.Encoded | list[codec.Encoded]]:
        """The batch's tasks as a worker takes them, and the entries sent: one pickle for them all where
        each is a decoded task (a local caller's) with no shared memory but arenas and no large buffer
        outside them, the common case; else one pickle each. A task that cannot be pickled fails alone."""
        arenas: dict[str, shm.Segment] = {}
        for entry in batch:
            if entry.encoded is not None or not codec.arenas_only(entry.segments):
                break
            arenas.update(entry.segments)
        else:
            bundle = codec.encode_batch([entry.current for entry in batch], arenas)
            if bundle is not None:
                return batch, bundle
        sent: list[Entry] = []
        encoded: list[codec.Encoded] = []
        for entry in batch:
            if entry.encoded is None and not self._encode_one(rt, entry):
                continue
            assert entry.encoded is not None
            encoded.append(entry.encoded)
            sent.append(entry)
        return sent, encoded

    def _encode_one(self, rt: _StepRuntime, entry: Entry) -> bool:
        """Pickle the entry's task on its own; False (and the task failed) when it cannot be pickled."""
        assert entry.current is not None
        try:
            entry.encoded = codec.encode(entry.current, entry.segments, self.prefix + "-p")
        except Exception as exc:  # noqa: BLE001 - an unpicklable task fails alone
            entry.fail(TaskError(rt.name, *describe_exception(exc), TaskError.PICKLING_TASK))
            self._forget(entry)
            return False
        return True

    # ------------------------------------------------------------------ worker events
    def _on_message(self, rt: _StepRuntime, w: WorkerProcess, message: Any) -> None:
        kind = message[0]
        if kind == "done":
            self._on_done(rt, w, message[1], message[2], message[3], message[4])
        elif kind == "resend":
            self._on_resend(rt, w, message[1])
        elif kind == "ready":
            w.ready = True
            log.info("step %r: worker %d is ready", rt.name, w.pid)
            self._schedule(rt)
        elif kind == "start_failed":
            log.error("step %r: worker %d on_start raised %s: %s\n%s", rt.name, w.pid, *message[1:])

    def _on_done(
        self,
        rt: _StepRuntime,
        w: WorkerProcess,
        batch_id: int,
        outcomes: list[Any],
        seconds: float,
        bundle: codec.Encoded | None,
    ) -> None:
        batch = w.inflight.pop(batch_id, None)
        if batch is None:
            return
        w.batches_done += 1
        if not w.inflight:
            w.suspect = False
        handled = rows = ok = 0
        metrics = rt.metrics
        worker_prefix = self._worker_prefix
        bundled: Iterator[BaseTask] | None = None
        if bundle is not None:
            segments: dict[str, shm.Segment] = {}
            if bundle[1]:  # it refers to the arenas its batch came with
                for entry in batch:
                    segments.update(entry.segments)
            try:
                bundled = iter(codec.decode_batch(bundle, segments))
            except Exception as exc:  # noqa: BLE001 - the batch's answers fail, the flow goes on
                info = (*describe_exception(exc), TaskError.UNPICKLING_RESULT)
                outcomes = [(ERROR, info) if status == OK else (status, payload) for status, payload in outcomes]
        for entry, (status, payload) in zip(batch, outcomes, strict=True):
            entry.in_worker = False
            if status != EXPIRED:
                handled += 1
                rows += entry.weight
            answer: BaseTask | None = None
            if status == OK and payload is None:
                assert bundled is not None
                answer = next(bundled)  # in order, whether or not its caller still waits
            elif status == OK:
                refs = payload[1]
                if refs:
                    blocks = codec.output_blocks(refs)
                    if blocks:
                        entry.worker_blocks = blocks if entry.worker_blocks is None else entry.worker_blocks | blocks
                    made = {r[0] for r in refs if r[0].startswith(worker_prefix) and not r[0].endswith(ARENA_SUFFIX)}
                    if made:
                        entry.worker_refs = made if entry.worker_refs is None else entry.worker_refs | made
            if entry.done:
                self._forget(entry)
                continue
            if status == OK:
                entry.current = answer
                entry.encoded = payload
                ok += 1
                self.route(entry, rt.index + 1)
            elif status == ERROR:
                if metrics:
                    metrics.outcome["error"].inc()
                entry.fail(TaskError(rt.name, *payload))
            else:
                if metrics:
                    metrics.outcome["expired"].inc()
                entry.fail(TaskTimeoutError())
            if entry.done:
                self._forget(entry)
        rt.quick = seconds < pipes.SPIN_S
        if handled:
            if metrics:
                metrics.batch(handled, rows, seconds)
                if ok:
                    metrics.outcome["ok"].inc(ok)
            if rt.adaptive is not None:
                rt.adaptive.handled(rows, seconds)
        self._schedule(rt)

    def _on_resend(self, rt: _StepRuntime, w: WorkerProcess, batch_id: int) -> None:
        """The worker could not decode a batch sent as one pickle: queue its tasks again, each pickled
        on its own, so that the task at fault fails alone and the others run."""
        batch = w.inflight.pop(batch_id, None)
        if batch is None:
            return
        for entry in reversed(batch):
            entry.in_worker = False
            if entry.done:
                self._forget(entry)
            elif self._encode_one(rt, entry):
                self._requeue(rt, entry)
        self._schedule(rt)

    def _requeue(self, rt: _StepRuntime, entry: Entry) -> None:
        """Put a task back at the head of its step's queue."""
        rt.queues[entry.priority].appendleft(entry)
        rt.waiting += 1
        rt.rows += entry.weight
        self.waiting += 1

    def _on_exit(self, rt: _StepRuntime, w: WorkerProcess) -> None:
        """A worker process ended: bisect (or fail) the batch it was handling, queue again the batches
        it had not started, clean up, and replace it if the flow runs."""
        w.detach()
        batches = list(w.inflight.values())  # in the order the worker takes them
        w.inflight.clear()
        reason = exit_reason(w.process.exitcode)
        for entry in reversed([entry for batch in batches[1:] for entry in batch]):
            entry.in_worker = False
            if entry.done:
                self._forget(entry)
            else:
                self._requeue(rt, entry)
        if batches:
            self._after_crash(rt, w, batches[0], reason)
        # Answers it sent may still be on their way to a front end that has yet to map its output arena:
        # its segments lose their names a little later (their memory stays with whoever mapped them).
        assert self.loop is not None
        self.loop.call_later(DEAD_WORKER_SWEEP_DELAY_S, shm.sweep, f"{self.prefix}-w{w.pid}-")
        if self.running:
            slot = rt.workers.index(w)
            # Back off only for a worker whose death nothing explains yet: it never became ready,
            # or died before answering any batch while not running a group under suspicion.
            # A death under suspicion is explained (bisection goes on at once) and leaves the count alone.
            unexplained = not w.ready or (w.batches_done == 0 and not w.suspect)
            if unexplained:
                rt.crashes[slot] += 1
            elif w.batches_done:
                rt.crashes[slot] = 0
            delay = min(MAX_RESTART_DELAY_S, 0.5 * 2 ** (rt.crashes[slot] - 1)) if unexplained else 0.0
            cause = "start" if not w.ready else ("killed" if (w.process.exitcode or 0) < 0 else "exited")
            rt.restart_reasons[cause] = rt.restart_reasons.get(cause, 0) + 1
            log.error("step %r: worker %d %s; restarting it in %.1f s", rt.name, w.pid, reason, delay)
            assert self.loop is not None
            self.loop.call_later(delay, self._restart, rt, slot, cause)
            self._schedule(rt)
        elif self.on_all_exited is not None and all(x.exited for x in self.all_workers()):
            self.on_all_exited()

    def _after_crash(self, rt: _StepRuntime, w: WorkerProcess, batch: list[Entry], reason: str) -> None:
        """The worker died handling ``batch``: run it again as groups of their own (halves; a lone task
        once more, alone), so that a task that kills its worker is found and fails alone while the others,
        and a task whose worker was killed from outside, are answered. With ``bisect=False`` it fails."""
        live = []
        for entry in batch:
            entry.in_worker = False
            if entry.done:
                self._forget(entry)
            else:
                live.append(entry)
        if rt.step.bisect and live and (len(live) > 1 or not w.suspect):
            middle = len(live) // 2
            for group in (live[middle:], live[:middle]) if middle else (live,):
                rt.suspects.appendleft(group)
            rt.waiting += len(live)
            self.waiting += len(live)
            if rt.metrics:
                rt.metrics.rerun.inc(len(live))
            return
        for entry in live:
            if rt.metrics:
                rt.metrics.outcome["lost"].inc()
                if w.suspect:
                    rt.metrics.isolated.inc()
            entry.fail(WorkerDiedError(f"step {rt.name!r}: worker {w.pid} {reason} holding the task"))
            self._forget(entry)

    def _restart(self, rt: _StepRuntime, slot: int, cause: str) -> None:
        if not self.running:
            return
        try:
            w = self._spawn(rt, slot)
        except Exception:  # noqa: BLE001 - e.g. out of memory to fork: try again later
            log.exception("step %r: could not start a worker", rt.name)
            assert self.loop is not None
            self.loop.call_later(MAX_RESTART_DELAY_S, self._restart, rt, slot, cause)
            return
        rt.restarts += 1
        if rt.metrics:
            rt.metrics.restarts[cause].inc()
        self._attach(rt, w)

    # ------------------------------------------------------------------ stop
    def clear(self) -> None:
        """Cancel timers, empty the queues and release what the tasks in flight still hold."""
        self.running = False
        self.deadlines.clear()
        for rt in self.steps:
            if rt.timer is not None:
                rt.timer.cancel()
            for queue in rt.queues:
                queue.clear()
            rt.suspects.clear()
        for entry in list(self.inflight):
            entry.in_worker = False
            entry.release()


def exit_reason(code: int | None) -> str:
    """Why a worker process ended, in words."""
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def spawner(ctx: Any, prefix: str, threads: int) -> Callable[[FlowStep, str, int], WorkerProcess]:
    """A function starting worker ``slot`` of a step with the flow's context, shared-memory prefix and threads."""

    def start(step: FlowStep, step_name: str, slot: int) -> WorkerProcess:
        env = worker_environment(slot, step.gpu_per_worker)
        return spawn(ctx, step.handler, step_name, step.bisect, prefix, slot, threads, env)

    return start
