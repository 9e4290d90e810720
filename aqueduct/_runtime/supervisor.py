"""Starting, watching and stopping worker processes (the parent's side of each worker)."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any

from ..exceptions import FlowStartError, FlowStartTimeout
from ..handler import BaseTaskHandler
from . import pipes
from .worker import worker_main

#: Parent-side pipe ends of every worker of every flow in this process: a forked worker closes them.
_PARENT_FDS: set[int] = set()


class WorkerProcess:
    """One worker process and the parent's ends of its two pipes."""

    def __init__(self, process: Any, to_worker: int, from_worker: int) -> None:
        self.process = process
        self.pid: int = process.pid
        self.to_worker = to_worker
        self.from_worker = from_worker
        self.started_at = time.monotonic()
        self.ready = False
        #: Batches the worker answered: one that did work and then died is replaced at once.
        self.batches_done = 0
        #: The batch in hand is a group being bisected after a crash (its death is explained).
        self.suspect = False
        self.reader: pipes.LoopReader | None = None
        self.writer: pipes.LoopWriter | None = None
        self.inflight: dict[int, Any] = {}
        self.exited = False
        self._input_closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def sentinel(self) -> int:
        return int(self.process.sentinel)

    def wait_ready(self, deadline: float | None, step_name: str) -> None:
        """Block until the worker reports that ``on_start`` finished; raise ``FlowStartError`` if it failed."""
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self.from_worker, self.sentinel], [], [], remaining)
            if self.from_worker in readable:
                message = pipes.read_blocking(self.from_worker)
                if message is not None:
                    self._check_start(message, step_name)
                    return
            if readable:
                self.process.join(1.0)
                raise FlowStartError(
                    f"step {step_name!r}: worker {self.pid} exited with code {self.process.exitcode} while starting"
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise FlowStartTimeout(f"step {step_name!r}: worker {self.pid} did not finish on_start in time")

    def _check_start(self, message: Any, step_name: str) -> None:
        if message[0] == "ready":
            self.ready = True
            return
        _, exc_type, exc_message, tb = message
        raise FlowStartError(f"step {step_name!r}: on_start raised {exc_type}: {exc_message}\n{tb}")

    def attach(
        self, loop: asyncio.AbstractEventLoop, on_message: Callable[[Any], None], on_exit: Callable[[], None]
    ) -> None:
        """Read and write the worker's pipes from ``loop``; ``on_exit`` runs when the process ends."""
        self._loop = loop
        self.writer = pipes.LoopWriter(loop, self.to_worker)
        self.reader = pipes.LoopReader(loop, self.from_worker, on_message)
        loop.add_reader(self.sentinel, on_exit)

    def detach(self) -> None:
        """Read what the worker wrote before it ended, then close everything (after it exited)."""
        if self._loop is not None:
            self._loop.remove_reader(self.sentinel)
        if self.reader is not None:
            self.reader.drain()
            self.reader.close()
        else:
            _close(self.from_worker)
        self.close_input()
        _PARENT_FDS.discard(self.from_worker)
        self.process.join(0.5)
        self.exited = True

    def close_input(self) -> None:
        """Ask the worker to exit once its current batches are done (end-of-file on its input); idempotent."""
        if self._input_closed:
            return  # closing the number again could close an fd reused since
        self._input_closed = True
        _PARENT_FDS.discard(self.to_worker)
        if self.writer is not None:
            self.writer.write(pipes.pack(("stop",)))  # unannounced, the end of input means this process died
            self.writer.close()
        else:
            _close(self.to_worker)

    def signal(self, signum: int) -> None:
        """Send a signal if the process is still there."""
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def is_alive(self) -> bool:
        return bool(self.process.is_alive())


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def spawn(
    ctx: BaseContext,
    handler: BaseTaskHandler,
    step_name: str,
    bisect: bool,
    flow_prefix: str,
    slot: int,
    threads: int,
    env: dict[str, str],
) -> WorkerProcess:
    """Start one worker process for a step; its math libraries get ``threads`` threads (see ``threads.py``),
    and ``env`` is set in it before anything else."""
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    _PARENT_FDS.update((to_w, from_r))
    child_in = Connection(to_r, writable=False)
    child_out = Connection(from_w, readable=False)
    inherited = sorted(_PARENT_FDS) if ctx.get_start_method() == "fork" else []
    process = ctx.Process(  # type: ignore[attr-defined]
        target=worker_main,
        args=(handler, step_name, bisect, child_in, child_out, flow_prefix, inherited, threads, env, slot),
        name=f"aqueduct-{step_name}-{slot}",
        daemon=True,
    )
    try:
        process.start()
    except BaseException:
        for fd in (to_w, from_r):
            _PARENT_FDS.discard(fd)
            _close(fd)
        raise
    finally:
        child_in.close()
        child_out.close()
    return WorkerProcess(process, to_w, from_r)


def kill_all(workers: list[WorkerProcess], grace: float) -> None:
    """SIGTERM the workers still running, wait up to ``grace`` seconds, then SIGKILL."""
    alive = [w for w in workers if w.is_alive()]
    for w in alive:
        w.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for w in alive:
        w.process.join(max(0.0, deadline - time.monotonic()))
        if w.is_alive():
            w.signal(signal.SIGKILL)
            w.process.join(1.0)
