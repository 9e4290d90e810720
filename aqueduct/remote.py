"""A flow shared by several processes: ``FlowGateway`` beside the flow, ``RemoteFlow`` in the others.

The process that runs a ``Flow`` (and its workers) makes one channel per client process with
``FlowGateway.connect()`` and hands the returned ``ClientAddress`` to that process (as an argument
of a ``spawn``-started ``multiprocessing.Process``). There, ``RemoteFlow(address)`` offers the
flow's ``process()``, ``health()`` and its metrics. Every client feeds the same step queues, so a
batch mixes tasks from all clients.

How a task travels: the client pickles it (protocol 5; large buffers by reference to shared
memory: its arena, a ``share_value`` segment, or a segment made for the trip) and sends the bytes
over a Unix socket. The flow's process queues the bytes as they are and forwards them to a worker
without unpickling (unless a ``handle_condition`` must look at the task); the worker's answer goes
back to the client the same way. A client's large inputs are written into shared memory once, by
the client: ``RemoteFlow.lease()`` hands out blocks of its arena, reused from task to task, and
the workers map the arena once.

A client that disconnects (its process died) loses only its own tasks: the gateway drops them,
and removes the shared memory the client and the workers made for them.

Example (the flow's process)::

    gateway = FlowGateway(flow)
    address = gateway.connect()                      # in the flow's event loop
    ctx = multiprocessing.get_context("spawn")
    ctx.Process(target=client_main, args=(address,)).start()
    address.close()                                  # the child has its own copy

and in the client process::

    remote = RemoteFlow(address)
    await remote.connect()
    await remote.process(task, timeout_sec=5)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import generate_latest

from ._runtime import codec, pipes, shm
from ._runtime.arena import Arena, Lease
from ._runtime.scheduler import Entry
from ._runtime.worker import describe_exception
from .exceptions import NotRunningError, QueueFullError, TaskError, TaskTimeoutError
from .flow import Flow, FlowHealth, outcome_of
from .metrics import FlowMetrics
from .task import BaseTask

__all__ = ["ClientAddress", "FlowGateway", "Lease", "RemoteFlow"]


@dataclass
class ClientAddress:
    """The client's end of a channel to a ``FlowGateway``; pass it to the client process."""

    sock: socket.socket
    #: Names of the shared memory the client makes start with this (the gateway sweeps them).
    prefix: str

    def close(self) -> None:
        """Close this process's copy once the client process has its own."""
        self.sock.close()


class _RemoteEntry(Entry):
    """A task from a client process: answered over the client's channel."""

    __slots__ = ("client", "seq", "finished", "metrics")

    def __init__(
        self, client: _Client, seq: int, priority: int, weight: int, expires_at: float, encoded: codec.Encoded
    ) -> None:
        super().__init__(None, encoded, priority, expires_at, weight)
        self.client = client
        self.seq = seq
        self.finished = False
        self.metrics: FlowMetrics | None = None

    @property
    def done(self) -> bool:
        return self.finished or self.client.closed

    def finish(self, step_name: str) -> None:
        if self.done:
            return
        self.finished = self.delivered = True
        self.client.answer(self, True, self.encoded)

    def fail(self, exc: BaseException) -> None:
        if self.done:
            return
        self.finished = True
        self.client.answer(self, False, exc)

    def release(self) -> None:
        # The client releases what it made and what it got back; here only the intermediate results'
        # shared memory, and everything the workers made when the answer never reached the client.
        if self.released or self.in_worker or not self.done:
            return
        self.released = True
        names = set(self.worker_refs or ())
        if self.delivered and self.encoded is not None:
            names.difference_update(ref[0] for ref in self.encoded[1])
        for name in names:
            shm.unlink(name)
        self.free_blocks()


