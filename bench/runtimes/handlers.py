"""The hand-written handler the ``xgboost`` runtime is held to: what a user wrote before the runtimes."""

from __future__ import annotations

import os

import numpy as np

from aqueduct import BaseTaskHandler


class XGBoostHandler(BaseTaskHandler):
    """Joins its tasks' ``input`` rows (FP32 [N, features]), one ``inplace_predict``, ``predict`` back by rows.

    ``threads``: the booster's ``nthread`` (default: ``OMP_NUM_THREADS``, the worker's share the engine sets).
    """

    def __init__(self, model: str, threads: int = 0) -> None:
        self.model = model
        self.threads = threads
        self.booster = None

    def on_start(self) -> None:
        import xgboost

        self.booster = xgboost.Booster(model_file=self.model)
        self.booster.set_param({"nthread": self.threads or int(os.environ.get("OMP_NUM_THREADS", "1"))})

    def handle(self, *tasks) -> None:  # type: ignore[no-untyped-def]
        rows = [task.inputs["input"] for task in tasks]
        predictions = np.asarray(self.booster.inplace_predict(np.concatenate(rows)), np.float32)  # type: ignore[attr-defined]
        start = 0
        for task, part in zip(tasks, rows, strict=True):
            task.outputs["predict"] = predictions[start : start + len(part)]
            start += len(part)
