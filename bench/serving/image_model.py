"""The image model's computation, numpy only, so that every server of the benchmarks runs the same code:
our pod (``bench/serving/models.py``), mosec (``mosec_app.py``) and Triton (``pytriton_app.py``), whose
venvs hold numpy but not our packages.

``labels``: a batch of 224x224x3 uint8 images (150,528 bytes each) -> one label each, here whether its
mean brightness is over 127 (a reduction over the stacked batch: the data movement a GPU model's host
side does, without the model).
"""

from __future__ import annotations

import numpy as np

SHAPE = (224, 224, 3)


def labels(images: np.ndarray) -> np.ndarray:
    """One INT64 label per image of a (n, 224, 224, 3) uint8 batch."""
    bright: np.ndarray = images.mean(axis=(1, 2, 3)) > 127
    return bright.astype(np.int64)
