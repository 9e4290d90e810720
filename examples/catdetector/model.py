"""CatDetector: an emulated batched image classifier, served by aqueduct-serve.

A batch of one takes 10 ms; a batch of n > 1 takes 7 ms per image (so batching pays: ideal
throughput is 142.9 images/s at any n >= 2). Every image is a cat.
"""

from __future__ import annotations

import time

import numpy as np
from aqueduct_service import InferenceTask

from aqueduct import BaseTaskHandler


def inference_seconds(batch_size: int) -> float:
    """How long the emulated model takes for ``batch_size`` images."""
    return 0.01 if batch_size == 1 else 0.01 * batch_size * 0.7


class CatDetectorHandler(BaseTaskHandler):
    """Answers ``is_cat = [True]`` for every request, after the emulated model's delay for the batch."""

    def handle(self, *tasks: InferenceTask) -> None:
        time.sleep(inference_seconds(len(tasks)))
        for task in tasks:
            task.outputs["is_cat"] = np.ones(1, dtype=np.bool_)