class _Client:
    """The gateway's side of one client's channel."""

    def __init__(self, gateway: FlowGateway, sock: socket.socket, prefix: str) -> None:
        self.gateway = gateway
        self.prefix = prefix
        self.closed = False
        self.entries: dict[int, _RemoteEntry] = {}
        self._outbox: list[Any] = []
        loop = gateway.loop
        fd = sock.detach()
        self._writer = pipes.LoopWriter(loop, os.dup(fd))
        self._reader = pipes.LoopReader(loop, fd, self._on_message, self.close)

    def _on_message(self, message: Any) -> None:
        kind = message[0]
        if kind == "submit":
            self._submit(message[1])
        elif kind == "health":
            self._send(("health", message[1], self.gateway.flow.health()))
        elif kind == "metrics":
            self._send(("metrics", message[1], self.gateway.exposition()))

    def _submit(self, items: list[tuple[int, int, int, float, bytes, list[codec.BufferRef]]]) -> None:
        flow = self.gateway.flow
        for seq, priority, weight, expires_at, data, refs in items:
            try:
                sched = flow.scheduler()
            except NotRunningError as exc:
                self._reply(seq, False, exc)
                continue
            metrics = sched.metrics
            queued = sched.check_capacity()
            if queued is not None:
                if metrics:
                    metrics.flow_outcome["rejected"].inc()
                error = QueueFullError(f"{queued} tasks are waiting, the flow's queue_size is {sched.queue_size}")
                self._reply(seq, False, error)
                continue
            priority = max(0, min(priority, sched.priorities - 1))
            entry = _RemoteEntry(self, seq, priority, weight, expires_at, (data, refs))
            entry.metrics = metrics
            self.entries[seq] = entry
            sched.submit(entry)

    def answer(self, entry: _RemoteEntry, ok: bool, payload: Any) -> None:
        """Send a task's outcome and count it."""
        self.entries.pop(entry.seq, None)
        metrics = entry.metrics
        if metrics:
            if ok:
                metrics.flow_outcome["ok"].inc()
                metrics.latency.observe(time.monotonic() - entry.arrived_at)
            else:
                metrics.flow_outcome[outcome_of(payload)].inc()
        self._reply(entry.seq, ok, payload)

    def _reply(self, seq: int, ok: bool, payload: Any) -> None:
        if not self._outbox:
            self.gateway.loop.call_soon(self._flush)
        self._outbox.append((seq, ok, payload))

    def _send(self, message: Any) -> None:
        self._writer.write(pipes.pack(message))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if outbox and not self.closed:
            self._send(("results", outbox))

    def close(self) -> None:
        """The client is gone: its tasks are dropped where they are, its shared memory removed."""
        if self.closed:
            return
        self.closed = True
        self._reader.close()
        self._writer.close()
        self.entries.clear()  # each is done now: dropped from the queues, or released when its worker answers
        try:
            self.gateway.flow.scheduler().purge()
        except NotRunningError:
            pass
        shm.sweep(self.prefix + "-")
        self.gateway.closed(self)


class FlowGateway:
    """Lets other processes submit tasks to ``flow`` (see the module docstring).

    Args:
        flow: the flow; it may start later: until it runs, tasks are refused with ``NotRunningError``.
        exposition: what ``RemoteFlow.metrics()`` returns (default: the flow's registry, text format).
        on_disconnect: called with a client's address prefix when that client's channel closes.
    """

    def __init__(
        self,
        flow: Flow,
        exposition: Callable[[], bytes] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
    ) -> None:
        self.flow = flow
        self.exposition = exposition or (lambda: generate_latest(flow.metrics_registry))
        self._on_disconnect = on_disconnect
        self._prefix = shm.new_flow_prefix()
        self._counter = itertools.count()
        self._clients: set[_Client] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the gateway serves from (the one ``connect()`` first ran in)."""
        assert self._loop is not None
        return self._loop

    def connect(self) -> ClientAddress:
        """Make a channel for one more client process; call it from the event loop that runs the flow."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        prefix = f"{self._prefix}-c{next(self._counter)}"
        self._clients.add(_Client(self, ours, prefix))
        return ClientAddress(theirs, prefix)

    def closed(self, client: _Client) -> None:
        """A client's channel closed (called by the client's side object)."""
        self._clients.discard(client)
        if self._on_disconnect is not None:
            self._on_disconnect(client.prefix)

    def close(self) -> None:
        """Close every channel; clients see end-of-file."""
        for client in list(self._clients):
            client.close()
        shm.sweep(self._prefix + "-")


