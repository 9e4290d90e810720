"""The soak's model: ``y = 2 * x``; ``x`` holding -1 makes ``handle`` raise, -2 makes it kill its process."""

from __future__ import annotations

import os

import numpy as np

from aqueduct import BaseTaskHandler

RAISE = -1
CRASH = -2


class SoakHandler(BaseTaskHandler):
    """Doubles ``x``; raises ``ValueError`` for a batch holding ``RAISE``; ``os.abort()`` for ``CRASH``."""

    def handle(self, *tasks) -> None:  # type: ignore[no-untyped-def]
        for task in tasks:
            x = task.inputs["x"]
            if (x == CRASH).any():
                os.abort()  # SIGABRT: as a segfault in a native library would end the process
            if (x == RAISE).any():
                raise ValueError(f"poisoned input in task {task.task_id}")
        for task in tasks:
            task.outputs["y"] = (task.inputs["x"] * 2).astype(np.int64)
