"""The soak's model: ``y = 2 * x``; ``x`` holding -1 makes ``handle`` raise, -2 makes it kill its process.

It doubles ``x`` in place, as pre-processing often changes its input: a request whose shared memory
went to another request while a worker still held it would show as a wrong answer of the other one.
A request's ``sleep`` parameter makes its batch take that long (the soak's timing-out requests).
"""

from __future__ import annotations

import os
import time

import numpy as np

from aqueduct import BaseTaskHandler

RAISE = -1
CRASH = -2


class SoakHandler(BaseTaskHandler):
    """Doubles ``x`` in place; raises ``ValueError`` for a batch holding ``RAISE``; ``os.abort()`` for ``CRASH``."""

    def handle(self, *tasks) -> None:  # type: ignore[no-untyped-def]
        time.sleep(max(float(task.parameters.get("sleep", 0)) for task in tasks))
        for task in tasks:
            x = task.inputs["x"]
            if (x == CRASH).any():
                os.abort()  # SIGABRT: as a segfault in a native library would end the process
            if (x == RAISE).any():
                raise ValueError(f"poisoned input in task {task.task_id}")
        for task in tasks:
            x = task.inputs["x"]
            x *= 2
            task.outputs["y"] = x.astype(np.int64)
