"""The worker process: ``on_start``, then take batches from the parent, handle them, reply.

Messages from the parent: ``("run", [(batch_id, tasks), ...])``, where ``tasks`` is a list of
encoded tasks or, for a batch of a local caller's tasks, one pickle of them all with its references
to the caller's arena (``codec.encode_batch``: a tuple ``(pickle, refs)``), and ``("stop",)``
before the parent closes the pipe; an end of the pipe without it means the parent died, and the
worker removes the flow's shared memory.

Messages to the parent: ``("ready",)`` or ``("start_failed", type, message, traceback)`` once, then
per batch ``("done", batch_id, outcomes, handle_seconds, bundle)``, where each outcome is
``(OK, encoded task)``, ``(ERROR, (type, message, traceback[, stage]))`` (``TaskError``'s
arguments) or ``(EXPIRED, None)``. A batch that came as one pickle is answered with one too where
it can be: ``bundle`` then pickles the tasks whose outcome is ``(OK, None)``, in order (large arrays
only by reference to the segments the batch came with); else it is None. A batch pickle that cannot
be decoded is answered ``("resend", batch_id)``: the parent sends its tasks again, one pickle each,
so that the one at fault fails alone.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..exceptions import TaskError
from ..handler import BaseTaskHandler
from ..task import BaseTask
from . import codec, pipes, shm
from .arena import OutputArena
from .threads import limit_math_threads

OK, ERROR, EXPIRED = 0, 1, 2
#: Size of each worker's arena for outputs of 64 KiB or more (its pages are taken as they are written).
OUTPUT_ARENA_BYTES = 32 * 1024 * 1024
_PR_SET_PDEATHSIG = 1
#: How long a worker waits to see whether its parent died (its input ended unannounced, or the thread
#: that started it ended).
ORPHAN_WAIT_S = 1.0
#: What the kernel sends a worker when the thread that started it ends (``PR_SET_PDEATHSIG``).
PARENT_DIED_SIGNAL = signal.SIGUSR2


def describe_exception(exc: BaseException) -> tuple[str, str, str]:
    """``(type name, message, traceback text)`` of an exception, as ``TaskError`` carries them."""
    name = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__"):
        name = f"{module}.{name}"
    return name, str(exc), "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _die_with_parent(flow_prefix: str) -> Callable[[float], bool]:
    """Leave, removing the flow's shared memory, when the parent process dies.

    The kernel sends ``PARENT_DIED_SIGNAL`` when the thread that started this worker ends. That may be
    before the rest of the parent's process has ended, or for a thread of a parent that lives on, so
    the worker waits for the kernel to hand it to a new parent and leaves only then. SIGTERM (the
    parent stopping its workers, or anyone else) makes it leave at once.

    Returns that wait-and-sweep (True: the parent died and the memory was removed), for a worker whose
    input ended without a stop message: the end of the pipe may reach it before the signal does.
    """
    parent = os.getppid()

    def sweep_if_orphaned(wait: float = 0.0) -> bool:
        deadline = time.monotonic() + wait
        while os.getppid() == parent:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        shm.sweep(flow_prefix + "-")
        return True

    def on_parent_died(signum: int, frame: Any) -> None:
        if sweep_if_orphaned(ORPHAN_WAIT_S):
            os._exit(0)

    def on_sigterm(signum: int, frame: Any) -> None:
        sweep_if_orphaned()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(PARENT_DIED_SIGNAL, on_parent_died)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, PARENT_DIED_SIGNAL)
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent:
        on_sigterm(signal.SIGTERM, None)
    return sweep_if_orphaned


class _Worker:
    def __init__(
        self, handler: BaseTaskHandler, step_name: str, bisect: bool, in_fd: int, out_fd: int, flow_prefix: str
    ) -> None:
        self.handler = handler
        self.step_name = step_name
        self.bisect = bisect
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.prefix = f"{flow_prefix}-w{os.getpid()}"
        self.outputs: OutputArena | None = None  # made at the first answer; its pages are taken as written

    def send(self, message: Any) -> None:
        pipes.write_blocking(self.out_fd, pipes.pack(message))

    def run(self) -> bool:
        """Serve batches until told to stop (True) or until the input ends without that (False: the
        parent died, or is about to; a parent that stops its workers says so first)."""
        try:
            self.handler.on_start()
        except BaseException as exc:  # noqa: BLE001 - reported to start(), which raises FlowStartError
            self.send(("start_failed", *describe_exception(exc)))
            return True
        self.send(("ready",))
        while True:
            pipes.spin_until_readable(self.in_fd)
            message = pipes.read_blocking(self.in_fd)
            if message is None:
                return False
            if message[0] == "stop":
                return True
            for batch_id, tasks in message[1]:
                self.run_batch(batch_id, tasks)

    def run_batch(self, batch_id: int, tasks: list[codec.Encoded] | codec.Encoded) -> None:
        segments: dict[str, shm.Segment] = {}
        bundled = isinstance(tasks, tuple)
        if isinstance(tasks, tuple):
            try:
                decoded = codec.decode_batch(tasks, segments)
            except Exception:  # noqa: BLE001 - the parent sends them one by one: the one at fault fails alone
                self.send(("resend", batch_id))
                return
            outcomes: list[tuple[int, Any]] = [(EXPIRED, None)] * len(decoded)
            live = [(i, task) for i, task in enumerate(decoded) if not task.is_expired()]
        else:
            outcomes = [(EXPIRED, None)] * len(tasks)
            live = []
            for i, (data, refs) in enumerate(tasks):
                try:
                    task = codec.decode(data, refs, segments)
                except Exception as exc:  # noqa: BLE001 - one undecodable task fails alone
                    outcomes[i] = (ERROR, (*describe_exception(exc), TaskError.UNPICKLING_TASK))
                    continue
                if not task.is_expired():
                    live.append((i, task))
        started = time.perf_counter()
        if live:
            self.handle(live, outcomes)
        elapsed = time.perf_counter() - started
        sent: list[codec.BufferRef] = tasks[1] if isinstance(tasks, tuple) else [r for _, rs in tasks for r in rs]
        _check_clean(segments, sent)
        done = [(i, task) for i, task in live if outcomes[i][0] == OK]
        bundle = codec.encode_batch([task for _, task in done], segments) if bundled and done else None
        if bundle is None:
            expires_at = max((task.expiration_time or math.inf for _, task in live), default=math.inf)
            for i, task in done:
                try:
                    outcomes[i] = (OK, codec.encode(task, segments, self.prefix, self.output_arena(), expires_at))
                except Exception as exc:  # noqa: BLE001 - e.g. the handler set an unpicklable field
                    outcomes[i] = (ERROR, (*describe_exception(exc), TaskError.PICKLING_RESULT))
        self.send(("done", batch_id, outcomes, elapsed, bundle))
        # the batch's blocks may be handed to other tasks now: our writes into them must not show there
        for name, _, offset, nbytes in sent:
            seg = segments.get(name)
            if seg is not None and seg.pristine is not None and not seg.clean:
                seg.forget_writes(offset, nbytes)

    def output_arena(self) -> OutputArena | None:
        """This worker's arena for large outputs (None where /dev/shm has no room for one)."""
        if self.outputs is None and OUTPUT_ARENA_BYTES:
            try:
                self.outputs = OutputArena(self.prefix, OUTPUT_ARENA_BYTES)
            except OSError:
                return None
        return self.outputs

    def handle(self, live: list[tuple[int, BaseTask]], outcomes: list[tuple[int, Any]]) -> None:
        try:
            self.handler.handle(*(task for _, task in live))
        except Exception as exc:  # noqa: BLE001 - isolated below, reported per task
            if self.bisect and len(live) > 1:
                middle = len(live) // 2
                self.handle(live[:middle], outcomes)
                self.handle(live[middle:], outcomes)
                return
            info = describe_exception(exc)
            for i, _ in live:
                outcomes[i] = (ERROR, info)
            return
        for i, _ in live:
            outcomes[i] = (OK, None)