class RemoteFlow:
    """The flow behind a ``FlowGateway``, used from another process.

    Args:
        address: the ``ClientAddress`` the gateway's process passed to this one.
        arena_bytes: size of this client's shared-memory arena for ``lease()`` (0: none).
        on_disconnect: called once if the flow's process closes the channel (it stopped or died).
    """

    def __init__(
        self, address: ClientAddress, arena_bytes: int = 0, on_disconnect: Callable[[], None] | None = None
    ) -> None:
        self._address = address
        self._arena_bytes = arena_bytes
        self._on_disconnect = on_disconnect
        self._arena: Arena | None = None
        self._own: dict[str, shm.Segment] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: pipes.LoopReader | None = None
        self._writer: pipes.LoopWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        # Leases of tasks whose caller stopped waiting, held until the flow's answer says no worker has them.
        self._abandoned: dict[int, tuple[Lease, ...]] = {}
        self._outbox: list[Any] = []
        self._seq = itertools.count()
        self.closed = False

    async def connect(self) -> None:
        """Attach the channel to the running event loop and make the arena."""
        loop = self._loop = asyncio.get_running_loop()
        fd = self._address.sock.detach()
        self._writer = pipes.LoopWriter(loop, os.dup(fd))
        self._reader = pipes.LoopReader(loop, fd, self._on_message, self._on_eof)
        if self._arena_bytes:
            self._arena = Arena(self._address.prefix, self._arena_bytes)
            self._own = {self._arena.name: self._arena.segment}

    def lease(self, nbytes: int) -> Lease | None:
        """A block of this client's arena to put a task's data in, or None (no arena, or no room now).

        Arrays over ``lease.buffer`` travel to the workers by reference; ``lease.free()`` once the
        task's answer has been used.
        """
        return self._arena.lease(nbytes) if self._arena is not None else None

    async def process(self, task: BaseTask, timeout_sec: float = 5.0, *, leases: Sequence[Lease] = ()) -> bool:
        """``Flow.process`` across processes: same contract, same errors.

        ``leases``: blocks of this client's arena the task's arrays lie in; each is held until the
        flow's process answers for the task (then no worker has it), also when this call ends first.
        """
        if self.closed or self._loop is None:
            raise NotRunningError("Flow is not running")
        loop = self._loop
        task.set_timeout(timeout_sec)
        segments = task.shared_segments()
        if self._own:
            segments.update(self._own)
        keep = set(segments)
        try:
            data, refs = codec.encode(task, segments, self._address.prefix)
            seq = next(self._seq)
            future: asyncio.Future[Any] = loop.create_future()
            self._pending[seq] = future
            if not self._outbox:
                loop.call_soon(self._flush)
            self._outbox.append((seq, task.priority, task.weight, task.expiration_time, data, refs))
            for lease in leases:
                lease.retain()
            timer = loop.call_later(timeout_sec, _expire, future)
            try:
                ok, payload = await future
            finally:
                timer.cancel()
                self._pending.pop(seq, None)
                if leases:
                    if future.done() and not future.cancelled() and future.result()[0] is not None:
                        _release(leases)  # the flow answered: no worker holds the task
                    else:  # the flow still has it: hold the leases until its answer comes
                        self._abandoned[seq] = tuple(leases)
            if ok is None:
                raise TaskTimeoutError()
            if not ok:
                raise payload
            try:
                result = codec.decode(payload[0], payload[1], segments, final=True)
            except Exception as exc:  # noqa: BLE001
                raise TaskError("flow", *describe_exception(exc), TaskError.UNPICKLING_RESULT) from None
            task.update(result)
            return True
        finally:
            for name, seg in segments.items():
                if name not in keep and not name.endswith(shm.ARENA_SUFFIX):  # arenas outlive their tasks
                    seg.unlink()

    async def health(self) -> FlowHealth:
        """The flow's ``health()``, asked of its process."""
        health: FlowHealth = await self._ask("health")
        return health

    async def metrics(self) -> bytes:
        """The flow's metrics in Prometheus text format (as the gateway's ``exposition`` gives them)."""
        text: bytes = await self._ask("metrics")
        return text

    def close(self) -> None:
        """Close the channel and remove the arena; tasks in flight fail with ``NotRunningError``."""
        if self.closed:
            return
        self.closed = True
        if self._reader is not None:
            self._reader.close()
        if self._writer is not None:
            self._writer.close()
        if self._arena is not None:
            self._arena.unlink()
        for future in self._pending.values():
            if not future.done():
                future.set_result((False, NotRunningError("the flow's process closed the channel")))
        self._pending.clear()
        for leases in self._abandoned.values():  # the arena is gone with the channel
            _release(leases)
        self._abandoned.clear()

    async def _ask(self, kind: str) -> Any:
        if self.closed or self._loop is None or self._writer is None:
            raise NotRunningError("Flow is not running")
        seq = next(self._seq)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[seq] = future
        self._writer.write(pipes.pack((kind, seq)))
        try:
            ok, payload = await future
        finally:
            self._pending.pop(seq, None)
        if not ok:
            raise payload
        return payload

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if outbox and self._writer is not None and not self.closed:
            self._writer.write(pipes.pack(("submit", outbox)))

    def _on_message(self, message: Any) -> None:
        pending = self._pending
        if message[0] == "results":
            for seq, ok, payload in message[1]:
                future = pending.get(seq)
                if future is not None and not future.done():
                    future.set_result((ok, payload))
                    continue
                leases = self._abandoned.pop(seq, None)
                if leases:
                    _release(leases)
                if ok:
                    _unlink_answer(payload, self._address.prefix, self._own)
        else:
            future = pending.get(message[1])
            if future is not None and not future.done():
                future.set_result((True, message[2]))

    def _on_eof(self) -> None:
        self.close()
        if self._on_disconnect is not None:
            self._on_disconnect()


def _expire(future: asyncio.Future[Any]) -> None:
    """The caller's timeout passed before the flow answered: ``ok`` None says so."""
    if not future.done():
        future.set_result((None, None))


def _release(leases: Sequence[Lease]) -> None:
    for lease in leases:
        lease.release()


def _unlink_answer(encoded: codec.Encoded, own_prefix: str, own: dict[str, shm.Segment]) -> None:
    """An answer nobody waits for any more: free the shared memory the workers made for it."""
    codec.free_outputs(codec.output_blocks(encoded[1]))
    for name, *_ in encoded[1]:
        if name not in own and not name.startswith(own_prefix) and not name.endswith(shm.ARENA_SUFFIX):
            shm.unlink(name)
