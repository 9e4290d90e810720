"""A handler whose outputs break the model's declaration on request (served by ``test_outputs.py``)."""

from __future__ import annotations

import numpy as np
from aqueduct_service import InferenceTask

from aqueduct import BaseTaskHandler


class MisbehavingHandler(BaseTaskHandler):
    """Sets ``y = 2x`` (FP32, rows like ``x``) and ``n`` (the rows, as int32 where INT64 is declared) per task.

    The request's OIP parameter ``mode`` breaks one thing: ``missing`` (``y`` not set), ``fp64``
    (``y`` as float64), ``shape`` (``y`` with a column too many), ``rows`` (``y`` a row short),
    ``extra`` (an undeclared output ``scratch`` set besides). Every task reports the batch's rows in ``batch``.
    """

    def handle(self, *tasks: InferenceTask) -> None:
        rows = sum(len(task.inputs["x"]) for task in tasks)
        for task in tasks:
            x = task.inputs["x"]
            mode = task.parameters.get("mode", "ok")
            y = x * 2
            if mode == "fp64":
                y = y.astype(np.float64)
            elif mode == "shape":
                y = np.concatenate([y, y[:, :1]], axis=1)
            elif mode == "rows":
                y = y[:-1]
            elif mode == "extra":
                task.outputs["scratch"] = np.zeros(3, np.float32)
            if mode != "missing":
                task.outputs["y"] = y
            task.outputs["n"] = np.full((len(x), 1), len(x), dtype=np.int32)
            task.outputs["batch"] = np.full((len(x), 1), rows, dtype=np.int32)
