"""Handlers and tasks shared by the engine tests (module level: workers unpickle tasks by reference)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from aqueduct import BaseTask, BaseTaskHandler


class Task(BaseTask):
    def __init__(self, value: object = None, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.value = value
        self.result: object = None
        self.batch: int = 0
        self.pid: int = 0
        self.trail: list[str] = []


class Recorder(BaseTaskHandler):
    """Records, on each task, the batch size it was handled in and the worker's pid; appends to a log file."""

    def __init__(self, log: Path | None = None, sleep: float = 0.0, tag: str = "") -> None:
        self.log = log
        self.sleep = sleep
        self.tag = tag

    def handle(self, *tasks: Task) -> None:
        if self.sleep:
            time.sleep(self.sleep)
        for task in tasks:
            task.batch = len(tasks)
            task.pid = os.getpid()
            task.result = task.value
            task.trail = [*task.trail, self.tag]
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(" ".join(str(t.value) for t in tasks) + "\n")


class Poisoned(Recorder):
    """Raises ValueError for any batch holding a task whose value is 'poison'."""

    def handle(self, *tasks: Task) -> None:
        if any(t.value == "poison" for t in tasks):
            raise ValueError("poisoned input")
        super().handle(*tasks)


class Doubler(BaseTaskHandler):
    """Doubles array values; leaves other tasks alone."""

    def handle(self, *tasks: Task) -> None:
        for task in tasks:
            if isinstance(task.value, np.ndarray):
                task.result = task.value * 2


class InPlace(BaseTaskHandler):
    """Adds 1 to each task's ``value`` in place; records the batch size on it."""

    def handle(self, *tasks: Task) -> None:
        for task in tasks:
            task.value += 1
            task.batch = len(tasks)


class InPlaceDiesOnNegative(InPlace):
    """``InPlace``, but kills its own process on a task whose ``value`` (an array) starts below 0."""

    def handle(self, *tasks: Task) -> None:
        if any(t.value[0] < 0 for t in tasks):
            os._exit(139)
        super().handle(*tasks)


class InPlaceThenDiesOnNegative(InPlace):
    """``InPlace``, then kills its own process when a task's ``value`` (an array) started below 0."""

    def handle(self, *tasks: Task) -> None:
        super().handle(*tasks)
        if any(t.value[0] < 1 for t in tasks):
            os._exit(139)


class SlowInPlace(InPlace):
    """``InPlace`` after sleeping ``sleep`` seconds; kills its own process instead on a value starting below 0."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def handle(self, *tasks: Task) -> None:
        time.sleep(self.sleep)
        if any(t.value[0] < 0 for t in tasks):
            os._exit(139)
        super().handle(*tasks)


class FailingStart(BaseTaskHandler):
    def on_start(self) -> None:
        raise RuntimeError("model file missing")

    def handle(self, *tasks: BaseTask) -> None:
        pass


class SlowStart(BaseTaskHandler):
    def on_start(self) -> None:
        time.sleep(30)

    def handle(self, *tasks: BaseTask) -> None:
        pass


class DiesOnValue(Recorder):
    """Kills its own process on the value 'die' (a segfault, as far as the parent can tell)."""

    def handle(self, *tasks: Task) -> None:
        if any(t.value == "die" for t in tasks):
            time.sleep(self.sleep)
            os._exit(139)
        super().handle(*tasks)


def is_even(task: Task) -> bool:
    return isinstance(task.value, int) and task.value % 2 == 0


class ThreadReporter(BaseTaskHandler):
    """Reports, as seen in its worker after start, the OMP_NUM_THREADS variable and the BLAS threads."""

    def on_start(self) -> None:
        from threadpoolctl import threadpool_info

        blas = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
        self.seen = (os.environ.get("OMP_NUM_THREADS"), blas, len(os.listdir("/proc/self/task")))

    def handle(self, *tasks: Task) -> None:
        for task in tasks:
            task.result = self.seen


class MakesLargeOutput(BaseTaskHandler):
    """Sets ``result`` to a 1 MiB array filled with the task's ``value`` (an int)."""

    def handle(self, *tasks: Task) -> None:
        for task in tasks:
            task.result = np.full(1 << 18, task.value, dtype=np.int32)


class DeviceReporter(BaseTaskHandler):
    """Reports what its worker saw in ``on_start``: its index and ``CUDA_VISIBLE_DEVICES``."""

    def on_start(self) -> None:
        self.seen = (self.worker_index, os.environ.get("AQUEDUCT_WORKER_INDEX"), os.environ.get("CUDA_VISIBLE_DEVICES"))

    def handle(self, *tasks: Task) -> None:
        time.sleep(0.05)  # long enough for the batches to spread over the workers
        for task in tasks:
            task.result = self.seen


class StartChangesWithMarker(Recorder):
    """Starts at once until the file ``marker`` exists; from then on, its ``on_start`` kills the process
    (``die``: a broken model, CUDA out of memory at start) or takes a second."""

    def __init__(self, marker: Path, die: bool) -> None:
        super().__init__()
        self.marker = marker
        self.die = die

    def on_start(self) -> None:
        if self.marker.exists():
            if self.die:
                os._exit(3)
            time.sleep(1.0)


class BornHere:
    """Unpickles only in the process that made it: stands for a value another process cannot rebuild."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return _rebuild_born_here, (self.pid,)


def _rebuild_born_here(pid: int) -> BornHere:
    if os.getpid() != pid:
        raise ValueError(f"made in process {pid}, cannot be rebuilt in {os.getpid()}")
    return BornHere(pid)


class SetsBornHere(Recorder):
    """Sets, on tasks whose value is 'stuck', a field the parent cannot unpickle."""

    def handle(self, *tasks: Task) -> None:
        super().handle(*tasks)
        for task in tasks:
            if task.value == "stuck":
                task.result = BornHere()


class SetsUnpicklable(Recorder):
    """Sets, on tasks whose value is 'lock', a field that cannot be pickled (a lock)."""

    def handle(self, *tasks: Task) -> None:
        super().handle(*tasks)
        for task in tasks:
            if task.value == "lock":
                task.result = threading.Lock()
