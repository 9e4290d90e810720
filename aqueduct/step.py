"""``FlowStep``: one step of a flow and its batching settings."""

from __future__ import annotations

import operator

from .handler import BaseTaskHandler, HandleConditionType


class FlowStep:
    """A step: a handler, how many worker processes run it, and how it batches.

    Args:
        handler: the ``BaseTaskHandler`` instance; each worker process gets its own copy.
        handle_condition: called with a task before the step; false means the task skips it.
        nprocs: worker processes running the handler.
        batch_size: most tasks in one ``handle()`` call. A free worker takes what is waiting
            (up to ``batch_size``) without waiting for a batch to fill.
        batch_timeout: seconds a free worker waits for a fuller batch after the first task of a
            batch arrived; 0 never waits.
        on_start_wait: accepted for upstream compatibility; workers report when ``on_start``
            finished, so no wait is needed.
        name: the step's name in metrics and health (default ``step<N>_<HandlerClass>``).
        latency_target: opt-in adaptive batch window, seconds. The step learns the arrival rate
            and what a batch costs, and a free worker waits for a fuller batch only while that
            keeps the oldest task within this target and more tasks are expected; it replaces
            the fixed ``batch_timeout``.
        bisect: when ``handle()`` raises for a batch, or its worker dies handling it, re-run
            halves of it to find the task(s) to blame, so that the others complete. Set False for
            handlers with side effects: then the whole batch fails.
        gpu_per_worker: worker *i* of the step sees only GPU *i mod G* of the G GPUs the flow's
            process sees (``CUDA_VISIBLE_DEVICES`` set before ``on_start``; the framework calls it
            ``cuda:0``). Off by default: every worker sees every GPU. A handler knows its worker's
            index as ``self.worker_index`` (and ``$AQUEDUCT_WORKER_INDEX``) from ``on_start`` on.
    """

    def __init__(
        self,
        handler: BaseTaskHandler,
        handle_condition: HandleConditionType = operator.truth,
        nprocs: int = 1,
        batch_size: int = 1,
        batch_timeout: float = 0,
        on_start_wait: float = 0,
        *,
        name: str | None = None,
        bisect: bool = True,
        latency_target: float | None = None,
        gpu_per_worker: bool = False,
    ) -> None:
        if not isinstance(handler, BaseTaskHandler):
            raise TypeError(f"handler must be a BaseTaskHandler instance, got {type(handler).__name__}")
        if not callable(handle_condition):
            raise TypeError("handle_condition must be callable")
        if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
            raise ValueError(f"nprocs must be an integer >= 1, got {nprocs!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(batch_timeout, (int, float)) or batch_timeout < 0:
            raise ValueError(f"batch_timeout must be a number >= 0, got {batch_timeout!r}")
        if latency_target is not None and (not isinstance(latency_target, (int, float)) or latency_target <= 0):
            raise ValueError(f"latency_target must be None or a number > 0, got {latency_target!r}")
        self.handler = handler
        self.handle_condition = handle_condition
        self.nprocs = nprocs
        self.batch_size = batch_size
        self.batch_timeout = float(batch_timeout)
        self.on_start_wait = on_start_wait
        self.name = name
        self.bisect = bisect
        self.latency_target = latency_target
        self.gpu_per_worker = gpu_per_worker
