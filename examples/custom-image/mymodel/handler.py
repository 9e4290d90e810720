"""Your handler: a linear classifier over 4 features whose weights ship in the package (weights.json).

Served by ``aqueduct-serve`` like any handler; the image built by ``examples/custom-image/Dockerfile``
adds this package and its requirements (scipy) to the project's image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from aqueduct_service import InferenceTask
from scipy.special import softmax

from aqueduct import BaseTaskHandler

WEIGHTS = Path(__file__).with_name("weights.json")


class Classifier(BaseTaskHandler):
    """``probabilities`` (3 classes, FP32) of each request's ``features`` (4, FP32), a whole batch in one product."""

    def __init__(self, weights: str = str(WEIGHTS)) -> None:
        self.weights_path = weights

    def on_start(self) -> None:
        """Load the weights (in each worker, before it takes a batch)."""
        model = json.loads(Path(self.weights_path).read_text())
        self.weights = np.asarray(model["weights"], dtype=np.float32)
        self.bias = np.asarray(model["bias"], dtype=np.float32)

    def handle(self, *tasks: InferenceTask) -> None:
        features = np.stack([task.inputs["features"] for task in tasks]).astype(np.float32)
        probabilities = softmax(features @ self.weights + self.bias, axis=1).astype(np.float32)
        for task, row in zip(tasks, probabilities, strict=True):
            task.outputs["probabilities"] = row
