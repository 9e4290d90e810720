"""The ResNet-50 example as an aqueduct handler (see ``README.md`` here and ``pipeline.yaml``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from aqueduct_service import InferenceTask

from aqueduct import BaseTaskHandler

MODEL_PATH_ENV = "MODEL_PATH"


class ResNetHandler(BaseTaskHandler):
    """Classifies ``image`` (UINT8 [224, 224, 3]) into ``class_ids``, ``labels`` and ``scores`` (top ``topk``).

    Options (a step's ``options`` in the config file or the Pipeline):

    - ``weights``: path of a state dict (``torch.save(model.state_dict(), path)``); unset: the file
      ``$MODEL_PATH`` names (the operator sets it from ``spec.model``); neither: random weights.
    - ``topk``: how many classes to answer (default 5).
    - ``device``: ``cuda``, ``cuda:1``, ``cpu``...; unset: ``cuda`` when a GPU is visible.

    The constructor runs in the serving pod's main process and only keeps the options; torch (and
    CUDA, which does not survive a fork) is first touched in ``on_start``, in each worker process.
    """

    def __init__(self, weights: str | None = None, topk: int = 5, device: str | None = None) -> None:
        if not 1 <= topk <= 1000:
            raise ValueError(f"topk must be in [1, 1000], got {topk}")
        self.weights = weights or os.environ.get(MODEL_PATH_ENV) or None
        self.topk = topk
        self.device = device
        self.model: Any = None

    def on_start(self) -> None:
        from examples.resnet import model  # torch is imported in the worker, never in the parent

        self._model = model
        self.model = model.build_model(self.weights, self.device or model.default_device())
        model.predict(self.model, np.zeros((1, *model.IMAGE_SHAPE), np.uint8), self.topk)  # warm-up

    def handle(self, *tasks: InferenceTask) -> None:
        images = np.stack([task.inputs["image"] for task in tasks])
        ids, scores = self._model.predict(self.model, images, self.topk)
        names = self._model.labels(ids)
        for task, task_ids, task_scores, task_names in zip(tasks, ids, scores, names, strict=True):
            task.outputs["class_ids"] = task_ids
            task.outputs["scores"] = task_scores
            task.outputs["labels"] = task_names
