"""A model that does nothing: echoes input ``x`` as output ``y`` (for benchmarking the serving overhead)."""

from __future__ import annotations

from aqueduct_service import InferenceTask

from aqueduct import BaseTaskHandler


class EchoHandler(BaseTaskHandler):
    """Sets ``outputs["y"] = inputs["x"]`` for every task."""

    def handle(self, *tasks: InferenceTask) -> None:
        for task in tasks:
            task.outputs["y"] = task.inputs["x"]
