"""Our pod's handler for the CPU stand-in image model (``bench/serving/image_model.py`` computes it)."""

from __future__ import annotations

import numpy as np

from aqueduct import BaseTaskHandler
from bench.serving.image_model import labels


class ImageHandler(BaseTaskHandler):
    """Our pod's handler: input ``image`` UINT8 [224,224,3], output ``label`` INT64 [1]."""

    def handle(self, *tasks) -> None:  # type: ignore[no-untyped-def]
        batch = np.stack([task.inputs["image"] for task in tasks])
        for task, label in zip(tasks, labels(batch), strict=True):
            task.outputs["label"] = np.array([label], dtype=np.int64)
