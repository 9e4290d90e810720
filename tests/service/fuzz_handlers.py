"""The handler the fuzz test serves (imported by the server subprocess as ``tests.service.fuzz_handlers:...``)."""

from __future__ import annotations

from aqueduct_service import InferenceTask

from aqueduct import BaseTaskHandler


class MirrorHandler(BaseTaskHandler):
    """Answers every input as an output of the same name: any request the pod lets through is answered 200."""

    def handle(self, *tasks: InferenceTask) -> None:
        for task in tasks:
            task.outputs.update(task.inputs)
