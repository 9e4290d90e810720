"""The task one inference request becomes."""

from __future__ import annotations

from typing import Any

import numpy as np

from aqueduct import BaseTask


class InferenceTask(BaseTask):
    """One inference request travelling through the flow.

    A serving handler is an ordinary ``BaseTaskHandler``: its ``handle(*tasks)`` reads each task's
    ``inputs`` and sets ``outputs``, e.g.::

        class Doubler(BaseTaskHandler):
            def handle(self, *tasks: InferenceTask) -> None:
                batch = np.stack([t.inputs["x"] for t in tasks])   # stack as the model likes
                for task, y in zip(tasks, batch * 2):
                    task.outputs["y"] = y

    Attributes:
        inputs: the request's tensors by name (numpy arrays, never ``object`` dtype; ``BYTES`` is ``S`` dtype).
        outputs: tensors the handlers set by name; every one is returned unless the request asked for some only.
        parameters: the request's OIP ``parameters`` object (JSON values).
        request_id: the request's ``X-Request-Id`` (else the OIP ``id``, else one the pod made up), as the
            response and every log line about the request carry it; log it with whatever a handler logs
            about one task.
    """

    def __init__(
        self, inputs: dict[str, np.ndarray], parameters: dict[str, Any] | None = None, request_id: str | None = None
    ) -> None:
        super().__init__()
        self.inputs = inputs
        self.outputs: dict[str, np.ndarray] = {}
        self.parameters = parameters or {}
        self.request_id = request_id
