"""The ResNet-50 example as an aqueduct handler (see ``README.md`` here and ``pipeline.yaml``)."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np
from aqueduct_service import InferenceTask

from aqueduct import BaseTaskHandler

MODEL_PATH_ENV = "MODEL_PATH"


class ResNetHandler(BaseTaskHandler):
    """Classifies ``image`` (UINT8 [224, 224, 3]) into the ``topk`` ImageNet ``labels`` (class ids) and ``scores``.

    Options (a step's ``options`` in the config file or the Pipeline):

    - ``weights``: path of a state dict (``torch.save(model.state_dict(), path)``, torchvision's
      ``resnet50`` checkpoints included); unset: the file ``$MODEL_PATH`` names (the operator sets it
      from ``spec.model``); neither: random weights (the same in every worker).
    - ``topk``: how many classes to answer, best first (default 5).
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
        self.resnet: ModuleType | None = None
        self.model: Any = None

    def on_start(self) -> None:
        from examples.resnet import model as resnet  # torch is imported in the worker, never in the parent

        self.resnet = resnet
        self.model = resnet.build_model(self.weights, self.device or resnet.default_device())
        resnet.predict(self.model, np.zeros((1, *resnet.IMAGE_SHAPE), np.uint8), self.topk)  # warm-up

    def handle(self, *tasks: InferenceTask) -> None:
        assert self.resnet is not None, "on_start() loads the model"
        labels, scores = self.resnet.predict(self.model, np.stack([task.inputs["image"] for task in tasks]), self.topk)
        for task, task_labels, task_scores in zip(tasks, labels, scores, strict=True):
            task.outputs["labels"] = task_labels
            task.outputs["scores"] = task_scores
