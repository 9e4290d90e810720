"""The CPU stand-in for an image model, served by our pod and by mosec alike.

``image``: a 224x224x3 uint8 image (150,528 bytes, sent as raw binary) -> its label, here whether
its mean brightness is over 127 (``np.stack`` + a reduction: the same data movement a GPU model's
host side does, without the model).
"""

from __future__ import annotations

import numpy as np

from aqueduct import BaseTaskHandler

SHAPE = (224, 224, 3)


def labels(images: np.ndarray) -> np.ndarray:
    """One label per image of a (n, 224, 224, 3) uint8 batch."""
    return (images.mean(axis=(1, 2, 3)) > 127).astype(np.int64)


class ImageHandler(BaseTaskHandler):
    """Our pod's handler: input ``image`` UINT8 [224,224,3], output ``label`` INT64 [1]."""

    def handle(self, *tasks) -> None:  # type: ignore[no-untyped-def]
        batch = np.stack([task.inputs["image"] for task in tasks])
        for task, label in zip(tasks, labels(batch), strict=True):
            task.outputs["label"] = np.array([label], dtype=np.int64)