def _check_clean(segments: dict[str, shm.Segment], refs: list[codec.BufferRef]) -> None:
    """Ask once per private segment whether the handler wrote anywhere in the span of the batch's blocks
    (the common batch changed nothing: its arrays then go back by reference without a compare each)."""
    spans: dict[str, tuple[int, int]] = {}
    for name, _, offset, nbytes in refs:
        low, high = spans.get(name, (offset, offset + nbytes))
        spans[name] = (min(low, offset), max(high, offset + nbytes))
    for name, (low, high) in spans.items():
        seg = segments.get(name)
        if seg is not None:
            seg.check_clean(low, high)


def worker_main(
    handler: BaseTaskHandler,
    step_name: str,
    bisect: bool,
    in_conn: Connection,
    out_conn: Connection,
    flow_prefix: str,
    close_fds: list[int],
    threads: int,
    env: dict[str, str],
    slot: int,
) -> None:
    """Entry point of a worker process; ``close_fds`` are the parent's pipe ends a forked child inherited,
    ``threads`` the math-library threads it may use, ``env`` variables to set first, ``slot`` its index."""
    os.environ.update(env)
    handler.worker_index = slot
    in_fd, out_fd = in_conn.fileno(), out_conn.fileno()
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    sweep_if_orphaned = _die_with_parent(flow_prefix)
    shm.map_arenas_privately()
    limit_math_threads(threads)
    os.set_blocking(in_fd, True)
    os.set_blocking(out_fd, True)
    try:
        stopped = _Worker(handler, step_name, bisect, in_fd, out_fd, flow_prefix).run()
    except (BrokenPipeError, OSError):  # the parent is gone
        stopped = False
    if not stopped:
        sweep_if_orphaned(ORPHAN_WAIT_S)
    sys.stdout.flush()
    sys.stderr.flush()
