"""Handlers the service tests serve (imported by the server subprocess as ``tests.service.handlers:...``)."""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np
from aqueduct_service import InferenceTask

from aqueduct import BaseTaskHandler

POISON = -1
CRASH = -2


class EchoHandler(BaseTaskHandler):
    """Echoes ``x`` as ``y`` and reports the batch size as ``batch``.

    Controlled per request through OIP parameters: ``sleep`` (seconds this batch takes, the max over its
    tasks) and ``marker`` (a file to write the worker's pid in when the batch starts). An ``x`` holding
    ``POISON`` makes ``handle`` raise ``ValueError``; one holding ``CRASH`` kills the worker
    (``os.abort()``). ``$TEST_START_SLEEP`` seconds are spent in ``on_start``.
    """

    def on_start(self) -> None:
        time.sleep(float(os.environ.get("TEST_START_SLEEP", "0")))

    def handle(self, *tasks: InferenceTask) -> None:
        for task in tasks:
            marker = task.parameters.get("marker")
            if marker:
                pathlib.Path(marker).write_text(str(os.getpid()))
        time.sleep(max(float(task.parameters.get("sleep", 0)) for task in tasks))
        for task in tasks:
            if (task.inputs["x"] == CRASH).any():
                os.abort()  # as a segfault in a native library would end the worker
            if (task.inputs["x"] == POISON).any():
                raise ValueError(f"poisoned input in task {task.task_id}")
        for task in tasks:
            task.outputs["y"] = task.inputs["x"]
            task.outputs["batch"] = np.array([len(tasks)], dtype=np.int32)


class ScaleHandler(BaseTaskHandler):
    """Answers ``y = x * factor + offset``; both come from the step's ``options``, ``factor`` is required."""

    def __init__(self, factor: float, *, offset: float = 0.0) -> None:
        self.factor = factor
        self.offset = offset

    def handle(self, *tasks: InferenceTask) -> None:
        for task in tasks:
            task.outputs["y"] = task.inputs["x"] * self.factor + self.offset


class DeviceReporter(BaseTaskHandler):
    """Answers ``worker`` (its worker index) and ``gpus`` (its ``CUDA_VISIBLE_DEVICES``, as BYTES)."""

    def handle(self, *tasks: InferenceTask) -> None:
        time.sleep(0.05)  # long enough for requests to spread over the workers
        for task in tasks:
            task.outputs["worker"] = np.array([self.worker_index], dtype=np.int32)
            task.outputs["gpus"] = np.array([os.environ.get("CUDA_VISIBLE_DEVICES", "").encode()])


class InPlaceHandler(BaseTaskHandler):
    """Normalises a tensor in place (``*= 0.5``, a common pre-processing idiom) after sleeping the
    request's ``sleep`` parameter; answers ``sum_seen``, the tensor's sum as the handler found it.

    The tensor is the request's ``x``, or with ``output: y`` an earlier step's output ``y``.
    """

    def __init__(self, output: str | None = None) -> None:
        self.output = output

    def handle(self, *tasks: InferenceTask) -> None:
        time.sleep(max(float(task.parameters.get("sleep", 0)) for task in tasks))
        for task in tasks:
            x = task.outputs[self.output] if self.output else task.inputs["x"]
            task.outputs["sum_seen"] = np.array([x.sum(dtype=np.float64)])
            x *= 0.5
